"""`reprise bench serve` and `reprise bench compare` against real `reprise serve` processes.

Every scenario runs once, at a tiny size, through the command line's entry point, against one
server; the tests read its JSON. They are that server's only client, so the hit rate from usage
must equal the hit rate from the /metrics counters exactly. A second server, started with
--no-prefix-cache, runs the repeat scenario. No test asserts a time.
"""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from reprise.bench.client import Client
from reprise.bench.compare import run_compare
from reprise.cli import main

API_KEY = "bench-key-51c2"
START_TIMEOUT_S = 120
SIZES = {"--prompt-len": 160, "--output-len": 4, "--repeats": 2, "--prefix-len": 96, "--suffix-len": 32,
         "--num-prefixes": 2, "--num-prompts": 4, "--concurrency": 2, "--conversations": 2, "--turns": 3,
         "--system-len": 40, "--turn-len": 48, "--long-len": 120, "--long-prompts": 2, "--concurrencies": "1,2",
         "--decode-len": 4}
PERCENTILE_KEYS = [[f"{metric}_p{q}_s" for q in (50, 90, 99)] for metric in ("ttft", "tpot", "e2e")]


@contextmanager
def reprise_server(*flags: str) -> Iterator[str]:
    """A `reprise serve` process on a free port (its URL), stopped on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "reprise.cli", "serve", "--port", str(port), "--dtype", "float32", "--no-compile",
               "--kv-cache-bytes", "256MiB", "--api-key", API_KEY, *flags]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _healthy(url):
                if process.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"reprise serve exited with {process.returncode}:\n{log.read()[-4000:]}")
                assert time.monotonic() < deadline, f"reprise serve was not healthy after {START_TIMEOUT_S} s"
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=20)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def bench(url: str, folder: Path, label: str, *flags: str) -> tuple[dict, Path, Path]:
    """(result JSON, its path, the PNG path) of `reprise bench serve` at the tiny SIZES."""
    out, plot = folder / f"{label}.json", folder / f"{label}.png"
    sizes = [str(item) for pair in SIZES.items() for item in pair]
    argv = ["bench", "serve", "--base-url", url, "--api-key", API_KEY, "--label", label,
            "--out", str(out), "--plot", str(plot), *sizes, *flags]
    assert main(argv) == 0
    return json.loads(out.read_text()), out, plot


@pytest.fixture(scope="module")
def server_url():
    with reprise_server() as url:
        yield url


@pytest.fixture(scope="module")
def run(server_url, tmp_path_factory):
    """One run of every scenario."""
    return bench(server_url, tmp_path_factory.mktemp("bench"), "reprise", "--scenario", "all")


def records(result: dict, scenario: str, case: str | None = None) -> list[dict]:
    return [r for c in result["scenarios"][scenario]["cases"] if case in (None, c["case"]) for r in c["records"]]


def test_json_has_the_environment_the_server_and_every_scenario(run):
    result, _, _ = run
    assert result["label"] == "reprise" and result["model"] == result["server"]["data"][0]["id"]
    assert {"reprise", "python", "torch", "cpu", "cpus", "options"} <= set(result["environment"])
    assert result["environment"]["options"]["prompt_len"] == 160 and "api_key" not in result["environment"]["options"]
    assert list(result["scenarios"]) == ["repeat", "nearest", "prefix-repetition", "multiturn", "long",
                                          "decode"]


def test_counts_add_up_and_percentiles_are_ordered(run):
    result, _, _ = run
    planned = {"repeat": 1 + 2, "nearest": 1 + 2 * 2, "prefix-repetition": 2 * 4, "multiturn": 2 * 3,
               "long": 2, "decode": 1 + 2}
    for name, scenario in result["scenarios"].items():
        assert scenario["requests"] == planned[name] == len(records(result, name))
        assert scenario["failed"] == 0 and scenario["warnings"] == [] and scenario["token_sources"] == ["usage"]
        for case in scenario["cases"]:
            assert case["requests"] == len(case["records"]) and case["failed"] == 0
            assert case["prompt_tokens"] == sum(r["prompt_tokens"] for r in case["records"])
            for keys in PERCENTILE_KEYS:
                assert case[keys[0]] <= case[keys[1]] <= case[keys[2]]


def test_every_request_generates_exactly_the_requested_tokens(run):
    result, _, _ = run
    for name in result["scenarios"]:
        for record in records(result, name):
            assert record["ok"] and record["status"] == 200 and record["error"] is None
            assert record["completion_tokens"] == 4 and record["tpot_s"] is not None
            assert 0 < record["ttft_s"] <= record["e2e_s"]


def test_usage_hit_rate_equals_the_metrics_counters_hit_rate(run):
    result, _, _ = run
    for scenario in result["scenarios"].values():
        assert scenario["metrics"]["before"]["source"] == "reprise"
        assert scenario["hit_rate"] is not None
        assert scenario["hit_rate"] == scenario["metrics_hit_rate"]


def test_hot_repeats_reuse_all_but_the_last_prompt_token(run):
    result, _, _ = run
    (cold,) = records(result, "repeat", "cold")
    assert cold["cached_tokens"] == 0 and cold["prompt_tokens"] == 160
    hot = records(result, "repeat", "hot")
    assert [r["cached_tokens"] for r in hot] == [r["prompt_tokens"] - 1 for r in hot] == [159, 159]


def test_nearest_prompts_reuse_the_shared_prefix(run):
    result, _, _ = run
    near = next(c for c in result["scenarios"]["nearest"]["cases"] if c["case"] == "nearest")
    assert near["shared_tokens"] == 160 - 8
    assert all(160 - 8 <= r["cached_tokens"] < r["prompt_tokens"] for r in near["records"])


def test_later_turns_reuse_the_whole_history(run):
    result, _, _ = run
    turns = result["scenarios"]["multiturn"]["cases"]
    for previous, case in zip(turns, turns[1:]):
        assert case["hit_rate"] > 0
        for before, after in zip(previous["records"], case["records"]):
            assert after["conversation"] == before["conversation"]
            assert after["cached_tokens"] >= before["prompt_tokens"]


def test_warm_prefix_repetition_pass_hits_more_than_the_cold_one(run):
    result, _, _ = run
    cold, warm = result["scenarios"]["prefix-repetition"]["cases"]
    assert (cold["case"], warm["case"]) == ("cold", "warm")
    assert warm["hit_rate"] > cold["hit_rate"]
    assert [r["cached_tokens"] for r in warm["records"]] == [r["prompt_tokens"] - 1 for r in warm["records"]]


def test_decode_sweeps_the_concurrencies(run):
    result, _, _ = run
    cases = result["scenarios"]["decode"]["cases"]
    assert [(c["concurrency"], c["requests"], c["completion_tokens"]) for c in cases] == [(1, 1, 4), (2, 2, 8)]
    assert all(c["output_tokens_per_s"] > 0 for c in cases)


def test_the_chart_is_a_png(run):
    _, _, plot = run
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_tabulates_each_label_and_draws_one_chart(run, tmp_path):
    result, out, _ = run
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**result, "label": "other"}))
    table, chart = tmp_path / "table.md", tmp_path / "chart.png"
    assert run_compare([str(out), str(other)], str(table), str(chart)) == 0
    lines = table.read_text().splitlines()
    assert lines[0] == "| scenario | case | metric | reprise | other |"
    assert "| repeat | hot | hit_rate | 99.4% | 99.4% |" in lines
    assert chart.read_bytes()[:4] == b"\x89PNG"


def test_a_failed_request_is_recorded_not_raised(server_url):
    async def send(model: str | None, api_key: str | None, timeout_s: float) -> dict:
        client = Client(server_url, model, api_key, timeout_s, eos_ids=None)
        try:
            record, _ = await client.complete(" river stone", 4, lambda: 2)
        finally:
            await client.close()
        return record
    unknown = asyncio.run(send("no-such-model", API_KEY, 60))
    assert (unknown["ok"], unknown["status"]) == (False, 404) and "no-such-model" in unknown["error"]
    unauthorized = asyncio.run(send(None, None, 60))
    assert (unauthorized["ok"], unauthorized["status"]) == (False, 401)
    late = asyncio.run(send(None, API_KEY, 1e-4))
    assert not late["ok"] and late["error"].startswith("timed out")


def test_a_server_without_prefix_cache_reports_zero_hits(tmp_path):
    with reprise_server("--no-prefix-cache") as url:
        result, _, _ = bench(url, tmp_path, "reprise-no-cache", "--scenario", "repeat")
    repeat = result["scenarios"]["repeat"]
    assert repeat["hit_rate"] == repeat["metrics_hit_rate"] == 0.0 and repeat["warnings"] == []
    assert [r["cached_tokens"] for r in records(result, "repeat")] == [0, 0, 0]
