"""CacheManager: all the scheduler sees of KV memory and the prefix cache.

One request's life: `match` (dry run, no side effects) -> `acquire` (share the matched blocks,
copy the partial one) -> `allocate` as it grows -> `commit` full blocks while it runs ->
`release` on finish, abort or preemption (its computed tokens enter the index, its blocks are
freed; the ones the index adopted survive through the index's reference).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from reprise.cache.block_pool import BlockPool
from reprise.cache.index import IndexMatch, NullIndex, PrefixIndex, Stop, require
from reprise.cache.radix import Node, RadixIndex


class MissReason(Enum):
    """Why a match stopped short of the nearest cached sequence."""

    DIVERGED = "diverged"            # the prompt leaves the cached sequence at `diverged_at`
    EVICTED = "evicted"              # the continuation was cached, then evicted
    SALT = "salt"                    # the shared namespace holds a longer match than the salt's
    DISABLED = "disabled"            # prefix caching is off
    NO_CHECKPOINT = "no_checkpoint"  # hybrid models: no state checkpoint at the matched length


_MISS_BY_STOP = {Stop.DIVERGED: MissReason.DIVERGED, Stop.EVICTED: MissReason.EVICTED,
                 Stop.DISABLED: MissReason.DISABLED}


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

    `block_table[i]` holds the KV of positions [i*bs, (i+1)*bs). `cached_tokens` came from the
    cache at acquire. The index holds the first `num_committed` tokens along the locked path.
    """

    salt: str | None
    block_table: list[int]
    cached_tokens: int
    num_committed: int
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


