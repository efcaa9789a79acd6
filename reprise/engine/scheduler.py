"""Scheduler: waiting and running queues, a token budget per step, chunked prefill, preemption.

It decides and owns no memory: blocks come from the CacheManager, tensors from the ModelRunner.
What it decides leaves it as a StepPlan of plain data (plan_writer.py), never a live Request.
Each step every decoding request gets its one token first; prefill chunks share what is left of
the budget, cut on the block grid so a cold run and a run resumed from the cache chunk alike.
A prompt's last token always runs as a decode, as it does after an exact hit: in bf16 a one-row
decode rounds differently from a row of a chunk, so an exact repeat then redoes the cold run's
arithmetic bit for bit.

Hybrid models (recurrent layers) chunk on a coarser grid (`chunk_grid`, a multiple of the
recurrence's own chunk), stop every chunk at each `checkpoint_interval` multiple, and snapshot
the state where a chunk stops. So a cold run takes the same steps, in the same arithmetic, as a run
resumed from any of its checkpoints.

With a drafter (speculative decoding), a decoding request whose drafter guesses its next tokens
runs as a verify instead: its last token plus the drafts, paid from what is left of the budget
after the running requests' chunks, in blocks allocated after everyone else's (so drafting never
preempts). `update` advances it past the accepted tokens only and gives back the blocks that held
just rejected positions; their KV lies past num_computed, so it is overwritten, never matched.
"""
from __future__ import annotations

from collections import deque

from reprise.cache.manager import CacheManager
from reprise.cache.match import Match, MissReason
from reprise.engine.request import FinishReason, Request, RequestStatus
from reprise.engine.plan import StepPlan, Verify
from reprise.engine.plan_writer import Chunk, Drafted, PlanWriter
from reprise.engine.speculative import NgramDrafter


