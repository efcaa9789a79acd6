"""The Anthropic Messages API's request bodies (POST /v1/messages, /v1/messages/count_tokens), and
their conversion to the OpenAI-shaped chat body that ChatTemplates renders, so a Messages request
runs on the same template, reply memory, engine and cache path as a chat completion.

Conversion (Anthropic -> OpenAI messages):
- `system` (a string or text blocks, joined by newlines) -> one system message first;
- a user message's text blocks -> one user message (joined by newlines); each `tool_result`
  -> a `tool` message (`tool_call_id` = `tool_use_id`; its text, or its text blocks joined);
- an assistant message's text blocks -> `content` (joined as they are); `tool_use` ->
  `tool_calls` (`arguments` = the input as JSON); `thinking` -> `reasoning_content`;
- `tools` -> function tools (`input_schema` -> `parameters`); `tool_choice` auto / any / tool /
  none -> auto / required / the named function / none, `disable_parallel_tool_use` ->
  `parallel_tool_calls: false`; `stop_sequences` -> `stop`; `thinking` enabled or disabled ->
  the template's `enable_thinking`.
Every block also becomes a prompt_blocks.Block (tools, then system blocks, then message parts:
Anthropic's cache order), marked where it carries `cache_control`; a top-level `cache_control`
marks the last block of the last message.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reprise.server.errors import APIError
from reprise.server.guided import Tool
from reprise.server.prompt_blocks import Block
from reprise.server.protocol import ChatCompletionRequest

# known Anthropic fields whose meaning reprise does not implement: refused unless harmless
REFUSED = {"container": (None,), "mcp_servers": (None, []), "context_management": (None,),
           "service_tier": (None, "auto", "standard_only"), "inference_geo": (None,), "output_format": (None,)}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CacheControl(_Body):
    type: Literal["ephemeral"] = "ephemeral"
    ttl: Literal["5m", "1h"] = "5m"


class ContentBlock(_Body):
    """One content block of a message: text, tool_use, tool_result, thinking (others refused)."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[ContentBlock] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None
    cache_control: CacheControl | None = None


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class SystemBlock(_Body):
    type: Literal["text"] = "text"
    text: str
    cache_control: CacheControl | None = None


