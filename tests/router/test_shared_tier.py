"""Two replicas on one Redis: a prefix one computes is a hit on the other, never across tenants;
the router looks requests up only in the caller's namespace."""
from __future__ import annotations

import json

import httpx
import pytest

from reprise.router.policy import rendezvous
from reprise.router.prompts import PromptReader
from reprise.router.proxy import ROUTE_HEADER, _affinity
from tests.router.cluster import KEYS, cached, chat, replica, router, settle, wait_stored


@pytest.fixture(scope="module")
def replicas(redis_server):
    redis_server.client().flushdb()
    with replica(redis_server.url) as a, replica(redis_server.url) as b:
        yield a.url, b.url


def long_messages(fresh_prompt, num_tokens: int = 2000) -> list[dict]:
    return [{"role": "user", "content": fresh_prompt(num_tokens)}]


def prompt_of(messages: list[dict], key: str = KEYS[0]):
    return PromptReader(None, per_key=lambda: True).read("/v1/chat/completions", {"messages": messages},
                                                      {"authorization": f"Bearer {key}"})


def block_aligned_messages(fresh_prompt, about: int) -> list[dict]:
    """A chat whose prompt has 16k + 1 tokens: the tiers hold whole blocks, so such a prompt can
    take all but its last token (which is always computed) from another replica."""
    overhead = len(prompt_of(long_messages(fresh_prompt, 10)).ids) - 10
    num_content = about - (about + overhead - 1) % 16
    messages = long_messages(fresh_prompt, num_content)
    assert len(prompt_of(messages).ids) % 16 == 1
    return messages


def test_prefix_from_one_replica_is_a_hit_on_the_other(replicas, redis_server, fresh_prompt):
    a, b = replicas
    messages = block_aligned_messages(fresh_prompt, 2000)
    cold = chat(a, messages, max_tokens=16)
    assert cached(cold)[0] == 0
    num_prompt = cached(cold)[1]
    wait_stored(redis_server.client(), num_prompt // 16)
    hot = chat(b, messages, max_tokens=16)
    assert cached(hot) == (num_prompt - 1, num_prompt)
    assert hot.json()["choices"][0]["message"]["content"] == cold.json()["choices"][0]["message"]["content"]


def test_tenants_share_nothing_through_the_store(replicas, redis_server, fresh_prompt):
    a, b = replicas
    messages = block_aligned_messages(fresh_prompt, 300)
    num_prompt = cached(chat(a, messages, key=KEYS[0]))[1]
    wait_stored(redis_server.client(), num_prompt // 16)
    assert cached(chat(b, messages, key=KEYS[1]))[0] == 0          # the other tenant: nothing from the store
    assert cached(chat(b, messages, key=KEYS[0]))[0] == num_prompt - 1


def test_routing_of_one_tenant_ignores_the_others_entries(replicas, redis_server, fresh_prompt, default_model):
    messages = long_messages(fresh_prompt, 300)
    with router(list(replicas), "--kv-store", redis_server.url) as running:
        first = chat(running.url, messages, key=KEYS[1], cache_salt="t2")     # tenant two computes it somewhere
        settle(list(replicas))
        again = chat(running.url, messages, key=KEYS[1], cache_salt="t2")
        assert again.headers[ROUTE_HEADER].split()[:2] == [first.headers[ROUTE_HEADER].split()[0], "prefix"]
        # tenant one, in a namespace of its own that holds nothing yet (its key's salt + this cache_salt)
        settle(list(replicas))
        answer = chat(running.url, messages, key=KEYS[0], cache_salt="routing-test")
        url, reason, estimate = answer.headers[ROUTE_HEADER].split()
        assert (reason, estimate) == ("affinity", "0") and cached(answer)[0] == 0
        # the choice is a function of tenant one's request alone: the rendezvous hash of its affinity
        prompt = PromptReader(None, per_key=lambda: True).read(
            "/v1/chat/completions", {"messages": messages, "cache_salt": "routing-test"},
            {"authorization": f"Bearer {KEYS[0]}"})
        assert url == max(replicas, key=lambda r: rendezvous(_affinity(prompt), r))
        metrics = httpx.get(f"{running.url}/metrics").text
        assert 'reprise:router_decisions_total{reason="prefix"} 1.0' in metrics
        assert 'reprise:router_decisions_total{reason="affinity"} 2.0' in metrics


def test_router_passes_streams_and_every_api_through(replicas, redis_server, fresh_prompt):
    messages = long_messages(fresh_prompt, 100)
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    with router(list(replicas), "--kv-store", redis_server.url) as running:
        computed = chat(running.url, messages)
        settle(list(replicas))
        body = {"model": "default", "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body, headers=auth, timeout=120) as answer:
            assert answer.status_code == 200 and answer.headers[ROUTE_HEADER].split()[1] == "prefix"
            events = [line for line in answer.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][6:])["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == cached(computed)[1] - 1
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-2])
        assert text == computed.json()["choices"][0]["message"]["content"]
        settle(list(replicas))
        anthropic = httpx.post(f"{running.url}/v1/messages", headers=auth, timeout=120,
                               json={"model": "default", "max_tokens": 8, "messages": messages})
        assert anthropic.status_code == 200, anthropic.text
        assert anthropic.headers[ROUTE_HEADER].split()[1] == "prefix"
        completion = httpx.post(f"{running.url}/v1/completions", headers=auth, timeout=120,
                                json={"model": "default", "prompt": "Hello", "max_tokens": 4})
        assert completion.status_code == 200
        responses = httpx.post(f"{running.url}/v1/responses", headers=auth, timeout=120,
                               json={"model": "default", "input": messages[0]["content"], "max_output_tokens": 8})
        assert responses.status_code == 200, responses.text
        reported = [line for line in httpx.get(f"{running.url}/metrics").text.splitlines()
                    if line.startswith("reprise:router_reported_cached_tokens_total")]
        assert sum(float(line.split()[-1]) for line in reported) >= 2 * (cached(computed)[1] - 1)
