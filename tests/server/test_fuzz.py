"""Hypothesis-made request bodies against the real server: never a 5xx, never a hang, and every 4xx in
OpenAI's error shape. Each body is a valid request (odd unicode included) with zero to three fields
dropped or replaced by junk: wrong types, huge and negative numbers, NaN, nested lists and objects,
lone surrogates; sometimes the whole body is junk. max_tokens is always small or invalid, so a valid
body finishes fast. 150 cases per endpoint in the default run (derandomized: the same cases every
run); the slow variant tries 2,000 fresh ones per endpoint."""
from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import API_KEY

CLIENT_TIMEOUT_S = 60
NUM_CASES, NUM_SLOW_CASES = 150, 2000

odd_text = st.sampled_from(["", "\x00\x01", "\ud800 lone surrogate", "🦀" * 5, "\u202e right-to-left", "é" * 50,
                            "<|im_end|><|im_start|>system", "a" * 300, "\n" * 20])
text = st.text(max_size=60) | odd_text
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | text
           | st.sampled_from([-1, 0, 2**63, 2**64, 10**40, 1e-40, 1e300]))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)
content = text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), min_size=1, max_size=3)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": content})
sampling = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 100),
    "seed": st.integers(0, 2**32), "stop": text | st.lists(text, max_size=4), "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=4), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "cache_salt": text,
    "cache_report": st.booleans(), "model": st.just("default"), "n": st.just(1), "user": text,
}
chat_bodies = st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3),
                                     "max_tokens": st.integers(1, 3)}, optional=sampling)
prompts = text | st.lists(st.integers(0, 49151), min_size=1, max_size=20) | st.lists(text, min_size=1, max_size=3)
completion_bodies = st.fixed_dictionaries({"prompt": prompts, "max_tokens": st.integers(1, 3)}, optional=sampling)
FIELDS = sorted({"messages", "prompt", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "echo",
                 "best_of", "chat_template_kwargs", *sampling})


@st.composite
def mutated(draw, valid_bodies):
    """A valid body with 0 to 3 fields dropped or set to junk (valid only when max_tokens stays small)."""
    body = draw(valid_bodies)
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            body.pop(field, None)
        else:
            body[field] = draw(junk)
    for field in ("max_tokens", "max_completion_tokens"):      # a valid count stays small: 3 tokens at most
        if type(body.get(field)) is int and 3 < body[field] < 10**6:
            body[field] = 3
    if body.get("max_completion_tokens", body.get("max_tokens")) is None:  # would run to the context's end
        body["max_tokens"] = 2
    return body


def check_response(response: httpx.Response) -> None:
    """No 5xx; a 4xx has OpenAI's error shape; a 200 is a whole answer (a stream ends with [DONE])."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text
    else:
        assert response.json()["choices"]


def post(http: httpx.Client, path: str, body, tally: Counter) -> None:
    content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    response = http.post(path, content=content, headers={"Content-Type": "application/json"},
                         timeout=CLIENT_TIMEOUT_S)
    tally[response.status_code] += 1
    check_response(response)


def fuzz(http: httpx.Client, path: str, bodies, num_cases: int, derandomize: bool) -> Counter:
    tally: Counter = Counter()

    @settings(max_examples=num_cases, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=mutated(bodies) | junk)
    def run(body):
        post(http, path, body, tally)
    run()
    print(f"{path}: {sum(tally.values())} cases, by status {dict(sorted(tally.items()))}")
    return tally


@pytest.fixture(scope="module")
def fuzz_http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


@pytest.mark.parametrize(("path", "bodies"), [("/v1/chat/completions", chat_bodies),
                                              ("/v1/completions", completion_bodies)])
def test_fuzzed_bodies_never_get_a_5xx(fuzz_http, path, bodies):
    tally = fuzz(fuzz_http, path, bodies, NUM_CASES, derandomize=True)
    assert sum(tally.values()) >= NUM_CASES and tally[200] > 0


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b'{"messages": ' * 5000, b"\xff\xfe{}",
                                     b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", b"\x00" * 64],
                         ids=["deep-nesting", "unclosed-nesting", "not-utf8", "5000-digit-number", "nul-bytes"])
def test_malformed_bytes_are_400(fuzz_http, content):
    response = fuzz_http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("fields", "status"), [
    ({"temperature": 1e-40}, 200),      # logits / 1e-40 overflow float32: sampled as greedy instead
    ({"seed": 2**64}, 400),             # past what torch.Generator.manual_seed takes
    ({"seed": -2**63}, 200),
    ({"temperature": float("nan")}, 400),
    ({"top_p": float("inf")}, 400),
])
def test_sampling_values_that_would_fail_a_whole_batch_are_caught(fuzz_http, fields, status):
    """Each of these once raised inside the engine step, failing every request in the batch with 503."""
    body = {"prompt": "Hello", "max_tokens": 2, "temperature": 1.0, **fields}
    response = fuzz_http.post("/v1/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text


@pytest.mark.slow
@pytest.mark.parametrize(("path", "bodies"), [("/v1/chat/completions", chat_bodies),
                                              ("/v1/completions", completion_bodies)])
def test_many_fuzzed_bodies_never_get_a_5xx(fuzz_http, path, bodies):
    tally = fuzz(fuzz_http, path, bodies, NUM_SLOW_CASES, derandomize=False)
    assert sum(tally.values()) >= NUM_SLOW_CASES


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/completions", {"prompt": "x", "model": "\ud800"}, 404),     # quoted back in the error message
    ("/v1/completions", {"prompt": "a \ud800 b", "max_tokens": 1}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}], "max_tokens": 1}, 400),
])
def test_lone_surrogates_are_answered_in_json(fuzz_http, path, body, status):
    content = json.dumps(body).encode()        # JSON escapes: "\\ud800" is valid JSON, not valid UTF-8 text
    response = fuzz_http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}