class CacheManager:
    """Block pool + prefix index + per-block holder counts, kept consistent.

    Every block's pool reference count equals its index entries plus the live SeqCache tables
    holding it. Eviction only removes index entries of unlocked leaves, so a block a running
    request holds is never freed under it.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.pool = BlockPool(num_blocks, block_size)
        self.index: PrefixIndex = RadixIndex(block_size) if enable_prefix_cache else NullIndex(block_size)
        self._holders = [0] * num_blocks   # live SeqCache tables holding each block
        self._num_used = 0                 # blocks with holders > 0
        self._live: set[SeqCache] = set()
        self._queries = self._hits = self._evictions = 0

    # ---- admission ----------------------------------------------------------------------

    def match(self, prompt_ids: Sequence[int], salt: str | None) -> Match:
        """The cached prefix of `prompt_ids[:-1]` (the last prompt token always runs: its
        logits are needed), under `salt` only. No side effects."""
        query = prompt_ids[:-1]
        found = self.index.match(query, salt)
        miss = self._miss_reason(found, query, salt)
        partial = None
        if found.partial_block is not None:
            partial = PartialBlock(found.partial_block, found.length % self.block_size)
        diverged_at = found.length if miss is MissReason.DIVERGED else None
        return Match(found.length, found.blocks, partial, None, miss, diverged_at, found.node)

    def _miss_reason(self, found: IndexMatch, query: Sequence[int], salt: str | None) -> MissReason | None:
        # Only the shared namespace is consulted: one tenant's cache is never revealed to another.
        if salt is not None and found.stop is not Stop.EXHAUSTED:
            if self.index.match(query, None).length > found.length:
                return MissReason.SALT
        return _MISS_BY_STOP.get(found.stop)

    def acquire(self, match: Match, salt: str | None) -> tuple[SeqCache, tuple[int, int] | None] | None:
        """Start a request on `match` (fresh from `match`, no mutating call in between).

        Locks the match, shares its full blocks and allocates one block for the partial block,
        evicting if needed. Returns the SeqCache and the (src, dst) block copy the runner must
        execute before the next forward; or None if no block can be had, with the lock and the
        shares undone (the lock's LRU touch and entries evicted by the attempt remain).
        """
        if match.node is not None:
            self.index.lock(match.node)  # first: the eviction below must not drop the match
        table = list(match.blocks)
        for block in table:
            self.pool.share(block)
        self._hold(table)
        copy = None
        if match.partial is not None:
            fresh = self._allocate_blocks(1)
            if fresh is None:
                self._drop_table(table)
                if match.node is not None:
                    self.index.unlock(match.node)
                return None
            copy = (match.partial.block, fresh[0])
            table.extend(fresh)
            self._hold(fresh)
        seq = SeqCache(salt, table, match.cached_tokens, match.cached_tokens, match.node)
        self._live.add(seq)
        return seq, copy

    def allocate(self, seq: SeqCache, num_tokens: int) -> bool:
        """Grow `seq.block_table` to cover positions 0..num_tokens-1, evicting unlocked LRU
        cache entries if the free list is short. False, with nothing allocated, if impossible
        (cache entries evicted by an attempt that still fell short stay evicted)."""
        self._require_live(seq)
        num_needed = -(-num_tokens // self.block_size) - len(seq.block_table)
        if num_needed <= 0:
            return True
        fresh = self._allocate_blocks(num_needed)
        if fresh is None:
            return False
        seq.block_table.extend(fresh)
        self._hold(fresh)
        return True

    # ---- while running and at the end ---------------------------------------------------

    def commit(self, seq: SeqCache, token_ids: Sequence[int]) -> None:
        """Index the full blocks of `token_ids` (tokens whose KV is computed) while `seq` runs,
        so other requests can share them now; moves the seq's lock to the deepest new node."""
        self._require_live(seq)
        num_full = len(token_ids) // self.block_size * self.block_size
        if num_full <= seq.num_committed:
            return
        inserted = self.index.insert(token_ids[:num_full], seq.block_table, seq.salt)
        self._share(inserted.adopted)
        if inserted.node is not None:
            self.index.lock(inserted.node)  # lock new before unlocking old: no gap to evict in
        if seq._lock is not None:
            self.index.unlock(seq._lock)
        seq._lock, seq.num_committed = inserted.node, num_full

    def release(self, seq: SeqCache, token_ids: Sequence[int]) -> None:
        """End `seq` (finish, abort or preemption): index `token_ids` (every token whose KV is
        computed, e.g. prompt + output minus the last sampled token), unlock, free its blocks.
        Afterwards the seq holds nothing and must not be used again.

        Safe before the partial-block copy ran (`token_ids` = the first cached_tokens): those
        tokens lie on the locked path, so the index adopts none of this seq's blocks for them.
        """
        self._require_live(seq)
        inserted = self.index.insert(token_ids, seq.block_table, seq.salt)
        self._share(inserted.adopted)
        if seq._lock is not None:
            self.index.unlock(seq._lock)
        self._drop_table(seq.block_table)
        seq.block_table.clear()
        seq._lock = None
        self._live.discard(seq)

    def evict(self, num_blocks: int) -> int:
        """Evict LRU unlocked cache entries until `num_blocks` more blocks are free or nothing
        is evictable. Returns the number of blocks that went back to the free list."""
        before = self.pool.num_free
        self._make_free(before + num_blocks)
        return self.pool.num_free - before

    # ---- stats --------------------------------------------------------------------------

    def record(self, num_prompt_tokens: int, cached_tokens: int) -> None:
        """Count one request's lookup (once per request, not again on resume)."""
        self._queries += num_prompt_tokens
        self._hits += cached_tokens

    @property
    def stats(self) -> CacheStats:
        free = self.pool.num_free
        return CacheStats(self._queries, self._hits, self._evictions, self._num_used,
                          self.num_blocks - self._num_used - free, free, self.num_blocks)

    # ---- block accounting ---------------------------------------------------------------

    def _allocate_blocks(self, num: int) -> list[int] | None:
        cached = self.num_blocks - self._num_used - self.pool.num_free
        if num > self.pool.num_free + cached:
            return None  # even evicting every cached block would not do: keep the cache
        self._make_free(num)
        return self.pool.allocate(num)

    def _make_free(self, num_free: int) -> None:
        # An evicted entry frees nothing when another holder keeps its block: hence the loop.
        while self.pool.num_free < num_free:
            dropped = self.index.evict(num_free - self.pool.num_free)
            if not dropped:
                return
            for block in dropped:
                self.pool.free(block)
                if self.pool.ref_count(block) == self._holders[block]:
                    self._evictions += 1  # its last index entry is gone

    def _share(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            self.pool.share(block)

    def _hold(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            self._holders[block] += 1
            self._num_used += self._holders[block] == 1

    def _drop_table(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            self._holders[block] -= 1
            self._num_used -= self._holders[block] == 0
            self.pool.free(block)

    def _require_live(self, seq: SeqCache) -> None:
        if seq not in self._live:
            raise ValueError("this SeqCache was released (or belongs to another CacheManager)")

    def check_invariants(self) -> None:
        """Recount every holder and raise AssertionError on any mismatch. Walks everything:
        tests only."""
        self.index.check_invariants()
        nodes = list(self.index.nodes())
        index_refs = Counter(block for node in nodes for block in node.blocks)
        holders = Counter(block for seq in self._live for block in seq.block_table)
        locks = Counter(id(seq._lock) for seq in self._live if seq._lock is not None)
        node_ids = {id(node) for node in nodes}
        require(all(key in node_ids for key in locks), "a running request locks a node not in the index")
        for node in nodes:
            require(node.lock_ref == locks[id(node)], f"{node} lock_ref != {locks[id(node)]} lockers")
        for seq in self._live:
            require(len(set(seq.block_table)) == len(seq.block_table), f"duplicate blocks in {seq}")
        for block in range(self.num_blocks):
            refs = self.pool.ref_count(block)
            require(refs == index_refs[block] + holders[block],
                     f"block {block}: {refs} refs, {index_refs[block]} index + {holders[block]} running")
            require(self._holders[block] == holders[block], f"block {block}: holder count out of date")
        free = self.pool.free_block_ids()
        require(len(set(free)) == len(free), "duplicate blocks in the free list")
        require(set(free) == {b for b in range(self.num_blocks) if self.pool.ref_count(b) == 0},
                 "free list != blocks with no reference")
        require(self._num_used == len(holders), "blocks_used out of date")
