"""PlanWriter: the scheduler's decisions, taken on live Requests, written out as a plain-data StepPlan.

It remembers what the runner holds for each running request (how many block-table entries it was
sent) and which requests stopped running since the last plan, so a plan carries only what changed:
a decode usually sends no block id at all, a request first scheduled or resumed after preemption
sends its whole table (vLLM v1's `NewRequestData` vs `CachedRequestData`).
"""
from __future__ import annotations

from reprise.engine.plan import Scheduled, ScheduledChunk, StepPlan, Verify
from reprise.engine.request import Request

# while a step is planned: (request, num_tokens, checkpoint slot) and (request, draft_ids)
Chunk = tuple[Request, int, "int | None"]
Drafted = tuple[Request, tuple[int, ...]]


class PlanWriter:
    def __init__(self):
        self._num_sent_blocks: dict[str, int] = {}     # block-table entries the runner holds, per request
        self._dropped: list[str] = []       # stopped running since the last plan: the runner forgets them

    def write(self, prefills: list[Chunk], verifies: list[Drafted], decodes: list[Request],
              copies: list[tuple[int, int]]) -> StepPlan:
        """The step as plain data; call once every request holds this step's blocks."""
        restores = tuple((r.cache.restore_from, r.cache.state_slot)
                         for r in [r for r, _, _ in prefills] + decodes if r.cache.restore_from is not None)
        snapshots = tuple((r.cache.state_slot, checkpoint) for r, _, checkpoint in prefills if checkpoint is not None)
        chunks = tuple(self._prefill(*chunk) for chunk in prefills)
        checks = tuple(Verify(*self._part(r, (r.all_ids[-1], *draft_ids), r.num_computed)) for r, draft_ids in verifies)
        singles = tuple(Scheduled(*self._part(r, (r.all_ids[-1],), r.num_tokens - 1)) for r in decodes)
        dropped = ()
        if chunks or checks or singles:     # the engine runs no empty plan: the dropped ids wait for the next
            dropped, self._dropped = tuple(self._dropped), []
        return StepPlan(chunks, singles, tuple(copies), restores, snapshots, checks, dropped)

    def truncated(self, request: Request) -> None:
        """The request's table lost its last entries (a verify's rejected drafts): those are sent again."""
        num_sent = self._num_sent_blocks[request.request_id]
        self._num_sent_blocks[request.request_id] = min(num_sent, len(request.cache.block_table))

    def forget(self, request: Request) -> None:
        """The request stopped running (finished or preempted); if it resumes, its whole table is sent."""
        self._num_sent_blocks.pop(request.request_id, None)
        self._dropped.append(request.request_id)

    def _part(self, request: Request, token_ids: tuple[int, ...], start: int) -> tuple:
        """A request's Scheduled fields: the table entries the runner holds stay, the rest are sent."""
        table = request.cache.block_table
        num_kept = min(self._num_sent_blocks.get(request.request_id, 0), len(table))
        self._num_sent_blocks[request.request_id] = len(table)
        return (request.request_id, token_ids, start, tuple(table[num_kept:]), num_kept,
                request.cache.num_trimmed, request.cache.state_slot)

    def _prefill(self, request: Request, num_tokens: int, checkpoint: int | None) -> ScheduledChunk:
        """The chunk; with prompt logprobs, the prompt tokens its rows score."""
        start = request.num_computed
        token_ids = tuple(request.all_ids[start:start + num_tokens])
        num_scored = min(num_tokens, len(request.prompt_ids) - 1 - start)
        wanted = request.params.prompt_logprobs
        scored_ids = tuple(request.prompt_ids[start + 1:start + 1 + num_scored]) if wanted is not None else ()
        return ScheduledChunk(*self._part(request, token_ids, start), checkpoint=checkpoint,
                              prompt_logprobs=wanted if scored_ids else None, scored_ids=scored_ids)
