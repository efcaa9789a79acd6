"""What the CacheManager hands out and is told: a Match (the reusable prefix of a prompt and why it
stops where it does), a SeqCache (a running request's hold on KV memory), CacheStats, and the
IndexListener protocol the tiers and KV events implement. Plain data: no pool, no index logic.

Tenants: a SeqCache carries its request's salt, and a Match is the lookup of one salt's namespace;
nothing here is shared across salts.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from reprise.cache.radix import Node


class MissReason(Enum):
    """Why a match stopped short of the nearest cached sequence."""

    DIVERGED = "diverged"            # the prompt leaves the cached sequence at `diverged_at`
    EVICTED = "evicted"              # the continuation was cached, then evicted
    SALT = "salt"                    # the shared namespace holds a longer match than the salt's
    DISABLED = "disabled"            # prefix caching is off
    NO_CHECKPOINT = "no_checkpoint"  # hybrid models: no state checkpoint at the matched length
    PROMPT_LOGPROBS = "prompt_logprobs"  # the request needs logits at every prompt position: recomputed


@dataclass(frozen=True, slots=True)
class PartialBlock:
    """Copy `block`: its first `num_tokens` slots hold the matched tokens' KV."""

    block: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Match:
    """The reusable prefix of a prompt. Valid until the next mutating CacheManager call."""

    cached_tokens: int                 # reusable as-is, at token granularity
    blocks: tuple[int, ...]            # full blocks shared by reference, never copied
    partial: PartialBlock | None       # block to copy, when the match ends inside one
    checkpoint: int | None             # recurrent-state slot at cached_tokens (hybrid models; None)
    miss: MissReason | None            # why it stopped short; None = no shortfall
    diverged_at: int | None            # position where the prompt left the cached sequence
    node: Node | None = field(default=None, compare=False, repr=False)  # opaque lock handle


@dataclass(slots=True, eq=False)
class SeqCache:
    """A running request's hold on KV memory: owned by the request, mutated only by CacheManager.

    `block_table[i]` holds the KV of positions [i*bs, (i+1)*bs), or is None once `trim` gave
    it back (outside every window). `cached_tokens` came from the cache at acquire. The index
    holds the first `num_committed` tokens along the locked path. Hybrid models: `state_slot`
    is the working recurrent state; `restore_from`, until `restored`, the checkpoint to copy in.
    """

    salt: str | None
    block_table: list[int | None]
    cached_tokens: int
    num_committed: int
    state_slot: int | None = None
    restore_from: int | None = None
    num_trimmed: int = 0                                   # leading blocks given back by trim
    _lock: Node | None = field(default=None, repr=False)  # the index node this request locks


@dataclass(frozen=True, slots=True)
class CacheStats:
    queries: int          # prompt tokens looked up
    hits: int             # prompt tokens reused
    evictions: int        # blocks that left the index
    blocks_used: int      # held by at least one running request
    blocks_cached: int    # held only by the index: reusable, evictable unless locked
    blocks_free: int
    num_blocks: int
    blocks_pinned: int = 0    # in the index under a pin that has not ended (a subset of used + cached)
    pin_expiries: int = 0     # pins that ended
    tokens_written: int = 0   # tokens newly stored in the index (cache writes)


class IndexListener(Protocol):
    """Told when full blocks enter the index and when blocks leave it (the tiers' write-through
    and KV events). Called on the engine thread, inside the CacheManager call that caused it."""

    def inserted(self, salt: str | None, token_ids: Sequence[int], block_table: Sequence[int | None],
                 first: int, end: int, adopted: Sequence[int]) -> None:
        """Blocks [first, end) of `token_ids` (whole blocks, KV computed, held in `block_table`) were
        just committed by a sequence; `adopted` are the block ids the index newly references."""

    def evicted(self, blocks: Sequence[int]) -> None:
        """`blocks` left the index (their last index entry is gone)."""

    def checkpointed(self, salt: str | None, token_ids: Sequence[int], slot: int) -> None:
        """Hybrid models: state slot `slot`, the recurrent state after all of `token_ids`, was
        just filed in the index as the checkpoint at len(token_ids)."""
