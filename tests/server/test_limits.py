"""Admission control, size limits, several API keys and per-key cache namespaces (the default with
several keys), on a server of their own: one running request at most, 2 waiting, 200 prompt tokens and
64 KiB of body per request; an admin key for /v1/cache/check."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server.helpers import launch, wait_idle
from tests.server.test_errors import assert_error

KEY_A, KEY_B, ADMIN_KEY = "tenant-a-key-91c2", "tenant-b-key-4d7e", "admin-key-5e0b"
MAX_WAITING, MAX_PROMPT_TOKENS, MAX_BODY_BYTES = 2, 200, 65536
FLAGS = ["--dtype", "float32", "--kv-cache-bytes", "64MiB", "--max-num-seqs", "1", "--max-waiting", str(MAX_WAITING),
         "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-body-bytes", str(MAX_BODY_BYTES),
         "--api-key", KEY_A, "--api-key", KEY_B, "--admin-key", ADMIN_KEY]
FIXED = {"temperature": 0, "ignore_eos": True}
MARKER = "zebra-quartz-9931"            # sent in prompts and bad fields; must never reach the log


@pytest.fixture(scope="module")
def limited():
    with launch(FLAGS) as running:
        yield running


def tenant(limited, key: str) -> httpx.Client:
    return httpx.Client(base_url=limited.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


@pytest.fixture(scope="module")
def http_a(limited):
    with tenant(limited, KEY_A) as client:
        yield client


@pytest.fixture(scope="module")
def http_b(limited):
    with tenant(limited, KEY_B) as client:
        yield client


async def flood(url: str, num_requests: int) -> list[httpx.Response]:
    """num_requests at once, every third one streamed; responses with their bodies read."""
    headers = {"Authorization": f"Bearer {KEY_A}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        async def one(index: int) -> httpx.Response:
            body = {"prompt": f"Request {index} of the flood:", "max_tokens": 24, "stream": index % 3 == 0, **FIXED}
            response = await client.post("/v1/completions", json=body)
            await response.aread()
            return response
        return await asyncio.gather(*(one(index) for index in range(num_requests)))


def test_a_flood_past_max_waiting_gets_429_with_retry_after(limited, http_a):
    responses = asyncio.run(flood(limited.url, 10))
    refused = [r for r in responses if r.status_code == 429]
    served = [r for r in responses if r.status_code == 200]
    assert len(refused) + len(served) == 10
    assert refused and len(served) >= MAX_WAITING       # the first MAX_WAITING always fit
    for response in refused:
        assert response.headers["Retry-After"].isdigit() and int(response.headers["Retry-After"]) >= 1
        error = assert_error(response, 429, code="server_busy")
        assert error["type"] == "rate_limit_error"
    for response in served:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text
        else:
            assert response.json()["usage"]["completion_tokens"] == 24
    assert wait_idle(http_a)["used"] == 0
    check = httpx.get(f"{limited.url}/v1/cache/check", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert check.json()["ok"]


def test_prompt_past_max_prompt_tokens_is_413_and_at_it_runs(http_a):
    error = assert_error(http_a.post("/v1/completions", json={"prompt": [300] * (MAX_PROMPT_TOKENS + 1)}), 413,
                         "prompt", "prompt_too_long")
    assert str(MAX_PROMPT_TOKENS) in error["message"]
    long_chat = {"messages": [{"role": "user", "content": "word " * MAX_PROMPT_TOKENS}], "max_tokens": 1}
    assert_error(http_a.post("/v1/chat/completions", json=long_chat), 413, "messages", "prompt_too_long")
    at_limit = http_a.post("/v1/completions", json={"prompt": [300] * MAX_PROMPT_TOKENS, "max_tokens": 1})
    assert at_limit.status_code == 200 and at_limit.json()["usage"]["prompt_tokens"] == MAX_PROMPT_TOKENS


def test_body_past_max_body_bytes_is_413_by_length_and_by_chunks(http_a):
    padding = "a" * MAX_BODY_BYTES
    sized = http_a.post("/v1/completions", content=f'{{"prompt": "{padding}"}}'.encode(),
                        headers={"Content-Type": "application/json"})
    assert_error(sized, 413, code="body_too_large")
    chunks = iter([b'{"prompt": "', padding[:40000].encode(), padding[40000:].encode(), b'"}'])
    chunked = http_a.post("/v1/completions", content=chunks, headers={"Content-Type": "application/json"})
    assert "content-length" not in chunked.request.headers
    assert_error(chunked, 413, code="body_too_large")
    small = iter([b'{"prompt": "Hello', b' there", "max_tokens": 1}'])
    response = http_a.post("/v1/completions", content=small, headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 1


def test_every_key_is_accepted_and_no_key_is_401(limited, http_a, http_b):
    assert http_a.get("/v1/models").status_code == http_b.get("/v1/models").status_code == 200
    assert_error(httpx.get(f"{limited.url}/v1/models"), 401, code="invalid_api_key")
    with tenant(limited, KEY_A + "x") as wrong:
        assert_error(wrong.post("/v1/completions", json={"prompt": "Hi"}), 401, code="invalid_api_key")
    assert httpx.get(f"{limited.url}/health").status_code == 200


def cached(client: httpx.Client, prompt: list[int], **extra) -> int:
    body = {"prompt": prompt, "max_tokens": 1, **FIXED, **extra}
    return client.post("/v1/completions", json=body).json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_each_key_gets_its_own_cache_namespace(http_a, http_b):
    prompt = list(range(3000, 3100))
    assert [cached(http_a, prompt), cached(http_a, prompt)] == [0, 99]
    lookup = {"prompt": prompt}
    assert http_b.post("/v1/cache/lookup", json=lookup).json()["cached_tokens"] == 0
    assert http_a.post("/v1/cache/lookup", json=lookup).json()["cached_tokens"] == 99
    assert [cached(http_b, prompt), cached(http_b, prompt)] == [0, 99]
    # a client salt narrows a tenant's namespace; it never opens another tenant's
    assert [cached(http_a, prompt, cache_salt="s"), cached(http_a, prompt, cache_salt="s")] == [0, 99]
    assert cached(http_b, prompt, cache_salt="s") == 0


def test_prompts_and_bad_input_stay_out_of_the_log(limited, http_a):
    http_a.post("/v1/completions", json={"prompt": f"The code word is {MARKER}.", "max_tokens": 2})
    http_a.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": MARKER}], "max_tokens": 2,
                                              "stream": True})
    assert http_a.post("/v1/chat/completions", json={"messages": MARKER}).status_code == 400
    assert http_a.post("/v1/completions", json={"prompt": "x", "model": MARKER}).status_code == 404
    assert http_a.post("/v1/completions", json={"prompt": "x", "stop": {MARKER: 1}}).status_code == 400
    log = limited.log()
    assert MARKER not in log and KEY_A not in log and KEY_B not in log and ADMIN_KEY not in log
    assert "Traceback" not in log