class Scheduler:
    def __init__(self, cache: CacheManager, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 chunk_grid: int | None = None, checkpoint_interval: int | None = None,
                 drafter: NgramDrafter | None = None, max_model_len: int | None = None, loads=None):
        """`loads` (a TierLink, or None without tiers) may take a request at admission to load its
        prefix from a tier first (RequestStatus.LOADING); it comes back to `waiting` when done."""
        self.cache = cache
        self.block_size = block_size
        self.chunk_grid = chunk_grid or block_size
        self.checkpoint_interval = checkpoint_interval if cache.recurrent else None
        if self.checkpoint_interval is not None and self.checkpoint_interval % self.chunk_grid:
            raise ValueError(f"checkpoint interval {checkpoint_interval} is not a multiple of {self.chunk_grid}")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}   # added and not finished, for the ids a plan carries
        self.writer = PlanWriter()             # the plan's data, and what the runner holds
        self.num_preemptions = 0
        self.drafter = drafter
        self.max_model_len = max_model_len
        self.num_draft_tokens = 0       # proposed and verified
        self.num_accepted_tokens = 0    # drafts the model agreed with
        self.loads = loads

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or (self.loads is not None and self.loads.num_loading))

    def schedule(self) -> StepPlan:
        prefills: list[Chunk] = []
        decodes: list[Request] = []
        num_decodes = sum(1 for r in self.running if r.num_uncomputed == 1)
        budget = max(self.max_num_batched_tokens - num_decodes, 0)
        scheduled: set[str] = set()
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING or request.request_id in scheduled:
                continue
            budget = self._schedule_one(request, budget, prefills, decodes, scheduled)
        decodes, verifies, budget = self._speculate(decodes, budget)
        copies = self._admit(budget, prefills, decodes)
        return self.writer.write(prefills, verifies, decodes, copies)

    def _schedule_one(self, request: Request, budget: int, prefills, decodes, scheduled) -> int:
        """Plans one running request's tokens, preempting later requests if blocks run short."""
        num_tokens = 1 if request.num_uncomputed == 1 else self._chunk_size(request, budget)
        if num_tokens == 0:
            return budget
        self.cache.trim(request.cache, request.num_computed)
        while not self.cache.allocate(request.cache, request.num_computed + num_tokens):
            victim = self._pick_victim(scheduled)
            self.preempt(victim)
            if victim is request:
                return budget
        scheduled.add(request.request_id)
        if request.num_uncomputed == 1:
            decodes.append(request)
            return budget
        prefills.append(self._chunk(request, num_tokens))
        return budget - num_tokens

    def _speculate(self, decodes: list[Request], budget: int) -> tuple[list[Request], list[Drafted], int]:
        """Turns decodes into verifies where the drafter guesses tokens that fit the budget and the
        pool. Runs once every running request holds its blocks for this step: it never preempts."""
        if self.drafter is None:
            return decodes, [], budget
        plain, verifies = [], []
        for request in decodes:
            draft_ids = self._draft(request, budget)
            if draft_ids and self.cache.allocate(request.cache, request.num_tokens + len(draft_ids)):
                verifies.append((request, draft_ids))
                budget -= len(draft_ids)
            else:
                plain.append(request)
        return plain, verifies, budget

    def _draft(self, request: Request, budget: int) -> tuple[int, ...]:
        """Drafts within the budget, max_tokens and the context: a verify of d drafts yields at
        most d + 1 tokens, and its last position (num_tokens - 1 + d) must stay a fed one."""
        if not request.params.may_draft:
            return ()
        room = budget
        if request.params.max_tokens is not None:
            room = min(room, request.params.max_tokens - len(request.output_ids) - 1)
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - request.num_tokens - 1)
        return self.drafter.propose(request.all_ids, room)

    def _chunk_size(self, request: Request, budget: int) -> int:
        """All that is left (up to the next checkpoint stop) if it fits; else up to a grid line."""
        start = request.num_computed
        end = request.num_tokens - 1           # the last token always runs as a decode, as after an exact hit
        if self.checkpoint_interval is not None:
            end = min(end, (start // self.checkpoint_interval + 1) * self.checkpoint_interval)
        if end - start <= budget:
            return end - start
        end = (start + budget) // self.chunk_grid * self.chunk_grid
        return max(end - start, 0)

    def _chunk(self, request: Request, num_tokens: int) -> Chunk:
        """The chunk, with a fresh checkpoint slot when it stops at a checkpoint position."""
        end = request.num_computed + num_tokens
        checkpoint = None
        if self.checkpoint_interval is not None and (end % self.checkpoint_interval == 0
                                                     or end == request.num_tokens - 1):
            checkpoint = self.cache.allocate_checkpoint()
        return request, num_tokens, checkpoint

    def _pick_victim(self, scheduled: set[str]) -> Request:
        """The most recently admitted request not yet planned this step (the caller itself last)."""
        for request in reversed(self.running):
            if request.request_id not in scheduled:
                return request
        raise RuntimeError("no request left to preempt")  # unreachable: the caller is never scheduled yet

    def preempt(self, request: Request) -> None:
        """Frees its blocks (what it computed stays in the prefix cache) and queues it first to resume."""
        self.cache.release(request.cache, request.all_ids[:request.num_computed])
        request.cache, request.num_computed = None, 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(request)
        self.waiting.appendleft(request)
        self.writer.forget(request)

    def _admit(self, budget: int, prefills, decodes) -> list[tuple[int, int]]:
        copies: list[tuple[int, int]] = []
        deferred: list[Request] = []
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            request = self.waiting.popleft()
            match = self._match(request)
            if self._prefix_in_flight(request, match.cached_tokens):
                deferred.append(request)
                continue
            if self.loads is not None and self.loads.begin(request, match):
                continue
            acquired = self.cache.acquire(match, request.salt)
            if acquired is None:
                self.waiting.appendleft(request)
                break
            request.cache, copy = acquired
            request.num_computed = match.cached_tokens
            num_tokens = 1 if request.num_uncomputed == 1 else self._chunk_size(request, budget)
            if num_tokens == 0 or not self.cache.allocate(request.cache, request.num_computed + num_tokens):
                self.cache.release(request.cache, [])
                request.cache, request.num_computed = None, 0
                self.waiting.appendleft(request)
                break
            self._start(request, match)
            if copy is not None:
                copies.append(copy)
            if request.num_uncomputed == 1:
                decodes.append(request)
            else:
                prefills.append(self._chunk(request, num_tokens))
                budget -= num_tokens
        self.waiting.extendleft(reversed(deferred))
        return copies

    def _match(self, request: Request) -> Match:
        """The cache's match; none for a request that asked for prompt logprobs, whose every prompt
        position needs logits the cache does not keep."""
        if request.params.prompt_logprobs is not None:
            return self.cache.no_match(MissReason.PROMPT_LOGPROBS)
        return self.cache.match(request.all_ids, request.salt)

    def _start(self, request: Request, match) -> None:
        if request.cached_tokens is None:       # first admission; a resumed request keeps its numbers
            request.cached_tokens = match.cached_tokens
            request.miss, request.diverged_at = match.miss, match.diverged_at
            self.cache.record(len(request.prompt_ids), match.cached_tokens)
            request.cached_tokens_by_tier = {"memory": match.cached_tokens}
            if self.loads is not None:
                self.loads.admitted(request, match.cached_tokens)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _prefix_in_flight(self, request: Request, num_cached: int) -> bool:
        """True if a running request is computing at least one more block of this prompt right now,
        or is about to compute the last tokens it shares with it (a continuation prefill, whose
        blocks all enter the index when it ends one step later).

        Waiting for it (its blocks enter the index as each chunk completes) beats computing the
        same prefix twice in parallel.
        """
        for other in self.running:
            if other.salt != request.salt:
                continue
            shared = common_prefix_length(request.all_ids, other.prompt_ids)
            if other.num_computed >= shared or shared <= num_cached:
                continue
            if shared - num_cached >= self.block_size or shared == len(other.prompt_ids):
                return True
        return False

    def loaded(self, requests: list[Request]) -> None:
        """Requests whose tier load finished: first in line, to match what was loaded."""
        self.waiting.extendleft(reversed(requests))

    def update(self, plan: StepPlan, sampled: list[list[int]]) -> list[tuple[Request, int]]:
        """Applies a step's results (new tokens per sampling request, in plan order); returns the
        requests that got new tokens, with how many: one, or for a verify its accepted drafts + 1."""
        results = iter(sampled)
        advanced = []
        for item in plan.prefills:
            request = self.requests[item.request_id]
            self.cache.restored(request.cache)
            request.num_computed += item.num_tokens
            if item.samples:
                request.output_ids.extend(next(results))
                advanced.append((request, 1))
            self.cache.commit(request.cache, request.all_ids[:request.num_computed], item.checkpoint)
        for verify in plan.verifies:
            request = self.requests[verify.request_id]
            advanced.append((request, self._verified(request, verify, next(results))))
        for item in plan.decodes:
            request = self.requests[item.request_id]
            self.cache.restored(request.cache)
            request.num_computed += 1
            request.output_ids.extend(next(results))
            advanced.append((request, 1))
        return advanced

    def _verified(self, request: Request, verify: Verify, new_ids: list[int]) -> int:
        """Rolls a verify forward over its accepted drafts only: the last token and the accepted
        drafts now have KV (num_computed), the rejected positions after them do not, and the blocks
        that covered only those go back. Returns the number of new tokens."""
        request.num_computed += len(new_ids)
        request.output_ids.extend(new_ids)
        self.cache.truncate(request.cache, request.num_tokens)
        self.writer.truncated(request)
        self.num_draft_tokens += len(verify.draft_ids)
        self.num_accepted_tokens += len(new_ids) - 1
        return len(new_ids)

    def truncate_output(self, request: Request, num_output: int) -> None:
        """Keeps the first `num_output` output tokens (a stop condition fell inside a verified run);
        the dropped ones no longer count as computed, so they never enter the prefix cache."""
        request.truncate_output(num_output)
        request.num_computed = min(request.num_computed, request.num_tokens - 1)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Ends a request, running or waiting; what it computed goes into the prefix cache."""
        self._end(request, reason, request.all_ids[:request.num_computed], request.pins)

    def fail(self, request: Request) -> None:
        """Ends a request whose batch raised. Nothing since its last commit is trusted (a recurrent
        layer advances its state in place), so only what it had committed stays cached."""
        self._end(request, FinishReason.ABORT, (), ())

    def _end(self, request: Request, reason: FinishReason, cached_ids, pins) -> None:
        if request.status is RequestStatus.RUNNING:
            self.cache.release(request.cache, cached_ids, pins)
            request.cache = None
            self.running.remove(request)
            self.writer.forget(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status is RequestStatus.LOADING:
            self.loads.cancel(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.requests.pop(request.request_id, None)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    step, i = 256, 0
    while i + step <= limit and a[i:i + step] == b[i:i + step]:
        i += step
    while i < limit and a[i] == b[i]:
        i += 1
    return i
