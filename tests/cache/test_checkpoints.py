"""Hybrid and sliding layouts in the CacheManager: checkpoints, safe matches, trimmed windows.

block_size 4; a "state" is a slot id, the runner's copies are not modelled here.
"""
from __future__ import annotations

import pytest

from reprise.cache import CacheManager, MissReason, PartialBlock
from reprise.cache.layout import CacheLayout, LayerKind
from tests.cache.helpers import BLOCK_SIZE, check_invariants, start

HYBRID = CacheLayout((LayerKind.RECURRENT, LayerKind.RECURRENT, LayerKind.FULL))
SLIDING = CacheLayout((LayerKind.SLIDING, LayerKind.SLIDING), sliding_window=6)
PROMPT = list(range(1, 13))                      # 12 tokens: blocks 0, 1, 2


@pytest.fixture
def hybrid() -> CacheManager:
    return CacheManager(num_blocks=16, block_size=BLOCK_SIZE, layout=HYBRID, num_state_slots=4)


def run_with_checkpoint_at_8(cache: CacheManager, num_computed: int) -> None:
    """A request that snapshots its state at 8 while prefilling, then ends at num_computed."""
    seq = start(cache, PROMPT)
    assert seq.state_slot == 0
    slot = cache.allocate_checkpoint()
    cache.commit(seq, PROMPT[:8], checkpoint=slot)
    cache.release(seq, PROMPT[:num_computed])    # files the working slot at num_computed


def test_match_ends_at_the_deepest_checkpoint_not_the_deepest_block(hybrid):
    run_with_checkpoint_at_8(hybrid, num_computed=10)            # checkpoints: 8 -> slot 1, 10 -> slot 0
    exact = hybrid.match(PROMPT[:10] + [99], salt=None)
    assert (exact.cached_tokens, exact.checkpoint, exact.miss) == (10, 0, None)
    assert exact.blocks == (0, 1) and exact.partial == PartialBlock(2, 2)
    fallback = hybrid.match(PROMPT[:9] + [50, 51], salt=None)    # shares 9 tokens; nearest checkpoint 8
    assert (fallback.cached_tokens, fallback.checkpoint) == (8, 1)
    assert fallback.blocks == (0, 1) and fallback.partial is None
    assert (fallback.miss, fallback.diverged_at) == (MissReason.NO_CHECKPOINT, 9)
    early = hybrid.match(PROMPT[:7] + [50], salt=None)           # shares 7: no checkpoint at or below
    assert (early.cached_tokens, early.checkpoint, early.blocks) == (0, None, ())
    check_invariants(hybrid)


def test_a_checkpoint_to_restore_is_held_until_the_runner_copied_it(hybrid):
    run_with_checkpoint_at_8(hybrid, num_computed=8)             # both at 8: the snapshot wins, slot 0 freed
    match = hybrid.match(PROMPT, salt=None)
    assert (match.cached_tokens, match.checkpoint) == (8, 1)
    seq, copy = hybrid.acquire(match, salt=None)
    assert copy is None and (seq.state_slot, seq.restore_from) == (2, 1)   # freed slot 0 is reused last
    assert hybrid.states.ref_count(1) == 2                       # the index + the pending restore
    hybrid.evict(16)                                             # locked: nothing goes
    hybrid.restored(seq)
    assert seq.restore_from is None and hybrid.states.ref_count(1) == 1
    check_invariants(hybrid)


def test_a_dropped_checkpoint_survives_for_the_restore_waiting_on_it(hybrid):
    run_with_checkpoint_at_8(hybrid, num_computed=10)
    seq, _ = hybrid.acquire(hybrid.match(PROMPT[:10] + [99], salt=None), salt=None)   # restores slot 0
    assert (seq.state_slot, seq.restore_from) == (2, 0)
    taken = [hybrid.allocate_checkpoint() for _ in range(3)]     # 1 free slot, then drop 8 -> 1, then 10 -> 0
    assert taken == [3, 1, None]                                 # slot 0 is held by the restore: not reusable
    assert hybrid.states.ref_count(0) == 1 and hybrid.match(PROMPT, salt=None).cached_tokens == 0
    hybrid.restored(seq)
    assert hybrid.states.ref_count(0) == 0
    for slot in taken[:2]:
        hybrid.states.free(slot)
    hybrid.release(seq, ())
    check_invariants(hybrid)


