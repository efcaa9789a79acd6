"""Model families. `build_model(config)` picks the class for an architecture.

Every model is called as `model(input_ids, positions, caches, batch, logits_indices)`, owns its RoPE,
and declares `model.cache_layout` (what each layer keeps between steps). `caches[i]` is layer i's
(k_cache, v_cache) for attention layers (each [kv_heads, num_blocks, block_size, head_dim]: see
layers/attention.py), or its state tensors (see `state_specs`) for recurrent ones.
"""
from __future__ import annotations

from torch import nn

from reprise.models.config import ModelConfig, cache_layout
from reprise.models.layers.gated_delta import StateSpec
from reprise.models.layers.gated_delta import state_specs as gated_delta_state_specs

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "qwen3_5", "gemma3")


def build_model(config: ModelConfig, compile: bool = False) -> nn.Module:
    """`compile`: decode rows through one compiled graph (layers/compiled.py); the Llama family only,
    the others run eagerly."""
    if config.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {config.architecture!r} "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if config.architecture == "qwen3_5":
        from reprise.models.qwen3_5 import Qwen3_5ForCausalLM
        return Qwen3_5ForCausalLM(config)
    if config.architecture == "gemma3":
        from reprise.models.gemma3 import Gemma3ForCausalLM
        return Gemma3ForCausalLM(config)
    from reprise.models.llama import LlamaForCausalLM
    return LlamaForCausalLM(config, compile)


def state_specs(config: ModelConfig) -> tuple[StateSpec, ...]:
    """The state tensors of each recurrent layer (all of a model's recurrent layers are alike); ()
    when the model has none."""
    return gated_delta_state_specs(config) if cache_layout(config).has_recurrent else ()
