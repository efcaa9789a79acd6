"""The pool over time: engine counters sampled every `interval_s` into a bounded ring.

A daemon thread samples `EngineStats` (through `AsyncEngine.call`, between engine steps, as
/metrics reads them) and the ledger's per-namespace totals, so the dashboard shows history as soon
as it opens, not only from the moment someone watches. The thread ends once the engine has stopped
(or a read fails: the history then stops where it is).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from reprise.engine.async_engine import AsyncEngine
from reprise.server.dashboard.ledger import RequestLedger, namespace_label

log = logging.getLogger("reprise")


@dataclass(frozen=True, slots=True)
class Sample:
    """Engine-wide counters and block states at one wall-clock time, and each namespace's
    (prompt tokens, cached tokens) over its finished requests so far, keyed by salt."""

    t: float
    used: int
    cached: int
    free: int
    pinned: int
    queries: int
    hits: int
    evictions: int
    preemptions: int
    namespaces: dict[str | None, tuple[int, int]]

    def as_dict(self, visible: Callable[[str | None], bool]) -> dict:
        """The sample as JSON, with only the namespaces whose salt passes `visible`."""
        fields = {name: getattr(self, name) for name in ("t", "used", "cached", "free", "pinned", "queries", "hits",
                                                         "evictions", "preemptions")}
        fields["namespaces"] = {namespace_label(salt): list(tokens) for salt, tokens in self.namespaces.items()
                                if visible(salt)}
        return fields


class PoolHistory:
    """The last `capacity` samples, oldest first; `start()` begins sampling on a daemon thread."""

    def __init__(self, async_engine: AsyncEngine, ledger: RequestLedger, interval_s: float = 1.0,
                 capacity: int = 600):
        self._async_engine = async_engine
        self._ledger = ledger
        self._interval_s = interval_s
        self._samples: deque[Sample] = deque(maxlen=capacity)
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="reprise-dashboard-sampler", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def read(self) -> Sample:
        """A sample of now (not kept)."""
        engine = self._async_engine.engine
        stats = self._async_engine.call(engine.stats)
        cache = stats.cache
        totals = {salt: (t.prompt_tokens, t.cached_tokens) for salt, t in self._ledger.items()}
        return Sample(time.time(), cache.blocks_used, cache.blocks_cached, cache.blocks_free, cache.blocks_pinned,
                      cache.queries, cache.hits, cache.evictions, stats.num_preemptions, totals)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            if not self._async_engine.is_alive:
                return
            try:
                self._samples.append(self.read())
            except Exception as error:      # noqa: BLE001 - a thread's end: the history stops, serving goes on
                log.warning("dashboard: pool sampling stopped: %s", type(error).__name__)
                return
