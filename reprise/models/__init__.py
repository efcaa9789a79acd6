"""Model families. `build_model(config)` picks the class for an architecture."""
from __future__ import annotations

from torch import nn

from reprise.models.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def build_model(config: ModelConfig) -> nn.Module:
    if config.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {config.architecture!r} "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    from reprise.models.llama import LlamaForCausalLM
    return LlamaForCausalLM(config)
