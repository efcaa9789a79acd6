"""Qwen3-Coder's and Qwen3.5's tool calls: parameters as XML-like blocks, typed by the tool's schema.

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

A value is the text between `<parameter=k>` and `</parameter>`, one newline trimmed at each end
(a missing `</parameter>` ends at `</function>`). The arguments are JSON built from the values:
a string where the schema says string (or says nothing), else the JSON the text reads as (a
number, true/True, null/None, an object...), falling back to the text. They are sent one whole
parameter at a time: `{"city": "Paris"`, `, "days": 3`, `}`. A call cut off by the end of the
output is closed after its last complete parameter.
"""
from __future__ import annotations

import json

from reprise.chat.tool_scan import Header, Scan, chain, lit, word, ws
from reprise.chat.tool_stream import ToolFormat, ToolStream

_VALUE_END = "\n</parameter>\n"
_STRING_RULE = 'text_value[suffix="\\n</parameter>\\n"]: /(?s:.*)/'


class XmlToolStream(ToolStream):
    """A ToolStream whose arguments are parameter blocks rather than JSON."""

    def _start_arguments(self) -> None:
        self._num_params = 0
        self._handler = self._arguments

    def _arguments(self, final: bool) -> bool:
        body = self._buffer.lstrip()
        skipped = len(self._buffer) - len(body)
        if body.startswith("</function>"):
            self._take(skipped + len("</function>"))
            return self._close_arguments()
        if body.startswith("<parameter="):
            parameter = _parameter(body)
            if parameter is Scan.NEED and not final:
                return False
            if not isinstance(parameter, Scan):
                self._take(skipped + parameter[0])
                self._emit_parameter(*parameter[1:])
                return True
        elif not final and ("</function>".startswith(body) or "<parameter=".startswith(body)):
            return False
        if final:
            self._take(len(self._buffer))
            return self._close_arguments()
        at = body.find("<", 1)              # not a parameter: skipped, up to the next tag
        self._take(skipped + (at if at > 0 else len(body)))
        return True

    def _emit_parameter(self, key: str, text: str) -> None:
        schema = (self.schemas.get(self._header.name) or {}).get("properties", {}).get(key)
        pair = json.dumps(key, ensure_ascii=False) + ": " + json.dumps(typed_value(text, schema), ensure_ascii=False)
        self._emit_arguments(("{" if self._num_params == 0 else ", ") + pair)
        self._num_params += 1

    def _close_arguments(self) -> bool:
        self._emit_arguments("}" if self._num_params else "{}")
        self._handler = self._trailer
        return True


def _parameter(body: str) -> tuple[int, str, str] | Scan:
    """`<parameter=KEY>\\nVALUE\\n</parameter>` at the start of `body`: its length, key and value."""
    opened = chain(body, 0, lit("<parameter="), word(">"))
    if isinstance(opened, Scan):
        return opened
    start, (key,) = opened
    ends = [(at, tag) for tag in ("</parameter>", "</function>") if (at := body.find(tag, start)) >= 0]
    if not ends:
        return Scan.NEED
    at, tag = min(ends)
    value = body[start:at]
    value = value[1:] if value.startswith("\n") else value
    value = value[:-1] if value.endswith("\n") else value
    return at + (len(tag) if tag == "</parameter>" else 0), key, value


def typed_value(text: str, schema: dict | None):
    """A parameter's text as the JSON value its schema types it (see the module doc)."""
    kinds = _schema_types(schema)
    if not kinds or kinds == {"string"}:
        return text
    word_ = text.strip()
    if "boolean" in kinds and word_.lower() in ("true", "false"):
        return word_.lower() == "true"
    if "null" in kinds and word_ in ("null", "None"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    kind = _json_type(value)
    return value if kind in kinds or (kind == "integer" and "number" in kinds) else text


def _schema_types(schema) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind} if isinstance(kind, str) else set()
    for option in (*schema.get("anyOf", ()), *schema.get("oneOf", ())):
        kinds |= _schema_types(option)
    return kinds


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "null")


class Qwen3XmlFormat(ToolFormat):
    name = "qwen3_xml"
    openers = ("<tool_call>",)
    trigger = "<tool_call>"
    end = "</function>\n</tool_call>"
    stream_class = XmlToolStream

    def begin(self, name: str) -> str:
        return f"<tool_call>\n<function={name}>\n"

    def header(self, text: str, continued: bool) -> Header | Scan:
        result = chain(text, 0, lit("<tool_call>"), ws, lit("<function="), word(">"))
        return result if isinstance(result, Scan) else Header(result[0], result[1][0])

    def trailer(self, text: str, header: Header, final: bool) -> tuple[int, bool] | Scan:
        at = text.find("</tool_call>")
        return Scan.NEED if at < 0 else (at + len("</tool_call>"), False)

    def arguments_grammar(self, function: dict) -> str:
        """A Lark grammar (llguidance's dialect) for the parameter blocks: the schema's properties
        in order, the required ones always; strings as free text, other types as JSON."""
        schema = function.get("parameters") or {}
        required = set(schema.get("required") or ())
        rules, parts = [], []
        for index, (key, prop) in enumerate((schema.get("properties") or {}).items()):
            parts.append(f"p{index}" + ("" if key in required else "?"))
            rules.append(f"p{index}: {json.dumps(f'<parameter={key}>' + chr(10))} {_value_rule(prop)}")
        start = "start: " + (" ".join(parts) or '""')
        return "\n".join(["%llguidance {}", start, *rules, _STRING_RULE]) + "\n"


def _value_rule(schema) -> str:
    kinds = _schema_types(schema)
    enum = schema.get("enum") if isinstance(schema, dict) else None
    if enum and all(isinstance(value, str) for value in enum):
        return "(" + " | ".join(json.dumps(value, ensure_ascii=False) for value in enum) + ") " + json.dumps(_VALUE_END)
    if not kinds or "string" in kinds:
        return "text_value"
    return "%json " + json.dumps(schema, ensure_ascii=False) + " " + json.dumps(_VALUE_END)
