"""The OpenAI Responses API (POST /v1/responses), the subset agents use: request bodies, their
conversion to the OpenAI chat body that ChatTemplates renders (same template, reply memory,
engine and cache path as chat completions), and the conversations kept for
`previous_response_id`.

Conversion (input items -> chat messages): `instructions` -> a system message first (this
request's only: instructions are not carried over from a previous response, as OpenAI does); a
string `input` -> one user message; a message item -> a message of its role (text parts joined
by newlines); `function_call` items -> `tool_calls` of an assistant message (consecutive ones,
and one right after an assistant message, join it); `function_call_output` -> a `tool` message;
a `reasoning` item -> `reasoning_content` of the next assistant message. `tools` (function) ->
chat tools, `text.format` -> `response_format`, `max_output_tokens` -> `max_tokens`.

Conversations: a stored response (`store`, true by default) keeps, per tenant salt (bounded,
least recently used first out), its conversation's messages (instructions excluded, the reply
appended) and the token ids the engine ran (prompt and output). A request naming it as
`previous_response_id` continues it token-exactly: its prompt is those ids followed by the ids of
what the template renders after them (when the rendering of the whole conversation starts with
their text, as it does when the template renders the reply as generated), so the hit is
everything before the new input by construction. `prompt_cache_key` is accepted and echoed (a
hint that requests belong together; it never widens what a tenant may hit).
`prompt_cache_retention: "24h"` pins the whole prompt in the cache for 24 hours ("in_memory":
no pin, the cache's ordinary LRU).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reprise.chat.continuity import ChatPrompt
from reprise.chat.tenant_lru import TenantLRU
from reprise.server.config import tenant_cache_salt
from reprise.server.errors import APIError
from reprise.server.prompt_blocks import Block
from reprise.server.protocol import ChatCompletionRequest
from reprise.server.serving import Job, Serving

RETENTION_24H_S = 24 * 3600
# known Responses fields whose meaning reprise does not implement: refused unless harmless
REFUSED = {"background": (None, False), "conversation": (None,), "prompt": (None,), "truncation": (None, "disabled"),
           "reasoning": (None, {}), "include": (None, []), "top_logprobs": (None, 0), "service_tier": (None, "auto")}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: str
    text: str | None = None


class InputItem(_Body):
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[TextPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[TextPart] | None = None
    summary: list[TextPart] | None = None


class FunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None


class ResponsesRequest(_Body):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stream: bool | None = None
    store: bool | None = True
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "in-memory", "24h"] | None = None
    metadata: dict[str, str] | None = None
    cache_salt: str | None = None
    cache_report: bool | None = None


@dataclass(frozen=True, slots=True)
class Conversation:
    """A stored response: its conversation's messages (reply included) and the ids the engine ran."""

    messages: tuple[dict, ...]
    context_ids: tuple[int, ...]


class Conversations(TenantLRU[Conversation]):
    """(salt, response id) -> Conversation, bounded (see TenantLRU: tenants stay apart)."""

    def __init__(self, capacity: int = 1024):
        super().__init__(capacity)

    def find(self, salt: str | None, response_id: str) -> Conversation:
        """404 (in OpenAI's words) when it is not kept for this tenant."""
        conversation = self.get(salt, response_id)
        if conversation is None:
            raise APIError(404, f"Previous response with id '{response_id}' not found.", "previous_response_id",
                           "previous_response_not_found")
        return conversation


@dataclass(frozen=True)
class ResponsesTurn:
    """A Responses request ready to run: its chat job (prompt continued when it follows a stored
    response), its conversation's messages (no instructions) and its blocks."""

    job: Job
    conversation: list[dict]
    blocks: list[Block]


def responses_turn(serving: Serving, conversations: Conversations, body: ResponsesRequest,
                   tenant_salt: str | None) -> ResponsesTurn:
    _check_refused(body)
    salt = tenant_cache_salt(tenant_salt, body.cache_salt)
    previous = conversations.find(salt, body.previous_response_id) if body.previous_response_id else None
    conversation = [*(previous.messages if previous else ()), *input_messages(body.input)]
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    job = serving.chat_job(ChatCompletionRequest.model_validate(_chat_body(body, system + conversation)), tenant_salt)
    if previous is not None:
        job = _continued(serving, job, previous, body.max_output_tokens)
    if body.prompt_cache_retention == "24h":
        job = replace(job, pins=((len(job.prompts[0]), RETENTION_24H_S),))
    return ResponsesTurn(job, conversation, _blocks(body, conversation))


