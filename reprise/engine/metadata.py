"""The attention metadata of a step (batch.py's AttentionBatch), built once from each sequence's
block table and positions, and read by every attention layer of its kind.

A sequence's earlier keys are cut into segments at fixed positions (multiples of SEGMENT_TOKENS),
never where its blocks happen to lie in the pool: a segment whose blocks are consecutive is read in
place (per KV head, one contiguous run of the heads-outermost pool), another is gathered, and both
give the same arithmetic, so a run resumed from the prefix cache attends exactly as a cold run
whatever blocks each got.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from reprise.models.layers.batch import (AttentionBatch, DecodeBatch, KeySegment, PaddedDecode, PrefillChunk,
                                         WindowedKeys)

SEGMENT_TOKENS = 1024   # keys per segment: fewer kernel calls and merges vs. less gathered around a gap
DECODE_GROUP_KEYS = 256  # decodes seeing up to this many keys pad together; above, per power-of-2 class


@dataclass(frozen=True)
class SeqRows:
    """The tokens of one sequence in a step: positions [start, start + num_tokens), a chunk when
    `chunk` (it attends causally within itself), else one decode token."""

    request_id: str
    block_table: list[int | None]
    start: int
    num_tokens: int
    chunk: bool


def slot_mapping(rows: list[SeqRows], block_size: int) -> torch.Tensor:
    """Flat KV slot of every token of the step, in batch order."""
    pieces, singles = [], []
    for row in rows:
        if row.num_tokens == 1:
            singles.append(row.block_table[row.start // block_size] * block_size + row.start % block_size)
            continue
        if singles:
            pieces.append(torch.tensor(singles, dtype=torch.long))
            singles = []
        pieces.append(_slots(row.block_table, row.start, row.start + row.num_tokens, block_size))
    if singles or not pieces:
        pieces.append(torch.tensor(singles, dtype=torch.long))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _slots(table: list[int | None], start: int, end: int, block_size: int) -> torch.Tensor:
    """[end - start] flat slots of positions [start, end)."""
    blocks = table[start // block_size:-(-end // block_size)]
    if None in blocks:      # the cache releases only blocks wholly older than every window
        raise RuntimeError("a released block lies inside an attention window")
    offset = start % block_size
    slots = (torch.tensor(blocks, dtype=torch.long)[:, None] * block_size + torch.arange(block_size)).flatten()
    return slots[offset:offset + end - start]


def attention_batch(rows: list[SeqRows], slots: torch.Tensor, block_size: int, window: int | None,
                    device: torch.device, dtype: torch.dtype, graph: bool = False) -> AttentionBatch:
    """Rows: the chunks first, then the decodes (batch.py's order). With `graph` (the model decodes
    through its compiled graph) the decodes get block tables, else padded groups: each path's own."""
    chunks, q_start = [], 0
    for row in rows:
        if row.chunk:
            chunks.append(_prefill_chunk(row, q_start, block_size, window, device, dtype))
            q_start += row.num_tokens
    decodes = [row for row in rows if not row.chunk]
    decode = None
    if decodes:
        decode = (DecodeBatch(q_start, (), _block_tables(decodes, block_size, device)) if graph
                  else _decode_batch(decodes, q_start, block_size, window, device, dtype))
    return AttentionBatch(slots, tuple(chunks), decode)


