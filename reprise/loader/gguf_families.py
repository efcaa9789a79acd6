"""What differs by family in a GGUF file as llama.cpp's converter writes it: tensor names, the config
fields read from `{arch}.*` metadata, and the values the converter changed on the way in.

| family  | GGUF arch | reprise architecture | values changed by the converter                        |
|---------|-----------|----------------------|--------------------------------------------------------|
| Llama   | llama     | llama                | q/k rows interleaved per head (undone in gguf.py)       |
| Gemma 3 | gemma3    | gemma3               | norms stored as 1 + weight                              |
| Qwen3.5 | qwen35    | qwen3_5              | norms (not ssm_norm) 1 + weight; ssm_a = -exp(A_log);  |
|         |           |                      | conv1d squeezed; value heads in tiled order             |

Qwen3.5's value heads: with fewer key heads than value heads, the converter reorders every per-value-head
tensor from grouped (value head g * r + j reads key head g) to tiled (value head j * K + g reads key
head g), so ggml can broadcast. The weights are kept as stored and the model told
(`linear_value_heads_tiled`), so quantized tensors stay whole.
"""
from __future__ import annotations

import torch

GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "qwen35": "qwen3_5"}

TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per layer; llama.cpp names the one before the MLP as llama's second norm
_GEMMA3_LAYER = {**_PER_LAYER, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
# Qwen3.5 calls its second norm post_attention_norm; A_log and dt_bias have no .weight in HF names
_QWEN35_LAYER = {**{k: v for k, v in _PER_LAYER.items() if k != "ffn_norm"},
                 "post_attention_norm": "post_attention_layernorm",
                 "attn_qkv": "linear_attn.in_proj_qkv", "attn_gate": "linear_attn.in_proj_z",
                 "ssm_beta": "linear_attn.in_proj_b", "ssm_alpha": "linear_attn.in_proj_a",
                 "ssm_out": "linear_attn.out_proj", "ssm_norm": "linear_attn.norm", "ssm_conv1d": "linear_attn.conv1d"}
_QWEN35_BARE = {"ssm_a": "linear_attn.A_log", "ssm_dt.bias": "linear_attn.dt_bias"}
LAYER_NAMES = {"gemma3": _GEMMA3_LAYER, "qwen3_5": _QWEN35_LAYER}
# What llama.cpp assumes for Gemma 3 when the file does not say: every 6th layer full, local RoPE base 10000
_GEMMA3_PERIOD, _GEMMA3_LOCAL_BASE, _GEMMA3_27B_LAYERS = 6, 10000.0, 62
_QWEN35_INTERVAL = 4


def layer_name(arch: str, part: str, suffix: str | None) -> str | None:
    """The HF name after `model.layers.N.` of a GGUF layer tensor `blk.N.{part}[.{suffix}]`, or None."""
    if arch == "qwen3_5" and (bare := _QWEN35_BARE.get(part if suffix is None else f"{part}.{suffix}")):
        return bare
    names = LAYER_NAMES.get(arch, _PER_LAYER)
    return f"{names[part]}.{suffix}" if part in names and suffix is not None else None


def family_fields(arch: str, key, hidden_size: int, num_heads: int, head_dim: int) -> dict:
    """ModelConfig fields only some families have; `key(name, default)` reads `{arch}.{name}`."""
    if arch == "gemma3":
        return _gemma3_fields(key, hidden_size, num_heads, head_dim)
    if arch == "qwen3_5":
        return _qwen35_fields(key, head_dim)
    return {}


def _gemma3_fields(key, hidden_size: int, num_heads: int, head_dim: int) -> dict:
    """Gemma 3's sliding-window layout, local RoPE base, attention scale and softcap, as llama.cpp reads
    them: metadata where the converter writes it, llama.cpp's built-in values where it does not (the
    attention scale is 1/sqrt(hidden / heads) for the 62-layer 27B model, 1/sqrt(head_dim) otherwise)."""
    num_layers = key("block_count")
    pattern = key("attention.sliding_window_pattern", _GEMMA3_PERIOD)
    if isinstance(pattern, int):
        pattern = [(i + 1) % pattern != 0 for i in range(num_layers)]
    scalar = hidden_size // num_heads if num_layers == _GEMMA3_27B_LAYERS else head_dim
    scale = key("attention.scale", None)
    return dict(
        sliding_window=key("attention.sliding_window", None), hidden_act="gelu_pytorch_tanh",
        layer_types=tuple("sliding_attention" if sliding else "full_attention" for sliding in pattern),
        rope_local_base_freq=float(key("rope.freq_base_swa", _GEMMA3_LOCAL_BASE)),
        query_pre_attn_scalar=float(scale ** -2 if scale else scalar),
        final_logit_softcapping=key("final_logit_softcapping", None))


def _qwen35_fields(key, head_dim: int) -> dict:
    """Qwen3.5's layer pattern (every `full_attention_interval`-th layer full, as llama.cpp reads it),
    rotary share and Gated DeltaNet sizes, from the `ssm.*` keys the converter writes."""
    interval = key("full_attention_interval", _QWEN35_INTERVAL)
    num_v_heads, num_k_heads = key("ssm.time_step_rank"), key("ssm.group_count")
    return dict(
        layer_types=tuple("full_attention" if (i + 1) % interval == 0 else "linear_attention"
                          for i in range(key("block_count"))),
        partial_rotary_factor=key("rope.dimension_count", head_dim) / head_dim,
        linear_conv_kernel_dim=key("ssm.conv_kernel"), linear_num_key_heads=num_k_heads,
        linear_num_value_heads=num_v_heads, linear_key_head_dim=key("ssm.state_size"),
        linear_value_head_dim=key("ssm.inner_size") // num_v_heads,
        linear_value_heads_tiled=num_k_heads != num_v_heads)


def restore_values(arch: str, gguf_name: str, values: torch.Tensor) -> torch.Tensor:
    """A dequantized tensor as HF holds it, undoing what the converter did to this family's values."""
    if arch in ("gemma3", "qwen3_5") and gguf_name.endswith("norm.weight") and not gguf_name.endswith("ssm_norm.weight"):
        return values - 1       # the converter stores 1 + weight; our norms keep the offset
    if arch == "qwen3_5" and gguf_name.endswith(".ssm_a"):
        return torch.log(-values)
    if arch == "qwen3_5" and gguf_name.endswith(".ssm_conv1d.weight"):
        return values.unsqueeze(1)
    return values
