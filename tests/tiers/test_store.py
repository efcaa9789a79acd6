"""The Redis tier against a real redis-server: round trip, checksums, TTL, outages, tenants."""
from __future__ import annotations

import logging
import time

import pytest

from reprise.cache.tiers.keys import block_keys, namespace
from reprise.cache.tiers.store import HEADER, KEY_PREFIX, RedisTier, decode, encode, redis_key
from tests.tiers.redis_server import RedisServer

FINGERPRINT = "f" * 32
BLOCK = 4


def keys_of(token_ids, salt=None):
    return block_keys(namespace(FINGERPRINT, salt), token_ids, BLOCK)


@pytest.fixture
def tier(redis_url):
    tier = RedisTier(redis_url, ttl_s=600, reconnect_s=0.2)
    yield tier
    tier.close()


def test_round_trip(tier, redis_server):
    keys = keys_of(list(range(12)))
    payloads = [bytes([i]) * 1000 for i in range(3)]
    assert tier.store(list(zip(keys, payloads))) == 3
    tier.flush()
    assert tier.contains(keys) == 3
    assert tier.load(keys) == payloads
    stats = tier.stats()
    assert (stats.stores, stats.loads, stats.dropped, stats.corrupt) == (3, 3, 0, 0)
    assert stats.num_entries == 3 and stats.bytes_limit == 256 * 2**20
    assert len(stats.load_seconds) == 1 and len(stats.store_seconds) == 3
    assert sorted(redis_server.client().keys()) == sorted((KEY_PREFIX + key.hex()).encode() for key in keys)


def test_contains_stops_at_the_first_absent_key(tier):
    keys = keys_of(list(range(16)))
    tier.store([(keys[0], b"a"), (keys[1], b"b"), (keys[3], b"d")])
    tier.flush()
    assert tier.contains(keys) == 2
    assert tier.load(keys) == [b"a", b"b", None, b"d"]


def test_value_is_header_and_payload_with_a_ttl(tier, redis_server):
    key = keys_of([1, 2, 3, 4])[0]
    tier.store([(key, b"payload")])
    tier.flush()
    client = redis_server.client()
    value = client.get(redis_key(key))
    assert value == encode(b"payload") and len(value) == HEADER.size + 7
    assert value[:4] == b"RPKV" and decode(value) == b"payload"
    assert 590 <= client.ttl(redis_key(key)) <= 600


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "bad_magic", "not_ours"])
def test_corrupt_value_is_a_miss_deleted_and_counted(tier, redis_server, damage):
    key = keys_of([5, 6, 7, 8])[0]
    value = encode(b"x" * 100)
    damaged = {"flip_payload": value[:-1] + b"y", "truncate": value[:-10], "bad_magic": b"XXXX" + value[4:],
               "not_ours": b"hello"}[damage]
    redis_server.client().set(redis_key(key), damaged)
    assert tier.load([key]) == [None]
    assert redis_server.client().exists(redis_key(key)) == 0
    assert tier.stats().corrupt == 1 and tier.stats().loads == 0


def test_tenants_do_not_share_keys(tier):
    tokens = list(range(8))
    tier.store([(key, b"tenant a") for key in keys_of(tokens, salt="a")])
    tier.flush()
    assert tier.contains(keys_of(tokens, salt="a")) == 2
    for other in ("b", None, ""):
        assert tier.contains(keys_of(tokens, salt=other)) == 0
        assert tier.load(keys_of(tokens, salt=other)) == [None, None]


def test_full_queue_drops_and_counts(redis_url):
    tier = RedisTier(redis_url, queue_bytes=1000)
    try:
        keys = keys_of(list(range(4 * 50)))
        accepted = tier.store([(key, b"z" * 400) for key in keys])
        tier.flush()
        stats = tier.stats()
        assert accepted < 50 and stats.dropped == 50 - accepted and stats.stores == accepted
    finally:
        tier.close()


def test_dead_redis_degrades_then_recovers(caplog):
    server = RedisServer().start()
    tier = RedisTier(server.url, socket_timeout_s=0.2, reconnect_s=0.3)
    keys = keys_of(list(range(8)))
    try:
        tier.store([(keys[0], b"before")])
        tier.flush()
        assert tier.load(keys[:1]) == [b"before"]
        server.kill()
        with caplog.at_level(logging.WARNING, logger="reprise"):
            started = time.monotonic()
            assert tier.contains(keys) == 0
            assert tier.load(keys) == [None, None]
            assert tier.store([(keys[1], b"lost")]) == 0
            for _ in range(5):
                tier.contains(keys)
            assert time.monotonic() - started < 2
        assert not tier.healthy and tier.errors >= 1 and tier.stats().dropped == 1
        assert sum("unavailable" in record.message for record in caplog.records) == 1
        server.start()                      # a new, empty server on the same port
        time.sleep(0.4)
        assert tier.contains(keys) == 0 and tier.healthy
        assert tier.store([(keys[0], b"after")]) == 1
        tier.flush()
        assert tier.load(keys[:1]) == [b"after"]
    finally:
        tier.close()
        server.stop()


def test_writes_queued_when_redis_dies_are_dropped_not_raised(redis_url):
    server = RedisServer().start()
    tier = RedisTier(server.url, socket_timeout_s=0.2, reconnect_s=60)
    try:
        server.kill()
        keys = keys_of(list(range(40)))
        tier.store([(key, b"v" * 10) for key in keys])
        tier.flush()
        stats = tier.stats()
        assert stats.stores == 0 and stats.dropped == 10
    finally:
        tier.close()
        server.stop()
