"""The dashboard: its JSON state with exact numbers, tenant isolation, and both pages rendered in a
real headless Chromium (skipped when Debian's `chromium` is not installed).

One server with the default model and no keys (`--log-prompts`, so the tree carries text) serves the
state and page tests; one tiny random-weight model with two keys and `--salt-per-key` serves the
isolation tests. Each test works in its own cache namespace (`cache_salt`) or compares engine-wide
counters read while the server is idle, so the tests do not depend on each other's requests.
"""
from __future__ import annotations

import base64
import os
import re
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from reprise.cache.radix import RadixIndex
from reprise.server.config import key_salt
from reprise.server.dashboard.ledger import SHARED, namespace_label
from reprise.server.dashboard.state import caller_scope
from reprise.server.dashboard.tree import summarise
from tests.server.browser import CHROMIUM, Browser
from tests.server.helpers import launch, metric, wait_idle, write_tiny_model

BLOCK_SIZE = 16
KEY_A, KEY_B = "dashboard-key-a", "dashboard-key-b"
# screenshots go to a temporary folder; REPRISE_SCREENSHOTS=docs refreshes the README's
SCREENSHOTS = Path(os.environ.get("REPRISE_SCREENSHOTS") or tempfile.mkdtemp(prefix="reprise-screens-"))
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make setup)")


@pytest.fixture(scope="module")
def running():
    with launch(["--kv-cache-bytes", "64MiB", "--block-size", str(BLOCK_SIZE), "--log-prompts"]) as running:
        yield running


