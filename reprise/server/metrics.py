"""Prometheus metrics (DESIGN.md section 5), on one CollectorRegistry per app.

Engine-wide numbers (prefix cache counters, KV blocks, queue lengths) are read from
`EngineStats` at scrape time by a custom collector, so they are exactly the engine's own counts:
`reprise:prefix_cache_hits_total` is the sum of `cached_tokens` over every admitted request.
Per-request numbers (latencies, cached tokens, token counts) are observed when a request ends.

Tiers: the hit and query counters carry a `tier` label. `memory` counts every prompt token looked up
and the tokens matched in the pool itself; a tier below it (`disk`, `store`) counts the prompt tokens
its lookup covered (those beyond the memory match) and the tokens loaded from it that requests then
reused. So hits summed over tiers = the sum of `cached_tokens`, and each tier's hit rate is its own
hits / queries. Per tier also: bytes and entries held, load and store latencies, dropped writes and
corrupt entries (drained from the tier's stats at each scrape).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from reprise.engine.request import RequestOutput

if TYPE_CHECKING:
    from reprise.engine.engine import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TOKEN_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TIER_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class EngineCollector:
    """Yields the engine-wide metrics from one `read_stats()` call per scrape."""

    def __init__(self, read_stats: Callable[[], EngineStats]):
        self._read_stats = read_stats
        self._load_seconds = Histogram("reprise:tier_load_seconds", "Seconds to read and verify one block from "
                                       "a tier.", ["tier"], buckets=_TIER_BUCKETS, registry=None)
        self._store_seconds = Histogram("reprise:tier_store_seconds", "Seconds to write one block to a tier.",
                                        ["tier"], buckets=_TIER_BUCKETS, registry=None)

    def collect(self) -> Iterator[Metric]:
        stats = self._read_stats()
        cache = stats.cache
        queries = CounterMetricFamily("reprise:prefix_cache_queries", "Prompt tokens looked up, by tier (memory: "
                                      "every prompt token; a lower tier: those beyond the memory match).",
                                      labels=["tier"])
        hits = CounterMetricFamily("reprise:prefix_cache_hits", "Prompt tokens whose KV came from the prefix "
                                   "cache, by the tier that held it.", labels=["tier"])
        queries.add_metric(["memory"], cache.queries)
        hits.add_metric(["memory"], cache.hits - sum(tier_hits for *_, tier_hits in stats.tiers))
        for name, _, tier_queries, tier_hits in stats.tiers:
            queries.add_metric([name], tier_queries)
            hits.add_metric([name], tier_hits)
        yield queries
        yield hits
        yield from self._tiers(stats.tiers)
        yield CounterMetricFamily("reprise:prefix_cache_evictions", "KV blocks evicted from the prefix cache.",
                                  value=cache.evictions)
        yield GaugeMetricFamily("reprise:kv_blocks_pinned", "KV blocks in the prefix cache under a client's "
                                "retention pin that has not ended (a subset of used + cached).", value=cache.blocks_pinned)
        yield CounterMetricFamily("reprise:prefix_cache_pin_expiries", "Retention pins that ended.",
                                  value=cache.pin_expiries)
        yield CounterMetricFamily("reprise:prefix_cache_writes", "Tokens newly stored in the prefix cache.",
                                  value=cache.tokens_written)
        blocks = GaugeMetricFamily("reprise:kv_blocks", "KV blocks by state: used by running requests, "
                                   "cached (unreferenced, reusable) or free; they sum to the pool.", labels=["state"])
        blocks.add_metric(["used"], cache.blocks_used)
        blocks.add_metric(["cached"], cache.blocks_cached)
        blocks.add_metric(["free"], cache.blocks_free)
        yield blocks
        yield CounterMetricFamily("reprise:num_preemptions", "Running requests preempted to free KV blocks.",
                                  value=stats.num_preemptions)
        yield CounterMetricFamily("reprise:spec_decode_draft_tokens", "Speculative draft tokens proposed and verified.",
                                  value=stats.num_draft_tokens)
        yield CounterMetricFamily("reprise:spec_decode_accepted_tokens",
                                  "Speculative draft tokens the model agreed with (accepted).",
                                  value=stats.num_accepted_tokens)
        yield GaugeMetricFamily("reprise:weights_bytes", "Bytes of the model's weights as held in memory "
                                "(quantized blocks and scales with native GGUF weights).", value=stats.weights_bytes)
        yield GaugeMetricFamily("reprise:kv_pool_bytes", "Bytes reserved for the KV pool and recurrent states; "
                                "on CPU, pages cost RAM only once written.", value=stats.kv_pool_bytes)
        yield GaugeMetricFamily("reprise:num_requests_running", "Requests in the running batch.",
                                value=stats.num_running)
        yield GaugeMetricFamily("reprise:num_requests_waiting", "Requests waiting to be admitted.",
                                value=stats.num_waiting)


    def _tiers(self, tiers) -> Iterator[Metric]:
        families = {key: family(f"reprise:tier_{key}", text, labels=["tier"]) for key, family, text in (
            ("bytes", GaugeMetricFamily, "Bytes a tier holds."),
            ("entries", GaugeMetricFamily, "KV blocks a tier holds."),
            ("stores", CounterMetricFamily, "KV blocks written to a tier."),
            ("loads", CounterMetricFamily, "KV blocks read back from a tier and verified."),
            ("dropped_writes", CounterMetricFamily, "Writes a tier dropped (its queue was full or it cannot write)."),
            ("corrupt_entries", CounterMetricFamily, "Entries that failed their check at load (deleted, recomputed)."),
            ("evictions", CounterMetricFamily, "Entries a tier removed to stay within its budget."),
            ("errors", CounterMetricFamily, "Failed calls to a tier's backend (the shared store down or too slow: "
             "requests go on from the tiers above it)."))}
        for name, tier, _, _ in tiers:
            for key, value in (("bytes", tier.bytes_used), ("entries", tier.num_entries), ("stores", tier.stores),
                               ("loads", tier.loads), ("dropped_writes", tier.dropped),
                               ("corrupt_entries", tier.corrupt), ("evictions", tier.evictions),
                               ("errors", tier.errors)):
                families[key].add_metric([name], value)
            for seconds in tier.load_seconds:
                self._load_seconds.labels(name).observe(seconds)
            for seconds in tier.store_seconds:
                self._store_seconds.labels(name).observe(seconds)
        if tiers:
            yield from families.values()
            yield from self._load_seconds.collect()
            yield from self._store_seconds.collect()


class ServerMetrics:
    """The app's registry: engine collector, per-request histograms and counters, process collectors."""

    def __init__(self, read_stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.registry.register(EngineCollector(read_stats))
        histogram, counter = self._histogram, self._counter
        self.cached_tokens = histogram("reprise:request_cached_tokens", "Cached prompt tokens per request.",
                                       _TOKEN_BUCKETS)
        self.time_to_first_token = histogram("reprise:time_to_first_token_seconds",
                                             "Seconds from arrival to the first output token.", _TTFT_BUCKETS)
        self.time_per_output_token = histogram("reprise:time_per_output_token_seconds",
                                               "Seconds per output token after the first.", _TPOT_BUCKETS)
        self.e2e_latency = histogram("reprise:e2e_request_latency_seconds",
                                     "Seconds from arrival to the last output token.", _E2E_BUCKETS)
        self.prompt_tokens = counter("reprise:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("reprise:generation_tokens", "Tokens generated by finished requests.")

    def _histogram(self, name: str, documentation: str, buckets) -> Histogram:
        return Histogram(name, documentation, buckets=buckets, registry=self.registry)

    def _counter(self, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, registry=self.registry)

    def observe(self, output: RequestOutput) -> None:
        """Records one finished request (its last output, whose `metrics` hold the monotonic times)."""
        num_generated = len(output.token_ids)
        self.cached_tokens.observe(output.cached_tokens)
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(num_generated)
        arrival, first, finished = (output.metrics.get(key) for key in ("arrival", "first_token", "finished"))
        if arrival is None or first is None or finished is None:
            return
        self.time_to_first_token.observe(first - arrival)
        self.e2e_latency.observe(finished - arrival)
        if num_generated > 1:
            self.time_per_output_token.observe((finished - first) / (num_generated - 1))

    def exposition(self) -> bytes:
        """The Prometheus text format; reads engine stats, so call it off the event loop."""
        return generate_latest(self.registry)
