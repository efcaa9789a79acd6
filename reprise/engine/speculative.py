"""Prompt-lookup (n-gram) drafting for speculative decoding.

A request's next tokens are guessed by finding the last n tokens it holds (prompt + output)
earlier in the same sequence and copying what followed them there: answers that quote the prompt
(repeat a text, edit a piece of code) draft long agreeing runs for free. The target model then
checks the guesses in one forward pass (runner: a `Verify` item), the sampler keeps the agreeing
run plus one token of its own (`Sampler.sample`), and the scheduler gives back the blocks that held
only rejected positions (`CacheManager.truncate`).

Greedy output equals plain decoding's: a verified position's logits come from the chunk path (as
in a prefill) where a plain decode's come from the decode path, the same arithmetic up to rounding,
which in float32 never moved an argmax in the tests (in bfloat16 a near tie could).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SPECULATIVE_METHODS = ("ngram",)


@dataclass(frozen=True)
class NgramDrafter:
    """Proposes up to `num_draft_tokens` tokens from the most recent earlier occurrence of the
    sequence's last n tokens, n from `ngram_max` down to `ngram_min` (longer contexts first: they
    are likelier to continue the same way)."""

    num_draft_tokens: int
    ngram_max: int
    ngram_min: int

    def __post_init__(self):
        if self.num_draft_tokens < 1:
            raise ValueError("--spec-tokens must be at least 1")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("need 1 <= --spec-ngram-min <= --spec-ngram-max")

    def propose(self, token_ids: list[int], max_tokens: int) -> tuple[int, ...]:
        """At most min(max_tokens, num_draft_tokens) tokens to follow `token_ids`; () if no n-gram recurs."""
        limit = min(max_tokens, self.num_draft_tokens)
        if limit < 1 or len(token_ids) <= self.ngram_min:
            return ()
        ids = np.asarray(token_ids)
        for n in range(min(self.ngram_max, len(ids) - 1), self.ngram_min - 1, -1):
            start = last_occurrence(ids, n)
            if start is not None:
                return tuple(ids[start + n:start + n + limit].tolist())
        return ()


def last_occurrence(ids: np.ndarray, n: int) -> int | None:
    """Start of the latest earlier occurrence of the last n ids that some id follows, else None.

    Windows start at 0 .. len - n - 1, so the suffix itself (at len - n) is never its own match
    and every match has at least one token after it.
    """
    windows = sliding_window_view(ids[:-1], n)
    hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
    return int(hits[-1]) if hits.size else None
