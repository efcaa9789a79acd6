"""What the scheduler decides for one step, as plain data: no torch here, so the scheduler imports none.

The ModelRunner executes a StepPlan; Scheduler.update applies what it sampled.
"""
from __future__ import annotations

from dataclasses import dataclass

from reprise.engine.request import Request


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    num_tokens: int             # tokens computed this step, from request.num_computed on
    # logits of its last token pick the next one. The scheduler never sets it (a prompt's last token
    # runs as a decode); tests read a prefill chunk's logits with it
    samples: bool = False
    checkpoint: int | None = None   # state slot the scheduler snapshots into after this chunk (its bookkeeping)


@dataclass(frozen=True)
class Verify:
    """Speculative decoding: the request's last token plus drafted tokens, run as one chunk with
    logits at every position, so the sampler can check each draft against the model's own choice."""

    request: Request            # a decoding request: num_computed == num_tokens - 1
    draft_ids: tuple[int, ...]  # guessed continuation of request.all_ids (at least one token)

    @property
    def num_tokens(self) -> int:
        return 1 + len(self.draft_ids)


@dataclass(frozen=True)
class StepPlan:
    """One engine step: prefill chunks, verifies (chunks too), then decodes (one token each).

    Before the forward: block copies, then state copies (a checkpoint restored into a working slot);
    a prefill chunk starting at position 0 has its slot's states zeroed. After the forward: state
    snapshots (a working slot's state kept as a checkpoint). Pairs are (src, dst).
    """

    prefills: tuple[ScheduledChunk, ...]
    decodes: tuple[Request, ...]
    copies: tuple[tuple[int, int], ...]          # (src, dst) block copies for partial-block matches
    state_copies: tuple[tuple[int, int], ...] = ()
    state_snapshots: tuple[tuple[int, int], ...] = ()
    verifies: tuple[Verify, ...] = ()            # attention-only models: recurrent state cannot roll back

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes and not self.verifies

    @property
    def requests(self) -> list[Request]:
        return [item.request for item in (*self.prefills, *self.verifies)] + list(self.decodes)
