"""Replicas, routers and conversations for the scale-out tests (real processes on 127.0.0.1)."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.server.helpers import launch

KV_CACHE_BYTES = str(128 * 2**20)
REPLICA_FLAGS = ["--dtype", "float32", "--kv-cache-bytes", KV_CACHE_BYTES, "--block-size", "16"]
KEYS = ("tenant-one-key", "tenant-two-key")


def replica(kv_store: str | None, *extra: str):
    """`reprise serve` with the scale-out test flags (two API keys, a namespace per key)."""
    store = ["--kv-store", kv_store] if kv_store else []
    return launch([*REPLICA_FLAGS, "--api-key", ",".join(KEYS), *store, *extra])


def router(replicas: list[str], *flags: str):
    """`reprise route` over `replicas`, answering /health with every replica in."""
    return launch(["--health-interval", "0.5", *(arg for r in replicas for arg in ("--replica", r)), *flags],
                  "route", lambda health: len(health["replicas"]) == len(replicas))


def chat(url: str, messages: list[dict], key: str = KEYS[0], max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                        timeout=300)
    assert answer.status_code == 200, answer.text
    return answer


def cached(answer: httpx.Response) -> tuple[int, int]:
    """(cached_tokens, prompt_tokens) of a chat completion."""
    usage = answer.json()["usage"]
    return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]


def settle(replicas: list[str], health_interval_s: float = 0.5) -> None:
    """Until no replica runs or queues anything (a chat turn may leave a continuation prefill
    running), and the router has had two health checks since: load then plays no part."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        texts = [httpx.get(f"{url}/metrics", timeout=5).text for url in replicas]
        busy = [line for text in texts for line in text.splitlines()
                if line.startswith(("reprise:num_requests_running ", "reprise:num_requests_waiting "))
                and float(line.split()[-1]) > 0]
        if not busy:
            time.sleep(2 * health_interval_s + 0.2)
            return
        time.sleep(0.1)
    pytest.fail("the replicas did not become idle")


def wait_stored(redis_client, num_keys: int, timeout_s: float = 30) -> None:
    """Until the shared tier holds at least `num_keys` blocks (writes are asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(redis_client.keys("reprise:kv:*")) >= num_keys:
            return
        time.sleep(0.1)
    pytest.fail(f"the shared tier holds {len(redis_client.keys('reprise:kv:*'))} blocks, expected {num_keys}")
