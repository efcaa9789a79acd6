"""KV events through a real redis-server: publisher -> stream -> the router's per-replica index."""
from __future__ import annotations

import time

import pytest

from reprise.cache.tiers.events import KvEventPublisher, namespace_id
from reprise.cache.tiers.keys import block_keys, namespace
from reprise.router.index import KvEventSubscriber, KvIndex

FINGERPRINT = "a" * 32
BLOCK = 4


def chain(tokens, salt=None):
    root = namespace(FINGERPRINT, salt)
    return root, block_keys(root, tokens, BLOCK)


def wait_for(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def index_of(redis_url):
    subscribers = []

    def make(*replica_ids):
        index = KvIndex()
        subscriber = KvEventSubscriber(redis_url, index).start()
        subscriber.follow(set(replica_ids))
        subscribers.append(subscriber)
        return index
    yield make
    for subscriber in subscribers:
        subscriber.close()


def test_stored_and_removed_reach_the_index(redis_url, index_of):
    publisher = KvEventPublisher(redis_url, "replica-a", FINGERPRINT, BLOCK)
    index = index_of("replica-a")
    root, keys = chain(list(range(16)))
    ns_id = namespace_id(root)
    publisher.stored(keys, root)
    assert wait_for(lambda: index.matched_blocks("replica-a", ns_id, keys) == 4)
    assert index.model("replica-a") == (FINGERPRINT, BLOCK)
    publisher.removed(keys[2:])
    assert wait_for(lambda: index.matched_blocks("replica-a", ns_id, keys) == 2)
    assert index.matched_blocks("replica-b", ns_id, keys) == 0
    publisher.close()


def test_a_late_router_learns_from_the_snapshot(redis_url, index_of):
    publisher = KvEventPublisher(redis_url, "replica-a", FINGERPRINT, BLOCK, max_len=8, snapshot_s=0.2)
    root, keys = chain(list(range(4 * 40)))
    for key in keys:                 # 40 entries: the stream keeps about 8, the first ones are gone
        publisher.stored([key], root)
    publisher.flush()
    time.sleep(0.4)                  # a periodic snapshot
    index = index_of("replica-a")
    assert wait_for(lambda: index.matched_blocks("replica-a", namespace_id(root), keys) == 40)
    publisher.close()


def test_lookup_sees_only_the_callers_namespace(redis_url, index_of):
    publisher = KvEventPublisher(redis_url, "replica-a", FINGERPRINT, BLOCK)
    index = index_of("replica-a")
    tokens = list(range(12))
    root_a, keys_a = chain(tokens, salt="tenant-a")
    root_b, keys_b = chain(tokens, salt="tenant-b")
    publisher.stored(keys_a, root_a)
    assert wait_for(lambda: index.matched_blocks("replica-a", namespace_id(root_a), keys_a) == 3)
    assert index.matched_blocks("replica-a", namespace_id(root_b), keys_b) == 0
    assert index.matched_blocks("replica-a", namespace_id(root_b), keys_a) == 0   # even A's own keys
    publisher.close()


def test_publisher_survives_a_dead_redis_and_resyncs():
    from tests.tiers.redis_server import RedisServer
    server = RedisServer().start()
    publisher = KvEventPublisher(server.url, "replica-a", FINGERPRINT, BLOCK, reconnect_s=0.1, snapshot_s=60)
    root, keys = chain(list(range(12)))
    try:
        server.kill()
        publisher.stored(keys, root)             # queued; publishing fails, never raises
        time.sleep(0.5)
        assert publisher.errors >= 1
        server.start()
        index = KvIndex()
        subscriber = KvEventSubscriber(server.url, index).start()
        subscriber.follow({"replica-a"})
        assert wait_for(lambda: index.matched_blocks("replica-a", namespace_id(root), keys) == 3)
        subscriber.close()
    finally:
        publisher.close()
        server.stop()
