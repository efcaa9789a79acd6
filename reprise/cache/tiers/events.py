"""KV events: each replica tells the router, through Redis, which blocks its memory index holds.

The engine calls `stored(keys, root)` and `removed(keys)` as blocks enter and leave its
prefix index (never blocking: the calls only queue); a publisher thread sends them as entries of
one Redis stream per replica, `reprise:kv-events:<replica id>`, trimmed to about `max_len`
entries. A router that starts late, or that lost its connection, must still learn everything the
replica holds, so the publisher also sends a full snapshot of its keys every `snapshot_s` seconds,
every `max_len // 4` entries, and after any failure to publish; a reader replays the stream from its
start, and a snapshot replaces what it knew of that replica.

An entry's fields:

    v           "1"
    replica     the replica id (random per process: a restarted replica is a new, empty one)
    fingerprint the model fingerprint (tiers/keys.py), so a router never mixes models
    block_size  tokens per block
    op          "stored" | "removed" | "snapshot"
    data        groups of: namespace id (16 bytes) | count (u32 LE) | count block keys (16 bytes each)

A namespace id is `namespace_id(root)`, a digest of the tenant's key root: it names the tenant's
namespace without letting a reader compute that tenant's keys (the root would), and it carries no
salt or API key in clear. Block keys are digests of whole prefixes, so the stream reveals which
prefixes a tenant has, to whoever may read Redis, only as opaque digests.
"""
from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from reprise.cache.tiers.keys import KEY_BYTES

log = logging.getLogger("reprise")

STREAM_PREFIX = "reprise:kv-events:"
VERSION = "1"
COUNT = struct.Struct("<I")
DEFAULT_MAX_LEN = 10_000
DEFAULT_SNAPSHOT_S = 30.0
STREAM_TTL_S = 3600             # a dead replica's stream goes away after this (renewed by each snapshot)


def namespace_id(root: bytes) -> bytes:
    """The public name of a namespace (see the module docstring)."""
    return hashlib.blake2b(b"reprise-ns-id|" + root, digest_size=KEY_BYTES).digest()


def stream_name(replica_id: str) -> str:
    return STREAM_PREFIX + replica_id


def encode_groups(groups: dict[bytes, Iterable[bytes]]) -> bytes:
    parts = []
    for ns_id, keys in groups.items():
        keys = list(keys)
        parts += [ns_id, COUNT.pack(len(keys)), *keys]
    return b"".join(parts)


def decode_groups(data: bytes) -> dict[bytes, list[bytes]]:
    groups: dict[bytes, list[bytes]] = {}
    at = 0
    while at < len(data):
        ns_id = data[at:at + KEY_BYTES]
        (count,) = COUNT.unpack_from(data, at + KEY_BYTES)
        at += KEY_BYTES + COUNT.size
        groups.setdefault(ns_id, []).extend(data[at + i * KEY_BYTES:at + (i + 1) * KEY_BYTES] for i in range(count))
        at += count * KEY_BYTES
    return groups


@dataclass(frozen=True, slots=True)
class KvEvent:
    replica: str
    fingerprint: str
    block_size: int
    op: str                                 # "stored" | "removed" | "snapshot"
    groups: dict[bytes, list[bytes]]        # namespace id -> block keys

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> KvEvent | None:
        """An entry read back from the stream; None for one of another version or malformed."""
        try:
            if fields[b"v"].decode() != VERSION:
                return None
            return cls(fields[b"replica"].decode(), fields[b"fingerprint"].decode(), int(fields[b"block_size"]),
                       fields[b"op"].decode(), decode_groups(fields[b"data"]))
        except (KeyError, ValueError, struct.error):
            return None


