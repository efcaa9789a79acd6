"""A real `reprise serve --speculative ngram`: cached_tokens and usage exactly as on the plain path
(streaming and not, multi-turn), the speculative counters on /metrics, and the per-request opt-out."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.helpers import launch, metric, wait_idle
from tests.server.test_completions import sse_events

FIXED = {"temperature": 0, "ignore_eos": True}
QUOTE = ("Repeat the following text exactly: The quick brown fox jumps over the lazy dog. A journey of a "
         "thousand miles begins with a single step.")
DRAFTED, ACCEPTED = "reprise:spec_decode_draft_tokens_total", "reprise:spec_decode_accepted_tokens_total"


@pytest.fixture(scope="module")
def spec_url() -> str:
    flags = ["--dtype", "float32", "--kv-cache-bytes", "64MiB", "--speculative", "ngram", "--spec-tokens", "4"]
    with launch(flags) as running:
        yield running.url


@pytest.fixture(scope="module")
def spec_http(spec_url) -> httpx.Client:
    with httpx.Client(base_url=spec_url, timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def spec_client(spec_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{spec_url}/v1", api_key="none", max_retries=0, timeout=120)


def test_exact_repeat_reports_all_but_the_last_prompt_token(spec_http, fresh_prompt):
    prompt = f"{QUOTE}\n{fresh_prompt(300)}"
    body = {"prompt": prompt, "max_tokens": 12, **FIXED}
    drafted = metric(spec_http, DRAFTED)
    cold, hot = (spec_http.post("/v1/completions", json=body).json() for _ in range(2))
    assert metric(spec_http, DRAFTED) > drafted          # the speculative path ran
    num_prompt = cold["usage"]["prompt_tokens"]
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert hot["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 12, "total_tokens": num_prompt + 12,
                            "prompt_tokens_details": {"cached_tokens": num_prompt - 1}}
    assert hot["choices"][0]["text"] == cold["choices"][0]["text"]
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with spec_http.stream("POST", "/v1/completions", json=stream_body) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [i for i, chunk in enumerate(chunks) if chunk.get("usage") is not None] == [len(chunks) - 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == hot["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == cold["choices"][0]["text"]


def test_three_turn_chat_reuses_each_previous_turn(spec_client, fresh_prompt):
    messages = [{"role": "user", "content": f"{QUOTE} {fresh_prompt(20)}"}]
    usages = []
    for turn in range(3):
        response = spec_client.chat.completions.create(model="default", messages=messages, max_tokens=24,
                                                       temperature=0)
        usages.append(response.usage)
        messages += [{"role": "assistant", "content": response.choices[0].message.content},
                     {"role": "user", "content": f"Again, exactly: {fresh_prompt(8)}"}]
    cached = [usage.prompt_tokens_details.cached_tokens for usage in usages]
    assert cached[0] < cached[1] < cached[2]
    for before, after in zip(usages, usages[1:]):
        assert after.prompt_tokens_details.cached_tokens == before.prompt_tokens + before.completion_tokens - 1


def test_metrics_count_drafts_and_the_opt_out_drafts_nothing(spec_http):
    body = {"messages": [{"role": "user", "content": QUOTE}], "max_tokens": 32, "temperature": 0}
    speculated = spec_http.post("/v1/chat/completions", json=body).json()
    drafted, accepted = metric(spec_http, DRAFTED), metric(spec_http, ACCEPTED)
    assert drafted > 0 and 0 < accepted <= drafted
    plain = spec_http.post("/v1/chat/completions", json={**body, "speculative": False}).json()
    assert (metric(spec_http, DRAFTED), metric(spec_http, ACCEPTED)) == (drafted, accepted)
    assert plain["choices"][0]["message"] == speculated["choices"][0]["message"]
    assert plain["usage"]["completion_tokens"] == speculated["usage"]["completion_tokens"]
    assert wait_idle(spec_http)["used"] == 0
