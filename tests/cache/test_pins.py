"""Retention pins: a pinned prefix outlives LRU pressure for its TTL, within each tenant's share.
block_size 4, 16 blocks; a fake clock; comments give the hand-computed state."""
from __future__ import annotations

from reprise.cache import CacheManager
from tests.cache.helpers import BLOCK_SIZE, check_invariants, finish, start


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pinned_cache(clock: Clock, fraction: float = 0.5) -> CacheManager:
    return CacheManager(num_blocks=16, block_size=BLOCK_SIZE, max_pinned_fraction=fraction, clock=clock)


def finish_pinned(cache: CacheManager, token_ids: list[int], num_pinned: int, ttl: float, salt=None) -> None:
    cache.release(start(cache, token_ids, salt), token_ids, pins=((num_pinned, ttl),))


def flood(cache: CacheManager, first: int, count: int) -> None:
    """`count` unrelated 8-token sequences (2 blocks each), each released into the cache."""
    for n in range(count):
        finish(cache, list(range(first + 100 * n, first + 100 * n + 8)))


def test_a_pinned_prefix_survives_a_flood_until_its_ttl_ends():
    clock = Clock()
    cache = pinned_cache(clock)
    finish_pinned(cache, list(range(1, 13)), num_pinned=8, ttl=60)     # 12 tokens; the first 8 pinned
    assert cache.stats.blocks_pinned == 2
    flood(cache, 1000, 12)                    # 24 blocks through a 16-block pool: LRU goes round
    assert cache.match(list(range(1, 13)), None).cached_tokens == 8     # the pinned part stayed
    assert cache.stats.evictions >= 10
    check_invariants(cache)
    clock.now += 61                           # the pin ended: an ordinary (old) entry now
    assert (cache.stats.blocks_pinned, cache.stats.pin_expiries) == (0, 1)
    flood(cache, 5000, 8)
    assert cache.match(list(range(1, 13)), None).cached_tokens == 0
    check_invariants(cache)


def test_the_pin_ends_at_its_token_not_at_the_node():
    """Pinning 6 of 12 tokens splits the cached node at 6: tokens 7-12 stay ordinary."""
    clock = Clock()
    cache = pinned_cache(clock)
    finish_pinned(cache, list(range(1, 13)), num_pinned=6, ttl=60)    # blocks 0,1,2; the pin covers 0 and 1
    assert cache.stats.blocks_pinned == 2
    flood(cache, 1000, 8)
    assert cache.match(list(range(1, 13)), None).cached_tokens == 6
    check_invariants(cache)


def test_pinned_entries_go_last_but_do_go_when_nothing_else_can():
    clock = Clock()
    cache = pinned_cache(clock, fraction=1.0)
    finish_pinned(cache, list(range(1, 33)), num_pinned=32, ttl=3600)   # 8 blocks pinned
    finish(cache, list(range(100, 132)))                              # 8 unpinned blocks: the pool is full
    start(cache, list(range(200, 232)))                                 # needs 8: the unpinned entry goes
    assert cache.match(list(range(100, 132)), None).cached_tokens == 0
    assert cache.match(list(range(1, 33)), None).cached_tokens == 31
    start(cache, list(range(300, 316)))                                 # needs 4 more: only the pinned one is left
    assert cache.match(list(range(1, 33)), None).cached_tokens == 0
    assert cache.stats.blocks_pinned == 0
    check_invariants(cache)


def test_each_tenant_pins_within_its_own_share():
    clock = Clock()
    cache = pinned_cache(clock, fraction=0.25)                          # 4 blocks per tenant
    finish_pinned(cache, list(range(1, 13)), 12, 60, salt="a")         # 3 blocks: fits
    finish_pinned(cache, list(range(20, 32)), 12, 60, salt="a")        # 3 more would make 6: not pinned
    finish_pinned(cache, list(range(40, 52)), 12, 60, salt="b")        # b's own share
    assert cache.index.pins.num_blocks == {"a": 3, "b": 3}
    check_invariants(cache)


def test_a_repeated_pin_extends_and_never_shortens():
    clock = Clock()
    cache = pinned_cache(clock)
    finish_pinned(cache, list(range(1, 9)), 8, ttl=60)
    finish_pinned(cache, list(range(1, 9)), 8, ttl=10)                 # shorter: the 60 s pin stands
    clock.now += 30
    assert cache.stats.blocks_pinned == 2
    finish_pinned(cache, list(range(1, 9)), 8, ttl=100)                # extends to now + 100
    clock.now += 90
    assert cache.stats.blocks_pinned == 2
    clock.now += 20
    assert (cache.stats.blocks_pinned, cache.stats.pin_expiries) == (0, 1)
    check_invariants(cache)
