"""Scanning model output for tool-call markup: small steps that either match at a position, need
more text to decide, or fail. Shared by the tool-call formats; pure text, no state but `JsonEnd`'s."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class Header:
    """A call's opening, parsed: it ends at `end`, where the arguments start. `in_list`: the call is
    an element of a JSON list (Mistral's `[TOOL_CALLS][...]`), so a sibling may follow."""

    end: int
    name: str
    in_list: bool = False


class Scan(Enum):
    NEED = "need"      # the text ends before it is decided
    FAIL = "fail"      # the text does not match


Step = Callable[[str, int], "tuple[int, str | None] | Scan"]


def chain(text: str, pos: int, *steps: Step) -> tuple[int, list[str]] | Scan:
    """Run `steps` from `pos`: the end position and the values the steps captured, or why not."""
    values = []
    for step in steps:
        result = step(text, pos)
        if isinstance(result, Scan):
            return result
        pos, value = result
        if value is not None:
            values.append(value)
    return pos, values


def ws(text: str, pos: int) -> tuple[int, None]:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos, None


def lit(literal: str, consume: bool = True) -> Step:
    """Exactly `literal` (left unconsumed when `consume` is False: a look-ahead)."""
    def step(text: str, pos: int):
        rest = text[pos:pos + len(literal)]
        if rest == literal:
            return pos + (len(literal) if consume else 0), None
        return Scan.NEED if literal.startswith(rest) and pos + len(rest) == len(text) else Scan.FAIL
    return step


def json_string(keys: tuple[str, ...] | None = None, max_chars: int = 256) -> Step:
    """A JSON string of at most `max_chars` (a key or a name), captured decoded; with `keys`, one of them."""
    def step(text: str, pos: int):
        if pos >= len(text):
            return Scan.NEED
        if text[pos] != '"':
            return Scan.FAIL
        end = pos + 1
        while end < len(text) and end - pos <= max_chars and text[end] != '"':
            end += 2 if text[end] == "\\" else 1
        if end - pos > max_chars:
            return Scan.FAIL
        if end >= len(text):
            return Scan.NEED
        try:
            value = json.loads(text[pos:end + 1])
        except ValueError:
            return Scan.FAIL
        return (end + 1, value) if keys is None or value in keys else Scan.FAIL
    return step


def word(stop: str, max_chars: int = 256) -> Step:
    """A tool name, captured, then the literal `stop`: no whitespace, brackets or quotes in the name."""
    def step(text: str, pos: int):
        end = pos
        while end < len(text) and end - pos <= max_chars and not (text[end].isspace() or text[end] in "<>[]{}\"'"):
            end += 1
        if end - pos > max_chars:
            return Scan.FAIL
        if end == len(text):
            return Scan.NEED
        after = lit(stop)(text, end) if end > pos else Scan.FAIL
        return after if isinstance(after, Scan) else (after[0], text[pos:end])
    return step


def json_call_header(args_keys: tuple[str, ...]) -> tuple[Step, ...]:
    """`{"name": "NAME", "arguments": ` up to the `{` that opens the arguments (not consumed).
    The values it captures: the key "name", NAME, the arguments key."""
    return (lit("{"), ws, json_string(("name",)), ws, lit(":"), ws, json_string(), ws, lit(","), ws,
            json_string(args_keys), ws, lit(":"), ws, lit("{", consume=False))


class JsonEnd:
    """Where a JSON value that opens with a bracket closes, fed in pieces. `depth` > 0 starts
    inside brackets already open (to find the end of the object around the arguments)."""

    def __init__(self, depth: int = 0):
        self.depth, self.in_string, self.escaped = depth, False, False

    def scan(self, text: str) -> int | None:
        """The index just past the bracket that closes the value, or None if `text` does not reach it."""
        for index, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return index + 1
        return None


def held_prefix(text: str, openers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that is the start of an opener (held back)."""
    return max((size for opener in openers for size in range(min(len(opener) - 1, len(text)), 0, -1)
                if text.endswith(opener[:size])), default=0)
