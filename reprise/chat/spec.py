"""Plain data shared by the server, the chat layer and the engine: what a request's output must
look like (GuidedSpec) and how a model writes one tool call (ToolTag). No torch, no grammar engine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ToolTag:
    """How one tool's call is written, for constrained decoding: `begin`, then text matching
    `grammar`, then `end`. `grammar` is a JSON schema (as JSON text) of the arguments, or a Lark
    grammar (text with a `start:` rule) for formats whose arguments are not JSON. `trigger` is the
    prefix of `begin` that opens a call in free text (`<tool_call>`), the same for every tool of
    a format.

    Example (Hermes): trigger `<tool_call>`, begin `<tool_call>\\n{"name": "get_weather", "arguments": `,
    grammar `{"type": "object", ...}`, end `}\\n</tool_call>`.
    """

    trigger: str
    begin: str
    grammar: str
    end: str


@dataclass(frozen=True, slots=True)
class GuidedSpec:
    """One constraint on a request's output; exactly one of the fields is set.

    json_schema: JSON text of a schema (`{"type": "object"}` for response_format json_object).
    regex: the whole output matches it. choice: the output is one of these strings.
    grammar: a Lark grammar (llguidance's dialect) or GBNF (llama.cpp's), told apart by syntax.
    tool_calls: calls as the tags describe; with `tool_calls_required` the output is one or more
    calls (one when `parallel_tool_calls` is False) and nothing else; without it, free text in
    which a trigger opens a call that must then be complete and valid.
    """

    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    tool_calls: tuple[ToolTag, ...] | None = None
    tool_calls_required: bool = False
    parallel_tool_calls: bool = True

    def __post_init__(self):
        given = [f for f in (self.json_schema, self.regex, self.choice, self.grammar, self.tool_calls) if f is not None]
        if len(given) != 1:
            raise ValueError("a GuidedSpec takes exactly one of json_schema, regex, choice, grammar, tool_calls")
