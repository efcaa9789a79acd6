"""DiskTier without weights: format, key table, restart, budget, corruption, degraded disks."""
from __future__ import annotations

import errno
import logging
import os

from reprise.cache.tiers.disk import HEADER, DiskTier
from reprise.cache.tiers.keys import block_keys, namespace

PAYLOAD = 1000
ENTRY = HEADER.size + PAYLOAD


def keys(count: int, salt: str | None = None) -> list[bytes]:
    return block_keys(namespace("f" * 32, salt), list(range(4 * count)), 4)


def payload(i: int) -> bytes:
    return bytes([i % 256]) * PAYLOAD


def filled(directory, count: int, limit: int = 100 * ENTRY) -> DiskTier:
    tier = DiskTier(directory, limit)
    ids = keys(count)
    assert tier.store([(key, payload(i)) for i, key in enumerate(ids)]) == count
    tier.flush()
    return tier


def test_store_then_load_round_trips_and_contains_counts_the_leading_run(tmp_path):
    tier = filled(tmp_path, 5)
    ids = keys(6)
    assert tier.contains(ids) == 5
    assert tier.contains(keys(3, salt="other")) == 0
    assert tier.load(ids[:2]) == [payload(0), payload(1)]
    assert tier.load([ids[5]]) == [None]
    stats = tier.stats()
    assert (stats.num_entries, stats.bytes_used, stats.stores, stats.loads) == (5, 5 * ENTRY, 5, 2)
    assert len(stats.store_seconds) == 5 and len(stats.load_seconds) == 2
    assert tier.stats().load_seconds == ()          # drained by the previous call
    assert tier.path(ids[0]).parent.name == ids[0].hex()[:2]
    tier.close()


def test_a_key_it_holds_or_has_queued_is_not_written_again(tmp_path):
    tier = filled(tmp_path, 3)
    assert tier.store([(key, payload(9)) for key in keys(4)]) == 1
    tier.flush()
    assert tier.stats().stores == 4
    tier.close()


def test_restart_rebuilds_the_table_from_the_directory(tmp_path):
    filled(tmp_path, 4).close()
    (tmp_path / keys(1)[0].hex()[:2] / ".leftover.kv.123.tmp").write_bytes(b"torn")
    again = DiskTier(tmp_path, 100 * ENTRY)
    assert again.contains(keys(4)) == 4
    assert again.load(keys(4)[3:]) == [payload(3)]
    assert again.stats().bytes_used == 4 * ENTRY
    assert not list(tmp_path.glob("*/.*.tmp"))      # a write cut short leaves nothing behind
    again.close()


def test_budget_evicts_least_recently_used_first(tmp_path):
    tier = DiskTier(tmp_path, 3 * ENTRY)
    ids = keys(4)
    tier.store([(ids[i], payload(i)) for i in range(3)])
    tier.flush()
    tier.load([ids[0]])                              # 0 is now the most recently used
    tier.store([(ids[3], payload(3))])
    tier.flush()
    assert [tier.contains([key]) for key in ids] == [1, 0, 1, 1]
    stats = tier.stats()
    assert (stats.num_entries, stats.bytes_used, stats.evictions) == (3, 3 * ENTRY, 1)
    assert not tier.path(ids[1]).exists()
    tier.close()


def test_truncated_and_flipped_entries_are_misses_counted_and_deleted(tmp_path):
    tier = filled(tmp_path, 3)
    ids = keys(3)
    path = tier.path(ids[0])
    path.write_bytes(path.read_bytes()[:100])
    data = bytearray(tier.path(ids[1]).read_bytes())
    data[HEADER.size + 10] ^= 0xFF
    tier.path(ids[1]).write_bytes(bytes(data))
    assert tier.load(ids) == [None, None, payload(2)]
    assert tier.stats().corrupt == 2
    assert tier.contains(ids) == 0 and tier.contains(ids[2:]) == 1
    assert not path.exists()
    tier.close()


def test_a_full_queue_drops_writes_and_counts_them(tmp_path):
    tier = DiskTier(tmp_path, 100 * ENTRY, max_pending_bytes=0)
    assert tier.store([(key, payload(0)) for key in keys(3)]) == 0
    assert tier.stats().dropped == 3
    tier.close()


def test_a_full_disk_degrades_to_read_only_with_one_warning(tmp_path, monkeypatch, caplog):
    tier = filled(tmp_path, 2)

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tier, "_write_file", full)
    with caplog.at_level(logging.WARNING, logger="reprise"):
        tier.store([(key, payload(1)) for key in keys(5)[2:]])
        tier.flush()
        tier.store([(keys(6)[5], payload(1))])
        tier.flush()
    assert len([r for r in caplog.records if "cannot write" in r.message]) == 1
    stats = tier.stats()
    assert (stats.stores, stats.dropped) == (2, 4)
    assert tier.load(keys(2)) == [payload(0), payload(1)]        # reads go on
    tier.close()


def test_an_unusable_directory_is_one_warning_and_an_empty_tier(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="reprise"):
        tier = DiskTier(blocker / "cache", 100 * ENTRY)
        assert tier.store([(key, payload(0)) for key in keys(2)]) == 0
        tier.flush()
    assert len([r for r in caplog.records if "cannot write" in r.message]) == 1
    assert tier.contains(keys(2)) == 0 and tier.stats().dropped == 2
    tier.close()
