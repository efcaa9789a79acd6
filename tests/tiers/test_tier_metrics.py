"""/metrics and cache_report with a tier, from made-up engine stats (no weights)."""
from __future__ import annotations

from reprise.cache.match import CacheStats
from reprise.cache.tiers import TierStats
from reprise.engine.engine import EngineStats
from reprise.engine.request import FinishReason, RequestOutput
from reprise.server.metrics import ServerMetrics
from reprise.server.protocol import CacheReport

DISK = TierStats(num_entries=250, bytes_used=92_000_000, bytes_limit=10 * 2**30, stores=260, dropped=3, loads=250,
                 corrupt=2, evictions=10, load_seconds=(0.001, 0.002), store_seconds=(0.004,))


def stats() -> EngineStats:
    cache = CacheStats(queries=8000, hits=5000, evictions=4, blocks_used=0, blocks_cached=7, blocks_free=93,
                       num_blocks=100)
    return EngineStats(0, 0, 0, cache, tiers=(("disk", DISK, 4500, 3999),))


def test_hits_and_queries_are_labelled_by_tier_and_sum_to_the_engine_totals():
    lines = set(ServerMetrics(stats).exposition().decode().splitlines())
    for line in ('reprise:prefix_cache_queries_total{tier="memory"} 8000.0',
                 'reprise:prefix_cache_queries_total{tier="disk"} 4500.0',
                 'reprise:prefix_cache_hits_total{tier="memory"} 1001.0',
                 'reprise:prefix_cache_hits_total{tier="disk"} 3999.0',
                 'reprise:tier_bytes{tier="disk"} 9.2e+07', 'reprise:tier_entries{tier="disk"} 250.0',
                 'reprise:tier_dropped_writes_total{tier="disk"} 3.0',
                 'reprise:tier_corrupt_entries_total{tier="disk"} 2.0',
                 'reprise:tier_load_seconds_count{tier="disk"} 2.0',
                 'reprise:tier_store_seconds_count{tier="disk"} 1.0'):
        assert line in lines, line


def test_cache_report_splits_cached_tokens_by_tier_only_when_there_are_tiers():
    def output(by_tier):
        return RequestOutput("r", [1] * 4000, [2], "x", "", [], sum(by_tier.values()), FinishReason.LENGTH,
                             cached_tokens_by_tier=by_tier)

    tiered = CacheReport.of([output({"memory": 16, "disk": 3983})]).model_dump()
    assert tiered["cached_tokens_by_tier"] == {"memory": 16, "disk": 3983} and tiered["cached_tokens"] == 3999
    assert "cached_tokens_by_tier" not in CacheReport.of([output({"memory": 3999})]).model_dump()
