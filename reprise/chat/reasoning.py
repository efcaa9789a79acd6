"""Reasoning in model output: `<think>...</think>` (Qwen3, DeepSeek-R1, SmolLM3), whole and streamed.

The output is reasoning when it opens with `<think>` (after whitespace), or when the prompt
already opened it (the generation prompt ends with `<think>`: then only `</think>` appears, and
an output that never closes it is all reasoning). Reasoning ends at `</think>`; what follows is
content, its leading newlines stripped (as Qwen3's template writes `</think>\\n\\n`). An output
that does not open with reasoning is all content, tags included. Reasoning loses its newlines
at both ends (the template strips them when it renders reasoning back).

A stream holds back only what is undecided: the start of an output that could still be
`<think>`, the end of reasoning that could still be `</think>`, and newlines that may turn out
to end the reasoning or start the content. As with tool calls, any split of an output gives
the same text once the deltas are concatenated, and `parse` is `feed(text) + finish()` joined.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from reprise.chat.tool_scan import held_prefix


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Exactly one of the fields is set."""

    reasoning: str | None = None
    content: str | None = None


@dataclass(frozen=True, slots=True)
class ReasoningOutput:
    """A finished output split in two; an empty part is None."""

    reasoning: str | None
    content: str | None


class _Part(Enum):
    START = "start"            # nothing decided yet: `<think>` may open the output
    REASONING = "reasoning"
    AFTER = "after"            # just past `</think>`: newlines are dropped
    CONTENT = "content"


class ReasoningParser:
    """The reasoning between `start` and `end` tags."""

    def __init__(self, start: str = "<think>", end: str = "</think>"):
        self.start, self.end = start, end

    def opens_in_reasoning(self, prompt: str) -> bool:
        """Whether a prompt (rendered with its generation prompt) leaves the output inside reasoning."""
        return prompt.rstrip().endswith(self.start)

    def stream(self, in_reasoning: bool = False) -> ReasoningStream:
        return ReasoningStream(self, in_reasoning)

    def parse(self, text: str, in_reasoning: bool = False) -> ReasoningOutput:
        stream = self.stream(in_reasoning)
        deltas = stream.feed(text) + stream.finish()
        reasoning = "".join(d.reasoning for d in deltas if d.reasoning is not None)
        content = "".join(d.content for d in deltas if d.content is not None)
        return ReasoningOutput(reasoning or None, content or None)


class ReasoningStream:
    """One output's reasoning and content as it grows: `feed` pieces, then `finish` once."""

    def __init__(self, parser: ReasoningParser, in_reasoning: bool):
        self._start, self._end = parser.start, parser.end
        self._part = _Part.REASONING if in_reasoning else _Part.START
        self._buffer = ""
        self._newlines = ""        # trailing newlines of the reasoning, dropped if it ends there
        self._leading = True       # reasoning has not started: its leading newlines are dropped
        self._out: list[ReasoningDelta] = []

    def feed(self, text: str) -> list[ReasoningDelta]:
        self._buffer += text
        return self._run(final=False)

    def finish(self) -> list[ReasoningDelta]:
        return self._run(final=True)

    def _run(self, final: bool) -> list[ReasoningDelta]:
        handlers = {_Part.START: self._opening, _Part.REASONING: self._reasoning,
                    _Part.AFTER: self._after, _Part.CONTENT: self._content}
        while self._buffer and handlers[self._part](final):
            pass
        out, self._out = self._out, []
        return out

    def _opening(self, final: bool) -> bool:
        """Handlers return True when they made progress, False when they wait for more text."""
        body = self._buffer.lstrip()
        if body.startswith(self._start):
            self._buffer = body[len(self._start):]
            self._part = _Part.REASONING
            return True
        if not final and self._start.startswith(body):
            return False
        self._part = _Part.CONTENT
        return True

    def _reasoning(self, final: bool) -> bool:
        if self._leading:
            self._buffer = self._buffer.lstrip("\n")
            self._leading = not self._buffer
        at = self._buffer.find(self._end)
        if at >= 0:
            self._emit_reasoning(self._buffer[:at])
            self._buffer, self._newlines = self._buffer[at + len(self._end):], ""
            self._part = _Part.AFTER
            return True
        keep = 0 if final else held_prefix(self._buffer, (self._end,))
        self._emit_reasoning(self._buffer[:len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return False

    def _emit_reasoning(self, text: str) -> None:
        full = self._newlines + text
        body = full.rstrip("\n")
        self._newlines = full[len(body):]
        if body:
            self._out.append(ReasoningDelta(reasoning=body))

    def _after(self, final: bool) -> bool:
        self._buffer = self._buffer.lstrip("\n")
        if self._buffer:
            self._part = _Part.CONTENT
        return bool(self._buffer)

    def _content(self, final: bool) -> bool:
        self._out.append(ReasoningDelta(content=self._buffer))
        self._buffer = ""
        return False


REASONING_PARSERS = {"qwen3": ReasoningParser, "deepseek_r1": ReasoningParser}


def choose_reasoning_parser(template: str | None, override: str | None = None) -> ReasoningParser | None:
    """`--reasoning-parser NAME`'s parser, else `<think>` reasoning if the template mentions `<think>`,
    else None (the output is all content). ValueError for an unknown name."""
    if override is not None:
        if override not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {override!r}; known: {', '.join(REASONING_PARSERS)}")
        return REASONING_PARSERS[override]()
    return ReasoningParser() if template and "<think>" in template else None
