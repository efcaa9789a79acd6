"""The soak runner against a real server whose small KV pool forces eviction and preemption: every
request completes or ends cleanly, nothing hangs, and afterwards no block is used and the cache's
invariants hold. The long run (300 requests at concurrency 16) is marked slow.

The surface soak (tiny model, three tenant keys and an admin key, 64 blocks) mixes every API and
kind; the same plan runs on a fault-free server and on one with --inject-fault-every 50: every
check holds on both, the only 5xx are injected faults, and every greedy request that completed on
both gave the same output. The 500-request acceptance run is the slow one."""
from __future__ import annotations

import pytest

from reprise.bench.soak import Soak, compare, print_summary, run_soak
from tests.loader.loader_testing import CHATML
from tests.server.helpers import launch, write_tiny_model

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


TENANTS, ADMIN = "soak-a,soak-b,soak-c", "soak-admin"


def surface_flags(model, faults: bool) -> list[str]:
    """The tiny model (ChatML) on a 512 KiB pool (64 blocks of 16 tokens): eviction, and
    preemption at 8 running."""
    template = model / "chatml.jinja"
    template.write_text(CHATML)
    flags = [str(model), "--chat-template", str(template), "--dtype", "float32", "--kv-cache-bytes", "512KiB",
             "--max-num-seqs", "8", "--max-model-len", "1024", "--api-key", TENANTS, "--admin-key", ADMIN]
    return flags + (["--inject-fault-every", "50"] if faults else [])


def surface_soak(url: str, num_requests: int, seed: int) -> dict:
    return run_soak(Soak(url, num_requests=num_requests, concurrency=8, seed=seed, api_key=TENANTS, admin_key=ADMIN,
                         request_timeout_s=120, max_tokens=16, system_words=(60, 150), check_every_s=1.0))


def check_surface(reference: dict, report: dict, num_requests: int) -> dict:
    """Every check held on the faulty run; its greedy outputs equal the fault-free run's."""
    report["reference"] = compare(reference, report)
    print_summary(reference)
    print_summary(report)
    assert reference["held"] == {name: True for name in reference["held"]}, reference["failures"]
    assert report["held"] == {name: True for name in report["held"]}, report["failures"]
    assert set(reference["outcomes"]) <= {"completed", "error", "disconnected"}
    assert set(report["outcomes"]) <= {"completed", "error", "disconnected", "injected"}
    assert sum(report["outcomes"].values()) == num_requests and report["tenants"] == 3
    assert all(400 <= int(status) < 500 for status in report["errors_by_status"])
    assert report["reference"]["differ"] == 0, report["reference"]["examples"]
    assert report["reference"]["compared"] > num_requests // 5
    assert report["checks_during_load"] > 0
    planned = {kind for kind, outcomes in reference["by_kind"].items() if outcomes} - {"bad", "cancel", "disconnect"}
    assert {kind for kind in planned if reference["by_kind"][kind].get("completed")} == planned
    assert {"tools", "json", "messages", "probe", "multi_turn"} <= planned
    return report


def run_surface(tmp_path, num_requests: int, seed: int) -> dict:
    model = write_tiny_model(tmp_path / "tiny")
    with launch(surface_flags(model, faults=False)) as clean:
        reference = surface_soak(clean.url, num_requests, seed)
    with launch(surface_flags(model, faults=True)) as faulty:
        report = surface_soak(faulty.url, num_requests, seed)
    return check_surface(reference, report, num_requests)


def test_short_soak_with_tenants_and_faults_matches_a_fault_free_run(tmp_path):
    report = run_surface(tmp_path, 60, seed=3)
    assert report["outcomes"].get("injected", 0) > 0
    assert report["during_load"]["prefix_cache_evictions"] > 0


@pytest.mark.slow
def test_500_requests_with_faults_match_a_fault_free_run(tmp_path):
    report = run_surface(tmp_path, 500, seed=4)
    assert report["during_load"]["num_preemptions"] > 0