class AnthropicTool(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    type: str | None = None
    cache_control: CacheControl | None = None


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(_Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class DiagnosticsRequest(_Body):
    previous_message_id: str | None = None


class MessagesPrompt(_Body):
    """What makes the prompt (the whole body of count_tokens)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[SystemBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    cache_control: CacheControl | None = None
    cache_salt: str | None = None


class MessagesRequest(MessagesPrompt):
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    metadata: dict[str, Any] | None = None
    diagnostics: DiagnosticsRequest | None = None
    cache_report: bool | None = None


def chat_request(body: MessagesPrompt) -> tuple[ChatCompletionRequest, list[Block]]:
    """The OpenAI chat body of a Messages body (see the module doc), and its blocks."""
    _check_refused(body)
    tools = [_tool(tool) for tool in body.tools or ()]
    blocks = [Block("tool", index, json.dumps(tool, ensure_ascii=False), _ttl(body.tools[index].cache_control))
              for index, tool in enumerate(tools)]
    messages = _system(body.system, blocks)
    for index, message in enumerate(body.messages):
        parts = [ContentBlock(type="text", text=message.content)] if isinstance(message.content, str) \
            else message.content
        messages += _user(parts, index, blocks) if message.role == "user" else [_assistant(parts, index, blocks)]
    if body.cache_control is not None and blocks and blocks[-1].kind == "message":
        blocks[-1] = Block(blocks[-1].kind, blocks[-1].index, blocks[-1].text, body.cache_control.ttl)
    chat = {"model": body.model, "messages": messages, "tools": tools or None, "cache_salt": body.cache_salt,
            **_tool_choice(body.tool_choice)}
    if body.thinking is not None:
        chat["chat_template_kwargs"] = {"enable_thinking": body.thinking.type != "disabled"}
    if isinstance(body, MessagesRequest):
        chat.update(max_tokens=body.max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=body.top_p, top_k=body.top_k, stop=body.stop_sequences, stream=body.stream,
                    cache_report=body.cache_report)
    return ChatCompletionRequest.model_validate(chat), blocks


def _ttl(control: CacheControl | None) -> str | None:
    return control.ttl if control is not None else None


def _check_refused(body: MessagesPrompt) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in REFUSED and value not in REFUSED[name]:
            raise APIError(400, f"{name} is not supported by this server", name)


def _tool(tool: AnthropicTool) -> dict:
    if tool.type not in (None, "custom"):
        raise APIError(400, f"tool type {tool.type!r} is not supported; send custom tools (name, input_schema)",
                       "tools")
    function = {"name": tool.name, "description": tool.description, "parameters": tool.input_schema}
    return Tool.model_validate({"type": "function", "function": function}).model_dump(exclude_none=True)


def _system(system: str | list[SystemBlock] | None, blocks: list[Block]) -> list[dict]:
    if system is None or system == []:
        return []
    parts = [SystemBlock(text=system)] if isinstance(system, str) else system
    blocks += [Block("system", index, part.text, _ttl(part.cache_control)) for index, part in enumerate(parts)]
    return [{"role": "system", "content": "\n".join(part.text for part in parts)}]


def _user(parts: list[ContentBlock], index: int, blocks: list[Block]) -> list[dict]:
    """A user message: its tool results as `tool` messages, its text as one user message."""
    messages: list[dict] = []
    texts: list[str] = []
    for part in parts:
        if part.type == "tool_result":
            if texts:
                messages.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            result = _result_text(part)
            messages.append({"role": "tool", "tool_call_id": part.tool_use_id, "content": result})
            blocks.append(Block("message", index, result, _ttl(part.cache_control)))
        elif part.type == "text" and part.text is not None:
            texts.append(part.text)
            blocks.append(Block("message", index, part.text, _ttl(part.cache_control)))
        else:
            raise APIError(400, f"content block type {part.type!r} is not supported in user messages", "messages")
    return messages + ([{"role": "user", "content": "\n".join(texts)}] if texts or not messages else [])


def _assistant(parts: list[ContentBlock], index: int, blocks: list[Block]) -> dict:
    text, reasoning, calls = "", None, []
    for part in parts:
        if part.type == "text" and part.text is not None:
            text += part.text
            piece = part.text
        elif part.type == "tool_use" and part.id and part.name:
            piece = json.dumps(part.input or {}, ensure_ascii=False)
            calls.append({"id": part.id, "type": "function", "function": {"name": part.name, "arguments": piece}})
        elif part.type == "thinking" and part.thinking is not None:
            reasoning = (reasoning or "") + part.thinking
            piece = part.thinking
        else:
            raise APIError(400, f"content block type {part.type!r} is not supported in assistant messages",
                           "messages")
        blocks.append(Block("message", index, piece, _ttl(part.cache_control)))
    message = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def _result_text(part: ContentBlock) -> str:
    if part.content is None or isinstance(part.content, str):
        return part.content or ""
    if any(piece.type != "text" for piece in part.content):
        raise APIError(400, "tool_result content must be text", "messages")
    return "\n".join(piece.text or "" for piece in part.content)


def _tool_choice(choice: ToolChoice | None) -> dict:
    if choice is None:
        return {}
    parallel = {"parallel_tool_calls": False} if choice.disable_parallel_tool_use else {}
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, "tool_choice type tool needs a name", "tool_choice")
        return {"tool_choice": {"type": "function", "function": {"name": choice.name}}, **parallel}
    return {"tool_choice": {"auto": "auto", "any": "required", "none": "none"}[choice.type], **parallel}
