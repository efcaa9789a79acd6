"""Loading Hugging Face weights into a model whose projections are fused.

A weight may come as a float tensor or, for GGUF files loaded with native weights, as a GGMLTensor:
the linear layer (or embedding) it belongs to is then replaced by its quantized form. A tied
`lm_head` gets a QuantizedLinear over the embedding's blocks, since a lookup table cannot serve
as a matmul operand.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reprise.models.layers.quant import (GGMLTensor, QuantizedEmbedding, QuantizedLinear, SharedEmbedding, can_pack,
                                         rows_readable)

# fused parameter -> the HF parameters it concatenates, in order (along the output dimension)
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "in_proj": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),    # Gated DeltaNet
}
_PART_OF = {part: fused for fused, parts in FUSED.items() for part in parts}
Weight = torch.Tensor | GGMLTensor


def load_weights(model: nn.Module, weights: Iterable[tuple[str, Weight]]) -> None:
    """Takes HF names (the `model.` prefix dropped); fuses parts as they arrive. An unknown weight or a
    missing one raises KeyError; `lm_head.weight` is ignored when the model ties it to the embeddings."""
    params = dict(model.named_parameters())
    pending: dict[str, dict[str, Weight]] = {}
    loaded = set()
    for name, tensor in weights:
        name = name.removeprefix("model.")
        target, part = _fused_target(name)
        if target is None:
            if name not in params:
                if name == "lm_head.weight" and "lm_head.weight" not in params:
                    continue
                raise KeyError(f"unexpected weight {name}")
            _store(model, params, name, tensor)
            loaded.add(name)
            continue
        parts = pending.setdefault(target, {})
        parts[part] = tensor
        order = FUSED[_PART_OF[part]]
        if all(p in parts for p in order):
            _store(model, params, target, _concat([parts[p] for p in order]))
            loaded.add(target)
            del pending[target]
    missing = set(params) - loaded
    if missing or pending:
        raise KeyError(f"weights missing from the model files: {sorted(missing)[:5]}")


def head_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x times the output embedding: `model.lm_head`, or the input embedding's weight when tied."""
    if model.lm_head is not None:
        return model.lm_head(x)
    return F.linear(x, model.embed_tokens.weight)


def _store(model: nn.Module, params: dict[str, nn.Parameter], name: str, tensor: Weight) -> None:
    """Copies a float tensor into its parameter; swaps in the quantized module for a GGMLTensor (or
    dequantizes it, for a module or shape with no quantized form)."""
    path, _, kind = name.rpartition(".")
    module = model.get_submodule(path) if isinstance(tensor, GGMLTensor) and kind == "weight" else None
    tied = getattr(model, "lm_head", False) is None
    if isinstance(module, nn.Linear) and can_pack(tensor):
        _replace(model, path, QuantizedLinear(tensor, module.bias))
    elif isinstance(module, nn.Embedding) and tied and rows_readable(tensor):
        model.lm_head = QuantizedLinear(tensor)
        _replace(model, path, SharedEmbedding(model.lm_head))
    elif isinstance(module, nn.Embedding) and (can_pack(tensor) or not tied):
        _replace(model, path, QuantizedEmbedding(tensor))
        if tied:
            model.lm_head = QuantizedLinear(tensor)
    else:
        params[name].data.copy_(tensor.dequantize() if isinstance(tensor, GGMLTensor) else tensor)


def _concat(parts: list[Weight]) -> Weight:
    """Parts stacked along the output dimension; quantized parts stay quantized when they share a type."""
    if all(isinstance(p, GGMLTensor) for p in parts) and len({p.qtype for p in parts}) == 1:
        return GGMLTensor(np.concatenate([p.blocks for p in parts]), parts[0].qtype,
                          (sum(p.shape[0] for p in parts), parts[0].shape[1]))
    return torch.cat([p.dequantize() if isinstance(p, GGMLTensor) else p for p in parts], dim=0)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _fused_target(name: str) -> tuple[str | None, str | None]:
    """'layers.3.self_attn.k_proj.bias' -> ('layers.3.self_attn.qkv_proj.bias', 'k_proj')."""
    pieces = name.split(".")
    if len(pieces) >= 2 and pieces[-2] in _PART_OF:
        part = pieces[-2]
        return ".".join([*pieces[:-2], _PART_OF[part], pieces[-1]]), part
    return None, None
