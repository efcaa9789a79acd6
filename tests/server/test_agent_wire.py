"""The Anthropic and Responses wire formats without a server: reply deltas into event streams,
Anthropic bodies into chat messages, blocks located in a rendered prompt, usage split at the last
breakpoint, and diagnostics compared with a kept record."""
from __future__ import annotations

import json

from reprise.server.anthropic import MessagesRequest, chat_request
from reprise.server.anthropic_cache import Record, diagnose, fingerprint, usage
from reprise.server.anthropic_reply import ContentBlockStream
from reprise.server.prompt_blocks import Block, locate
from reprise.server.responses_api import input_messages, InputItem
from reprise.server.responses_api_reply import OutputItemStream

CALL = {"index": 0, "id": "call_abc", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": '}}
MORE = {"index": 0, "function": {"arguments": '"UTC"}'}}
DELTAS = [{"reasoning_content": "Let me"}, {"reasoning_content": " see."}, {"content": "Calling."},
          {"tool_calls": [CALL]}, {"tool_calls": [MORE]}]


def parse(events: list[str]) -> list[dict]:
    return [json.loads(event.split("data: ", 1)[1]) for event in events]


def test_reply_deltas_become_anthropic_content_block_events():
    stream = ContentBlockStream()
    events = parse([event for delta in DELTAS for event in stream.feed(delta)] + stream.close())
    summary = [(e["type"], e["index"], (e.get("content_block") or e.get("delta") or {}).get("type")) for e in events]
    assert summary == [("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
                       ("content_block_delta", 0, "thinking_delta"), ("content_block_stop", 0, None),
                       ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"),
                       ("content_block_stop", 1, None), ("content_block_start", 2, "tool_use"),
                       ("content_block_delta", 2, "input_json_delta"), ("content_block_delta", 2, "input_json_delta"),
                       ("content_block_stop", 2, None)]
    assert stream.content == [{"type": "thinking", "thinking": "Let me see.", "signature": ""},
                              {"type": "text", "text": "Calling."},
                              {"type": "tool_use", "id": "call_abc", "name": "get_time", "input": {"tz": "UTC"}}]


def test_reply_deltas_become_responses_output_item_events():
    stream = OutputItemStream("resp_1")
    events = parse([event for delta in DELTAS for event in stream.feed(delta)] + stream.close())
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["item"] == {"type": "function_call", "id": "fc_abc", "call_id": "call_abc", "name": "get_time",
                                  "arguments": '{"tz": "UTC"}', "status": "completed"}


def exchange_body(**extra) -> MessagesRequest:
    return MessagesRequest.model_validate({
        "model": "default", "max_tokens": 8, "system": [{"type": "text", "text": "Be brief.",
                                                         "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "tools": [{"name": "get_time", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "Time?"},
                     {"role": "assistant", "content": [{"type": "thinking", "thinking": "Hm.", "signature": "x"},
                                                       {"type": "tool_use", "id": "call_1", "name": "get_time",
                                                        "input": {"tz": "UTC"}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "9:00"},
                                                  {"type": "text", "text": "Thanks."}]}], **extra})


def test_anthropic_messages_become_chat_messages_and_blocks_in_cache_order():
    chat, blocks = chat_request(exchange_body(cache_control={"type": "ephemeral"}))
    messages = [message.as_template_message() for message in chat.messages]
    assert messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "reasoning_content": "Hm.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "9:00"}, {"role": "user", "content": "Thanks."}]
    assert [(b.kind, b.index, b.text, b.ttl) for b in blocks] == [
        ("tool", 0, '{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}', None),
        ("system", 0, "Be brief.", "1h"), ("message", 0, "Time?", None), ("message", 1, "Hm.", None),
        ("message", 1, '{"tz": "UTC"}', None), ("message", 2, "9:00", None), ("message", 2, "Thanks.", "5m")]


def test_blocks_are_found_in_order_and_a_repeated_text_is_not_taken_for_an_earlier_one():
    rendered = "<s>Hi</s><u>Hi</u><a>Hi</a>"
    blocks = [Block("system", 0, "Hi"), Block("message", 0, "Hi"), Block("message", 1, "Hi"), Block("message", 2, "no")]
    assert [(span.block.index, span.start, span.end) for span in locate(rendered, blocks)] == [(0, 3, 5), (0, 12, 14),
                                                                                                 (1, 21, 23)]


def test_usage_splits_the_prompt_at_the_last_breakpoint():
    assert usage(100, 40, 90, 7) == {"input_tokens": 10, "cache_creation_input_tokens": 50,
                                     "cache_read_input_tokens": 40, "output_tokens": 7}
    assert usage(100, 95, 90, 7)["cache_creation_input_tokens"] == 0
    assert usage(100, 40, None, 7)["input_tokens"] == 60


def test_diagnostics_compare_in_cache_order():
    body = exchange_body()
    kept = Record(fingerprint(body, "m"), 120)
    assert diagnose(kept, fingerprint(body, "m"), 120, 150) is None
    assert diagnose(kept, fingerprint(body, "m"), 100, 150) == {"cache_miss_reason": {"type": "unavailable"}}
    other_tools = exchange_body(tools=[{"name": "get_time", "description": "Now.", "input_schema": {"type": "object"}}])
    assert diagnose(kept, fingerprint(other_tools, "m"), 30, 150) == {
        "cache_miss_reason": {"type": "tools_changed", "cache_missed_input_tokens": 90}}
    assert diagnose(kept, fingerprint(body, "n"), 0, 150)["cache_miss_reason"]["type"] == "model_changed"
    lost = diagnose(None, fingerprint(body, "m"), 0, 150)
    assert lost == {"cache_miss_reason": {"type": "previous_message_not_found"}}


def test_responses_items_become_chat_messages():
    items = [InputItem(role="user", content="Time?"), InputItem(type="reasoning", summary=[{"type": "summary_text",
                                                                                             "text": "Hm."}]),
             InputItem(role="assistant", content=[{"type": "output_text", "text": "Checking."}]),
             InputItem(type="function_call", call_id="call_1", name="get_time", arguments="{}"),
             InputItem(type="function_call_output", call_id="call_1", output="9:00")]
    assert input_messages(items) == [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Hm.",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "9:00"}]
