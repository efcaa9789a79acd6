"""CacheManager as the scheduler drives it. block_size 4; comments give the hand-computed state."""
from __future__ import annotations

import pytest

from reprise.cache import CacheManager, MissReason, PartialBlock
from tests.cache.helpers import BLOCK_SIZE, check_invariants, finish, start


def test_exact_repeat_matches_all_but_the_last_token(cache):
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])                 # leaf [0,9) -> blocks 0, 1, 2
    match = cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9], salt=None)
    assert (match.cached_tokens, match.blocks, match.partial, match.miss) == (8, (0, 1), None, None)
    check_invariants(cache)


def test_partial_block_match_is_token_exact(cache):
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    match = cache.match([1, 2, 3, 4, 5, 6, 70, 80], salt=None)
    assert match.cached_tokens == 6 and match.partial == PartialBlock(block=1, num_tokens=2)
    assert (match.miss, match.diverged_at) == (MissReason.DIVERGED, 6)
    seq, copy = cache.acquire(match, salt=None)
    assert copy == (1, 3) and seq.block_table == [0, 3]       # block 1 is copied, never written
    assert [cache.pool.ref_count(b) for b in (0, 1, 2, 3)] == [2, 1, 1, 1]
    check_invariants(cache)


def test_full_blocks_are_shared_by_reference(cache):
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    first, second = start(cache, [1, 2, 3, 4, 5, 6, 7, 8, 50]), start(cache, [1, 2, 3, 4, 5, 6, 7, 8, 60])
    assert first.block_table == [0, 1, 3] and second.block_table == [0, 1, 4]
    assert first.cached_tokens == second.cached_tokens == 8
    assert [cache.pool.ref_count(b) for b in (0, 1, 2)] == [3, 3, 1]
    stats = cache.stats
    assert (stats.blocks_used, stats.blocks_cached, stats.blocks_free) == (4, 1, 11)
    check_invariants(cache)


def test_split_mid_node_keeps_both_halves_valid(cache):
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])                # leaf [0,10) -> 0, 1, 2
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 80, 90, 91, 92])
    # second: copy 1 -> 3, new block 4; insert splits at 7 (inside block 1):
    #   [0,7) -> 0, 1    [7,10) -> 1, 2 (1 now in both halves)    new leaf [7,11) -> 3, 4
    assert [cache.pool.ref_count(b) for b in range(5)] == [1, 2, 1, 1, 1]
    first = cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99], salt=None)
    assert (first.cached_tokens, first.blocks, first.partial) == (10, (0, 1), PartialBlock(2, 2))
    second = cache.match([1, 2, 3, 4, 5, 6, 7, 80, 90, 91, 92, 99], salt=None)
    assert (second.cached_tokens, second.blocks, second.partial) == (11, (0, 3), PartialBlock(4, 3))
    stats = cache.stats
    assert (stats.blocks_used, stats.blocks_cached, stats.blocks_free) == (0, 5, 11)
    check_invariants(cache)


def test_sequences_sharing_a_prefix_then_diverging_at_a_block_edge(cache):
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])                # leaf [0,10) -> 0, 1, 2
    match = cache.match([1, 2, 3, 4, 5, 6, 7, 8, 50, 51], salt=None)
    assert (match.cached_tokens, match.blocks, match.partial) == (8, (0, 1), None)
    assert (match.miss, match.diverged_at) == (MissReason.DIVERGED, 8)
    seq, copy = cache.acquire(match, salt=None)
    assert copy is None and cache.allocate(seq, 10) and seq.block_table == [0, 1, 3]
    cache.release(seq, [1, 2, 3, 4, 5, 6, 7, 8, 50, 51])          # split at 8: nothing straddles
    assert [cache.pool.ref_count(b) for b in range(4)] == [1, 1, 1, 1]
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8, 50, 51, 52], salt=None).blocks == (0, 1)
    check_invariants(cache)


def test_next_turn_hits_the_whole_previous_turn(cache):
    prompt, reply = [1, 2, 3, 4, 5, 6, 7], [20, 21, 22]
    seq = start(cache, prompt)                                     # blocks 0, 1
    assert cache.allocate(seq, 9)                                  # 20 at 7, 21 at 8 -> block 2
    cache.release(seq, prompt + reply[:-1])                        # 22 was sampled, never run
    match = cache.match(prompt + reply + [30, 31, 32], salt=None)
    assert (match.cached_tokens, match.blocks, match.partial, match.miss) == (9, (0, 1), PartialBlock(2, 1), None)