@pytest.fixture(scope="module")
def http(running) -> httpx.Client:
    with httpx.Client(base_url=running.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    model = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    with launch(["--model", str(model), "--block-size", str(BLOCK_SIZE), "--kv-cache-bytes", "32MiB",
                 "--api-key", KEY_A, "--api-key", KEY_B, "--salt-per-key"]) as running:
        yield running


def complete(http: httpx.Client, prompt_ids: list[int], salt: str | None = None, key: str | None = None) -> dict:
    body = {"model": "default", "prompt": prompt_ids, "max_tokens": 1, "temperature": 0}
    if salt is not None:
        body["cache_salt"] = salt
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = http.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def state(http: httpx.Client, key: str | None = None) -> dict:
    response = http.get("/v1/dashboard/state", headers={"Authorization": f"Bearer {key}"} if key else {})
    assert response.status_code == 200, response.text
    return response.json()


def settled(http: httpx.Client) -> tuple[float, float]:
    """(hits, queries) from /metrics once no block is used and two readings agree (a chat's
    background continuation prefill counts as a query too)."""
    previous = None
    for _ in range(100):
        wait_idle(http)
        reading = (metric(http, "reprise:prefix_cache_hits_total", tier="memory"),
                   metric(http, "reprise:prefix_cache_queries_total", tier="memory"))
        if reading == previous:
            return reading
        previous = reading
        time.sleep(0.3)
    raise AssertionError("the cache counters did not settle")


def test_tree_summary_keeps_the_largest_subtrees_and_counts_a_shared_block_once():     # block_size=4
    index = RadixIndex(4)
    index.insert([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 2], None)
    index.insert([1, 2, 3, 4, 5, 6, 20, 21], [0, 3], None)    # splits at 6: [0, 6) -> [6, 10) and [6, 8)
    index.insert([1, 2, 3, 4, 5], [9, 8], "tenant")
    summary = summarise(SimpleNamespace(index=index), lambda salt: True, 2, now=0.0)
    assert summary.namespaces == {SHARED: 12, namespace_label("tenant"): 5} and summary.num_nodes == 4
    shared, tenant = summary.prefixes
    assert (shared.start, shared.num_tokens, shared.num_blocks, shared.subtree_tokens, shared.subtree_blocks) == \
        (0, 6, 2, 12, 4)                # blocks 0, 1, 2, 3: block 1 straddles [0, 6) and [6, 10), counted once
    assert (tenant.namespace, tenant.subtree_tokens, tenant.subtree_blocks, tenant.parent) == \
        (namespace_label("tenant"), 5, 2, None)
    only_tenant = summarise(SimpleNamespace(index=index), lambda salt: salt == "tenant", 10, now=0.0)
    assert only_tenant.namespaces == {namespace_label("tenant"): 5} and len(only_tenant.prefixes) == 1


def test_a_keys_scope_is_its_salt_and_the_salts_under_it():
    visible, own = caller_scope("k" * 64, keyed=True)
    assert own == [namespace_label("k" * 64)]
    assert [visible(salt) for salt in ("k" * 64, "k" * 64 + ":user", None, "j" * 64, "k" * 63)] == \
        [True, True, False, False, False]
    for tenant_salt, keyed in ((None, False), (None, True)):     # no keys; keys sharing one namespace
        visible, own = caller_scope(tenant_salt, keyed)
        assert own is None and visible(None) and visible("any")
    assert namespace_label(None) == "shared" and re.fullmatch(r"ns-[0-9a-f]{8}", namespace_label("x"))


def test_hit_rate_is_the_metrics_hits_over_queries(http):
    prompt = list(range(1000, 1040))
    assert complete(http, prompt)["prompt_tokens_details"]["cached_tokens"] == 0
    assert complete(http, prompt + [7, 8, 9])["prompt_tokens_details"]["cached_tokens"] == 40
    hits, queries = settled(http)
    cache = state(http)["cache"]
    assert (cache["hits"], cache["queries"]) == (hits, queries)
    assert cache["hit_rate"] == hits / queries


def test_tree_shows_a_prompts_size_in_tokens_and_blocks(http):
    salt = "dashboard-tree"
    complete(http, list(range(2000, 2037)), salt)     # 37 prompt tokens; the one output token has no KV yet
    wait_idle(http)
    tree = state(http)["tree"]
    label = namespace_label(salt)
    assert tree["namespaces"][label] == 37
    chain = sorted((p for p in tree["prefixes"] if p["namespace"] == label), key=lambda p: p["start"])
    root = chain[0]       # full blocks entered the index as prefill completed them: a chain of nodes
    assert (root["start"], root["parent"], root["subtree_tokens"], root["subtree_blocks"]) == (0, None, 37, 3)
    assert sum(p["num_tokens"] for p in chain) == 37 and sum(p["num_blocks"] for p in chain) == 3
    assert all(child["parent"] == parent["id"] for parent, child in zip(chain, chain[1:]))
    assert all(p["pinned_for_s"] is None for p in chain)
    text = http.post("/detokenize", json={"tokens": list(range(2000, 2037))}).json()["prompt"]
    assert "".join(p["text"] for p in chain) == text


def test_recent_requests_keep_prompt_cached_tokens_and_the_miss(http):
    salt = "dashboard-ring"
    prompt = list(range(3000, 3040))
    complete(http, prompt, salt)
    complete(http, prompt + [11, 12, 13, 14, 15], salt)
    complete(http, prompt[:20] + [21, 22, 23], salt)
    snapshot = state(http)
    label = namespace_label(salt)
    mine = [r for r in snapshot["requests"] if r["namespace"] == label]
    seen = [(r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"], r["miss_reason"], r["diverged_at"])
            for r in mine]
    assert seen == [(23, 20, 1, "diverged", 20), (45, 40, 1, None, None), (40, 0, 1, None, None)]   # newest first
    assert all(r["ttft_s"] > 0 for r in mine)
    [row] = [row for row in snapshot["namespaces"] if row["label"] == label]
    assert (row["prompt_tokens"], row["cached_tokens"]) == (108, 60)
    assert row["hit_rate"] == 60 / 108


def test_history_samples_the_pool_every_second(http):
    time.sleep(2.5)
    snapshot = state(http)
    history = snapshot["history"]
    assert len(history) >= 2 and history == sorted(history, key=lambda sample: sample["t"])
    pool = snapshot["pool"]
    assert all(s["used"] + s["cached"] + s["free"] == pool["num_blocks"] for s in history)
    assert snapshot["scope"] == "all" and snapshot["own_namespaces"] is None


def test_pages_and_state_need_a_key_when_the_server_has_keys(keyed):
    basic = "Basic " + base64.b64encode(f"anyone:{KEY_B}".encode()).decode()
    for path in ("/dashboard", "/chat", "/dashboard/assets/dashboard.js", "/v1/dashboard/state"):
        assert httpx.get(keyed.url + path).status_code == 401
        assert httpx.get(keyed.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(keyed.url + path, headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
    refused = httpx.get(keyed.url + "/dashboard")
    assert refused.headers["www-authenticate"].startswith("Basic ")
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(keyed.url + "/dashboard", headers={"Authorization": basic}).status_code == 200
    assert httpx.get(keyed.url + "/dashboard/assets/nothing.js", headers={"Authorization": basic}).status_code == 404


def test_a_key_sees_only_its_own_namespaces(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as http:
        complete(http, list(range(4000, 4021)), key=KEY_A)
        complete(http, list(range(4100, 4130)), salt="user-1", key=KEY_A)
        complete(http, list(range(4200, 4250)), key=KEY_B)
        wait_idle(http)
        seen_by_a, seen_by_b = state(http, KEY_A), state(http, KEY_B)
    label_a, label_a1 = namespace_label(key_salt(KEY_A)), namespace_label(f"{key_salt(KEY_A)}:user-1")
    label_b = namespace_label(key_salt(KEY_B))
    assert (seen_by_a["scope"], seen_by_a["own_namespaces"]) == ("own", [label_a])
    assert seen_by_a["tree"]["namespaces"] == {label_a: 21, label_a1: 30}
    assert seen_by_b["tree"]["namespaces"] == {label_b: 50}
    assert [(r["namespace"], r["prompt_tokens"]) for r in seen_by_a["requests"]] == [(label_a1, 30), (label_a, 21)]
    assert [(r["namespace"], r["prompt_tokens"]) for r in seen_by_b["requests"]] == [(label_b, 50)]
    assert {row["label"] for row in seen_by_a["namespaces"]} == {label_a, label_a1}
    assert all(set(sample["namespaces"]) <= {label_b} for sample in seen_by_b["history"])
    assert all(p["text"] is None for p in seen_by_a["tree"]["prefixes"])     # no --log-prompts
    assert seen_by_a["cache"]["queries"] == seen_by_b["cache"]["queries"] == 101     # engine-wide, as /metrics


@needs_chromium
def test_chat_page_streams_two_turns_and_the_second_hits_the_cache(running, http):
    with Browser() as browser:
        dom = browser.open(f"{running.url}/chat?auto=Hello!|Tell%20me%20more&max_tokens=32&temperature=0",
                           "document.body.dataset.turns === '2'", timeout=180)
        browser.screenshot(SCREENSHOTS / "chat.png")
    turns = re.findall(r'class="turn assistant" data-cached-tokens="(\d+)" data-prompt-tokens="(\d+)"', dom)
    assert len(turns) == 2
    (cached_1, prompt_1), (cached_2, prompt_2) = [(int(c), int(p)) for c, p in turns]
    assert cached_2 > 0 and prompt_2 > prompt_1
    assert f"cached_tokens {cached_2}</b>" in dom
    newest = state(http)["requests"][:2]           # the server's own record of the same two turns
    assert [(r["prompt_tokens"], r["cached_tokens"]) for r in newest] == [(prompt_2, cached_2), (prompt_1, cached_1)]


@needs_chromium
def test_dashboard_page_shows_the_metrics_hit_rate_and_the_prompts_size(running, http):
    complete(http, list(range(5000, 5037)), "dashboard-page")
    hits, queries = settled(http)
    with Browser() as browser:
        dom = browser.open(f"{running.url}/dashboard", "document.body.dataset.updated !== undefined")
        browser.screenshot(SCREENSHOTS / "dashboard.png")
    shown = re.search(r'id="hit-rate" data-value="([^"]+)">([^<]+)<', dom)
    assert float(shown.group(1)) == hits / queries
    assert shown.group(2) == f"{100 * hits / queries:.2f}%"
    label = namespace_label("dashboard-page")
    assert re.search(rf'<g data-namespace="{label}">', dom)
    assert f'class="prefix" data-namespace="{label}" data-tokens="37" data-blocks="3" data-start="0"' in dom
