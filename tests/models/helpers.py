"""Teacher-forced logits through reprise's real engine path (block tables, chunked prefill, decode)."""
from __future__ import annotations

import torch

from reprise.engine.engine import Engine
from reprise.engine.request import Request, SamplingParams
from reprise.engine.runner import ScheduledChunk, StepPlan


def engine_logits(engine: Engine, ids: list[int], num_prompt: int, chunk: int = 48) -> torch.Tensor:
    """Logits for positions num_prompt-1 .. len(ids)-1: the prompt is prefilled in chunks, the rest
    of `ids` is fed one token at a time as decodes."""
    request = Request(ids[:num_prompt], SamplingParams(temperature=0))
    match = engine.cache.match([], None)
    request.cache, _ = engine.cache.acquire(match, None)
    assert engine.cache.allocate(request.cache, len(ids))
    rows = []
    while request.num_computed < num_prompt:
        size = min(chunk, num_prompt - request.num_computed)
        logits, _ = engine.runner.forward(StepPlan((ScheduledChunk(request, size, True),), (), ()))
        request.num_computed += size
        rows.append(logits[0])
    rows = rows[-1:]
    for token in ids[num_prompt:]:
        request.output_ids.append(token)
        logits, _ = engine.runner.forward(StepPlan((), (request,), ()))
        request.num_computed += 1
        rows.append(logits[0])
    engine.cache.release(request.cache, [])
    return torch.stack(rows)