def test_committed_blocks_serve_another_request_while_the_first_runs(cache):
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    running = start(cache, prompt)                                  # blocks 0, 1, 2
    cache.commit(running, prompt)                                   # full blocks: [0,8) -> 0, 1
    assert running.num_committed == 8
    follower = start(cache, [1, 2, 3, 4, 5, 6, 7, 8, 60, 61])
    assert follower.cached_tokens == 8 and follower.block_table == [0, 1, 3]
    assert [cache.pool.ref_count(b) for b in (0, 1, 2)] == [3, 3, 1]
    assert cache.evict(16) == 0                                     # both requests lock [0,8)
    check_invariants(cache)
    cache.release(running, prompt)
    cache.release(follower, [1, 2, 3, 4, 5, 6, 7, 8, 60, 61])
    assert cache.stats.blocks_used == 0
    check_invariants(cache)


def test_least_recently_used_conversation_is_evicted_first():
    cache = CacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    a, b, c = [1, 2, 3, 4, 5, 6, 7, 8], [11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25, 26, 27, 28]
    finish(cache, a)                                                # 0, 1
    finish(cache, b)                                                # 2, 3
    finish(cache, c)                                                # 4, 5
    touch = start(cache, a + [9])                                   # shares 0, 1; new block 6
    cache.release(touch, a)                                         # aborted before its forward
    assert cache.pool.free_block_ids() == (7, 6)
    long_request = start(cache, list(range(100, 116)))              # 4 blocks: evicts b only
    assert long_request.block_table == [7, 6, 2, 3]
    assert cache.stats.evictions == 2
    assert cache.match(b + [0], salt=None).miss is MissReason.EVICTED
    assert cache.match(a + [0], salt=None).cached_tokens == 8
    short_request = start(cache, list(range(200, 208)))             # 2 blocks: evicts c, not a
    assert short_request.block_table == [4, 5]
    assert cache.match(c + [0], salt=None).cached_tokens == 0
    assert cache.match(a + [0], salt=None).cached_tokens == 8
    check_invariants(cache)


def test_locked_prefix_is_never_evicted():
    cache = CacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8])                         # 0, 1
    running = start(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])             # shares 0, 1; new block 2
    assert cache.evict(4) == 0
    other = start(cache, [50, 51, 52])                              # block 3
    assert not cache.allocate(other, 8)                              # would need 0 or 1
    assert other.block_table == [3]
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9], salt=None).cached_tokens == 8
    cache.release(running, [1, 2, 3, 4, 5, 6, 7, 8])
    assert cache.allocate(other, 8) and other.block_table == [3, 2]  # free first, no eviction
    check_invariants(cache)


def test_allocate_evicts_only_what_it_needs_and_fails_without_side_effects():
    cache = CacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8])                         # 0, 1
    finish(cache, [11, 12, 13, 14, 15, 16, 17, 18])                 # 2, 3
    seq = start(cache, [31, 32, 33, 34])                            # 4
    assert cache.allocate(seq, 16) and seq.block_table == [4, 5, 6, 7]
    assert cache.stats.evictions == 0
    assert cache.allocate(seq, 20) and seq.block_table == [4, 5, 6, 7, 0]
    assert cache.stats.evictions == 2                               # the older conversation only
    assert cache.match([11, 12, 13, 14, 15, 16, 17, 18, 19], salt=None).cached_tokens == 8
    assert not cache.allocate(seq, 40)                              # 5 more; 1 free + 2 cached
    assert seq.block_table == [4, 5, 6, 7, 0] and cache.stats.evictions == 2
    assert cache.stats.blocks_free == 1
    check_invariants(cache)


def test_acquire_undoes_everything_when_the_partial_block_does_not_fit():
    cache = CacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    finish(cache, [1, 2, 3, 4, 5, 6])                               # 0, 1
    start(cache, [40, 41, 42])                                       # 2
    match = cache.match([1, 2, 3, 4, 5, 6, 7], salt=None)
    assert match.partial == PartialBlock(1, 2)
    assert cache.acquire(match, salt=None) is None
    assert [cache.pool.ref_count(b) for b in range(3)] == [1, 1, 1]
    check_invariants(cache)                                          # no lock left behind


