"""The Anthropic Messages API (/v1/messages) against the shared `reprise serve`, through the official
`anthropic` SDK: a Claude-Code-shaped tool exchange whose usage is exact in Anthropic's terms,
cache diagnostics, the `cache` report, streaming events, errors and count_tokens.

Default model, generic tool format: the prompt ends with the last message's text, then
`<|im_end|>\\n<|im_start|>assistant\\n` (6 tokens); a tool result's text is followed by
`\\n</tool_response>` and that (12 tokens). With a top-level `cache_control` (the last message is
the last breakpoint), those tails are `input_tokens`; the rest not read is written.
"""
from __future__ import annotations

import json
import uuid

import anthropic
import httpx
import jsonschema
import pytest

from tests.server.conftest import API_KEY, BLOCK_SIZE
from tests.server.helpers import metric, wait_idle
from tests.server.test_tools import SCHEMAS, TIME, WEATHER

TOOLS = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER},
         {"name": "get_time", "description": "Current time in a timezone", "input_schema": TIME,
          "cache_control": {"type": "ephemeral"}}]
EPHEMERAL = {"type": "ephemeral"}
AFTER_TEXT, AFTER_RESULT = 6, 12          # prompt tokens after the last message's text (see the module doc)
RESULTS = {"get_weather": {"temperature": 21, "sky": "clear"}, "get_time": {"time": "14:05"}}
ANY = {"type": "any", "disable_parallel_tool_use": True}


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def tenant() -> str:
    """A cache salt of the test's own: a namespace no other request of the run has touched (every
    tools prompt starts alike, so only a fresh namespace makes a first turn read nothing), with
    its own share of pins."""
    return f"tenant-{uuid.uuid4().hex}"


def system_blocks(text: str) -> list[dict]:
    return [{"type": "text", "text": text, "cache_control": EPHEMERAL}]


def send(claude, tenant, system, messages, tool_choice, stream=False, tools=TOOLS, max_tokens=60, **extra):
    """One turn of `tenant` (a cache salt), greedy, the last message marked by the top-level cache_control."""
    kwargs = dict(model="default", max_tokens=max_tokens, system=system, tools=tools, messages=messages,
                  tool_choice=tool_choice, cache_control=EPHEMERAL,
                  extra_body={"temperature": 0, "cache_salt": tenant, **extra})
    if not stream:
        return claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as events:
        return events.get_final_message()


def follow(messages: list[dict], reply) -> list[dict]:
    """The history after `reply`: it, then the results of its tool calls (one user message)."""
    messages = [*messages, {"role": "assistant", "content": [block.model_dump(exclude_none=True)
                                                             for block in reply.content]}]
    calls = [block for block in reply.content if block.type == "tool_use"]
    if calls:
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                      "content": json.dumps(RESULTS[call.name])} for call in calls]})
    return messages


def prompt_tokens(usage) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


