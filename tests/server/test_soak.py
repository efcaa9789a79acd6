"""The soak runner against a real server whose small KV pool forces eviction and preemption: every
request completes or ends cleanly, nothing hangs, and afterwards no block is used and the cache's
invariants hold. The long run (300 requests at concurrency 16) is marked slow."""
from __future__ import annotations

import pytest

from reprise.bench.soak import Soak, print_summary, run_soak
from tests.server.helpers import launch

FLAGS = ["--dtype", "float32", "--kv-cache-bytes", "24MiB", "--max-num-seqs", "8", "--api-key", "soak-key"]


@pytest.fixture(scope="module")
def small_pool():
    with launch(FLAGS) as running:
        yield running


def check(report: dict, num_requests: int) -> None:
    print_summary(report)
    assert report["held"] == {name: True for name in report["held"]}, report["failures"]
    assert sum(report["outcomes"].values()) == num_requests
    assert set(report["outcomes"]) <= {"completed", "error", "disconnected"}
    assert all(400 <= int(status) < 500 for status in report["errors_by_status"])
    assert report["outcomes"]["completed"] > num_requests // 2
    assert report["kv_blocks_after"]["used"] == 0 and report["cache_check"]["violation"] is None


def test_short_soak_leaves_a_clean_cache(small_pool):
    report = run_soak(Soak(small_pool.url, num_requests=40, concurrency=8, seed=1, api_key="soak-key",
                           request_timeout_s=120, max_tokens=12, system_words=(60, 150)))
    check(report, 40)
    assert report["during_load"]["prefix_cache_evictions"] > 0


@pytest.mark.slow
def test_long_soak_leaves_a_clean_cache(small_pool):
    report = run_soak(Soak(small_pool.url, num_requests=300, concurrency=16, seed=2, api_key="soak-key",
                           request_timeout_s=300, system_words=(60, 150)))
    check(report, 300)
    assert report["during_load"]["num_preemptions"] > 0
