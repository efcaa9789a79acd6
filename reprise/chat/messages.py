"""OpenAI chat messages and tools -> the messages and keyword arguments a chat template renders.

For every template: a `developer` message becomes `system` unless the template knows the
developer role (its text says "developer"). A template that knows tools gets them as
transformers passes them (`tools=[{"type": "function", "function": {...}}]`), and each
assistant tool call's `arguments` as an object parsed from the JSON string the client sent,
keys in the same order (templates expect a mapping); arguments that are not a JSON object stay
a string. For Mistral's templates, which require tool-call ids of 9 letters and digits, any
other id is replaced by 9 derived from it (the same id maps to the same 9 every time).

The generic format serves tools to a model whose template knows none (tool format `generic`),
the way llama.cpp's server does, with plain system/user/assistant messages:

- The tools go into the system message, before its content (separated by a blank line), or
  into a new system message first when there is none. The text, with one JSON tool per line:

      # Tools

      You may call one or more tools to help with the user's request. The tools, as JSON schemas:
      <tools>
      {"type": "function", "function": {"name": "get_weather", ...}}
      </tools>

      To call tools, reply with nothing but one <tool_call></tool_call> block per call:
      <tool_call>{"name": <tool-name>, "arguments": <args-json-object>}</tool_call>
      Each result comes back to you in a <tool_response></tool_response> block.

- An assistant message's tool calls become its content: its own content (if any), then one
  `<tool_call>{"name": "NAME", "arguments": ARGUMENTS}</tool_call>` per call, joined by
  newlines; ARGUMENTS is the client's argument string as given, so the text is the one the
  model generated.
- Tool results become a user message, `<tool_response>\\nRESULT\\n</tool_response>` per result,
  consecutive results joined by a newline into one message, so that templates which alternate
  user and assistant strictly still render.
"""
from __future__ import annotations

import hashlib
import json
import string

from reprise.chat.tool_stream import ToolFormat

GENERIC_TOOLS_PROMPT = """# Tools

You may call one or more tools to help with the user's request. The tools, as JSON schemas:
<tools>
{tools}
</tools>

To call tools, reply with nothing but one <tool_call></tool_call> block per call:
<tool_call>{{"name": <tool-name>, "arguments": <args-json-object>}}</tool_call>
Each result comes back to you in a <tool_response></tool_response> block."""

_ID_ALPHABET = string.ascii_letters + string.digits


def template_messages(messages: list[dict], tools: list[dict] | None, tool_format: ToolFormat,
                      template: str | None) -> tuple[list[dict], dict]:
    """(messages for the template, keyword arguments for it: `tools`, or none for generic).

    `messages` are validated OpenAI messages (role, content, tool_calls with JSON-string
    arguments, tool_call_id, name, reasoning_content); they are not modified.
    """
    developer = template is not None and "developer" in template
    messages = [message if developer or message["role"] != "developer" else {**message, "role": "system"}
                for message in messages]
    if tool_format.name == "generic":
        return generic_messages(messages, tools), {}
    short_ids = tool_format.name == "mistral"
    return [_for_template(message, short_ids) for message in messages], ({"tools": list(tools)} if tools else {})


def generic_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The messages in the generic format (see the module doc)."""
    out: list[dict] = []
    for index, message in enumerate(messages):
        if message["role"] == "tool":
            block = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if index > 0 and messages[index - 1]["role"] == "tool":
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
        elif message["role"] == "assistant" and message.get("tool_calls"):
            rest = {key: value for key, value in message.items() if key != "tool_calls"}
            out.append({**rest, "content": calls_text(message.get("content"), message["tool_calls"])})
        else:
            out.append(message)
    return _with_tools_prompt(out, tools) if tools else out


def calls_text(content: str | None, tool_calls: list[dict]) -> str:
    """An assistant turn with tool calls, written in the generic format."""
    calls = []
    for call in tool_calls:
        function = call["function"]
        arguments = function["arguments"]
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append('<tool_call>{"name": ' + json.dumps(function["name"], ensure_ascii=False)
                     + ', "arguments": ' + arguments + "}</tool_call>")
    return "\n".join(([content] if content else []) + calls)


def generic_tools_prompt(tools: list[dict]) -> str:
    return GENERIC_TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))


def _with_tools_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    prompt = generic_tools_prompt(tools)
    if messages and messages[0]["role"] == "system":
        content = messages[0].get("content")
        return [{**messages[0], "content": f"{prompt}\n\n{content}" if content else prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _for_template(message: dict, short_ids: bool) -> dict:
    """Tool-call arguments as objects; with `short_ids`, ids of 9 letters and digits."""
    message = dict(message)
    if message.get("tool_calls"):
        message["tool_calls"] = [_call_for_template(call, short_ids) for call in message["tool_calls"]]
    if short_ids and message.get("tool_call_id"):
        message["tool_call_id"] = _short_id(message["tool_call_id"])
    return message


def _call_for_template(call: dict, short_ids: bool) -> dict:
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        function["arguments"] = parsed if isinstance(parsed, dict) else arguments
    call = {**call, "function": function}
    if short_ids and call.get("id"):
        call["id"] = _short_id(call["id"])
    return call


def _short_id(call_id: str) -> str:
    """`call_id` if it is 9 letters and digits, else 9 derived from its digest."""
    if len(call_id) == 9 and all(char in _ID_ALPHABET for char in call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        number, digit = divmod(number, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[digit])
    return "".join(chars)
