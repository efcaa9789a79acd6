"""CacheManager: all the scheduler sees of KV memory and the prefix cache.

One request's life: `match` (dry run, no side effects) -> `acquire` (share the matched blocks,
copy the partial one) -> `allocate` as it grows (`truncate` gives back blocks allocated ahead
for rejected speculative drafts) -> `commit` full blocks while it runs ->
`release` on finish, abort or preemption (its computed tokens enter the index, its blocks are
freed; the ones the index adopted survive through the index's reference).

Hybrid models (a CacheLayout with RECURRENT layers) add state slots: every running sequence
holds a working slot; `commit(..., checkpoint=slot)` files a snapshot of it in the index; a
match ends only where a checkpoint is (`restore_from`, held until `restored`); `release` files
the working slot itself as the checkpoint at the end of what was computed. When every attention
layer slides, `trim` gives back the blocks that fell out of the window of a running sequence.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from reprise.cache.block_pool import BlockPool
from reprise.cache.index import Evicted, IndexMatch, NullIndex, PrefixIndex, Stop
from reprise.cache.layout import CacheLayout
from reprise.cache.match import CacheStats, IndexListener, Match, MissReason, PartialBlock, SeqCache
from reprise.cache.radix import Node, RadixIndex
from reprise.cache.states import StatePool

_MISS_BY_STOP = {Stop.DIVERGED: MissReason.DIVERGED, Stop.EVICTED: MissReason.EVICTED,
                 Stop.DISABLED: MissReason.DISABLED}


class CacheManager:
    """Block pool + prefix index + per-block holder counts, kept consistent.

    Every block's pool reference count equals its index entries plus the live SeqCache tables
    holding it. Eviction only removes index entries of unlocked leaves, so a block a running
    request holds is never freed under it.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True,
                 layout: CacheLayout | None = None, num_state_slots: int = 0, max_pinned_fraction: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, listener: IndexListener | None = None) -> None:
        """`max_pinned_fraction`: of the pool, the blocks one namespace may pin; `clock` times pins;
        `listener` hears of blocks entering and leaving the index (tiers, KV events)."""
        self.listener = listener
        self.block_size = block_size
        self.max_pinned_blocks = int(num_blocks * max_pinned_fraction)
        self._clock = clock
        self.num_blocks = num_blocks
        self.pool = BlockPool(num_blocks, block_size)
        self.recurrent = layout is not None and layout.has_recurrent
        if self.recurrent and num_state_slots < 1:
            raise ValueError("a layout with recurrent layers needs state slots")
        self.states = StatePool(num_state_slots) if self.recurrent else None
        self.window = layout.sliding_window if layout is not None and layout.all_sliding else None
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
        diverged_at = found.length if miss is MissReason.DIVERGED else None
        length, blocks, partial_block, checkpoint = found.length, found.blocks, found.partial_block, None
        if self.recurrent:
            length, checkpoint = found.checkpoints[-1] if found.checkpoints else (0, None)
            if length < found.length:
                miss = MissReason.NO_CHECKPOINT
                blocks = found.blocks[:length // self.block_size]
                partial_block = found.blocks[length // self.block_size] \
                    if length // self.block_size < len(found.blocks) else found.partial_block
        partial = PartialBlock(partial_block, length % self.block_size) if length % self.block_size else None
        return Match(length, blocks, partial, checkpoint, miss, diverged_at, found.node if length else None)

    @staticmethod
    def no_match(reason: MissReason) -> Match:
        """An empty match, for a request that must not reuse the cache (`reason` says why)."""
        return Match(0, (), None, None, reason, None)

    def _miss_reason(self, found: IndexMatch, query: Sequence[int], salt: str | None) -> MissReason | None:
        # Only the shared namespace is consulted, never another salt's: one tenant's cache is never
        # revealed to another. The server keeps the shared namespace to those who may read it
        # anyway: with several API keys (a namespace each) no request runs unsalted, so it stays
        # empty; it fills only without keys, with one key, or with --shared-cache, where any caller
        # can send the same prompt without cache_salt and see the hit.
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
        seq = SeqCache(salt, list(match.blocks), match.cached_tokens, match.cached_tokens, _lock=match.node)
        self._share(seq.block_table)
        self._hold(seq.block_table)
        self._live.add(seq)
        if match.checkpoint is not None:
            self.states.share(match.checkpoint)  # before taking a slot, which may drop checkpoints
            seq.restore_from = match.checkpoint
        if self.recurrent:
            seq.state_slot = self._allocate_slot()
        fresh = None
        if seq.state_slot is not None or not self.recurrent:
            fresh = self._allocate_blocks(1) if match.partial is not None else []
        if fresh is None:
            self.release(seq, ())
            return None
        seq.block_table.extend(fresh)
        self._hold(fresh)
        return seq, (match.partial.block, fresh[0]) if fresh else None

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

    def truncate(self, seq: SeqCache, num_tokens: int) -> None:
        """Shrink `seq.block_table` to the blocks covering positions 0..num_tokens-1, freeing the
        rest: blocks allocated ahead for speculative positions whose drafts were rejected. Never
        below what is committed, so no block the index shares with others leaves here."""
        self._require_live(seq)
        if num_tokens < seq.num_committed:
            raise ValueError(f"cannot truncate to {num_tokens} tokens: {seq.num_committed} are committed")
        num_kept = -(-num_tokens // self.block_size)
        dropped = seq.block_table[num_kept:]
        del seq.block_table[num_kept:]
        self._drop_table(dropped)

    # ---- while running and at the end ---------------------------------------------------

    def commit(self, seq: SeqCache, token_ids: Sequence[int], checkpoint: int | None = None) -> None:
        """Index the full blocks of `token_ids` (tokens whose KV is computed) while `seq` runs,
        so other requests can share them now; moves the seq's lock to the deepest new node.

        With `checkpoint` (a slot from `allocate_checkpoint` holding the state after all of
        `token_ids`), every token is indexed, partial last block included, and the checkpoint
        is filed at len(token_ids); the slot is freed if that position already has one."""
        self._require_live(seq)
        num_tokens = len(token_ids) if checkpoint is not None else len(token_ids) // self.block_size * self.block_size
        if num_tokens <= seq.num_committed and checkpoint is None:
            return
        inserted = self.index.insert(token_ids[:num_tokens], seq.block_table, seq.salt)
        self._share(inserted.adopted)
        self._notify(seq, token_ids, num_tokens, inserted)
        if checkpoint is not None:
            self._file_checkpoint(seq.salt, inserted.node, token_ids[:num_tokens], checkpoint)
        if num_tokens <= seq.num_committed:
            return
        if inserted.node is not None:
            self.index.lock(inserted.node)  # lock new before unlocking old: no gap to evict in
        if seq._lock is not None:
            self.index.unlock(seq._lock)
        seq._lock, seq.num_committed = inserted.node, num_tokens

    def allocate_checkpoint(self) -> int | None:
        """A free state slot for a snapshot (None if there is none, then skip the checkpoint)."""
        return self._allocate_slot() if self.recurrent and not isinstance(self.index, NullIndex) else None

    def restored(self, seq: SeqCache) -> None:
        """The runner has copied `seq.restore_from` into the working slot: drop that hold."""
        if seq.restore_from is not None:
            self.states.free(seq.restore_from)
            seq.restore_from = None

    def trim(self, seq: SeqCache, num_computed: int) -> None:
        """All-sliding layouts: give back the blocks every position >= num_computed no longer
        sees (wholly before num_computed - window + 1). Cached ones stay in the index."""
        if self.window is None:
            return
        num_dead = min((num_computed - self.window + 1) // self.block_size, len(seq.block_table))
        for i in range(seq.num_trimmed, num_dead):
            self._drop_table([seq.block_table[i]])
            seq.block_table[i] = None
        seq.num_trimmed = max(seq.num_trimmed, num_dead)

    def release(self, seq: SeqCache, token_ids: Sequence[int], pins: Sequence[tuple[int, float]] = ()) -> None:
        """End `seq` (finish, abort or preemption): index `token_ids` (every token whose KV is
        computed, e.g. prompt + output minus the last sampled token), unlock, free its blocks.
        Afterwards the seq holds nothing and must not be used again. Each of `pins`, (num_tokens,
        ttl_seconds), pins the first num_tokens indexed for that long (see cache/pins.py).

        Safe before the partial-block copy ran (`token_ids` = the first cached_tokens): those
        tokens lie on the locked path, so the index adopts none of this seq's blocks for them.
        """
        self._require_live(seq)
        token_ids = token_ids[:self._insertable(seq, len(token_ids))]
        inserted = self.index.insert(token_ids, seq.block_table, seq.salt)
        self._share(inserted.adopted)
        self._notify(seq, token_ids, len(token_ids), inserted)
        if seq._lock is not None:
            self.index.unlock(seq._lock)
        unrestored = seq.restore_from is not None     # released before the runner copied its state in
        self.restored(seq)
        if seq.state_slot is not None:
            if token_ids and not unrestored:   # the working state is the state after exactly these tokens
                self._file_checkpoint(seq.salt, inserted.node, token_ids, seq.state_slot)
            else:
                self.states.free(seq.state_slot)
        self._drop_table(seq.block_table)
        seq.block_table.clear()
        seq._lock, seq.state_slot = None, None
        self._live.discard(seq)
        self._pin(token_ids, seq.salt, pins)

    def _notify(self, seq: SeqCache, token_ids: Sequence[int], num_tokens: int, inserted) -> None:
        """Tells the listener of the whole blocks this seq commits for the first time: from the
        block holding position num_committed (partly committed, or matched, before) on."""
        first, end = seq.num_committed // self.block_size, num_tokens // self.block_size
        if self.listener is not None and end > first and not isinstance(self.index, NullIndex):
            self.listener.inserted(seq.salt, token_ids, seq.block_table, first, end, inserted.adopted)

    def _pin(self, token_ids: Sequence[int], salt: str | None, pins: Sequence[tuple[int, float]]) -> None:
        """After the release: a pin's split must not move the nodes the release still used."""
        now = self._clock()
        for num_tokens, ttl in pins:
            if min(num_tokens, len(token_ids)):
                pinned = self.index.pin(token_ids[:num_tokens], salt, now + ttl, self.max_pinned_blocks)
                self._share(pinned.adopted)

    def _insertable(self, seq: SeqCache, num_tokens: int) -> int:
        """Tokens that can be indexed: beyond what is committed, only up to the first block trim gave back."""
        gap = next((i for i in range(seq.num_committed // self.block_size, len(seq.block_table))
                    if seq.block_table[i] is None), None)
        return num_tokens if gap is None else max(min(num_tokens, gap * self.block_size), seq.num_committed)

    def _file_checkpoint(self, salt: str | None, node: Node | None, token_ids: Sequence[int], slot: int) -> None:
        """Files `slot` (the state after `token_ids`) at len(token_ids), or frees it if that
        position has a checkpoint already; the listener hears of a filed one."""
        if node is None or not self.index.add_checkpoint(node, len(token_ids), slot):
            self.states.free(slot)
        elif self.listener is not None:
            self.listener.checkpointed(salt, token_ids, slot)

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
        """The counters and block states now (pins that have ended are let go first)."""
        self.index.expire_pins(self._clock())
        free = self.pool.num_free
        return CacheStats(self._queries, self._hits, self._evictions, self._num_used,
                          self.num_blocks - self._num_used - free, free, self.num_blocks,
                          self.index.pins.total_blocks, self.index.pins.num_expired, self.index.num_written_tokens)

    # ---- block accounting ---------------------------------------------------------------

    def _allocate_blocks(self, num: int) -> list[int] | None:
        cached = self.num_blocks - self._num_used - self.pool.num_free
        if num > self.pool.num_free + cached:
            return None  # even evicting every cached block would not do: keep the cache
        self._make_free(num)
        return self.pool.allocate(num)

    def _make_free(self, num_free: int) -> None:
        # An evicted entry frees nothing when another holder keeps its block: hence the loop.
        self.index.expire_pins(self._clock())
        while self.pool.num_free < num_free:
            dropped = self.index.evict(num_free - self.pool.num_free)
            if not dropped.blocks:
                return
            self._free_evicted(dropped)

    def _free_evicted(self, dropped: Evicted) -> None:
        gone = []
        for block in dropped.blocks:
            self.pool.free(block)
            if self.pool.ref_count(block) == self._holders[block]:
                self._evictions += 1  # its last index entry is gone
                gone.append(block)
        if self.listener is not None and gone:
            self.listener.evicted(gone)
        for slot in dropped.checkpoints:
            self.states.free(slot)

    def _allocate_slot(self) -> int | None:
        """A state slot, dropping least recently used checkpoints (not their blocks) if none is free."""
        while self.states.num_free == 0:
            slot = self.index.drop_checkpoint()
            if slot is None:
                return None
            self.states.free(slot)       # stays held if a restore still waits on it
        return self.states.allocate(1)[0]

    def _share(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            self.pool.share(block)

    def _hold(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            self._holders[block] += 1
            self._num_used += self._holders[block] == 1

    def _drop_table(self, blocks: Iterable[int | None]) -> None:
        for block in blocks:
            if block is None:
                continue
            self._holders[block] -= 1
            self._num_used -= self._holders[block] == 0
            self.pool.free(block)

    def _require_live(self, seq: SeqCache) -> None:
        if seq not in self._live:
            raise ValueError("this SeqCache was released (or belongs to another CacheManager)")

    def check_invariants(self) -> None:
        """Recount every holder and raise AssertionError on any mismatch. Walks everything:
        tests and the server's on-demand check only."""
        from reprise.cache.invariants import check_manager
        check_manager(self)
