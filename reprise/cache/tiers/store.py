"""The shared tier: KV blocks in Redis (or Valkey), read by every replica that serves the same model.

    --kv-store redis://HOST:PORT/DB    [--kv-store-ttl 86400]

Keys are `reprise:kv:<hex of the block key>`: the block key already carries the tenant namespace
and the model fingerprint (tiers/keys.py), so replicas of one model share blocks and tenants never
do. A value is a header, then the payload:

    magic "RPKV" | version (1 byte) | payload length (8 bytes, little-endian) | checksum (16 bytes, tiers.checksum)

A value whose header or checksum does not match is a miss: deleted and counted in `corrupt`.

Redis bounds the tier: every key carries a TTL (default one day) and the server is expected to run
with `maxmemory` and `maxmemory-policy allkeys-lru`, so the blocks least recently read or written go
first when it is full; reprise never scans or trims the store itself.

Writes never wait: `store` puts entries on a bounded queue (bounded in bytes) and a writer thread
sends them in pipelines of SET ... EX; when the queue is full the write is dropped and counted.
Reads are one round trip per call (a pipeline of EXISTS for `contains`, one MGET for `load`).

A dead or slow Redis never fails a request: short socket timeouts, no client-side retries; the
first error marks the store down (one warning, `errors` counted), and while it is down `contains`
and `load` answer "absent" at once and `store` drops. After `reconnect_s` the next call tries
again; the first success logs the recovery.
"""
from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from collections.abc import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from reprise.cache.tiers import TierStats, checksum

log = logging.getLogger("reprise")

KEY_PREFIX = "reprise:kv:"
MAGIC = b"RPKV"
VERSION = 2              # 2: SHA-256 checksums (1: blake2b)
HEADER = struct.Struct("<4sBQ16s")
DEFAULT_TTL_S = 24 * 3600
DEFAULT_QUEUE_BYTES = 256 * 2**20
DEFAULT_SOCKET_TIMEOUT_S = 0.5
DEFAULT_RECONNECT_S = 2.0
STATS_REFRESH_S = 5.0           # INFO is read at most this often (stats are for /metrics)
WRITE_BATCH = 32                # entries per pipeline


def encode(payload: bytes) -> bytes:
    """Header + payload, as stored."""
    return HEADER.pack(MAGIC, VERSION, len(payload), checksum(payload)) + payload


def decode(value: bytes) -> bytes | None:
    """The payload of a stored value, or None when its header or checksum does not match."""
    if len(value) < HEADER.size:
        return None
    magic, version, length, digest = HEADER.unpack_from(value)
    payload = value[HEADER.size:]
    if magic != MAGIC or version != VERSION or length != len(payload):
        return None
    return payload if checksum(payload) == digest else None


def redis_key(key: bytes) -> str:
    return KEY_PREFIX + key.hex()


