"""Loading Hugging Face weights into a model whose projections are fused."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# fused parameter -> the HF parameters it concatenates, in order (along the output dimension)
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "in_proj": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),    # Gated DeltaNet
}
_PART_OF = {part: fused for fused, parts in FUSED.items() for part in parts}


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Takes HF names (the `model.` prefix dropped); fuses parts as they arrive. An unknown weight or a
    missing one raises KeyError; `lm_head.weight` is ignored when the model ties it to the embeddings."""
    params = dict(model.named_parameters())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    loaded = set()
    for name, tensor in weights:
        name = name.removeprefix("model.")
        target, part = _fused_target(name)
        if target is None:
            if name not in params:
                if name == "lm_head.weight" and "lm_head.weight" not in params:
                    continue
                raise KeyError(f"unexpected weight {name}")
            params[name].data.copy_(tensor)
            loaded.add(name)
            continue
        parts = pending.setdefault(target, {})
        parts[part] = tensor
        order = FUSED[_PART_OF[part]]
        if all(p in parts for p in order):
            params[target].data.copy_(torch.cat([parts[p] for p in order], dim=0))
            loaded.add(target)
            del pending[target]
    missing = set(params) - loaded
    if missing or pending:
        raise KeyError(f"weights missing from the model files: {sorted(missing)[:5]}")


def _fused_target(name: str) -> tuple[str | None, str | None]:
    """'layers.3.self_attn.k_proj.bias' -> ('layers.3.self_attn.qkv_proj.bias', 'k_proj')."""
    pieces = name.split(".")
    if len(pieces) >= 2 and pieces[-2] in _PART_OF:
        part = pieces[-2]
        return ".".join([*pieces[:-2], _PART_OF[part], pieces[-1]]), part
    return None, None
