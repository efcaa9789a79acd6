"""What a model sees of a step: flat tokens plus, per cache kind, how to reach each sequence's past.

A step's tokens are laid out flat: first each prefill chunk (one sequence after another), then every
decode token (one per sequence). Attention layers read keys through block tables; recurrent layers
read and write a state slot per sequence.

    tokens:    | prefill seq A (q_len_a) | prefill seq B (q_len_b) | decode x1 | decode x1 | ...
    attention: A: keys of block_table_a, the first num_keys of them    decode: block_tables[b], masked
    recurrent: A: state slot_a                                          decode: decode_slots[b]

A sliding layer's block tables start at the first block its window reaches, so the gathered keys
start at that block's first position, not at position 0; its masks hide keys older than the window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefillChunk:
    q_start: int                 # first token of this chunk in the flat batch
    q_len: int                   # tokens computed in this chunk
    num_keys: int                # keys gathered from block_table (from its first block's first position)
    block_table: torch.Tensor    # [ceil(num_keys / block_size)] block ids
    mask: torch.Tensor | None    # [1, 1, q_len, num_keys] additive (0 / -inf); None = plain causal from 0


@dataclass(frozen=True)
class DecodeBatch:
    q_start: int                 # decode tokens are the last `num_seqs` tokens of the batch
    block_tables: torch.Tensor   # [num_seqs, max_blocks], padded with any valid block id
    mask: torch.Tensor           # [num_seqs, 1, 1, max_blocks * block_size] bool: key is visible


@dataclass(frozen=True)
class AttentionBatch:
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
