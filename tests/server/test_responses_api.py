"""The OpenAI Responses API (/v1/responses) against the shared `reprise serve`, through the official
`openai` SDK: conversations through `previous_response_id` hit their whole previous context,
tool calls round-trip as `function_call` / `function_call_output` items, structured output,
streamed events, the `cache` report, and stored responses kept per tenant."""
from __future__ import annotations

import json
import uuid

import jsonschema
import openai
import pytest

from tests.server.helpers import wait_idle
from tests.server.test_tools import SCHEMAS, TIME, WEATHER

TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER},
         {"type": "function", "name": "get_time", "description": "Current time in a timezone", "parameters": TIME}]
RESULTS = {"get_weather": {"temperature": 21, "sky": "clear"}, "get_time": {"time": "14:05"}}


def respond(client, stream=False, **kwargs):
    """One greedy response; streamed, the response of its final event (after checking the events)."""
    kwargs = {"model": "default", "tools": TOOLS, "temperature": 0, "max_output_tokens": 60, **kwargs}
    if not stream:
        return client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert [event.type for event in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type in ("response.completed", "response.incomplete")
    return events[-1].response


def assert_one_valid_call(response):
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])
    return calls[0]


def result_of(call) -> dict:
    return {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps(RESULTS[call.name])}


def context(response) -> int:
    """The tokens of a response's conversation that have KV: its prompt and output, less the last token."""
    return response.usage.input_tokens + response.usage.output_tokens - 1


def test_a_conversation_through_previous_response_id_hits_its_whole_context(client, http, fresh_prompt):
    instructions = "You are a travel agent." + fresh_prompt(8)
    tenant = {"cache_salt": f"tenant-{uuid.uuid4().hex}"}    # a namespace of its own: turn 1 reads nothing
    first = respond(client, input="Weather in Paris?", instructions=instructions, tool_choice="required",
                    parallel_tool_calls=False, extra_body=tenant)
    call = assert_one_valid_call(first)
    second = respond(client, stream=True, previous_response_id=first.id, instructions=instructions,
                     input=[result_of(call)], tool_choice="none", extra_body=tenant)
    third = respond(client, previous_response_id=second.id, instructions=instructions, input="And in Tokyo?",
                    tool_choice={"type": "function", "name": "get_time"}, extra_body=tenant)
    wait_idle(http)
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert second.output_text and second.usage.input_tokens_details.cached_tokens == context(first)
    assert_one_valid_call(third)
    assert third.usage.input_tokens_details.cached_tokens == context(second)


def test_tool_calls_round_trip_as_items_without_stored_state(client, http, fresh_prompt):
    history = [{"role": "user", "content": "Time in Tokyo?"}]
    first = respond(client, input=history, instructions="You are a travel agent." + fresh_prompt(8), store=False,
                    tool_choice="required", parallel_tool_calls=False)
    call = assert_one_valid_call(first)
    items = [*history, {"type": "function_call", "call_id": call.call_id, "name": call.name,
                        "arguments": call.arguments}, result_of(call)]
    second = respond(client, input=items, instructions=first.instructions, store=False, tool_choice="none")
    wait_idle(http)
    assert second.usage.input_tokens_details.cached_tokens == context(first)
    with pytest.raises(openai.NotFoundError):          # store: false keeps nothing
        respond(client, previous_response_id=first.id, input="Thanks.")


def test_text_format_json_schema_is_enforced(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    response = client.responses.create(model="default", input="Name a city in France.", temperature=0,
                                       max_output_tokens=40, text={"format": {"type": "json_schema", "name": "city",
                                                                              "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(response.output_text), schema)


def test_the_cache_report_names_the_tool_that_changed(client, fresh_prompt):
    instructions = "You are a travel agent." + fresh_prompt(8)
    respond(client, input="Weather in Paris?", instructions=instructions, max_output_tokens=4, store=False)
    tools = [TOOLS[0], {**TOOLS[1], "description": "The clock time of a timezone"}]
    changed = respond(client, input="Weather in Paris?", instructions=instructions, max_output_tokens=4, tools=tools,
                      store=False, extra_body={"cache_report": True})
    cache = changed.model_extra["cache"]
    assert (cache["reason"], cache["diverged_block"], cache["diverged_index"]) == ("tools_changed", "tool", 1)
    assert cache["cached_tokens"] == changed.usage.input_tokens_details.cached_tokens


def test_stored_responses_are_kept_per_tenant(client):
    first = respond(client, input="Hello.", max_output_tokens=4, prompt_cache_key="agent-7",
                    extra_body={"cache_salt": "tenant-a"})
    assert first.prompt_cache_key == "agent-7"
    with pytest.raises(openai.NotFoundError):
        respond(client, previous_response_id=first.id, input="Again.", extra_body={"cache_salt": "tenant-b"})
    with pytest.raises(openai.BadRequestError) as refused:
        respond(client, input="Hello.", background=True)
    assert refused.value.body["param"] == "background"
