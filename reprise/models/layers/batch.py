"""What a model sees of a step: flat tokens plus, per cache kind, how to reach each sequence's past.

A step's tokens are laid out flat: first each prefill chunk (one sequence after another), then every
decode token (one per sequence). Attention layers read keys through block tables; recurrent layers
read and write a state slot per sequence.

    tokens:    | prefill seq A (q_len_a) | prefill seq B (q_len_b) | decode x1 | decode x1 | ...
    attention: A: prefix segments + its own K/V (causal)    decode: padded block tables, per length group
    recurrent: A: state slot_a                               decode: decode_slots[b]

Segments read the KV cache in place wherever a sequence's blocks follow each other in the pool: a
layer's cache is heads outermost ([kv_heads, num_blocks * block_size, head_dim] viewed by flat
slot), so such a run of slots is one contiguous stretch of keys per head. A sliding layer's keys
start where its window does; where the window hides some of a chunk's keys from some of its
queries, that chunk takes the masked path (WindowedKeys).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class KeySegment:
    """Keys (and values) of consecutive positions of one sequence, `length` of them: flat cache slots
    [start, start + length) of every KV head, read in place when `slots` is None (their blocks
    follow each other in the pool), else gathered from `slots`. The attention over a segment does the same arithmetic
    either way: only where a segment is cut (see metadata.py) changes the numerics."""

    length: int
    start: int = 0
    slots: torch.Tensor | None = None       # [length] flat slots, where the blocks are scattered


@dataclass(frozen=True)
class WindowedKeys:
    """A chunk's keys when a sliding window hides some of them from some of its queries: gathered
    through block_table (from its first block's first position) under an additive mask."""

    num_keys: int
    block_table: torch.Tensor    # [ceil(num_keys / block_size)] block ids
    mask: torch.Tensor           # [1, 1, q_len, num_keys] additive (0 / -inf)


@dataclass(frozen=True)
class PrefillChunk:
    """A chunk attends to the keys before it (all visible to every query: `prefix`) and causally to
    its own, which the layer takes from its fresh K/V, not from the cache."""

    q_start: int                 # first token of this chunk in the flat batch
    q_len: int                   # tokens computed in this chunk
    prefix: tuple[KeySegment, ...] = ()
    windowed: WindowedKeys | None = None    # set instead of prefix when a window cuts


@dataclass(frozen=True)
class PaddedDecode:
    """Decodes of similar context lengths, batched: their keys gathered into one padded tensor, or
    read in place (`start`) where the group is one sequence whose blocks follow each other."""

    rows: torch.Tensor | None    # [num_seqs] rows among the decode rows; None = every decode row
    block_tables: torch.Tensor | None   # [num_seqs * max_blocks] block ids, each row padded with a valid
    #                                     block id; None when read in place
    mask: torch.Tensor           # [num_seqs, 1, 1, max_blocks * block_size] additive (0 / -inf)
    start: int | None = None     # flat slot of the first key, when read in place
    # the gathered keys and values, one buffer pair per shape reused by every layer of the step (a
    # fresh multi-MiB tensor per layer costs its page faults each time), and the cache rows they
    # come from (attention.py's _gather_padded)
    scratch: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DecodeBatch:
    """One query per sequence: for eager attention in groups of similar context length (so one long
    context never pads the short ones to its length); for the compiled graph's kernel (compiled.py)
    as block tables, and no groups."""

    q_start: int                 # decode tokens are the last tokens of the batch
    groups: tuple[PaddedDecode, ...]
    # [num_seqs, max_blocks] int64: each sequence's block ids up to its position's block, padded with 0
    # (as are released blocks, which no window reaches); None for eager attention
    block_tables: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionBatch:
    """The attention metadata of a step, built once and read by every layer of its kind."""

    slot_mapping: torch.Tensor   # [num_tokens] flat slot (block * block_size + offset) for new K/V
    prefills: tuple[PrefillChunk, ...]
    decode: DecodeBatch | None


@dataclass(frozen=True)
class RecurrentChunk:
    q_start: int
    q_len: int
    slot: int                    # state slot the chunk continues from and leaves its state in


@dataclass(frozen=True)
class RecurrentBatch:
    prefills: tuple[RecurrentChunk, ...]
    decode_start: int            # decode tokens are rows decode_start.. of the batch
    decode_slots: torch.Tensor | None    # [num_decodes] state slot of each decode row


@dataclass(frozen=True)
class ForwardBatch:
    """One view per cache kind the model has; a layer takes the one of its kind."""

    full: AttentionBatch | None
    sliding: AttentionBatch | None      # the same object as `full` when the window never cuts
    recurrent: RecurrentBatch | None
