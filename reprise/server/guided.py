"""Structured output and tools in request bodies, and the one GuidedSpec they turn into.

OpenAI's `response_format` (json_object, json_schema) and tool_choice (`required`, a named
function), vLLM's `structured_outputs` and its older `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar`: all become a GuidedSpec that the sampler enforces with a
token bitmask, so the output always parses. At most one of them per request.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reprise.chat.spec import GuidedSpec, ToolTag
from reprise.server.errors import APIError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDefinition(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class _FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: _FunctionName


class JSONSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` (one of its fields)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class GuidedFields(_Body):
    """The request fields that constrain the output (mixed into chat and text completion bodies)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def output_spec(self) -> tuple[str, GuidedSpec] | None:
        """(field, spec) of the one output constraint given, or None; 400 when several are."""
        given = [item for item in self._candidates() if item[1] is not None]
        if len(given) > 1:
            raise APIError(400, f"give at most one output constraint, not {' and '.join(f for f, _ in given)}",
                           given[1][0])
        return given[0] if given else None

    def _candidates(self) -> list[tuple[str, GuidedSpec | None]]:
        outputs = self.structured_outputs
        return [("response_format", _response_format_spec(self.response_format)),
                ("structured_outputs", _structured_spec(outputs) if outputs is not None else None),
                ("guided_json", _schema_spec(self.guided_json, "guided_json")),
                ("guided_regex", GuidedSpec(regex=self.guided_regex) if self.guided_regex is not None else None),
                ("guided_choice", _choice_spec(self.guided_choice, "guided_choice")),
                ("guided_grammar", GuidedSpec(grammar=self.guided_grammar) if self.guided_grammar else None)]


def tool_call_spec(tags: tuple[ToolTag, ...], tool_choice, parallel: bool | None) -> GuidedSpec | None:
    """The constraint for `tool_choice` over the tools' tags (in the tools' order): `required` =
    one or more calls and nothing else, a named function = that call, `auto` = free text in
    which a call, once opened, must be valid; `none` = no constraint."""
    if tool_choice == "none" or not tags:
        return None
    required = tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)
    return GuidedSpec(tool_calls=tags, tool_calls_required=required,
                      parallel_tool_calls=parallel is not False and not isinstance(tool_choice, NamedToolChoice))


def _response_format_spec(response_format: ResponseFormat | None) -> GuidedSpec | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return GuidedSpec(json_schema='{"type": "object"}')
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema", "response_format")
    return _schema_spec(response_format.json_schema.schema_, "response_format")


def _structured_spec(outputs: StructuredOutputs) -> GuidedSpec | None:
    given = [name for name in ("json_", "regex", "choice", "grammar", "json_object")
             if getattr(outputs, name) not in (None, False)]
    if len(given) != 1:
        raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                       "structured_outputs")
    if outputs.json_object:
        return GuidedSpec(json_schema='{"type": "object"}')
    if outputs.choice is not None:
        return _choice_spec(outputs.choice, "structured_outputs")
    if outputs.json_ is not None:
        return _schema_spec(outputs.json_, "structured_outputs")
    return GuidedSpec(regex=outputs.regex) if outputs.regex is not None else GuidedSpec(grammar=outputs.grammar)


def _schema_spec(schema: dict | str | None, param: str) -> GuidedSpec | None:
    if schema is None:
        return None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise APIError(400, f"{param}: the schema is not valid JSON: {error}", param) from error
    return GuidedSpec(json_schema=json.dumps(schema))


def _choice_spec(choice: list[str] | None, param: str) -> GuidedSpec | None:
    if choice is None:
        return None
    if not choice or not all(choice):
        raise APIError(400, f"{param} needs at least one non-empty choice", param)
    return GuidedSpec(choice=tuple(choice))
