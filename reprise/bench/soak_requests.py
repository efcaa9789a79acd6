"""The requests of `reprise bench soak` (soak.py runs them): one body builder per kind, the sending
(plain or streamed), and the judging of what came back into an outcome and, for a complete answer,
its output (text, or tool calls as JSON), which a fault-free run of the same plan must reproduce
when the request was greedy.

Kinds beyond chat and text completions: `tools` (chat with tool_choice required: the answer must
be parsed tool calls), `json` (response_format json_schema: the content must parse and match),
`messages` (Anthropic's /v1/messages), `responses` (OpenAI's /v1/responses).
"""
from __future__ import annotations

import json
import random

import httpx

WORDS = ("alpha river stone light number garden window paper music signal harbor engine forest winter yellow "
         "silver morning castle bridge ocean mountain letter story market doctor planet cable orange seven "
         "quiet moment travel button candle rocket velvet shadow ticket marble").split()
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
PATHS = {"messages": "/v1/messages", "responses": "/v1/responses", "completion": "/v1/completions",
         "completion_stream": "/v1/completions"}


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def path_of(kind: str) -> str:
    return PATHS.get(kind, "/v1/chat/completions")


def body_of(kind: str, rng: random.Random, systems: list[str], max_tokens: int) -> dict:
    """The request body of one kind (not multi_turn, bad or probe, which soak.py builds)."""
    system = rng.choice(systems) if rng.random() < 0.8 else None
    question = words(rng, rng.randint(5, 60))
    sampling = {"max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0, 0, 0.7]),
                "seed": rng.randint(0, 1000)}
    if kind in ("completion", "completion_stream"):
        return {"prompt": (system + " " if system else "") + question, **sampling,
                "stream_options": {"include_usage": True}}
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    if kind == "messages":
        body = {"messages": messages[-1:], "max_tokens": sampling["max_tokens"], "temperature": sampling["temperature"]}
        return {**body, "system": system} if system else body
    if kind == "responses":
        return {"input": question, "max_output_tokens": sampling["max_tokens"], "temperature": sampling["temperature"],
                **({"instructions": system} if system else {})}
    body = {"messages": messages, **sampling, "stream_options": {"include_usage": True}}
    if kind == "tools":
        return {**body, "tools": TOOLS, "tool_choice": "required", "max_tokens": 48}
    if kind == "json":
        return {**body, "max_tokens": 48, "response_format": {"type": "json_schema",
                                                               "json_schema": {"name": "answer", "schema": SCHEMA}}}
    return body


def is_greedy(body: dict) -> bool:
    return isinstance(body, dict) and body.get("temperature") == 0


async def send(client: httpx.AsyncClient, kind: str, body: dict, headers: dict, rng: random.Random) -> tuple:
    """(outcome, status, detail, output) for one request of `kind`."""
    path = path_of(kind)
    if kind.endswith("stream") or kind == "disconnect":
        drop_after = rng.randint(1, 6) if kind == "disconnect" else None
        return await stream(client, path, {**body, "stream": True}, headers, drop_after)
    return judge(kind, await client.post(path, json=body, headers=headers))


async def stream(client: httpx.AsyncClient, path: str, body: dict, headers: dict, drop_after: int | None) -> tuple:
    """Reads an SSE answer to [DONE], or leaves after `drop_after` events (closing the connection)."""
    async with client.stream("POST", path, json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return judge("chat", response)
        num_events, text = 0, []
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return ("completed", 200, None, "".join(text))
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return ("server_error", event["error"].get("code") or 500, event["error"].get("message"), None)
            for choice in event.get("choices") or ():
                text.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
            num_events += 1
            if drop_after is not None and num_events >= drop_after:
                return ("disconnected", 200, f"left after {num_events} events", None)
    return ("broken", 200, "the stream ended without [DONE]", None)


def judge(kind: str, response: httpx.Response) -> tuple:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        return ("server_error" if status >= 500 else "broken", status, "the body is not JSON", None)
    if status >= 500:
        return ("server_error", status, _error_message(body), None)
    if status != 200:
        if _is_error_shape(kind, body):
            return ("error", status, _error_message(body)[:200], None)
        return ("broken", status, "not the API's error shape", None)
    output = _output(kind, body)
    if isinstance(output, Exception):
        return ("broken", status, f"{type(output).__name__}: {output}", None)
    return ("completed", status, None, output)


def _output(kind: str, body: dict):
    """The answer's output as a string, or the exception that says why it is malformed."""
    try:
        if kind == "messages":
            assert body["type"] == "message" and "usage" in body
            return json.dumps(_without_ids(body["content"]))
        if kind == "responses":
            assert body["object"] == "response" and "usage" in body
            return json.dumps(_without_ids(body["output"]))
        assert "usage" in body
        choice = body["choices"][0]
        if "text" in choice:
            return choice["text"]
        message = choice["message"]
        if kind == "tools" and choice["finish_reason"] == "tool_calls":
            calls = [(call["function"]["name"], json.loads(call["function"]["arguments"]))
                     for call in message["tool_calls"]]
            assert message["content"] is None and all(name == "get_weather" and set(args) == {"city"}
                                                      for name, args in calls), calls
            return json.dumps(calls)
        if kind == "tools":
            assert choice["finish_reason"] == "length", choice     # required: a tool call, or cut short
        if kind == "json" and choice["finish_reason"] == "stop":
            assert set(json.loads(message["content"])) == {"ok"}
        return message["content"]
    except (AssertionError, KeyError, IndexError, TypeError, ValueError) as error:
        return error


def _without_ids(value):
    """`value` without the ids every run draws anew (items' and tool calls' ids)."""
    if isinstance(value, dict):
        return {key: _without_ids(item) for key, item in value.items() if key not in ("id", "call_id")}
    if isinstance(value, list):
        return [_without_ids(item) for item in value]
    return value


def _is_error_shape(kind: str, body) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    if kind == "messages":
        return body.get("type") == "error" and isinstance(error, dict) and {"type", "message"} <= set(error)
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


def _error_message(body) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("message", "")) if isinstance(error, dict) else str(body)[:200]
