"""Tool-call formats by name, and which one a model's chat template speaks.

    hermes       Qwen2.5, Hermes:  <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>
    llama3_json  Llama 3.1/3.2:    {"name": "f", "parameters": {...}}, after <|python_tag|> or not,
                                   several separated by `;`
    mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]  or  [TOOL_CALLS]f[ARGS]{...}
    qwen3_xml    Qwen3-Coder, Qwen3.5:  <tool_call>\\n<function=f>\\n<parameter=k>\\nv\\n</parameter>\\n
                                   </function>\\n</tool_call>   (see qwen3_xml.py)
    generic      any template that knows no tools: <tool_call>{"name": "f", "arguments": {...}}</tool_call>
                 (messages.py puts the tools and this instruction in the system message)

Every JSON format reads "arguments" or "parameters" for the arguments key, wants "name" first,
and takes the arguments exactly as written (an object). A call may open anywhere in the
output; text before, between and after calls is content, without the whitespace that joins it
to a call.
"""
from __future__ import annotations

import json

from reprise.chat.qwen3_xml import Qwen3XmlFormat
from reprise.chat.tool_scan import Header, JsonEnd, Scan, chain, json_call_header, lit, word, ws
from reprise.chat.tool_stream import ToolFormat, call_id

_ARGUMENT_KEYS = ("arguments", "parameters")


def _quote(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


def _first_header(*results: tuple[int, list[str]] | Scan, in_list: bool = False) -> Header | Scan:
    """The header of the first result that matched; NEED if one still may; else FAIL."""
    for result in results:
        if not isinstance(result, Scan):
            return Header(result[0], result[1][1], in_list)
    return Scan.NEED if Scan.NEED in results else Scan.FAIL


class HermesFormat(ToolFormat):
    name = "hermes"
    openers = ("<tool_call>",)
    trigger = "<tool_call>"
    end = "}\n</tool_call>"

    def begin(self, name: str) -> str:
        return '<tool_call>\n{"name": ' + _quote(name) + ', "arguments": '

    def header(self, text: str, continued: bool) -> Header | Scan:
        return _first_header(chain(text, 0, lit("<tool_call>"), ws, *json_call_header(_ARGUMENT_KEYS)))

    def trailer(self, text: str, header: Header, final: bool) -> tuple[int, bool] | Scan:
        """Everything up to `</tool_call>` (an extra brace, a stray key) is the call's markup."""
        at = text.find("</tool_call>")
        return Scan.NEED if at < 0 else (at + len("</tool_call>"), False)


class GenericFormat(HermesFormat):
    """Hermes' markup on one line: what messages.py teaches a model whose template knows no tools."""

    name = "generic"
    end = "}</tool_call>"

    def begin(self, name: str) -> str:
        return '<tool_call>{"name": ' + _quote(name) + ', "arguments": '


class Llama3JsonFormat(ToolFormat):
    name = "llama3_json"
    openers = ("<|python_tag|>", "{")
    trigger = '{"name": '
    end = "}"

    def begin(self, name: str) -> str:
        return '{"name": ' + _quote(name) + ', "parameters": '

    def header(self, text: str, continued: bool) -> Header | Scan:
        start = chain(text, 0, lit("<|python_tag|>"), ws) if text.startswith("<|python_tag|>") else (0, [])
        return _first_header(chain(text, start[0], *json_call_header(_ARGUMENT_KEYS)))

    def trailer(self, text: str, header: Header, final: bool) -> tuple[int, bool] | Scan:
        """The rest of the call's object, then a `;` if one follows (the next call opens by itself)."""
        end = JsonEnd(depth=1).scan(text)
        if end is None:
            return Scan.NEED
        after, _ = ws(text, end)
        if after == len(text) and not final:
            return Scan.NEED
        return (after + 1 if text.startswith(";", after) else end), False


class MistralFormat(ToolFormat):
    """Both of Mistral's forms are read; `named` (templates with `[ARGS]`) picks the one tags write.
    Ids are 9 letters and digits, as Mistral's templates require."""

    name = "mistral"
    openers = ("[TOOL_CALLS]",)
    trigger = "[TOOL_CALLS]"

    def __init__(self, named: bool = False):
        self.named = named
        self.end = "" if named else "}]"

    def begin(self, name: str) -> str:
        if self.named:
            return f"[TOOL_CALLS]{name}[ARGS]"
        return '[TOOL_CALLS][{"name": ' + _quote(name) + ', "arguments": '

    def header(self, text: str, continued: bool) -> Header | Scan:
        element = json_call_header(_ARGUMENT_KEYS)
        if continued:
            return _first_header(chain(text, 0, ws, *element), in_list=True)
        listed = _first_header(chain(text, 0, lit("[TOOL_CALLS]"), ws, lit("["), ws, *element), in_list=True)
        named = chain(text, 0, lit("[TOOL_CALLS]"), word("[ARGS]"), lit("{", consume=False))
        if isinstance(listed, Header):
            return listed
        if not isinstance(named, Scan):
            return Header(named[0], named[1][0])
        return Scan.NEED if Scan.NEED in (listed, named) else Scan.FAIL

    def trailer(self, text: str, header: Header, final: bool) -> tuple[int, bool] | Scan:
        """In a list: the rest of the call's object, then `,` (a sibling follows) or `]`."""
        if not header.in_list:
            return 0, False
        end = JsonEnd(depth=1).scan(text)
        if end is None:
            return Scan.NEED
        after, _ = ws(text, end)
        if after == len(text):
            return Scan.NEED if not final else (end, False)
        if text[after] in ",]":
            return after + 1, text[after] == ","
        return end, False

    def new_call_id(self, seed: str | None) -> str:
        return call_id(seed, 9, prefix="")


TOOL_FORMATS: dict[str, type[ToolFormat]] = {
    format.name: format for format in (HermesFormat, Llama3JsonFormat, MistralFormat, Qwen3XmlFormat, GenericFormat)}


def choose_tool_format(template: str | None, override: str | None = None) -> ToolFormat:
    """The format of `override` (`--tool-call-parser NAME`), else the one the template writes.

    From the template text: `<tool_call>` with `<function=` -> qwen3_xml; `<tool_call>` ->
    hermes; `[TOOL_CALLS]` -> mistral; `<|python_tag|>`, or Llama 3's header tokens with tools ->
    llama3_json; anything else (no template, one that never mentions `tools`, or a tools format
    not known here) -> generic. ValueError for an unknown override.
    """
    text = template or ""
    if override is not None and override not in TOOL_FORMATS:
        raise ValueError(f"unknown tool call parser {override!r}; known: {', '.join(TOOL_FORMATS)}")
    name = override or _format_in(text)
    return MistralFormat(named="[ARGS]" in text) if name == "mistral" else TOOL_FORMATS[name]()


def _format_in(template: str) -> str:
    if "<tool_call>" in template:
        return "qwen3_xml" if "<function=" in template else "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "tools" in template):
        return "llama3_json"
    return "generic"