def input_messages(items: str | list[InputItem]) -> list[dict]:
    """The chat messages of `input` (see the module doc)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    reasoning = None
    for item in items:
        if item.type == "reasoning":
            reasoning = "\n".join(part.text or "" for part in item.summary or ())
        elif item.type == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, "\n")})
        elif item.type == "function_call":
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name,
                                                                         "arguments": item.arguments or "{}"}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1]["tool_calls"] = [*messages[-1].get("tool_calls", ()), call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item.role is None:
            raise APIError(400, "a message item needs a role", "input")
        else:
            separator = "" if item.role == "assistant" else "\n"
            messages.append({"role": item.role, "content": _text(item.content, separator)})
        if reasoning is not None and messages and messages[-1]["role"] == "assistant" and item.type != "reasoning":
            messages[-1]["reasoning_content"], reasoning = reasoning, None
    return messages


def _continued(serving: Serving, job: Job, previous: Conversation, max_output_tokens: int | None) -> Job:
    """The job with its prompt continued token-exactly from the previous response's ids, when
    the rendered conversation starts with their text; else as rendered."""
    tokenizer, prompt = serving.tokenizer, job.turn.prompt
    context = list(previous.context_ids)
    text = tokenizer.decode(context)
    if not prompt.rendered.startswith(text):
        return job
    ids = context + tokenizer.encode(prompt.rendered[len(text):])
    max_tokens = serving.fit([ids], max_output_tokens, "input")
    turn = replace(job.turn, prompt=ChatPrompt(ids, prompt.rendered))
    return replace(job, prompts=[ids], params=[replace(job.params[0], max_tokens=max_tokens)], turn=turn)


def _chat_body(body: ResponsesRequest, messages: list[dict]) -> dict:
    tools = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
             for tool in body.tools or ()]
    choice = body.tool_choice
    if isinstance(choice, FunctionChoice):
        choice = {"type": "function", "function": {"name": choice.name}}
    return {"model": body.model, "messages": messages, "tools": tools or None, "tool_choice": choice,
            "parallel_tool_calls": body.parallel_tool_calls, "response_format": _response_format(body.text),
            "max_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "stream": body.stream, "cache_salt": body.cache_salt, "cache_report": body.cache_report}


def _response_format(text: TextConfig | None) -> dict | None:
    form = text.format if text is not None else None
    if form is None or form.type != "json_schema":
        return {"type": form.type} if form is not None else None
    return {"type": "json_schema", "json_schema": {"name": form.name, "schema": form.schema_, "strict": form.strict}}


def _blocks(body: ResponsesRequest, conversation: list[dict]) -> list[Block]:
    """Tools, the instructions (system block 0), then each message of the conversation (its index
    in the conversation, stored messages first): its text, or each call's arguments."""
    blocks = [Block("tool", index, json.dumps({"type": "function", "function": tool.model_dump(
        exclude={"type"}, exclude_none=True)}, ensure_ascii=False)) for index, tool in enumerate(body.tools or ())]
    if body.instructions:
        blocks.append(Block("system", 0, body.instructions))
    for index, message in enumerate(conversation):
        texts = [call["function"]["arguments"] for call in message.get("tool_calls", ())] or [message.get("content")]
        blocks += [Block("message", index, text) for text in texts if text]
    return blocks


def _text(content: str | list[TextPart] | None, separator: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.type not in ("input_text", "output_text", "text") for part in content):
        raise APIError(400, "only text content parts (input_text, output_text) are supported", "input")
    return separator.join(part.text or "" for part in content)


def _check_refused(body: ResponsesRequest) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in REFUSED and value not in REFUSED[name]:
            raise APIError(400, f"{name} is not supported by this server", name)
