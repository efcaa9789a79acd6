"""Anthropic's cache terms: usage split at the last breakpoint, and cache diagnostics.

Usage, for a prompt of P tokens of which R were read from the cache and whose last
`cache_control` breakpoint ends at token B (none: B = R):

    | read from the cache | computed, up to B          | computed, after B |
    | 0 ............... R | R ........................ B | B ............. P |
      cache_read_input_tokens  cache_creation_input_tokens   input_tokens

so the three add up to P. (reprise caches every prompt, marked or not: reads count whatever the
cache held.)

Diagnostics: for each message it answers, the server keeps (per tenant salt, bounded, least
recently used first out) the request's fingerprints (model, system, tools, the options that shape
the prompt, each message, with the reply appended) and how many tokens of that conversation then
had KV (its prompt and output, less the last sampled token). A request naming it as
`diagnostics.previous_message_id` is compared with it, in cache order: `model_changed`,
`tools_changed`, `system_changed`, then `messages_changed` (the earlier messages are not a
prefix of this request's); `cache_missed_input_tokens` is what this request would have read had
its prefix matched (the previous conversation's tokens, at most this prompt's length less one)
less what it read. Same fingerprints but other options, or fewer tokens read than expected (an
eviction), is `unavailable`; no divergence is null, as the SDK documents.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from reprise.chat.tenant_lru import TenantLRU
from reprise.server.anthropic import ContentBlock, MessagesRequest


@dataclass(frozen=True, slots=True)
class Fingerprint:
    model: str | None
    system: str
    tools: str
    options: str
    messages: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Record:
    fingerprint: Fingerprint
    num_context_tokens: int


class Records(TenantLRU[Record]):
    """(salt, message id) -> Record, bounded (see TenantLRU: tenants stay apart)."""

    def __init__(self, capacity: int = 4096):
        super().__init__(capacity)


def usage(num_prompt: int, num_read: int, breakpoint: int | None, num_output: int) -> dict:
    """Anthropic's usage (see the module doc)."""
    written = max(0, min(breakpoint, num_prompt) - num_read) if breakpoint is not None else 0
    return {"input_tokens": num_prompt - num_read - written, "cache_creation_input_tokens": written,
            "cache_read_input_tokens": num_read, "output_tokens": num_output}


def fingerprint(body: MessagesRequest, model: str) -> Fingerprint:
    system = body.system if isinstance(body.system, str) or body.system is None \
        else [block.text for block in body.system]
    tools = [tool.model_dump(exclude={"cache_control"}, exclude_none=True) for tool in body.tools or ()]
    options = [_dump(body.tool_choice), _dump(body.thinking)]
    messages = tuple(message_digest(message.role, message.content) for message in body.messages)
    return Fingerprint(model, _digest(system), _digest(tools), _digest(options), messages)


def message_digest(role: str, content: str | list[ContentBlock]) -> str:
    """A message as the cache sees it: a string is one text block; cache_control and signatures
    do not count."""
    parts = [ContentBlock(type="text", text=content)] if isinstance(content, str) else content
    return _digest([role, [_part(part) for part in parts]])


def diagnose(previous: Record | None, current: Fingerprint, num_read: int, num_prompt: int) -> dict | None:
    """`diagnostics` of a request (see the module doc)."""
    if previous is None:
        return {"cache_miss_reason": {"type": "previous_message_not_found"}}
    missed = max(0, min(previous.num_context_tokens, num_prompt - 1) - num_read)
    before = previous.fingerprint
    for field, reason in (("model", "model_changed"), ("tools", "tools_changed"), ("system", "system_changed")):
        if getattr(before, field) != getattr(current, field):
            return {"cache_miss_reason": {"type": reason, "cache_missed_input_tokens": missed}}
    if current.messages[:len(before.messages)] != before.messages:
        return {"cache_miss_reason": {"type": "messages_changed", "cache_missed_input_tokens": missed}}
    if before.options != current.options or missed:
        return {"cache_miss_reason": {"type": "unavailable"}}
    return None


def _part(part: ContentBlock) -> dict:
    dumped = part.model_dump(exclude={"cache_control", "signature", "content"}, exclude_none=True)
    if isinstance(part.content, list):
        dumped["content"] = [_part(piece) for piece in part.content]
    elif part.content is not None:
        dumped["content"] = part.content
    return dumped


def _dump(model) -> dict | None:
    return model.model_dump(exclude_none=True) if model is not None else None


def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
