"""What clients send besides completions: CORS preflights, /tokenize and /detokenize, /version, HEAD
/health, prompt shaping (developer role, assistant prefill), and known fields reprise refuses."""
from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import API_KEY
from tests.server.helpers import launch

HI = [{"role": "user", "content": "Hi"}]


def test_cors_preflight_from_an_allowed_origin(tmp_path):
    from tests.server.helpers import write_tiny_model
    model = write_tiny_model(tmp_path / "tiny")
    with launch([str(model), "--dtype", "float32", "--kv-cache-bytes", "16MiB", "--api-key", API_KEY,
                 "--allowed-origins", "http://app.example"]) as running:
        headers = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization,content-type"}
        preflight = httpx.options(f"{running.url}/v1/chat/completions", headers=headers)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        refused = httpx.options(f"{running.url}/v1/chat/completions", headers={**headers, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in refused.headers
        unauthorized = httpx.post(f"{running.url}/v1/models", headers={"Origin": "http://app.example"})
        assert unauthorized.headers["access-control-allow-origin"] == "http://app.example"   # errors readable too


def test_tokenize_and_detokenize_round_trip(http, default_model):
    tokenizer = default_model.tokenizer
    body = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert body["tokens"] == tokenizer.encode("Hello world") and body["count"] == len(body["tokens"])
    assert "".join(body["token_strs"]) == "Hello world" and body["max_model_len"] == 8192
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": HI}).json()
    assert chat["tokens"] == tokenizer.encode(tokenizer.render_chat(HI))
    assert http.post("/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_version_and_head_health(http, server):
    from reprise import __version__
    assert http.get("/version").json() == {"version": __version__}
    head = httpx.head(f"{server.url}/health")
    assert head.status_code == 200 and head.content == b""


def test_developer_is_the_system_role_for_a_template_without_one(http, default_model):
    as_developer = http.post("/tokenize", json={"messages": [{"role": "developer", "content": "Be terse."}, *HI]})
    as_system = http.post("/tokenize", json={"messages": [{"role": "system", "content": "Be terse."}, *HI]})
    assert as_developer.json()["tokens"] == as_system.json()["tokens"]
    # SmolLM2's template adds its own system prompt only when the first message is not a system one
    assert "SmolLM" not in default_model.tokenizer.decode(as_developer.json()["tokens"])


def test_continue_final_message_prefills_the_assistant(client, default_model):
    messages = [*HI, {"role": "assistant", "content": "The capital of France is"}]
    reply = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=3,
                                           extra_body={"continue_final_message": True, "add_generation_prompt": False})
    rendered = default_model.tokenizer.render_chat(messages, add_generation_prompt=False)
    expected = rendered[:rendered.rindex("is") + 2]
    assert reply.usage.prompt_tokens == len(default_model.tokenizer.encode(expected))


@pytest.mark.parametrize(("field", "value"), [
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]), ("prediction", {"type": "x"}),
    ("functions", [{"name": "f"}]), ("reasoning_effort", "high"), ("store", True), ("use_beam_search", True),
    ("web_search_options", {}), ("echo", True),
])
def test_known_fields_reprise_does_not_implement_are_named(http, field, value):
    response = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, field: value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field and field in response.json()["error"]["message"]


def test_harmless_values_of_those_fields_and_unknown_fields_pass(http):
    response = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "store": False,
                                                       "modalities": ["text"], "service_tier": "auto",
                                                       "some_future_field": {"a": 1}, "user": "u"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("body", "param"), [({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of")])
def test_refused_completion_fields(http, body, param):
    response = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param
