"""Bad input and auth against a real server: status codes and OpenAI-shaped error bodies."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY

HI = [{"role": "user", "content": "Hi"}]


def assert_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param and body["error"]["code"] == code
    return body["error"]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": "Hi"}, "messages"),                                        # wrong type
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": HI, "max_tokens": "many"}, "max_tokens"),
    ({"messages": HI, "temperature": -1}, "temperature"),
    ({"messages": HI, "stream": "sometimes"}, "stream"),
    ({"model": "default"}, "messages"),                                      # missing
    ({"messages": []}, "messages"),                                          # empty
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": HI, "n": 17}, "n"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": HI, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": HI, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
])
def test_invalid_chat_requests_are_400(http, body, param):
    error = assert_error(http.post("/v1/chat/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": 12}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ({"max_tokens": 3}, "prompt"),
])
def test_invalid_completion_requests_are_400(http, body, param):
    assert_error(http.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'"text"'])
def test_malformed_bodies_are_400(http, content):
    response = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert_error(response, 400)


def test_unknown_model_is_404(http):
    error = assert_error(http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HI}), 404,
                         "model", "model_not_found")
    assert "gpt-4o" in error["message"]
    assert_error(http.post("/v1/cache/lookup", json={"model": "gpt-4o", "prompt": "Hi"}), 404, "model",
                 "model_not_found")


def test_unknown_route_is_404_in_the_same_shape(http):
    assert_error(http.get("/v1/nothing-here"), 404, code="not_found")


def test_prompt_over_the_context_is_400(http, server):
    too_long = [100] * (server.max_model_len + 1)
    error = assert_error(http.post("/v1/completions", json={"prompt": too_long, "max_tokens": 1}), 400,
                         "prompt", "context_length_exceeded")
    assert str(server.max_model_len) in error["message"]
    assert_error(http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": server.max_model_len}),
                 400, "messages", "context_length_exceeded")


def test_request_bigger_than_the_kv_pool_is_413(http, server):
    pool_tokens = server.num_blocks * 16
    assert pool_tokens < server.max_model_len
    error = assert_error(http.post("/v1/completions", json={"prompt": [100] * pool_tokens, "max_tokens": 1}), 413,
                         "prompt", "kv_cache_exceeded")
    assert str(pool_tokens) in error["message"]
    assert_error(http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": pool_tokens}), 413,
                 "messages", "kv_cache_exceeded")


def test_lookup_needs_exactly_one_prompt_form(http):
    assert_error(http.post("/v1/cache/lookup", json={}), 400, "prompt")
    assert_error(http.post("/v1/cache/lookup", json={"prompt": "a", "messages": HI}), 400, "prompt")


def test_api_key_guards_v1_only(server):
    assert_error(httpx.get(f"{server.url}/v1/models"), 401, code="invalid_api_key")
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", json={"messages": HI},
                            headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
    assert_error(httpx.post(f"{server.url}/v1/completions", content=b"{bad"), 401, code="invalid_api_key")
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
