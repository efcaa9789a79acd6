"""Compiled decode (`--compile`): a step's decode rows run through one graph of the whole model,
compiled by torch.compile; prefill chunks and speculative verifies run eagerly.

At batch 1 a small model's decode step is mostly per-op overhead: a 30-layer 135M model launches
~60 small ops per layer, each a Python call into the dispatcher. One graph from the embedding to
the logits removes that: inductor fuses each layer's norms, rope, residuals and activation around
its matmuls, and its C++ wrapper calls the kernels without Python in between.
- Paged attention enters the graph as one opaque op, `reprise::paged_attention(q, k, v, layer,
  scale)`: the compiler sees a function of q, k and v. The step's KV tensors and attention
  metadata (Python dataclasses whose shapes follow the contexts) reach it through `DecodeGraph`,
  which holds them for the length of the call, so the graph never guards on them and one graph
  serves every context length.
- Decode rows only, their count an unbacked size: one graph for every batch size, 1 included,
  built by the runner's `warm_up` before the first request. Prefill chunks stay eager: their work
  is in the matmuls, their sizes vary up to the step budget, and a prompt token then rounds the
  same whether the cache held its prefix or not (hot == cold).
- A decode row always takes the graph, whatever else the step holds (the step's chunks run
  eagerly first, then its decodes), so its numerics do not depend on the batch: batched == alone.
  Compiled code rounds differently from eager (fused float32 norms), so compile on and off are
  different engines (docs/compile.md).

Inductor's FX graph and AOT autograd caches persist the compiled code in `cache_dir()`, so a
second process loads it instead of compiling. Never max-autotune: its GEMM templates emit AMX,
which some CPUs advertise and then fault on.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import torch

from reprise.models.layers.attention import paged_attention
from reprise.models.layers.batch import AttentionBatch

# what the compiled graph's attention op reads, per engine thread: (caches, attention) of the running
# step, cleared after it, so nothing of one request outlives its step here (no tenant state)
_STEP = threading.local()


def cache_dir() -> str:
    """Where compiled kernels persist: TORCHINDUCTOR_CACHE_DIR if set, else ~/.cache/reprise/inductor."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(Path.home() / ".cache" / "reprise" / "inductor")


@torch.library.custom_op("reprise::paged_attention", mutates_args=())
def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """Layer `layer`'s paged attention over the running step's KV (attention.py's paged_attention,
    which also writes k and v to their slots)."""
    caches, attention = _STEP.current
    return paged_attention(q, k, v, *caches[layer], attention, scale)


@_paged_attention.register_fake
def _(q, k, v, layer, scale):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def _rows(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """What the graph computes: float32 logits of every row of tokens ([2, rows]: ids, positions),
    each layer attending through the op."""
    input_ids, positions = tokens
    return model.logits(model.hidden(input_ids, positions, torch.ops.reprise.paged_attention))


class DecodeGraph:
    """A model's decode rows through one compiled graph of `model.logits(model.hidden(input_ids,
    positions, attend))`; a step's chunk rows through `model.eager(input_ids, positions, caches,
    attention, logits_indices)`. (`attend(q, k, v, layer, scale)` is a layer's attention.)"""

    def __init__(self):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir()
        import torch._inductor.config as inductor
        inductor.fx_graph_cache = True
        torch._functorch.config.enable_autograd_cache = True
        self._rows = torch.compile(_rows, fullgraph=True, options={"cpp_wrapper": True})

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                 caches: list[tuple[torch.Tensor, ...]], attention: AttentionBatch,
                 logits_indices: torch.Tensor) -> torch.Tensor:
        """Logits at logits_indices: the rows before the first decode eagerly, then the decodes
        through the graph."""
        first = attention.decode.q_start
        out = None
        if first:
            chunked = logits_indices < first         # chunk rows, wherever logits_indices lists them
            chunks = AttentionBatch(attention.slot_mapping[:first], attention.prefills, None)
            chunk_logits = model.eager(input_ids[:first], positions[:first], caches, chunks, logits_indices[chunked])
            out = chunk_logits.new_empty(len(logits_indices), chunk_logits.shape[-1])
            out[chunked] = chunk_logits
        decodes = AttentionBatch(attention.slot_mapping[first:], (), dataclasses.replace(attention.decode, q_start=0))
        tokens = torch.stack([input_ids[first:], positions[first:]])
        # the row count as an unbacked size: one graph for every batch size, 1 included (a static
        # batch-1 graph fuses its reductions otherwise, and a decode alone would round differently)
        torch._dynamo.decorators.mark_unbacked(tokens, 1)
        _STEP.current = caches, decodes
        try:
            logits = self._rows(model, tokens)
        finally:
            _STEP.current = None
        if out is None:
            return logits[logits_indices]
        out[~chunked] = logits[logits_indices[~chunked] - first]
        return out
