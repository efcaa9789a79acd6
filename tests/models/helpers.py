"""Teacher-forced logits through reprise's real engine path (block tables, chunked prefill, decode)."""
from __future__ import annotations

import torch

from reprise.engine.engine import Engine
from reprise.engine.request import Request, SamplingParams
from reprise.engine.plan import Scheduled, ScheduledChunk, StepPlan


def engine_logits(engine: Engine, ids: list[int], num_prompt: int, chunk: int = 48,
                  drop_outside: int | None = None) -> torch.Tensor:
    """Logits for positions num_prompt-1 .. len(ids)-1: the prompt is prefilled in chunks, the rest
    of `ids` is fed one token at a time as decodes. Hybrid models run in state slot 0. With
    `drop_outside` (a sliding window), block-table entries wholly older than the window of the next
    token are set to None before each step, as the cache releases them, and put back at the end."""
    request = Request(ids[:num_prompt], SamplingParams(temperature=0))
    match = engine.cache.match([], None)
    request.cache, _ = engine.cache.acquire(match, None)
    by_hand = bool(engine.runner.states) and request.cache.state_slot is None
    if by_hand:             # the engine's cache does not hand out state slots (yet): take slot 0
        request.cache.state_slot = 0
    assert engine.cache.allocate(request.cache, len(ids))
    held = list(request.cache.block_table)
    rows = []
    while request.num_computed < num_prompt:
        _drop(request, drop_outside, engine.block_size)
        size = min(chunk, num_prompt - request.num_computed)
        logits, *_ = engine.runner.forward(StepPlan((chunk_item(request, size),), (), ()))
        request.num_computed += size
        rows.append(logits[0])
    rows = rows[-1:]
    for token in ids[num_prompt:]:
        request.output_ids.append(token)
        _drop(request, drop_outside, engine.block_size)
        logits, *_ = engine.runner.forward(StepPlan((), (decode_item(request),), ()))
        request.num_computed += 1
        rows.append(logits[0])
    request.cache.block_table[:] = held
    if by_hand:
        request.cache.state_slot = None
    engine.cache.release(request.cache, [])
    return torch.stack(rows)


def _fields(request: Request, token_ids: list[int], start: int) -> tuple:
    """A request's Scheduled fields, its whole block table sent (the runner keeps nothing between calls)."""
    return (request.request_id, tuple(token_ids), start, tuple(request.cache.block_table), 0, 0,
            request.cache.state_slot)


def chunk_item(request: Request, num_tokens: int) -> ScheduledChunk:
    """The request's next `num_tokens` as a chunk whose last logits are read."""
    start = request.num_computed
    return ScheduledChunk(*_fields(request, request.all_ids[start:start + num_tokens], start), samples=True)


def decode_item(request: Request) -> Scheduled:
    return Scheduled(*_fields(request, request.all_ids[-1:], request.num_tokens - 1))


def _drop(request: Request, window: int | None, block_size: int) -> None:
    if window is not None:
        num_dead = max(0, request.num_computed - window + 1) // block_size
        request.cache.block_table[:num_dead] = [None] * num_dead
