"""Where the blocks a client sent (system blocks, tool definitions, message parts) lie in the
prompt's token ids: for Anthropic's `cache_control` breakpoints, and for a `cache` report that
names the block in which the prompt left the cache.

A block is found by its text in the rendered prompt, each kind searched in order from where its
previous block ended (tools and system blocks from the start, as templates put tools before or
after the system text; message parts after the system), so a text repeated in a later block is
not mistaken for an earlier one. A block whose text the template does not render (a dropped
`thinking` block) is not found; a breakpoint on it then falls where the previous block found ends.
The token position of a character offset is the fewest leading ids whose text covers it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from reprise.chat.continuity import ChatPrompt
from reprise.loader import Tokenizer
from reprise.server.protocol import CacheReport

# what a DIVERGED miss means in the client's terms, by the kind of block it happened in
CHANGED = {"system": "system_changed", "tool": "tools_changed", "message": "messages_changed"}


@dataclass(frozen=True, slots=True)
class Block:
    """One block of a request: `kind` ("tool", "system" or "message"), its index in the client's
    list of that kind (a message part carries its message's index), the text the template renders
    for it, and the TTL of the cache breakpoint the client marked on it ("5m", "1h"; None: none)."""

    kind: str
    index: int
    text: str
    ttl: str | None = None

    @property
    def breakpoint(self) -> bool:
        return self.ttl is not None


@dataclass(frozen=True, slots=True)
class Span:
    """A block found in the rendered prompt, at characters [start, end)."""

    block: Block
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Breakpoint:
    """A marked block and the number of prompt tokens up to its end."""

    block: Block
    num_tokens: int


def chat_blocks(messages: list[dict], tools: list[dict] | None) -> list[Block]:
    """The blocks of an OpenAI chat: each tool (its JSON, as templates and the generic format write
    it), then each message by its index: system and developer ones as "system", the others as
    "message" (the text, or each call's arguments)."""
    blocks = [Block("tool", index, json.dumps(tool, ensure_ascii=False)) for index, tool in enumerate(tools or ())]
    for index, message in enumerate(messages):
        kind = "system" if message["role"] in ("system", "developer") else "message"
        texts = [call["function"]["arguments"] for call in message.get("tool_calls") or ()] or [message.get("content")]
        blocks += [Block(kind, index, text) for text in texts if text]
    return blocks


def locate(rendered: str, blocks: list[Block]) -> list[Span]:
    """The blocks found in `rendered` (see the module doc), sorted by where they start."""
    spans: list[Span] = []
    searched = {"tool": 0, "system": 0}
    for block in blocks:
        begin = searched.setdefault(block.kind, searched["system"])      # messages start after the system
        start = rendered.find(block.text, begin) if block.text else -1
        if start < 0:
            continue
        spans.append(Span(block, start, start + len(block.text)))
        searched[block.kind] = start + len(block.text)
    return sorted(spans, key=lambda span: span.start)


def token_position(tokenizer: Tokenizer, ids: list[int], offset: int) -> int:
    """The fewest leading `ids` whose text is at least `offset` characters (bisection: the decoded
    length grows with the number of ids)."""
    low, high = 0, len(ids)
    while low < high:
        middle = (low + high) // 2
        if len(tokenizer.decode(ids[:middle])) >= offset:
            high = middle
        else:
            low = middle + 1
    return low


def breakpoints(tokenizer: Tokenizer, prompt: ChatPrompt, spans: list[Span], blocks: list[Block]) -> list[Breakpoint]:
    """Each marked block, in the client's order, with the token position where it ends (a marked
    block the template does not render: where the last block found before it ends)."""
    ends = {id(span.block): span.end for span in spans}
    points, end = [], 0
    for block in blocks:
        end = ends.get(id(block), end)
        if block.breakpoint:
            points.append(Breakpoint(block, token_position(tokenizer, prompt.ids, end)))
    return points


def block_at(tokenizer: Tokenizer, prompt: ChatPrompt, spans: list[Span], position: int) -> Block | None:
    """The block whose text (or the template text just before it) holds token `position`; None
    past the last block (the generation prompt)."""
    offset = len(tokenizer.decode(prompt.ids[:position]))
    return next((span.block for span in spans if offset < span.end), None)


def block_report(report: CacheReport, tokenizer: Tokenizer, prompt: ChatPrompt, spans: list[Span]) -> dict:
    """The cache report with the block where reuse stopped, in the client's terms: `diverged_block`
    ("system", "tool" or "message"), `diverged_index` (its index in the client's list of that
    kind), and `reason` (tools_changed, system_changed, messages_changed where the prompt left the
    cached sequence; else the miss reason as it is: evicted, salt, no_checkpoint, ...)."""
    body = report.model_dump()
    if report.cached_tokens >= report.prompt_tokens - 1:
        return {**body, "diverged_block": None, "diverged_index": None, "reason": None}
    stopped = report.diverged_at if report.diverged_at is not None else report.cached_tokens
    block = block_at(tokenizer, prompt, spans, stopped)
    reason = report.miss_reason
    if reason == "diverged":
        reason = CHANGED[block.kind] if block is not None else "messages_changed"
    if block is not None and block.kind == "message":
        body["diverged_message"] = block.index
    return {**body, "diverged_block": block.kind if block else None, "diverged_index": block.index if block else None,
            "reason": reason}