class RedisTier:
    """A `Tier` over one Redis database (see the module docstring); thread-safe."""

    name = "store"

    def __init__(self, url: str, *, ttl_s: int = DEFAULT_TTL_S, queue_bytes: int = DEFAULT_QUEUE_BYTES,
                 socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S, reconnect_s: float = DEFAULT_RECONNECT_S):
        if ttl_s < 1:
            raise ValueError("the store's TTL must be at least 1 second")
        self.url = url
        self.ttl_s = ttl_s
        self.reconnect_s = reconnect_s
        self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout_s,
                                            socket_connect_timeout=socket_timeout_s,
                                            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._queue_bytes = queue_bytes
        self._queue: queue.Queue = queue.Queue()
        self._queued_bytes = 0
        self._pending = 0               # entries accepted and not yet written (or dropped)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._down_until = 0.0          # monotonic time before which the store is not tried
        self._down = False
        self._counts = dict(stores=0, dropped=0, loads=0, corrupt=0, errors=0)
        self._load_seconds: list[float] = []
        self._store_seconds: list[float] = []
        self._info = (0.0, 0, 0, None, 0)   # (read at, keys, bytes used, maxmemory, evicted keys)
        self._writer = threading.Thread(target=self._write_loop, name="reprise-kv-store", daemon=True)
        self._writer.start()

    # the Tier interface

    def contains(self, keys: Sequence[bytes]) -> int:
        if not keys or not self._available():
            return 0
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(redis_key(key))
                found = pipe.execute()
        except redis.RedisError as error:
            self._failed(error)
            return 0
        self._succeeded()
        return next((i for i, present in enumerate(found) if not present), len(keys))

    def load(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        started = time.perf_counter()
        try:
            values = self._client.mget([redis_key(key) for key in keys])
        except redis.RedisError as error:
            self._failed(error)
            return [None] * len(keys)
        self._succeeded()
        payloads = [None if value is None else decode(value) for value in values]
        corrupt = [key for key, value, payload in zip(keys, values, payloads) if value is not None and payload is None]
        if corrupt:
            self._delete(corrupt)
        with self._lock:
            self._counts["loads"] += sum(payload is not None for payload in payloads)
            self._counts["corrupt"] += len(corrupt)
            self._load_seconds.append(time.perf_counter() - started)
        return payloads

    def store(self, entries: Sequence[tuple[bytes, bytes]]) -> int:
        accepted = 0
        available = self._available()
        with self._lock:
            for key, payload in entries:
                if not available or self._queued_bytes + len(payload) > self._queue_bytes:
                    self._counts["dropped"] += 1
                    continue
                self._queued_bytes += len(payload)
                self._pending += 1
                self._queue.put(("set", key, payload))
                accepted += 1
        return accepted

    def evict(self, keys: Sequence[bytes]) -> None:
        if keys and self._available():
            with self._lock:
                self._pending += 1
            self._queue.put(("delete", list(keys), None))

    def stats(self) -> TierStats:
        self._refresh_info()
        with self._lock:
            _, num_keys, used, limit, evicted = self._info
            load_seconds, self._load_seconds = tuple(self._load_seconds), []
            store_seconds, self._store_seconds = tuple(self._store_seconds), []
            counts = dict(self._counts)
        return TierStats(num_entries=num_keys, bytes_used=used, bytes_limit=limit, stores=counts["stores"],
                         dropped=counts["dropped"], loads=counts["loads"], corrupt=counts["corrupt"],
                         evictions=evicted, load_seconds=load_seconds, store_seconds=store_seconds,
                         errors=counts["errors"])

    def flush(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join()
        self._client.close()

    # beyond the interface

    @property
    def errors(self) -> int:
        """Failed calls to Redis since start (`reprise:kv_store_errors_total`)."""
        with self._lock:
            return self._counts["errors"]

    @property
    def healthy(self) -> bool:
        return not self._down

    # internals

    def _available(self) -> bool:
        """False while the store is marked down and its reconnect time has not come."""
        return not self._down or time.monotonic() >= self._down_until

    def _failed(self, error: Exception) -> None:
        with self._lock:
            self._counts["errors"] += 1
            first = not self._down
            self._down = True
            self._down_until = time.monotonic() + self.reconnect_s
        if first:
            log.warning("kv store %s unavailable (%s: %s); serving from local tiers, retrying every %.0f s",
                        _safe_url(self.url), type(error).__name__, error, self.reconnect_s)

    def _succeeded(self) -> None:
        if self._down:
            with self._lock:
                recovered, self._down = self._down, False
            if recovered:
                log.warning("kv store %s is back", _safe_url(self.url))

    def _delete(self, keys: Sequence[bytes]) -> None:
        try:
            self._client.delete(*(redis_key(key) for key in keys))
        except redis.RedisError as error:
            self._failed(error)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < WRITE_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in batch:
                batch.remove(None)
                self._queue.put(None)
            self._write(batch)

    def _write(self, batch: list[tuple]) -> None:
        """One pipeline for a batch of queued sets and deletes; a failure drops the whole batch."""
        sets = [(key, payload) for op, key, payload in batch if op == "set"]
        written = False
        if self._available():
            started = time.perf_counter()
            try:
                with self._client.pipeline(transaction=False) as pipe:
                    for op, key, payload in batch:
                        if op == "set":
                            pipe.set(redis_key(key), encode(payload), ex=self.ttl_s)
                        else:
                            pipe.delete(*(redis_key(k) for k in key))
                    pipe.execute()
                written = True
                self._succeeded()
            except redis.RedisError as error:
                self._failed(error)
            elapsed = time.perf_counter() - started
        with self._idle:
            self._queued_bytes -= sum(len(payload) for _, payload in sets)
            self._pending -= len(batch)
            if written:
                self._counts["stores"] += len(sets)
                self._store_seconds.extend([elapsed / max(len(sets), 1)] * len(sets))
            else:
                self._counts["dropped"] += len(sets)
            self._idle.notify_all()

    def _refresh_info(self) -> None:
        """Keys, memory, maxmemory and evicted keys from INFO (the database is assumed to be reprise's)."""
        if time.monotonic() - self._info[0] < STATS_REFRESH_S or not self._available():
            return
        try:
            info = self._client.info()
            num_keys = self._client.dbsize()
        except redis.RedisError as error:
            self._failed(error)
            return
        self._succeeded()
        limit = int(info.get("maxmemory", 0)) or None
        with self._lock:
            self._info = (time.monotonic(), int(num_keys), int(info.get("used_memory", 0)), limit,
                          int(info.get("evicted_keys", 0)))


def _safe_url(url: str) -> str:
    """The URL without its password (for logs)."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
