"""What the scheduler decides for one step, as plain data (vLLM v1's `SchedulerOutput`): request ids,
token ids, positions, block ids and slots; no torch and no live `Request`, so the scheduler imports
no torch and the next step can be planned while the runner still works on this one.

The ModelRunner executes a StepPlan, keeping each request's block table from step to step and
updating it from the block ids each item carries; Scheduler.update applies what it sampled.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheduled:
    """One request's tokens in a step: `token_ids` at positions start, start + 1, ...

    Its block table, as the runner keeps it: the first `num_kept_blocks` entries the runner already
    holds stay, everything after them becomes `new_block_ids` (0 kept: the whole table, as when a
    request is first scheduled or resumes after preemption); the first `num_released_blocks` entries
    the cache gave back (sliding window) read None from now on.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start: int
    new_block_ids: tuple[int | None, ...]
    num_kept_blocks: int
    num_released_blocks: int
    state_slot: int | None      # hybrid models: the working recurrent-state slot

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def draft_ids(self) -> tuple[int, ...]:
        """Tokens to check against the model's own choice: none, except in a Verify."""
        return ()


@dataclass(frozen=True)
class ScheduledChunk(Scheduled):
    """A prefill chunk (it attends causally within itself)."""

    # logits of its last token pick the next one. The scheduler never sets it (a prompt's last token
    # runs as a decode); tests read a prefill chunk's logits with it
    samples: bool = False
    checkpoint: int | None = None   # state slot the scheduler snapshots into after this chunk (its bookkeeping)
    prompt_logprobs: int | None = None  # top logprobs wanted per scored prompt token
    # the prompt tokens this chunk's first rows score (row i, at position start + i, scores start + i + 1);
    # fewer than num_tokens at the prompt's end, none for a request resumed past its prompt
    scored_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Verify(Scheduled):
    """Speculative decoding: the request's last token plus drafted tokens (`token_ids`), run as one
    chunk with logits at every position, so the sampler can check each draft against the model's
    own choice."""

    @property
    def draft_ids(self) -> tuple[int, ...]:
        """The guessed continuation (at least one token)."""
        return self.token_ids[1:]


@dataclass(frozen=True)
class StepPlan:
    """One engine step: prefill chunks, verifies (chunks too), then decodes (one token each).

    Before the forward: the runner drops what it keeps for `dropped` (requests finished or
    preempted since the last plan), then block copies, then state copies (a checkpoint restored
    into a working slot); a prefill chunk starting at position 0 has its slot's states zeroed.
    After the forward: state snapshots (a working slot's state kept as a checkpoint). Pairs are (src, dst).
    """

    prefills: tuple[ScheduledChunk, ...]
    decodes: tuple[Scheduled, ...]
    copies: tuple[tuple[int, int], ...]          # (src, dst) block copies for partial-block matches
    state_copies: tuple[tuple[int, int], ...] = ()
    state_snapshots: tuple[tuple[int, int], ...] = ()
    verifies: tuple[Verify, ...] = ()            # attention-only models: recurrent state cannot roll back
    dropped: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes and not self.verifies

    @property
    def items(self) -> tuple[Scheduled, ...]:
        """Every request's part, in batch order."""
        return (*self.prefills, *self.verifies, *self.decodes)

    @property
    def sampling(self) -> list[Scheduled]:
        """The items the runner samples for, in its order: chunks that sample, verifies, decodes."""
        return [item for item in self.prefills if item.samples] + [*self.verifies, *self.decodes]

    @property
    def request_ids(self) -> list[str]:
        return [item.request_id for item in self.items]
