"""The router's /metrics (Prometheus text): requests per replica, decisions by reason, estimated vs
reported cached tokens, replica health."""
from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

USAGE_PATHS = (("prompt_tokens_details", "cached_tokens"), ("input_tokens_details", "cached_tokens"),
               ("cache_read_input_tokens",))


class RouterMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("reprise:router_requests", "Requests proxied, per replica.", ["replica"],
                                registry=self.registry)
        self.decisions = Counter("reprise:router_decisions", "Routing decisions by reason (prefix, load, affinity, "
                                 "round_robin).", ["reason"], registry=self.registry)
        self.estimated = Counter("reprise:router_estimated_cached_tokens", "Cached prompt tokens the router expected "
                                 "on the replica it chose (from KV events).", ["replica"], registry=self.registry)
        self.reported = Counter("reprise:router_reported_cached_tokens", "Cached prompt tokens the replicas reported "
                                "in usage.", ["replica"], registry=self.registry)
        self.failures = Counter("reprise:router_upstream_failures", "Replicas that could not be reached for a "
                                "request (it went to another).", ["replica"], registry=self.registry)
        self.healthy = Gauge("reprise:router_replica_healthy", "1 when the replica answers its health checks.",
                             ["replica"], registry=self.registry)
        self.indexed = Gauge("reprise:router_indexed_blocks", "Blocks the router knows a replica holds.",
                             ["replica"], registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def cached_tokens(usage: dict) -> int | None:
    """The reused prompt tokens of a usage object, in any of the three APIs' spellings."""
    for path in USAGE_PATHS:
        value = usage
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, int):
            return value
    return None


class UsageReader:
    """Finds the usage in a JSON body or an SSE stream, fed with the bytes as they pass."""

    def __init__(self, streaming: bool):
        self.streaming = streaming
        self._buffer = bytearray()
        self.cached_tokens: int | None = None

    def feed(self, chunk: bytes) -> None:
        if not self.streaming:
            self._buffer += chunk
            return
        self._buffer += chunk
        *lines, rest = self._buffer.split(b"\n")
        self._buffer = bytearray(rest)
        for line in lines:
            if line.startswith(b"data:") and b"usage" in line:
                self._read(line[5:])

    def finish(self) -> int | None:
        if not self.streaming:
            self._read(bytes(self._buffer))
        return self.cached_tokens

    def _read(self, data: bytes) -> None:
        try:
            body = json.loads(data)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        for usage in (body.get("usage"), (body.get("response") or {}).get("usage"),
                      (body.get("message") or {}).get("usage")):
            found = cached_tokens(usage) if isinstance(usage, dict) else None
            if found is not None:
                self.cached_tokens = found
