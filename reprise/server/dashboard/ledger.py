"""What the dashboard remembers of finished requests: the last N, and per-namespace token totals.

`RequestLedger.record` is called once per finished request (where `ServerMetrics.observe` is), on
the event loop; the history sampler reads it from its own thread, hence the lock. Everything here
is bounded: `capacity` recent requests and `max_namespaces` namespaces' totals (the least recently
active one is dropped first). Entries keep the salt, so
callers can be shown only their own namespace (see `dashboard/__init__.py`); the salt itself never
leaves the server, only its label does.
"""
from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass

from reprise.engine.request import RequestOutput

SHARED = "shared"       # the label of the namespace without a salt


def namespace_label(salt: str | None) -> str:
    """A short, stable label for a cache namespace: a digest of its salt, never the salt or any
    prompt text; "shared" for the namespace without a salt."""
    if salt is None:
        return SHARED
    return "ns-" + hashlib.sha256(salt.encode("utf-8", "surrogatepass")).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """One finished request as the dashboard shows it (times in seconds; None when not measured)."""

    seq: int                        # order of finishing, from 1
    finished_at: float              # wall-clock time.time()
    namespace: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    miss_reason: str | None
    diverged_at: int | None
    ttft_s: float | None
    tokens_per_s: float | None      # output tokens after the first, per second of decoding

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class NamespaceTotals:
    """Token-weighted totals of one namespace's finished requests."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0


class RequestLedger:
    """The last `capacity` finished requests (with their salts) and per-namespace totals."""

    def __init__(self, capacity: int = 100, max_namespaces: int = 64):
        self._recent: deque[tuple[str | None, FinishedRequest]] = deque(maxlen=capacity)
        self._totals: OrderedDict[str | None, NamespaceTotals] = OrderedDict()
        self._max_namespaces = max_namespaces
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def record(self, salt: str | None, output: RequestOutput) -> None:
        """Adds one finished request (its final output)."""
        arrival, first, finished = (output.metrics.get(key) for key in ("arrival", "first_token", "finished"))
        ttft = first - arrival if arrival is not None and first is not None else None
        num_generated = len(output.token_ids)
        rate = None
        if first is not None and finished is not None and num_generated > 1 and finished > first:
            rate = (num_generated - 1) / (finished - first)
        miss = output.miss.value if output.miss is not None else None
        entry = FinishedRequest(next(self._seq), time.time(), namespace_label(salt), len(output.prompt_token_ids),
                                output.cached_tokens, num_generated, miss, output.diverged_at, ttft, rate)
        with self._lock:
            self._recent.append((salt, entry))
            totals = self._totals.pop(salt, None) or NamespaceTotals()
            totals.requests += 1
            totals.prompt_tokens += entry.prompt_tokens
            totals.cached_tokens += entry.cached_tokens
            self._totals[salt] = totals
            if len(self._totals) > self._max_namespaces:
                self._totals.popitem(last=False)

    def recent(self, visible) -> list[FinishedRequest]:
        """The remembered requests whose salt passes `visible(salt)`, newest first."""
        with self._lock:
            return [entry for salt, entry in reversed(self._recent) if visible(salt)]

    def items(self) -> list[tuple[str | None, NamespaceTotals]]:
        """(salt, a copy of its totals) for every remembered namespace."""
        with self._lock:
            return [(salt, NamespaceTotals(t.requests, t.prompt_tokens, t.cached_tokens))
                    for salt, t in self._totals.items()]
