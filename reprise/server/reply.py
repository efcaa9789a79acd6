"""Reading a chat reply: reasoning first (`<think>`), then tool calls in what follows, into the
fields of an OpenAI assistant message, whole or as streaming deltas.

The reader is the one path for both: `read_all(text)` is `feed(text) + finish()`, so a streamed
reply adds up to the non-streamed one by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from reprise.chat.reasoning import ReasoningParser
from reprise.chat.tool_stream import ToolFormat


@dataclass
class ParsedReply:
    """One finished reply. `visible_text` is the raw text after the reasoning (call markup
    included): what the template renders back for it when the history keeps it as written."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)
    visible_text: str = ""

    def message(self) -> dict:
        """The response's `message`."""
        message = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message

    def as_history_message(self) -> dict:
        """The message as an OpenAI client sends it back in the next turn (without the reasoning)."""
        message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message

    @property
    def memory_key(self) -> str | None:
        """What the reply memory files it under: see continuity.reply_key."""
        if self.tool_calls:
            return f"tool_call:{self.tool_calls[0]['id']}"
        return self.content or None


class ReplyReader:
    """Streams one reply's text into OpenAI delta fields: `{"reasoning_content": ...}`,
    `{"content": ...}`, `{"tool_calls": [...]}`."""

    def __init__(self, reasoning: ReasoningParser | None, tool_format: ToolFormat | None, tools: list[dict] | None,
                 in_reasoning: bool, seed: str):
        """`seed`: the engine request's id, from which its calls' ids derive (any reader of the same
        output names them alike)."""
        self._reasoning = reasoning.stream(in_reasoning) if reasoning is not None else None
        self._tools = tool_format.stream(tools, seed) if tool_format is not None else None
        self.reply = ParsedReply()

    @property
    def num_tool_calls(self) -> int:
        return len(self.reply.tool_calls)

    def feed(self, text: str) -> list[dict]:
        if not text:
            return []
        return self._split(self._reasoning.feed(text) if self._reasoning is not None else None, text, final=False)

    def finish(self) -> list[dict]:
        return self._split(self._reasoning.finish() if self._reasoning is not None else None, "", final=True)

    def read_all(self, text: str) -> ParsedReply:
        self.feed(text)
        self.finish()
        return self.reply

    def _split(self, reasoning_deltas, text: str, final: bool) -> list[dict]:
        """Reasoning deltas go out as they are; the content between them goes through the tool parser."""
        out: list[dict] = []
        pieces = reasoning_deltas if reasoning_deltas is not None else [_Content(text)]
        for piece in pieces:
            if piece.reasoning:
                self.reply.reasoning = (self.reply.reasoning or "") + piece.reasoning
                out.append({"reasoning_content": piece.reasoning})
            elif piece.content:
                out += self._content(piece.content, final=False)
        if final:
            out += self._content("", final=True)
        return out

    def _content(self, text: str, final: bool) -> list[dict]:
        self.reply.visible_text += text
        if self._tools is None:
            return self._add_content(text) if text else []
        out = []
        for delta in self._tools.feed(text) if not final else self._tools.finish():
            if delta.content is not None:
                out += self._add_content(delta.content)
            else:
                out.append({"tool_calls": [self._add_call(delta.tool_call)]})
        return out

    def _add_content(self, text: str) -> list[dict]:
        self.reply.content = (self.reply.content or "") + text
        return [{"content": text}]

    def _add_call(self, piece) -> dict:
        calls = self.reply.tool_calls
        if piece.id is not None:
            calls.append({"id": piece.id, "type": "function", "function": {"name": piece.name, "arguments": ""}})
        calls[piece.index]["function"]["arguments"] += piece.arguments
        return piece.openai()


@dataclass(frozen=True)
class _Content:
    content: str
    reasoning: None = None
