"""Compiled decode (`--compile`): a step's decode rows run through one graph of the whole model,
compiled by torch.compile; prefill chunks and speculative verifies run eagerly.

At batch 1 a small model's decode step is mostly per-op overhead: a 30-layer 135M model launches
~60 small ops per layer, each a Python call into the dispatcher. One graph from the embedding to
the logits removes that: inductor fuses each layer's norms, rope, residuals and activation around
its matmuls, and its C++ wrapper calls the kernels without Python in between.
- Paged attention is reprise's C++ kernel `reprise::decode_attention` (decode_attention.cpp), an
  op the C++ wrapper calls like aten's: it writes each row's new K/V to its slot and attends over
  the row's keys through its block table. The graph's inputs are the tokens, the decode rows' block
  tables (both of unbacked sizes) and the runner's one KV pool tensor, so one graph serves every
  batch size and context length, and no step goes back to Python between the embedding and the
  logits. The kernel is built with the graph (`load_decode_attention`); where it cannot be, the
  graph is not built either and the engine decodes eagerly.
- Decode rows only: one graph for every batch size, 1 included, built by the runner's `warm_up`
  before the first request. Prefill chunks stay eager: their work
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

import os
from functools import lru_cache
from pathlib import Path

import torch

from reprise.cache.layout import LayerKind
from reprise.models.layers.batch import AttentionBatch
from reprise.models.layers.native import cpu_flags, load_kernel

_SOURCE = Path(__file__).with_name("decode_attention.cpp")


def cache_dir() -> str:
    """Where compiled kernels persist: TORCHINDUCTOR_CACHE_DIR if set, else ~/.cache/reprise/inductor."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(Path.home() / ".cache" / "reprise" / "inductor")


@lru_cache(maxsize=1)
def load_decode_attention() -> None:
    """Builds and registers `reprise::decode_attention` (once per process); raises where it cannot."""
    flags = cpu_flags()
    vector = (["-mavx512f", "-mavx512bw", "-mavx512vl"] if {"avx512f", "avx512bw", "avx512vl"} <= flags
              else ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else [])
    load_kernel("decode_attention", _SOURCE, ["-O3", "-fopenmp", *vector])
    torch.library.register_fake("reprise::decode_attention")(_decode_attention_shape)


def _decode_attention_shape(q, k, v, pool, layer, positions, block_tables, scale, window):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def _rows(model: torch.nn.Module, tokens: torch.Tensor, block_tables: torch.Tensor, pool: torch.Tensor,
          window: int | None) -> torch.Tensor:
    """What the graph computes: float32 logits of every row of tokens ([2, rows]: ids, positions), each
    layer attending through the kernel over its slice of the pool."""
    input_ids, positions = tokens

    def attend(q, k, v, layer: int, scale: float) -> torch.Tensor:
        return torch.ops.reprise.decode_attention(q, k, v, pool, layer, positions, block_tables, scale, window)
    return model.logits(model.hidden(input_ids, positions, attend))


def _pool(caches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """[layers, 2, kv_heads, num_blocks, block_size, dim]: the runner's one KV tensor, of which every
    layer's (k, v) is a view (runner.py), so the graph takes one input, not two per layer."""
    keys = caches[0][0]
    pool = (keys if keys._base is None else keys._base).view(len(caches), 2, *keys.shape)
    if pool[-1, 1].data_ptr() != caches[-1][1].data_ptr():
        raise ValueError("the layers' caches are not views of one pool")
    return pool


class DecodeGraph:
    """A model's decode rows through one compiled graph of `model.logits(model.hidden(input_ids,
    positions, attend))`; a step's chunk rows through `model.eager(input_ids, positions, caches,
    attention, logits_indices)`. (`attend(q, k, v, layer, scale)` is a layer's attention.)"""

    def __init__(self):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir()
        import torch._inductor.config as inductor
        inductor.fx_graph_cache = True
        torch._functorch.config.enable_autograd_cache = True
        # the guards on the model's ~300 parameters are checked through the modules' dict tags (a
        # module whose __dict__ did not change needs no look inside): 0.9 -> 0.35 ms a step
        torch._dynamo.config.use_recursive_dict_tags_for_guards = True
        self._rows = torch.compile(_rows, fullgraph=True, options={"cpp_wrapper": True})

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                 caches: list[tuple[torch.Tensor, ...]], attention: AttentionBatch,
                 logits_indices: torch.Tensor) -> torch.Tensor:
        """Logits at logits_indices: the rows before the first decode eagerly, then the decodes
        through the graph."""
        load_decode_attention()              # built by the first call, the runner's warm-up
        first = attention.decode.q_start
        out = None
        if first:
            chunked = logits_indices < first         # chunk rows, wherever logits_indices lists them
            chunks = AttentionBatch(attention.slot_mapping[:first], attention.prefills, None)
            chunk_logits = model.eager(input_ids[:first], positions[:first], caches, chunks, logits_indices[chunked])
            out = chunk_logits.new_empty(len(logits_indices), chunk_logits.shape[-1])
            out[chunked] = chunk_logits
        tokens = torch.stack([input_ids[first:], positions[first:]])
        tables = attention.decode.block_tables
        # row and block counts as unbacked sizes: one graph for every batch size and context, 1
        # included (a static batch-1 graph fuses its reductions otherwise, and a decode alone would
        # round differently)
        torch._dynamo.decorators.mark_unbacked(tokens, 1)
        torch._dynamo.decorators.mark_unbacked(tables, 0)
        torch._dynamo.decorators.mark_unbacked(tables, 1)
        layout = model.cache_layout
        window = layout.sliding_window if layout.layer_kinds[0] is LayerKind.SLIDING else None
        logits = self._rows(model, tokens, tables, _pool(caches), window)
        if out is None:
            return logits[logits_indices]
        out[~chunked] = logits[logits_indices[~chunked] - first]
        return out
