"""Tool calls and structured output against the shared `reprise serve` (the default model, whose
template knows no tools: the generic format), through the official openai client."""
from __future__ import annotations

import copy
import json

import jsonschema
import pydantic
import pytest

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}}, "required": ["timezone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def call(client, **kwargs):
    return client.chat.completions.create(model="default", messages=kwargs.pop("messages", ASK), tools=TOOLS,
                                          temperature=0, max_tokens=80, **kwargs)


def assert_valid_calls(calls, names=("get_weather", "get_time")):
    assert calls
    for tool_call in calls:
        assert tool_call.type == "function" and tool_call.id.startswith("call_")
        assert tool_call.function.name in names
        jsonschema.validate(json.loads(tool_call.function.arguments), SCHEMAS[tool_call.function.name])


def test_required_returns_a_call_that_validates(client):
    reply = call(client, tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert_valid_calls(choice.message.tool_calls)


def test_parallel_required_calls_are_each_valid_up_to_the_length_cut(client):
    """Greedy, the 135M model keeps calling (weather in Celsius, then Fahrenheit, ...) until max_tokens."""
    choice = call(client, tool_choice="required").choices[0]
    calls = choice.message.tool_calls
    assert len(calls) >= 2 and choice.message.content is None
    finished = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    assert choice.finish_reason in ("tool_calls", "length") and finished
    assert_valid_calls(finished)


def test_a_named_function_is_the_one_called(client):
    reply = call(client, tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1
    assert_valid_calls(calls, names=("get_time",))


def test_streamed_calls_reassemble_to_the_non_streamed_ones(client):
    whole = call(client, tool_choice="required", parallel_tool_calls=False).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in call(client, tool_choice="required", parallel_tool_calls=False, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for piece in delta.tool_calls or ():
                entry = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or piece.id
                entry["name"] += piece.function.name or ""
                entry["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_auto_may_answer_in_text_and_none_never_calls(client):
    reply = call(client, tool_choice="none")
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")
    auto = call(client, tool_choice="auto").choices[0]
    if auto.message.tool_calls:                         # the model chose a call: it must be valid
        assert_valid_calls(auto.message.tool_calls)
        assert auto.finish_reason == "tool_calls"
    else:
        assert "<tool_call>" not in (auto.message.content or "")


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=20)
    temperature_celsius: int
    sunny: bool


def test_parse_with_a_pydantic_model_returns_the_object(client):
    completion = client.chat.completions.parse(model="default", messages=ASK, response_format=Weather,
                                               temperature=0, max_tokens=60)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Weather)
    assert Weather.model_validate_json(completion.choices[0].message.content) == parsed


def test_json_object_returns_json(client):
    reply = client.chat.completions.create(model="default", messages=ASK, temperature=0, max_tokens=40,
                                           response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:                                     # cut by max_tokens: still a prefix of an object
        assert reply.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("field", ["guided_choice", "structured_outputs"])
def test_guided_choice_returns_one_of_the_choices(client, field):
    choices = ["sunny", "rainy", "cloudy with a chance of meatballs"]
    body = {"guided_choice": choices} if field == "guided_choice" else {"structured_outputs": {"choice": choices}}
    reply = client.chat.completions.create(model="default", messages=ASK, temperature=0, max_tokens=20,
                                           extra_body=body)
    assert reply.choices[0].message.content in choices
    assert reply.choices[0].finish_reason == "stop"


def test_guided_regex_matches(client):
    reply = client.completions.create(model="default", prompt="The year is", temperature=0, max_tokens=10,
                                      extra_body={"guided_regex": r" [12][0-9]{3}"})
    assert reply.choices[0].text[0] == " " and reply.choices[0].text[1:].isdigit()
    assert len(reply.choices[0].text) == 5


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format"),
    ({"guided_regex": "([a-z"}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_constraints_that_cannot_run_are_400(http, body, param):
    response = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_cache_report_names_the_block_where_the_prompt_changed(http, fresh_prompt):
    system = "You help travellers." + fresh_prompt(6)
    base = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Weather in Paris?"}],
            "tools": TOOLS, "tool_choice": "none", "max_tokens": 1, "cache_report": True}
    assert http.post("/v1/chat/completions", json=base).status_code == 200

    def report(change) -> tuple:
        body = copy.deepcopy(base)
        change(body)
        cache = http.post("/v1/chat/completions", json=body).json()["cache"]
        return cache["reason"], cache["diverged_block"], cache["diverged_index"]

    assert report(lambda body: body["tools"][1]["function"].update(description="Time anywhere")) == \
        ("tools_changed", "tool", 1)
    assert report(lambda body: body["messages"][0].update(content=system + " Be brief.")) == \
        ("system_changed", "system", 0)
    assert report(lambda body: body["messages"][1].update(content="Weather in Lima?")) == \
        ("messages_changed", "message", 1)
    assert report(lambda body: None) == (None, None, None)         # all but the last token hit