def _segments(table: list[int | None], first: int, end: int, block_size: int,
              device: torch.device) -> tuple[KeySegment, ...]:
    """Keys at positions [first, end), cut at multiples of SEGMENT_TOKENS."""
    segments = []
    while first < end:
        cut = min(end, (first // SEGMENT_TOKENS + 1) * SEGMENT_TOKENS)
        blocks = table[first // block_size:-(-cut // block_size)]
        if None in blocks:
            raise RuntimeError("a released block lies inside an attention window")
        if all(b == a + 1 for a, b in zip(blocks, blocks[1:])):
            segments.append(KeySegment(cut - first, blocks[0] * block_size + first % block_size))
        else:
            segments.append(KeySegment(cut - first, slots=_slots(table, first, cut, block_size).to(device)))
        first = cut
    return tuple(segments)


def _first_key(position: int, window: int | None) -> int:
    return 0 if window is None else max(0, position - window + 1)


def _prefill_chunk(row: SeqRows, q_start: int, block_size: int, window: int | None, device: torch.device,
                   dtype: torch.dtype) -> PrefillChunk:
    start, end = row.start, row.start + row.num_tokens
    if window is not None and end > window:
        return PrefillChunk(q_start, row.num_tokens, windowed=_windowed_keys(row, block_size, window, device, dtype))
    return PrefillChunk(q_start, row.num_tokens, _segments(row.block_table, 0, start, block_size, device))


def _windowed_keys(row: SeqRows, block_size: int, window: int, device: torch.device,
                   dtype: torch.dtype) -> WindowedKeys:
    """Keys from the first block the chunk's first query's window reaches, under an additive mask
    (4-D: the form SDPA's fused CPU kernel takes; a bool mask falls back to math)."""
    start, end = row.start, row.start + row.num_tokens
    key_start = _first_key(start, window) // block_size * block_size
    blocks = row.block_table[key_start // block_size:-(-end // block_size)]
    if None in blocks:
        raise RuntimeError(f"a released block lies inside the attention window of {row.request_id}")
    keys = torch.arange(key_start, end, device=device)
    queries = torch.arange(start, end, device=device)[:, None]
    hidden = (keys[None, :] > queries) | (keys[None, :] <= queries - window)
    mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))
    return WindowedKeys(end - key_start, torch.tensor(blocks, device=device), mask[None, None])


def _decode_batch(rows: list[SeqRows], q_start: int, block_size: int, window: int | None,
                  device: torch.device, dtype: torch.dtype) -> DecodeBatch:
    """Decodes grouped by context length class (up to DECODE_GROUP_KEYS keys, then each doubling),
    so a long context pads only the ones of its class."""
    classes: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        classes.setdefault(_length_class(row.start + 1 - _first_key(row.start, window)), []).append(i)
    groups = tuple(_padded([rows[i] for i in indices], indices, len(rows), block_size, window, device, dtype)
                   for _, indices in sorted(classes.items()))
    return DecodeBatch(q_start, groups)


def _block_tables(rows: list[SeqRows], block_size: int, device: torch.device) -> torch.Tensor:
    """[num_seqs, max_blocks]: each decode's block ids up to its position's block, padded with 0, as
    are released blocks (no window reaches them)."""
    tables = [row.block_table[:row.start // block_size + 1] for row in rows]
    width = max(len(table) for table in tables)
    padded = [[block or 0 for block in table] + [0] * (width - len(table)) for table in tables]
    return torch.tensor(padded, dtype=torch.long, device=device)


def _length_class(num_keys: int) -> int:
    """0 up to DECODE_GROUP_KEYS keys; above, 2**(c-1) < num_keys <= 2**c gives c."""
    return 0 if num_keys <= DECODE_GROUP_KEYS else (num_keys - 1).bit_length()


def _padded(rows: list[SeqRows], indices: list[int], num_rows: int, block_size: int, window: int | None,
            device: torch.device, dtype: torch.dtype) -> PaddedDecode:
    """Keys from the first block each window reaches, padded to the longest; the additive mask (the
    form SDPA's CPU kernel computes with: a bool mask is converted at every layer) hides the padding
    and keys older than the window. A lone sequence whose blocks follow each other in the pool is
    read in place: the same keys under the same mask, so the same arithmetic as gathered."""
    firsts = [_first_key(row.start, window) // block_size for row in rows]
    tables = [row.block_table[first:row.start // block_size + 1] for row, first in zip(rows, firsts)]
    if any(None in table for table in tables):
        raise RuntimeError("a released block lies inside an attention window")
    width = max(len(table) for table in tables)
    keys = torch.tensor(firsts)[:, None] * block_size + torch.arange(width * block_size)
    queries = torch.tensor([row.start for row in rows])[:, None]
    hidden = keys > queries
    if window is not None:
        hidden |= keys <= queries - window
    mask = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, float("-inf"))[:, None, None, :].to(device)
    row_ids = None if len(indices) == num_rows else torch.tensor(indices, device=device)
    table = tables[0]
    if len(rows) == 1 and all(b == a + 1 for a, b in zip(table, table[1:])):
        return PaddedDecode(row_ids, None, mask, start=table[0] * block_size)
    block_tables = torch.tensor([table + [table[0]] * (width - len(table)) for table in tables], dtype=torch.long)
    return PaddedDecode(row_ids, block_tables.flatten().to(device), mask)
