"""ModelConfig: the architecture facts a model needs, read from config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field

from reprise.cache.layout import CacheLayout, LayerKind

# Hugging Face's `layer_types` names
LAYER_KINDS = {"full_attention": LayerKind.FULL, "sliding_attention": LayerKind.SLIDING,
               "linear_attention": LayerKind.RECURRENT}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str                        # "llama" | "qwen2" | "qwen3" | "mistral" | "qwen3_5" | "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None         # HF form, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False             # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False                    # RMSNorm on q and k per head (Qwen3)
    sliding_window: int | None = None        # tokens a sliding layer's query sees, itself included
    layer_types: tuple[str, ...] = ()        # HF names per layer (keys of LAYER_KINDS); () = all alike
    hidden_act: str = "silu"                 # MLP gate activation: "silu" | "gelu_pytorch_tanh"
    partial_rotary_factor: float = 1.0       # share of head_dim that RoPE rotates (Qwen3.5: 0.25)
    rope_local_base_freq: float | None = None    # RoPE base of sliding layers (Gemma 3); None = rope_theta
    query_pre_attn_scalar: float | None = None   # attention scale is its -1/2 power (Gemma 3); None = head_dim
    final_logit_softcapping: float | None = None
    linear_conv_kernel_dim: int = 4          # Gated DeltaNet layers (Qwen3.5)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_value_heads_tiled: bool = False   # value head j * K + g reads key head g (GGUF), not g * V/K + j (HF)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = ""                           # served model name


def cache_layout(config: ModelConfig) -> CacheLayout:
    """Each layer's cache kind. A window at least as long as the model's context never cuts, so such
    "sliding" layers are FULL."""
    window = config.sliding_window
    if window is not None and window >= config.max_position_embeddings:
        window = None
    if config.layer_types:
        kinds = tuple(LAYER_KINDS[name] for name in config.layer_types)
    else:
        kinds = (LayerKind.SLIDING if window is not None else LayerKind.FULL,) * config.num_hidden_layers
    if window is None:
        kinds = tuple(LayerKind.FULL if kind is LayerKind.SLIDING else kind for kind in kinds)
    return CacheLayout(kinds, window if LayerKind.SLIDING in kinds else None)
