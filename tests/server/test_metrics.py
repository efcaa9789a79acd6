"""/metrics against a real server: counters equal what clients saw, blocks come back, disconnects abort."""
from __future__ import annotations

import httpx

from tests.server.helpers import kv_blocks, metric, wait_idle

FIXED = {"temperature": 0, "ignore_eos": True}
EXACT_NAMES = ["reprise:prefix_cache_queries_total", "reprise:prefix_cache_hits_total",
               "reprise:prefix_cache_evictions_total", "reprise:num_requests_running",
               "reprise:num_requests_waiting", "reprise:request_cached_tokens_count",
               "reprise:time_to_first_token_seconds_count", "reprise:time_per_output_token_seconds_count",
               "reprise:e2e_request_latency_seconds_count", "reprise:prompt_tokens_total",
               "reprise:generation_tokens_total"]


def test_metric_names_are_exact(http):
    text = http.get("/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert set(EXACT_NAMES) <= names
    assert "process_cpu_seconds_total" in names
    for state in ("used", "cached", "free"):
        assert f'reprise:kv_blocks{{state="{state}"}}' in text


def test_cache_counters_equal_what_clients_saw(http, fresh_prompt):
    names = ("reprise:prefix_cache_hits_total", "reprise:prefix_cache_queries_total", "reprise:prompt_tokens_total",
             "reprise:generation_tokens_total", "reprise:request_cached_tokens_sum",
             "reprise:request_cached_tokens_count")
    before = {name: metric(http, name, **_tier(name)) for name in names}
    prompt = fresh_prompt(100)
    usages = [http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, **FIXED}).json()["usage"]
              for _ in range(2)]
    usages.append(http.post("/v1/completions", json={"prompt": [prompt, fresh_prompt(30)], "max_tokens": 2,
                                                     **FIXED}).json()["usage"])
    usages.append(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                          "max_tokens": 2, **FIXED}).json()["usage"])
    delta = {name: metric(http, name, **_tier(name)) - before[name] for name in names}
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages[:3]] == [0, 99, 99]
    assert delta["reprise:prefix_cache_hits_total"] == cached
    assert delta["reprise:request_cached_tokens_sum"] == cached
    assert delta["reprise:request_cached_tokens_count"] == 5
    assert delta["reprise:prefix_cache_queries_total"] == sum(u["prompt_tokens"] for u in usages)
    assert delta["reprise:prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert delta["reprise:generation_tokens_total"] == 3 + 3 + 4 + 2


def _tier(name: str) -> dict:
    """The hit and query counters are per tier; the shared server has the memory tier only."""
    return {"tier": "memory"} if name.startswith("reprise:prefix_cache_") else {}


def test_blocks_return_to_the_pool_when_idle(http, server):
    blocks = wait_idle(http)
    assert blocks["used"] == 0
    assert blocks["used"] + blocks["cached"] + blocks["free"] == server.num_blocks
    assert metric(http, "reprise:num_requests_running") == 0
    assert metric(http, "reprise:num_requests_waiting") == 0


def test_disconnect_mid_stream_frees_blocks_and_keeps_the_prefix(http, server, fresh_prompt):
    prompt = fresh_prompt(200)
    body = {"prompt": prompt, "max_tokens": 500, "stream": True, **FIXED}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()       # kept: dropping the iterator closes the connection
        assert next(lines).startswith("data: ")
        assert kv_blocks(http)["used"] > 0
    blocks = wait_idle(http, timeout=10)
    assert blocks["used"] == 0
    assert blocks["used"] + blocks["cached"] + blocks["free"] == server.num_blocks
    # what it computed stayed in the cache: at least the whole prompt but its last token
    lookup = http.post("/v1/cache/lookup", json={"prompt": prompt}).json()
    assert lookup["cached_tokens"] == 199


def test_disconnect_while_waiting_for_a_whole_response_frees_blocks(http, server, fresh_prompt):
    body = {"prompt": fresh_prompt(20), "max_tokens": 500, **FIXED}
    try:
        http.post("/v1/completions", json=body, timeout=1.0)
    except httpx.ReadTimeout:
        pass
    blocks = wait_idle(http, timeout=10)
    assert blocks["used"] == 0
    assert blocks["used"] + blocks["cached"] + blocks["free"] == server.num_blocks