def test_salts_never_share(cache):
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9], salt="a")
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9], salt="a").cached_tokens == 8
    other = cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9], salt="b")
    shared = cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9], salt=None)
    assert (other.cached_tokens, other.miss) == (0, None)
    assert (shared.cached_tokens, shared.miss) == (0, None)


def test_miss_reason_salt_when_the_shared_namespace_has_more(cache):
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    match = cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9], salt="a")
    assert (match.cached_tokens, match.miss, match.diverged_at) == (0, MissReason.SALT, None)


def test_miss_reason_evicted(cache):
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    finish(cache, [1, 2, 3, 4, 50, 51, 52, 53])                    # [0,4) with two leaves
    assert cache.evict(1) == 1                                      # the [4,8) leaf of 5..8
    match = cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9], salt=None)
    assert (match.cached_tokens, match.miss) == (4, MissReason.EVICTED)
    assert cache.stats.evictions == 1


def test_evictions_count_blocks_that_leave_the_index(cache):
    finish(cache, [1, 2, 3, 4, 5, 6])                               # 0, 1
    finish(cache, [1, 2, 3, 4, 5, 60, 61, 62])                      # copy 1 -> 2
    # split at 5: [0,5) -> 0, 1    [5,6) -> 1 (straddles)    [5,8) -> 2
    assert [cache.pool.ref_count(b) for b in range(3)] == [1, 2, 1]
    assert cache.evict(1) == 1          # [5,6) first frees nothing (1 stays in [0,5)), then [5,8)
    assert cache.stats.evictions == 1 and cache.pool.free_block_ids()[-1] == 2
    match = cache.match([1, 2, 3, 4, 5, 6, 7], salt=None)
    assert (match.cached_tokens, match.partial, match.miss) == (5, PartialBlock(1, 1), MissReason.EVICTED)
    check_invariants(cache)


def test_disabled_cache_keeps_nothing_and_frees_everything():
    cache = CacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_cache=False)
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    match = cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9], salt=None)
    assert (match.cached_tokens, match.blocks, match.partial, match.miss) == (0, (), None, MissReason.DISABLED)
    seq = start(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    cache.commit(seq, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    cache.release(seq, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    stats = cache.stats
    assert (stats.blocks_used, stats.blocks_cached, stats.blocks_free) == (0, 0, 8)
    assert cache.match([7], salt=None).miss is None                 # nothing to look up
    check_invariants(cache)


def test_stats_count_recorded_requests_and_release_empties_the_seq(cache):
    seq = start(cache, [1, 2, 3, 4, 5])
    cache.record(num_prompt_tokens=5, cached_tokens=0)
    cache.record(num_prompt_tokens=5, cached_tokens=4)
    cache.release(seq, [1, 2, 3, 4, 5])
    assert (cache.stats.queries, cache.stats.hits) == (10, 4)
    assert seq.block_table == []
    with pytest.raises(ValueError):
        cache.release(seq, [])


def test_truncate_frees_blocks_past_the_kept_tokens_never_committed_ones(cache):
    prompt = list(range(1, 10))                     # 9 tokens: blocks 0, 1, 2
    seq = start(cache, prompt)
    cache.commit(seq, prompt)                       # blocks 0 and 1 (8 tokens) enter the index
    assert cache.allocate(seq, 9 + 5)               # 5 speculative positions reach into block 3
    assert seq.block_table == [0, 1, 2, 3]
    cache.truncate(seq, 10)                         # 10 tokens need 3 blocks: the 4th held rejected KV only
    assert seq.block_table == [0, 1, 2] and cache.stats.blocks_free == 13
    with pytest.raises(ValueError):
        cache.truncate(seq, 7)                      # below the 8 committed tokens
    check_invariants(cache)
    cache.release(seq, prompt + [10])
    check_invariants(cache)
    assert cache.stats.blocks_used == 0


def test_cache_writes_count_the_tokens_newly_stored(cache):
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert cache.stats.tokens_written == 9
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])           # two more tokens on the same path
    finish(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])                   # nothing new
    assert cache.stats.tokens_written == 11
    cache.evict(16)
    assert cache.stats.tokens_written == 11                      # a counter: evictions do not lower it