class KvEventPublisher:
    """The replica's side: queues the engine's calls, publishes them on its stream (module docstring)."""

    def __init__(self, url: str, replica_id: str, fingerprint: str, block_size: int, *,
                 max_len: int = DEFAULT_MAX_LEN, snapshot_s: float = DEFAULT_SNAPSHOT_S,
                 socket_timeout_s: float = 0.5, reconnect_s: float = 2.0):
        self.replica_id = replica_id
        self.stream = stream_name(replica_id)
        self._header = {"v": VERSION, "replica": replica_id, "fingerprint": fingerprint, "block_size": str(block_size)}
        self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
                                            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.max_len = max_len
        self.snapshot_s = snapshot_s
        self.reconnect_s = reconnect_s
        self._held: dict[bytes, bytes] = {}          # block key -> namespace id, as the engine reported
        self._pending: list[tuple[str, bytes, list[bytes]]] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._published = 0          # entries since the last snapshot
        self._resync = True          # the stream must start with (or be repaired by) a snapshot
        self._last_snapshot = 0.0
        self.errors = 0
        self._down = False
        self._thread = threading.Thread(target=self._run, name="reprise-kv-events", daemon=True)
        self._thread.start()

    def stored(self, keys: Sequence[bytes], root: bytes | None = None) -> None:
        """Blocks that entered the index, all under the namespace whose key root is `root` (None:
        unknown to the caller; the keys go under the all-zero id, which a router matches in any
        namespace: the keys themselves still differ per namespace)."""
        ns_id = namespace_id(root) if root is not None else bytes(KEY_BYTES)
        self._queue("stored", ns_id, keys)

    def removed(self, keys: Sequence[bytes]) -> None:
        self._queue("removed", b"", keys)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Waits until the queued events are published (tests, shutdown); False on timeout."""
        with self._wake:
            return self._wake.wait_for(lambda: not self._pending, timeout=timeout_s)

    def close(self) -> None:
        self.flush()
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join()
        self._client.close()

    def _queue(self, op: str, ns_id: bytes, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        with self._wake:
            self._pending.append((op, ns_id, list(keys)))
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending or self._closed, timeout=self._snapshot_due_in())
                if self._closed and not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._apply(batch)
                snapshot = self._needs_snapshot()
                held = dict(self._held) if snapshot else None
            ok = self._publish(batch, held)
            with self._wake:
                self._wake.notify_all()
            if not ok:
                time.sleep(self.reconnect_s)

    def _apply(self, batch) -> None:
        for op, ns_id, keys in batch:
            for key in keys:
                if op == "stored":
                    self._held[key] = ns_id
                else:
                    self._held.pop(key, None)

    def _snapshot_due_in(self) -> float:
        return max(0.05, self._last_snapshot + self.snapshot_s - time.monotonic())

    def _needs_snapshot(self) -> bool:
        return (self._resync or self._published >= self.max_len // 4
                or time.monotonic() - self._last_snapshot >= self.snapshot_s)

    def _publish(self, batch, held: dict[bytes, bytes] | None) -> bool:
        """One pipeline: the batch's events, then (when due) a snapshot of everything held."""
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for op, ns_id, keys in batch:
                    groups = {ns_id: keys} if op == "stored" else {bytes(KEY_BYTES): keys}
                    pipe.xadd(self.stream, {**self._header, "op": op, "data": encode_groups(groups)},
                              maxlen=self.max_len, approximate=True)
                if held is not None:
                    grouped: dict[bytes, list[bytes]] = {}
                    for key, ns_id in held.items():
                        grouped.setdefault(ns_id, []).append(key)
                    pipe.xadd(self.stream, {**self._header, "op": "snapshot", "data": encode_groups(grouped)},
                              maxlen=self.max_len, approximate=True)
                    pipe.expire(self.stream, STREAM_TTL_S)
                pipe.execute()
        except redis.RedisError as error:
            self.errors += 1
            if not self._down:
                log.warning("kv events: cannot publish to Redis (%s: %s); will resend a snapshot when it is back",
                            type(error).__name__, error)
            self._resync = self._down = True
            return False
        if self._down:
            log.warning("kv events: publishing to Redis again")
            self._down = False
        if held is not None:
            self._resync, self._published, self._last_snapshot = False, 0, time.monotonic()
        else:
            self._published += len(batch)
        return True
