"""Agent turns are cache hits: a five-step tool loop, on the default model (generic tool format) and on a
tiny model with a Hermes-style template; a reasoning turn whose template drops the `<think>` block."""
from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from tests.server.conftest import API_KEY
from tests.server.helpers import launch, wait_idle, write_tiny_model
from tests.server.test_tools import TOOLS, assert_valid_calls

HERMES_TEMPLATE = Path(__file__).parents[1] / "loader" / "qwen25_template.jinja"
# Qwen3's rule, cut down: an assistant turn before the last user message loses its reasoning
QWEN3_STYLE = """{%- set ns = namespace(last_user=0) -%}
{%- for message in messages -%}{%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- if message.role == 'assistant' -%}
{%- set content = message.content.split('</think>')[-1].lstrip('\\n') -%}
{%- if loop.index0 > ns.last_user and message.reasoning_content -%}
{{- '<|im_start|>assistant\\n<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- else -%}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""
RESULTS = {"get_weather": {"temperature": 21, "sky": "clear"}, "get_time": {"time": "14:05"}}


def agent_loop(client: openai.OpenAI, system: str) -> list:
    """Five requests of an agent: call, call, answer, (next question) call, answer."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Weather and time in Paris?"}]
    replies = []
    for step, choice in enumerate(["required", {"type": "function", "function": {"name": "get_time"}}, "none",
                                   "required", "none"]):
        if step == 3:
            messages.append({"role": "user", "content": "And in Tokyo?"})
        reply = client.chat.completions.create(model="default", messages=messages, tools=TOOLS, tool_choice=choice,
                                               temperature=0, max_tokens=60, parallel_tool_calls=False)
        replies.append(reply)
        message = reply.choices[0].message
        if message.tool_calls:
            assert_valid_calls(message.tool_calls)
            messages.append({"role": "assistant", "content": message.content,
                             "tool_calls": [call.model_dump() for call in message.tool_calls]})
            messages += [{"role": "tool", "tool_call_id": call.id, "content": json.dumps(RESULTS[call.function.name])}
                         for call in message.tool_calls]
        else:
            messages.append({"role": "assistant", "content": message.content})
    return replies


def assert_each_step_hits_the_previous_one(replies) -> None:
    """Step k reuses all of step k-1: its prompt and its output up to the end-of-turn token (the
    last sampled token has no KV yet)."""
    for previous, reply in zip(replies, replies[1:]):
        assert reply.usage.prompt_tokens_details.cached_tokens == \
            previous.usage.prompt_tokens + previous.usage.completion_tokens - 1


def test_agent_loop_on_the_default_model_hits_every_step(client, http, fresh_prompt):
    replies = agent_loop(client, "You are a travel agent." + fresh_prompt(8))
    wait_idle(http)
    assert [r.choices[0].finish_reason == "tool_calls" for r in replies] == [True, True, False, True, False]
    assert_each_step_hits_the_previous_one(replies)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def tiny_server(model: Path, template: Path, *flags: str):
    return launch([str(model), "--chat-template", str(template), "--dtype", "float32", "--kv-cache-bytes", "32MiB",
                   "--api-key", API_KEY, *flags])


def test_agent_loop_with_a_hermes_template_hits_every_step(tiny_model):
    with tiny_server(tiny_model, HERMES_TEMPLATE) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key=API_KEY, max_retries=0)
        replies = agent_loop(client, "You are a travel agent.")
        first = replies[0].choices[0].message.tool_calls[0]
        # the Hermes format: the template renders this call as the model wrote it
        assert first.function.arguments == json.dumps(json.loads(first.function.arguments))
    assert_each_step_hits_the_previous_one(replies)


THINKING = {"structured_outputs": {"regex": r"<think>\n[a-z]{3,8}( [a-z]{3,8}){2,4}\n</think>\n\n[A-Z][a-z]{3,8}\."}}


def reasoning_turns(url: str) -> tuple:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "Think, then answer."}]
    first = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=60,
                                           extra_body=THINKING)
    message = first.choices[0].message
    messages += [{"role": "assistant", "content": message.content}, {"role": "user", "content": "Again."}]
    second = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=4,
                                            extra_body={"cache_report": True})
    return first, second


def test_a_reasoning_turn_is_split_and_the_next_turn_hits_past_it(tiny_model, tmp_path):
    template = tmp_path / "qwen3_style.jinja"
    template.write_text(QWEN3_STYLE)
    tail = "<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n"
    with tiny_server(tiny_model, template, "--no-continuation-prefill") as running:
        first, second = reasoning_turns(running.url)
        message = first.choices[0].message
        assert message.model_extra["reasoning_content"].count(" ") >= 2 and "<think>" not in message.content
        assert message.content[0].isupper() and message.content.endswith(".")
        # the template drops the reasoning: turn 2 leaves turn 1's tokens where the reply began
        assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
        assert second.model_extra["cache"]["diverged_message"] == 1
    with tiny_server(tiny_model, template) as running:
        first, second = reasoning_turns(running.url)
        with_tail = second.usage.prompt_tokens
        num_tail = len(running_tokens(running.url, tail))
        # the reply as the next turn renders it was computed in the background: turn 2 hits it all
        assert second.usage.prompt_tokens_details.cached_tokens == with_tail - num_tail
        assert second.model_extra["cache"]["miss_reason"] is None


def running_tokens(url: str, text: str) -> list[int]:
    import httpx
    return httpx.post(f"{url}/tokenize", json={"prompt": text}).json()["tokens"]