def assert_valid_tool_use(reply, names=("get_weather", "get_time")):
    calls = [block for block in reply.content if block.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and len(calls) == 1
    assert calls[0].name in names and calls[0].id.startswith("call_")
    jsonschema.validate(calls[0].input, SCHEMAS[calls[0].name])


def test_a_one_hour_breakpoint_pins_the_prefix_up_to_it(claude, tenant, http, fresh_prompt):
    """First in the file: the first pin of the run, so no pin ends while it measures."""
    pinned = metric(http, "reprise:kv_blocks_pinned")
    system = [{"type": "text", "text": fresh_prompt(60), "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    reply = claude.messages.create(model="default", max_tokens=4, system=system,
                                   extra_body={"cache_report": True, "cache_salt": tenant},
                                   messages=[{"role": "user", "content": "Hello there."}])
    [point] = reply.model_extra["cache"]["breakpoints"]
    assert (point["block"], point["ttl"]) == ("system", "1h")
    assert point["tokens"] == reply.usage.cache_read_input_tokens + reply.usage.cache_creation_input_tokens == 63
    wait_idle(http)
    # the blocks holding those 63 tokens: 3 full and the one they end in
    assert metric(http, "reprise:kv_blocks_pinned") - pinned == -(-point["tokens"] // BLOCK_SIZE) == 4


def claude_code_exchange(claude, tenant, system) -> list:
    """Four turns: call (any), call (a named tool, streamed), answer (none), next question: call (streamed)."""
    messages = [{"role": "user", "content": "Weather and time in Paris?"}]
    replies = []
    for step, (choice, stream) in enumerate([(ANY, False), ({"type": "tool", "name": "get_time"}, True),
                                             ({"type": "none"}, False), (ANY, True)]):
        if step == 3:
            messages.append({"role": "user", "content": "And in Tokyo?"})
        reply = send(claude, tenant, system, messages, choice, stream=stream)
        replies.append(reply)
        messages = follow(messages, reply)
    return replies


def test_a_claude_code_exchange_reads_every_previous_turn_and_writes_up_to_the_breakpoint(claude, tenant, http,
                                                                                         fresh_prompt):
    replies = claude_code_exchange(claude, tenant, system_blocks("You are a coding agent." + fresh_prompt(8)))
    wait_idle(http)
    assert [reply.stop_reason for reply in replies] == ["tool_use", "tool_use", "end_turn", "tool_use"]
    for reply in (replies[0], replies[1], replies[3]):
        assert_valid_tool_use(reply)
    first = replies[0].usage
    assert first.cache_read_input_tokens == 0 and first.input_tokens == AFTER_TEXT
    assert first.cache_creation_input_tokens == prompt_tokens(first) - AFTER_TEXT > 0
    # turn k ends with: a tool result, a tool result, the next question
    for previous, reply, tail in zip(replies, replies[1:], [AFTER_RESULT, AFTER_RESULT, AFTER_TEXT]):
        usage = reply.usage
        assert usage.cache_read_input_tokens == prompt_tokens(previous.usage) + previous.usage.output_tokens - 1
        assert usage.input_tokens == tail
        assert usage.cache_creation_input_tokens == prompt_tokens(usage) - usage.cache_read_input_tokens - tail


def test_diagnostics_name_the_change_and_the_tokens_it_cost(claude, tenant, http, fresh_prompt):
    system = system_blocks("You are a coding agent." + fresh_prompt(8))
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = send(claude, tenant, system, messages, ANY)
    following = follow(messages, first)
    context = prompt_tokens(first.usage) + first.usage.output_tokens - 1
    same = send(claude, tenant, system, following, ANY, diagnostics={"previous_message_id": first.id})
    assert same.diagnostics is None and same.usage.cache_read_input_tokens == context
    tools = [TOOLS[0], {**TOOLS[1], "description": "The time now in a timezone"}]
    changed = send(claude, tenant, system, following, ANY, tools=tools, diagnostics={"previous_message_id": first.id})
    reason = changed.diagnostics.cache_miss_reason
    assert reason.type == "tools_changed"
    assert reason.cache_missed_input_tokens == context - changed.usage.cache_read_input_tokens > 0
    other = system_blocks("You are a careful coding agent." + fresh_prompt(8))
    moved = send(claude, tenant, other, following, ANY, diagnostics={"previous_message_id": first.id})
    reason = moved.diagnostics.cache_miss_reason
    assert reason.type == "system_changed"
    assert reason.cache_missed_input_tokens == context - moved.usage.cache_read_input_tokens > 0
    lost = send(claude, tenant, system, following, ANY, diagnostics={"previous_message_id": "msg_unknown"})
    assert lost.diagnostics.cache_miss_reason.type == "previous_message_not_found"
    wait_idle(http)


def test_the_cache_report_names_the_block_where_the_prompt_diverged(claude, tenant, fresh_prompt):
    system = system_blocks("You are a coding agent." + fresh_prompt(8))
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    send(claude, tenant, system, messages, ANY)
    tools = [TOOLS[0], {**TOOLS[1], "description": fresh_prompt(6)}]     # in no namespace of the shared server
    cache = send(claude, tenant, system, messages, ANY, tools=tools, cache_report=True).model_extra["cache"]
    assert (cache["reason"], cache["diverged_block"], cache["diverged_index"]) == ("tools_changed", "tool", 1)
    edited = [{"role": "user", "content": "Weather in Lyon?"}]
    cache = send(claude, tenant, system, edited, ANY, cache_report=True).model_extra["cache"]
    assert (cache["reason"], cache["diverged_block"], cache["diverged_message"]) == ("messages_changed", "message", 0)
    breakpoints = [(point["block"], point["index"], point["ttl"]) for point in cache["breakpoints"]]
    assert breakpoints == [("tool", 1, "5m"), ("system", 0, "5m"), ("message", 0, "5m")]
    assert cache["breakpoints"][-1]["tokens"] == cache["prompt_tokens"] - AFTER_TEXT


def test_a_streamed_tool_use_sends_anthropics_events_and_adds_up_to_the_message(server, claude, http, fresh_prompt):
    body = {"model": "default", "max_tokens": 60, "temperature": 0, "tools": TOOLS, "tool_choice": ANY,
            "system": "You are a coding agent." + fresh_prompt(8),
            "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    whole = claude.messages.create(**{key: value for key, value in body.items() if key != "temperature"},
                                   extra_body={"temperature": 0})
    with httpx.stream("POST", f"{server.url}/v1/messages", json={**body, "stream": True},
                      headers={"x-api-key": API_KEY}, timeout=120) as response:
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    kinds = [event["type"] for event in events]
    deltas = [event["delta"]["partial_json"] for event in events if event["type"] == "content_block_delta"]
    assert kinds == ["message_start", "content_block_start", *["content_block_delta"] * len(deltas),
                     "content_block_stop", "message_delta", "message_stop"]
    assert events[1]["content_block"]["type"] == "tool_use"
    assert json.loads("".join(deltas)) == whole.content[0].input
    usage = events[-2]["usage"]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert usage["cache_read_input_tokens"] == prompt_tokens(whole.usage) - 1      # the repeat reads all but one
    assert usage["output_tokens"] == whole.usage.output_tokens
    assert events[0]["message"]["usage"]["cache_read_input_tokens"] == usage["cache_read_input_tokens"]
    wait_idle(http)


def test_stop_sequences_end_the_reply_and_are_named(claude):
    reply = claude.messages.create(model="default", max_tokens=40, stop_sequences=[" "],
                                   messages=[{"role": "user", "content": "Describe Paris in one sentence."}],
                                   extra_body={"temperature": 0})
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == " "
    assert " " not in reply.content[0].text


def test_count_tokens_counts_the_prompt_a_message_runs(claude, tenant, fresh_prompt):
    system, messages = system_blocks("You are a coding agent." + fresh_prompt(8)), [{"role": "user", "content": "Hi"}]
    counted = claude.messages.count_tokens(model="default", system=system, tools=TOOLS, messages=messages)
    reply = send(claude, tenant, system, messages, {"type": "auto"}, max_tokens=4)
    assert counted.input_tokens == prompt_tokens(reply.usage)


def test_errors_have_anthropics_shape_and_x_api_key_is_accepted(server, claude):
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model="default", max_tokens=8, messages=[])
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "invalid_request_error"
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.create(model="default", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert denied.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-unknown", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    response = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": API_KEY},
                          json={"model": "default", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}],
                                "mcp_servers": [{"type": "url", "url": "http://x"}]})
    assert response.status_code == 400 and "mcp_servers" in response.json()["error"]["message"]


