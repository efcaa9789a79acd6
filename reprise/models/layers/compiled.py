"""Compiled decode (`--compile`): the dense parts of a decoder layer run through torch.compile for
decode rows; paged attention, prefill chunks and verifies stay eager.

At batch 1 a small model's decode step is mostly per-op overhead (a 30-layer 135M model launches
~25 small ops per layer); inductor fuses a layer's norms, rope and residuals around its matmuls.
What compiles:
- one function per dense half of a layer (norm + qkv + q/k norm + rope; o_proj + residual + norm +
  MLP + residual), taking the layer module as an argument: Dynamo inlines it, its parameters become
  graph inputs, so every layer shares one graph (`TORCH_LOGS=recompiles` shows none per layer).
- decode rows only. Their count is at most max_num_seqs: Dynamo compiles batch 1 as a static graph,
  then on the first other size one graph with a symbolic batch (automatic dynamic shapes), so the
  number of compiles is two per function, whatever the batch. Prefill chunks stay eager: their work
  is in the matmuls (nothing to fuse away), their sizes vary up to the step budget, and a prompt
  token then rounds the same whether the cache held its prefix or not (hot == cold).
- a decode row always takes the compiled path, whatever else the step holds, so its numerics do
  not depend on the batch: batched == alone. Compiled code may round differently from eager
  (fused float32 norms), so compile on and off are different engines (docs/compile.md).

Inductor's FX graph and AOT autograd caches persist the compiled code in `cache_dir()`, so a
second process loads it instead of compiling. Never max-autotune: its GEMM templates emit AMX,
which some CPUs advertise and then fault on.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

Rows = tuple[torch.Tensor, ...]


def cache_dir() -> str:
    """Where compiled kernels persist: TORCHINDUCTOR_CACHE_DIR if set, else ~/.cache/reprise/inductor."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(Path.home() / ".cache" / "reprise" / "inductor")


def _enable_cache() -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir()
    import torch._inductor.config as inductor
    inductor.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True


class DenseSteps:
    """Runs a layer's dense functions over a step's rows: rows before `first_decode` eagerly, the
    decode rows from `first_decode` on through the compiled function (when compiling is on).
    Each function maps (layer, *row tensors) to a tuple of row tensors."""

    def __init__(self, compile: bool):
        self.compile = compile
        self._compiled: dict[Callable, Callable] = {}
        if compile:
            _enable_cache()

    def __call__(self, fn: Callable[..., Rows], layer: torch.nn.Module, first_decode: int | None,
                 *rows: torch.Tensor) -> Rows:
        if not self.compile or first_decode is None:
            return fn(layer, *rows)
        compiled = self._compiled.get(fn)
        if compiled is None:
            compiled = self._compiled[fn] = torch.compile(fn, fullgraph=True)
        if first_decode == 0:
            return compiled(layer, *rows)
        head = fn(layer, *(t[:first_decode] for t in rows))
        tail = compiled(layer, *(t[first_decode:] for t in rows))
        return tuple(torch.cat(pair) for pair in zip(head, tail))


EAGER = DenseSteps(compile=False)