def test_evicting_a_node_frees_its_checkpoints(hybrid):
    run_with_checkpoint_at_8(hybrid, num_computed=12)
    assert hybrid.states.num_free == 2
    hybrid.evict(16)
    assert hybrid.states.num_free == 4 and hybrid.stats.blocks_free == 16
    check_invariants(hybrid)


def test_no_slot_no_admission_and_nothing_leaks(hybrid):
    seqs = [start(hybrid, [i, i + 1, i + 2]) for i in range(4)]
    assert hybrid.acquire(hybrid.match([7, 8, 9], salt=None), salt=None) is None
    check_invariants(hybrid)
    for seq in seqs:
        hybrid.release(seq, ())
    assert hybrid.states.num_free == 4 and hybrid.stats.blocks_free == 16


def test_without_prefix_cache_no_checkpoint_is_kept():
    cache = CacheManager(16, BLOCK_SIZE, enable_prefix_cache=False, layout=HYBRID, num_state_slots=2)
    seq = start(cache, PROMPT)
    assert cache.allocate_checkpoint() is None
    cache.release(seq, PROMPT)
    match = cache.match(PROMPT, salt=None)
    assert (match.cached_tokens, match.checkpoint, match.miss) == (0, None, MissReason.DISABLED)
    assert cache.states.num_free == 2
    check_invariants(cache)


def test_sliding_window_blocks_leave_a_running_sequence():
    cache = CacheManager(16, BLOCK_SIZE, layout=SLIDING)
    seq = start(cache, list(range(1, 21)))                      # 20 tokens: blocks 0..4
    cache.commit(seq, list(range(1, 9)))                         # blocks 0, 1 indexed
    cache.trim(seq, 16)                                          # position 16 sees 11..16: blocks 0, 1 dead
    assert seq.block_table == [None, None, 2, 3, 4]
    stats = cache.stats
    assert (stats.blocks_used, stats.blocks_cached, stats.blocks_free) == (3, 2, 11)
    cache.trim(seq, 20)                                          # sees 15..20: block 2 dead too
    assert seq.block_table[:3] == [None, None, None] and cache.stats.blocks_free == 12
    cache.release(seq, list(range(1, 20)))                       # block 2 is gone: index stops at 8
    assert cache.match(list(range(1, 21)), salt=None).cached_tokens == 8
    check_invariants(cache)


class Checkpoints:
    """An IndexListener that records the checkpoints filed (the tiers' write-through hook)."""

    def __init__(self):
        self.filed: list[tuple[str | None, int, int]] = []

    def inserted(self, salt, token_ids, block_table, first, end, adopted):
        pass

    def evicted(self, blocks):
        pass

    def checkpointed(self, salt, token_ids, slot):
        self.filed.append((salt, len(token_ids), slot))


def test_the_listener_hears_each_checkpoint_filed_and_not_one_that_lost_to_an_earlier():
    listener = Checkpoints()
    cache = CacheManager(16, BLOCK_SIZE, layout=HYBRID, num_state_slots=4, listener=listener)
    run_with_checkpoint_at_8(cache, num_computed=10)              # the snapshot at 8, the working slot at 10
    assert listener.filed == [(None, 8, 1), (None, 10, 0)]
    seq = start(cache, PROMPT)                                    # matches 10, restores slot 0
    cache.commit(seq, PROMPT[:10], checkpoint=cache.allocate_checkpoint())   # 10 is taken: freed, unheard
    cache.restored(seq)
    cache.release(seq, PROMPT[:11])                               # files the working slot at 11
    assert listener.filed == [(None, 8, 1), (None, 10, 0), (None, 11, 2)]      # working slot 2
    check_invariants(cache)
