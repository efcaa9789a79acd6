"""The streaming tool-call parser every format shares, and what it produces: content and call deltas.

A stream reads model output in arbitrary pieces and turns it into deltas: content text, or
pieces of tool calls in OpenAI's streaming shape. Its buffer is the text not yet decided:

    | sent (content, call pieces) | buffer: held until decided | next feed ... |

- In content, text that could still be the start of an opener (`<tool_ca`) is held; so is
  trailing whitespace, which is dropped if a call follows.
- At an opener, the call's header (up to where its arguments start) is held until it parses
  (the call starts: id and name are sent) or cannot (the opener is content after all).
- Arguments are sent as they arrive, exactly as written; the markup after them is consumed
  silently; whitespace after a call is dropped.

Every decision depends only on the text, never on where a piece ends, so any split of the
same output gives the same deltas once concatenated, and `collect(feed(text) + finish())` is
the non-streaming parse. A call that has started stays a call: cut off by the end of the
output, its arguments are what was written so far (as OpenAI reports a `length` finish). An
output that ends inside a call's header (after the opener, before the arguments) ends there:
the unfinished markup is neither a call nor content.
"""
from __future__ import annotations

import json
import hashlib
import secrets
import string
from dataclasses import dataclass
from typing import Protocol

from reprise.chat.spec import ToolTag
from reprise.chat.tool_scan import Header, JsonEnd, Scan, held_prefix


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One parsed call; `arguments` is JSON text (for JSON formats, the exact text the model wrote)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """A finished output: its content (None when empty) and its calls in order."""

    content: str | None
    tool_calls: list[ToolCall]


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of call `index`: the first piece of a call carries `id` and `name`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def openai(self) -> dict:
        """OpenAI's `delta.tool_calls[i]` object."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True, slots=True)
class Delta:
    """Exactly one of `content` and `tool_call` is set."""

    content: str | None = None
    tool_call: ToolCallDelta | None = None


def call_id(seed: str | None, num_chars: int = 24, prefix: str = "call_") -> str:
    """A tool-call id: `prefix` and `num_chars` letters and digits, random, or derived from `seed`
    (so every parse of one output names its calls alike: the response, the stream, the memory)."""
    alphabet = string.ascii_letters + string.digits
    if seed is None:
        return prefix + "".join(secrets.choice(alphabet) for _ in range(num_chars))
    number = int.from_bytes(hashlib.sha256(seed.encode()).digest(), "big")
    return prefix + "".join(alphabet[number // len(alphabet) ** i % len(alphabet)] for i in range(num_chars))


class CallSyntax(Protocol):
    """What a stream needs from a format: where calls open, how a call's header and the markup
    after its arguments read, and how its ids look."""

    openers: tuple[str, ...]

    def header(self, text: str, continued: bool) -> Header | Scan:
        """The header of a call at the start of `text`: at an opener, or (`continued`) right where
        a sibling call may follow the previous one (see `trailer`)."""

    def trailer(self, text: str, header: Header, final: bool) -> tuple[int, bool] | Scan:
        """How much of `text` (right after the arguments) is this call's closing markup, and
        whether a sibling call follows it directly; `final`: no more text will come."""

    def new_call_id(self, seed: str | None) -> str: ...


class ToolStream:
    """The streaming parser of one output: `feed` pieces, then `finish` once (see the module doc)."""

    def __init__(self, syntax: CallSyntax, tools: list[dict] | None, seed: str | None = None):
        """`seed` (the request's id) makes the call ids a function of the output; None: random."""
        self.syntax = syntax
        self._seed = seed
        self.schemas = {tool["function"]["name"]: tool["function"].get("parameters") or {}
                        for tool in tools or () if "function" in tool}
        self._buffer = ""
        self._handler = self._content
        self._pending_ws = ""          # trailing whitespace of content: dropped if a call follows
        self._drop_ws = False          # just after a call: leading whitespace is markup
        self._header: Header | None = None
        self._continued = False
        self._json_end = JsonEnd()
        self._num_calls = 0
        self._out: list[Delta] = []

    def feed(self, text: str) -> list[Delta]:
        self._buffer += text
        return self._run(final=False)

    def finish(self) -> list[Delta]:
        """Decide whatever is held: the output has ended."""
        return self._run(final=True)

    def _run(self, final: bool) -> list[Delta]:
        while self._handler(final):
            pass
        out, self._out = coalesce(self._out), []
        return out

    def _take(self, size: int) -> str:
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken

    def _emit_content(self, text: str) -> None:
        full = self._pending_ws + text
        body = full.rstrip()
        self._pending_ws = full[len(body):]
        if body:
            self._out.append(Delta(content=body))

    def _emit_arguments(self, text: str) -> None:
        if text:
            self._out.append(Delta(tool_call=ToolCallDelta(self._num_calls - 1, arguments=text)))

    def _content(self, final: bool) -> bool:
        """Handlers return True when they made progress, False when they wait for more text."""
        if self._drop_ws:
            self._buffer = self._buffer.lstrip()
            self._drop_ws = not self._buffer
        found = [(at, opener) for opener in self.syntax.openers if (at := self._buffer.find(opener)) >= 0]
        if found:
            at, _ = min(found)
            self._emit_content(self._take(at))
            self._handler = self._open
            return True
        keep = 0 if final else held_prefix(self._buffer, self.syntax.openers)
        self._emit_content(self._take(len(self._buffer) - keep))
        if final and self._pending_ws:
            self._out.append(Delta(content=self._pending_ws))
            self._pending_ws = ""
        return False

    def _open(self, final: bool) -> bool:
        header = self.syntax.header(self._buffer, self._continued)
        if header is Scan.NEED and not final:
            return False
        continued, self._continued = self._continued, False
        self._handler = self._content
        if header is Scan.NEED:     # the output ended inside a call's header: unfinished markup, dropped
            self._buffer, self._pending_ws = "", ""
            return True
        if isinstance(header, Scan):
            if not continued:       # not a call after all: the opener is text
                opener = next(o for o in self.syntax.openers if self._buffer.startswith(o))
                self._emit_content(self._take(len(opener)))
            return True
        self._take(header.end)
        self._pending_ws, self._header = "", header
        self._num_calls += 1
        self._out.append(Delta(tool_call=ToolCallDelta(
            self._num_calls - 1, self.syntax.new_call_id(self._call_seed()), header.name)))
        self._start_arguments()
        return True

    def _call_seed(self) -> str | None:
        return None if self._seed is None else f"{self._seed}/{self._num_calls}"

    def _start_arguments(self) -> None:
        self._json_end = JsonEnd()
        self._handler = self._arguments

    def _arguments(self, final: bool) -> bool:
        """JSON arguments, sent as written up to the bracket that closes them."""
        if not self._buffer:
            return False
        end = self._json_end.scan(self._buffer)
        self._emit_arguments(self._take(len(self._buffer) if end is None else end))
        if end is not None:
            self._handler = self._trailer
        return True

    def _trailer(self, final: bool) -> bool:
        result = self.syntax.trailer(self._buffer, self._header, final)
        if result is Scan.NEED and not final:
            return False
        consumed, continued = (len(self._buffer), False) if isinstance(result, Scan) else result
        self._take(consumed)
        self._continued, self._drop_ws = continued, True
        self._handler = self._open if continued else self._content
        return True


class ToolFormat:
    """One way models write tool calls (subclasses set the markup); instances are stateless.

    `parse` reads a finished output, `stream` a growing one (their results agree, see the module
    doc), `tags` says how each tool's call is written for constrained decoding.
    """

    name = ""
    openers: tuple[str, ...] = ()
    trigger = ""                  # what opens a call in free text, for ToolTag
    end = ""                      # what follows the arguments, for ToolTag
    stream_class: type[ToolStream] = ToolStream

    def stream(self, tools: list[dict] | None, seed: str | None = None) -> ToolStream:
        return self.stream_class(self, tools, seed)

    def parse(self, text: str, tools: list[dict] | None, seed: str | None = None) -> ParsedOutput:
        stream = self.stream(tools, seed)
        return collect(stream.feed(text) + stream.finish())

    def tags(self, tools: list[dict] | None) -> tuple[ToolTag, ...]:
        """One tag per tool: begin up to where the arguments' JSON starts, their schema, end."""
        return tuple(ToolTag(self.trigger, self.begin(tool["function"]["name"]),
                             self.arguments_grammar(tool["function"]), self.end)
                     for tool in tools or () if "function" in tool)

    def begin(self, name: str) -> str:
        raise NotImplementedError

    def arguments_grammar(self, function: dict) -> str:
        return json.dumps(function.get("parameters") or {"type": "object"}, ensure_ascii=False)

    def new_call_id(self, seed: str | None) -> str:
        return call_id(seed)


def coalesce(deltas: list[Delta]) -> list[Delta]:
    """Adjacent content joined; adjacent pieces of the same call joined."""
    out: list[Delta] = []
    for delta in deltas:
        last = out[-1] if out else None
        if last is not None and last.content is not None and delta.content is not None:
            out[-1] = Delta(content=last.content + delta.content)
        elif (last is not None and last.tool_call is not None and delta.tool_call is not None
              and last.tool_call.index == delta.tool_call.index and delta.tool_call.id is None):
            head = last.tool_call
            out[-1] = Delta(tool_call=ToolCallDelta(head.index, head.id, head.name,
                                                    head.arguments + delta.tool_call.arguments))
        else:
            out.append(delta)
    return out


def collect(deltas: list[Delta]) -> ParsedOutput:
    """The finished output that a stream's deltas add up to."""
    content = "".join(delta.content for delta in deltas if delta.content is not None)
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        piece = delta.tool_call
        if piece is not None:
            calls.setdefault(piece.index, [piece.id, piece.name, ""])[2] += piece.arguments
    return ParsedOutput(content or None, [ToolCall(*calls[index]) for index in sorted(calls)])
