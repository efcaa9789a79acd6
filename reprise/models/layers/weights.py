"""Loading Hugging Face weights into a model whose projections are fused.

A weight may come as a float tensor or, for GGUF files loaded with native weights, as a GGMLTensor:
the linear layer (or embedding) it belongs to is then replaced by its quantized form. A tied
`lm_head` gets a QuantizedLinear over the embedding's blocks, since a lookup table cannot serve
as a matmul operand. A fused projection whose parts differ in type (a Q4_K_M file's Q6_K v next to
Q4_K q and k) becomes a StackedLinear, one layer per run of parts of one type.
"""
from __future__ import annotations

from collections.abc import Iterable
from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reprise.models.layers.quant import (GGMLTensor, QuantizedEmbedding, QuantizedLinear, SharedEmbedding,
                                         StackedLinear, can_pack, rows_readable)

# fused parameter -> the HF parameters it concatenates, in order (along the output dimension)
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "in_proj": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),    # Gated DeltaNet
}
_PART_OF = {part: fused for fused, parts in FUSED.items() for part in parts}
Weight = torch.Tensor | GGMLTensor
Runs = tuple[Weight, ...]               # a fused weight's parts, adjacent parts of one type stacked


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


def _store(model: nn.Module, params: dict[str, nn.Parameter], name: str, tensor: Weight | Runs) -> None:
    """Copies a float tensor into its parameter; swaps in the quantized module for a GGMLTensor (or
    dequantizes it, for a module or shape with no quantized form)."""
    if isinstance(tensor, tuple):
        _store_runs(model, params, name, tensor)
        return
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
        params[name].data.copy_(_dense(tensor))


def _store_runs(model: nn.Module, params: dict[str, nn.Parameter], name: str, runs: Runs) -> None:
    """A fused weight whose parts differ in type: a StackedLinear of its runs when at least one run has a
    kernel form (the others are held dense), else the parts dequantized into the fused parameter."""
    path = name.rpartition(".")[0]
    module = model.get_submodule(path)
    if not isinstance(module, nn.Linear) or not any(isinstance(r, GGMLTensor) and can_pack(r) for r in runs):
        params[name].data.copy_(torch.cat([_dense(run) for run in runs]))
        return
    parts = []
    for run in runs:
        if isinstance(run, GGMLTensor) and can_pack(run):
            parts.append(QuantizedLinear(run))
        else:
            dense = _dense(run)
            parts.append(nn.Linear(dense.shape[1], dense.shape[0], bias=False))
            parts[-1].weight.data = dense
    _replace(model, path, StackedLinear(parts, module.bias))


def _dense(tensor: Weight) -> torch.Tensor:
    return tensor.dequantize() if isinstance(tensor, GGMLTensor) else tensor


def _concat(parts: list[Weight]) -> Weight | Runs:
    """Parts stacked along the output dimension. Adjacent quantized parts of one type stay one quantized
    weight (float parts one tensor); parts of different types come as a tuple of such runs."""
    runs = [list(run) for _, run in groupby(parts, key=lambda p: p.qtype if isinstance(p, GGMLTensor) else None)]
    stacked = tuple(_stack(run) for run in runs)
    return stacked[0] if len(stacked) == 1 else stacked


def _stack(parts: list[Weight]) -> Weight:
    """Parts of one type (or all float) as one weight, rows concatenated."""
    if isinstance(parts[0], GGMLTensor):
        return GGMLTensor(np.concatenate([p.blocks for p in parts]), parts[0].qtype,
                          (sum(p.shape[0] for p in parts), parts[0].shape[1]))
    return torch.cat(parts, dim=0)


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
