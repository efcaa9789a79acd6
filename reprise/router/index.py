"""The router's view of where prefixes live: one index per replica, fed by the replicas' KV events.

`KvIndex` holds, per replica id, block key -> namespace id (see tiers/events.py), and answers one
question: how many leading blocks of a prompt's key chain does a replica hold, in the caller's
namespace. The keys of a chain are computed under the caller's own namespace root, so another
tenant's entries can never match; the namespace id is checked as well, so even a key collision
across namespaces would not count.

`KvEventSubscriber` follows the streams of the replicas the router knows (by the ids their /health
reports), replaying each from its start (a snapshot there replaces the replica's index), on a
thread. When Redis is down the index keeps what it knew (routing is a hint, not a correctness
matter) and the subscriber retries.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from reprise.cache.tiers.events import KvEvent, stream_name
from reprise.cache.tiers.keys import KEY_BYTES

log = logging.getLogger("reprise.router")

UNKNOWN_NAMESPACE = bytes(KEY_BYTES)        # a publisher that did not know the root (tiers/events.py)
READ_BLOCK_MS = 200
READ_COUNT = 512


@dataclass
class ReplicaIndex:
    fingerprint: str
    block_size: int
    keys: dict[bytes, bytes] = field(default_factory=dict)      # block key -> namespace id


class KvIndex:
    """Per replica id: the blocks its memory index holds (thread-safe)."""

    def __init__(self):
        self._replicas: dict[str, ReplicaIndex] = {}
        self._lock = threading.Lock()

    def apply(self, event: KvEvent) -> None:
        with self._lock:
            replica = self._replicas.get(event.replica)
            if replica is None or event.op == "snapshot" or replica.fingerprint != event.fingerprint:
                replica = self._replicas[event.replica] = ReplicaIndex(event.fingerprint, event.block_size)
            for ns_id, keys in event.groups.items():
                if event.op == "removed":
                    for key in keys:
                        replica.keys.pop(key, None)
                else:
                    replica.keys.update(dict.fromkeys(keys, ns_id))

    def model(self, replica_id: str) -> tuple[str, int] | None:
        """(fingerprint, block size) of a replica, once one of its events has been read."""
        with self._lock:
            replica = self._replicas.get(replica_id)
            return None if replica is None else (replica.fingerprint, replica.block_size)

    def matched_blocks(self, replica_id: str, ns_id: bytes, keys: Sequence[bytes]) -> int:
        """Leading `keys` the replica holds under namespace `ns_id`."""
        with self._lock:
            replica = self._replicas.get(replica_id)
            if replica is None:
                return 0
            held = replica.keys
            for count, key in enumerate(keys):
                if held.get(key) not in (ns_id, UNKNOWN_NAMESPACE):
                    return count
            return len(keys)

    def num_blocks(self, replica_id: str) -> int:
        with self._lock:
            replica = self._replicas.get(replica_id)
            return 0 if replica is None else len(replica.keys)

    def forget(self, replica_id: str) -> None:
        with self._lock:
            self._replicas.pop(replica_id, None)


class KvEventSubscriber:
    """Reads the streams of `follow`ed replica ids into a KvIndex, on a thread."""

    def __init__(self, url: str, index: KvIndex, *, reconnect_s: float = 2.0, socket_timeout_s: float = 2.0):
        self.index = index
        self.reconnect_s = reconnect_s
        self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout_s,
                                            socket_connect_timeout=socket_timeout_s,
                                            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._positions: dict[str, str] = {}      # stream -> last id read
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._down = False
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="reprise-router-events", daemon=True)

    def start(self) -> KvEventSubscriber:
        self._thread.start()
        return self

    def follow(self, replica_ids: set[str]) -> None:
        """Read these replicas' streams (from their start, for a new one); stop reading the others."""
        streams = {stream_name(replica_id) for replica_id in replica_ids}
        with self._lock:
            for stream in set(self._positions) - streams:
                del self._positions[stream]
            for stream in streams - set(self._positions):
                self._positions[stream] = "0-0"

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                positions = dict(self._positions)
            if not positions:
                self._stop.wait(READ_BLOCK_MS / 1000)
                continue
            try:
                replies = self._client.xread(positions, count=READ_COUNT, block=READ_BLOCK_MS)
            except redis.RedisError as error:
                self._failed(error)
                self._stop.wait(self.reconnect_s)
                continue
            if self._down:
                log.warning("kv events: reading from Redis again")
                self._down = False
            self._apply(replies or [])

    def _apply(self, replies) -> None:
        for stream, entries in replies:
            stream = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                event = KvEvent.parse(fields)
                if event is not None:
                    self.index.apply(event)
                with self._lock:
                    if stream in self._positions:
                        self._positions[stream] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    def _failed(self, error: Exception) -> None:
        self.errors += 1
        if not self._down:
            log.warning("kv events: cannot read from Redis (%s: %s); routing on what is known, retrying",
                        type(error).__name__, error)
            self._down = True
