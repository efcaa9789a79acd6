"""Request parsing, error shapes and metrics exposition, without a model or a server."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from reprise.cache.match import CacheStats, MissReason
from reprise.engine.engine import EngineStats
from reprise.engine.request import FinishReason, RequestOutput
from reprise.server.errors import APIError, error_body, validation_message
from reprise.server.metrics import ServerMetrics
from reprise.server.protocol import CacheReport, ChatCompletionRequest, CompletionRequest, Usage

HI = [{"role": "user", "content": "Hi"}]


def output(prompt_len: int, generated: int, cached: int, miss=None, diverged_at=None) -> RequestOutput:
    return RequestOutput("r", [1] * prompt_len, [2] * generated, "x", "", [], cached, FinishReason.LENGTH, miss,
                         diverged_at, {"arrival": 10.0, "first_token": 10.5, "finished": 11.5})


@pytest.mark.parametrize(("prompt", "expected"), [
    ("hello", ["hello"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_forms(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompts() == expected


def test_defaults_follow_openai():
    completion = CompletionRequest(prompt="x", temperature=None, n=None)
    assert completion.requested_max_tokens() == 16
    params = completion.sampling_params(16)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (1.0, 1.0, 0, 16)
    chat = ChatCompletionRequest(messages=HI, max_tokens=7, max_completion_tokens=9)
    assert chat.requested_max_tokens() == 9
    assert ChatCompletionRequest(messages=HI).requested_max_tokens() is None
    assert ChatCompletionRequest(messages=HI, top_k=-1).sampling_params(4).top_k == 0


def test_unknown_fields_are_ignored_and_stream_options_read():
    request = ChatCompletionRequest(messages=HI, frequency_penalty=0.5, user="u", stream=True,
                                    stream_options={"include_usage": True})
    assert request.include_usage and request.unsupported() is None
    assert not ChatCompletionRequest(messages=HI, stream_options={"include_usage": True}).include_usage


@pytest.mark.parametrize(("fields", "param"), [({"audio": {}}, "audio"), ({"store": True}, "store"),
                                               ({"modalities": ["audio"]}, "modalities")])
def test_unsupported_chat_features_are_named(fields, param):
    assert ChatCompletionRequest(messages=HI, **fields).unsupported()[0] == param


def test_sampling_controls_reach_the_sampling_params():
    request = ChatCompletionRequest(messages=HI, presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2,
                                    logit_bias={"7": -100, "9": 5}, min_p=0.1, min_tokens=2, logprobs=True,
                                    top_logprobs=3)
    params = request.sampling_params(8)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -1, 1.2)
    assert params.logit_bias == ((7, -100.0), (9, 5.0))
    assert (params.min_p, params.min_tokens, params.logprobs) == (0.1, 2, 3)
    assert ChatCompletionRequest(messages=HI, logprobs=True).sampling_params(8).logprobs == 0
    assert ChatCompletionRequest(messages=HI).sampling_params(8).logprobs is None


def test_text_parts_join_and_other_parts_are_refused():
    request = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                           {"type": "text", "text": "b"}]}])
    assert request.messages[0].as_template_message() == {"role": "user", "content": "a\nb"}
    image = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(APIError) as raised:
        image.messages[0].as_template_message()
    assert raised.value.status == 400 and raised.value.param == "messages"


def test_usage_and_cache_report_sum_over_prompts():
    outputs = [output(10, 3, 9, MissReason.DIVERGED, 9), output(5, 2, 0)]
    assert Usage.of(outputs).model_dump() == {"prompt_tokens": 15, "completion_tokens": 5, "total_tokens": 20,
                                              "prompt_tokens_details": {"cached_tokens": 9}}
    assert CacheReport.of(outputs[:1]).model_dump() == {"cached_tokens": 9, "prompt_tokens": 10, "diverged_at": 9,
                                                        "miss_reason": "diverged", "diverged_message": None}
    assert CacheReport.of(outputs).model_dump() == {"cached_tokens": 9, "prompt_tokens": 15, "diverged_at": None,
                                                    "miss_reason": None, "diverged_message": None}


def test_n_choices_count_the_prompt_once():
    outputs = [output(10, 3, 4), output(10, 2, 9), output(6, 1, 0), output(6, 4, 5)]      # n=2 of two prompts
    assert Usage.of(outputs, n=2).model_dump() == {"prompt_tokens": 16, "completion_tokens": 10,
                                                   "total_tokens": 26, "prompt_tokens_details": {"cached_tokens": 4}}


def _errors(model, body) -> list[dict]:
    with pytest.raises(ValidationError) as raised:
        model.model_validate(body)
    return [dict(e, loc=("body", *e["loc"])) for e in raised.value.errors()]


def test_validation_messages_name_the_field():
    assert validation_message(_errors(ChatCompletionRequest, {"messages": []}))[1] == "messages"
    assert validation_message(_errors(CompletionRequest, {"prompt": 12}))[1] == "prompt"
    content = _errors(ChatCompletionRequest, {"messages": [{"role": "user", "content": 5}]})
    assert validation_message(content)[1] == "messages.0.content"
    message, param = validation_message([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error",
                                          "ctx": {"error": "Expecting value"}}])
    assert param is None and "not valid JSON" in message


def test_error_body_shape():
    assert error_body(404, "no such model", "model", "model_not_found") == {"error": {
        "message": "no such model", "type": "not_found_error", "param": "model", "code": "model_not_found"}}
    assert error_body(413, "too big")["error"]["type"] == "invalid_request_error"


def _stats(**cache) -> EngineStats:
    values = dict(queries=120, hits=99, evictions=4, blocks_used=3, blocks_cached=7, blocks_free=90, num_blocks=100)
    return EngineStats(num_running=2, num_waiting=1, num_preemptions=0, cache=CacheStats(**(values | cache)))


def test_metrics_exposition_uses_exact_names():
    metrics = ServerMetrics(_stats)
    metrics.observe(output(10, 3, 9))
    lines = set(metrics.exposition().decode().splitlines())
    for line in ('reprise:prefix_cache_queries_total{tier="memory"} 120.0', 'reprise:prefix_cache_hits_total{tier="memory"} 99.0',
                 "reprise:prefix_cache_evictions_total 4.0", 'reprise:kv_blocks{state="used"} 3.0',
                 'reprise:kv_blocks{state="cached"} 7.0', 'reprise:kv_blocks{state="free"} 90.0',
                 "reprise:num_requests_running 2.0", "reprise:num_requests_waiting 1.0",
                 "reprise:prompt_tokens_total 10.0", "reprise:generation_tokens_total 3.0",
                 "reprise:request_cached_tokens_sum 9.0", "reprise:time_to_first_token_seconds_sum 0.5",
                 "reprise:e2e_request_latency_seconds_sum 1.5", "reprise:time_per_output_token_seconds_sum 0.5"):
        assert line in lines
    assert any(line.startswith("process_") for line in lines)


def test_each_app_has_its_own_registry():
    first, second = ServerMetrics(_stats), ServerMetrics(_stats)
    first.observe(output(10, 3, 9))
    assert b"reprise:prompt_tokens_total 0.0" in second.exposition()
