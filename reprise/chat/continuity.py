"""Token continuity: a conversation's next prompt extends the ids the cache holds for its last one.

A chat client sends each reply back as text. Re-encoding that text often gives other ids than
the model produced ("Hel"+"lo" vs "Hello"), and a tool call or a reasoning reply comes back in
another shape (parsed calls, reasoning dropped), so a prefix-cache match would end inside the
reply. `ReplyMemory` keeps the exact ids of each reply under a key the client sends back (its
text, or its first tool call's id), and `prompt_ids` splices them into the next rendered prompt.

Tenants stay apart: every entry is filed under the request's cache salt, and a lookup sees only
its own salt's entries, so a tenant that sends back another tenant's reply text tokenizes it
exactly as its own tokenizer would.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reprise.chat.tenant_lru import TenantLRU
from reprise.engine.request import FinishReason
from reprise.loader.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class Reply:
    """`text` as it appears in a rendered prompt, and the ids the model generated for it."""

    text: str
    ids: tuple[int, ...]


class ReplyMemory(TenantLRU[Reply]):
    """(salt, key) -> Reply, bounded (see TenantLRU: tenants stay apart)."""

    def __init__(self, capacity: int = 4096):
        super().__init__(capacity)

    def remember(self, salt: str | None, key: str, text: str, ids: Sequence[int]) -> None:
        """`ids` must decode to exactly `text`; empty replies are not kept."""
        if text and ids:
            self.put(salt, key, Reply(text, tuple(ids)))

    def recall(self, salt: str | None, key: str) -> Reply | None:
        return self.get(salt, key)


def reply_key(message: dict) -> str | None:
    """The memory key of an assistant message as a client sends it back: its first tool call's id
    when it has calls, else its content; None for other roles."""
    if message.get("role") != "assistant":
        return None
    calls = message.get("tool_calls")
    if calls:
        call_id = calls[0].get("id")
        return f"tool_call:{call_id}" if call_id else None
    content = message.get("content")
    return content if isinstance(content, str) and content else None


def reply_ids(token_ids: Sequence[int], finish_reason: FinishReason | None, stop_ids: frozenset[int]) -> list[int] | None:
    """The generated ids that spell a finished reply's text: without a final EOS or stop token;
    None when a stop string ended it (the ids then spell more than the text) or it was aborted."""
    ids = list(token_ids)
    if ids and ids[-1] in stop_ids:
        return ids[:-1]
    if finish_reason in (FinishReason.STOP, FinishReason.ABORT):
        return None
    return ids


def suffix_ids(tokenizer: Tokenizer, ids: Sequence[int], text: str) -> list[int] | None:
    """The shortest tail of `ids` that decodes to exactly `text`, or None (the text starts inside a
    token). Decoded length grows as the tail does, so the start is found by bisection."""
    low, high = 0, len(ids)                   # the tail ids[start:] for start in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenizer.decode(ids[middle:], skip_special_tokens=True)) >= len(text):
            low = middle
        else:
            high = middle - 1
    tail = list(ids[low:])
    return tail if tail and tokenizer.decode(tail, skip_special_tokens=True) == text else None


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A rendered chat prompt and its ids."""

    ids: list[int]
    rendered: str


def prompt_ids(tokenizer: Tokenizer, rendered: str, messages: list[dict], memory: ReplyMemory | None,
               salt: str | None = None) -> ChatPrompt:
    """Ids of the `rendered` prompt of `messages`, with remembered replies kept as generated.

    Every message's text is located in order, each search starting where the previous one ended
    (so a reply is not mistaken for an earlier message with the same text). A reply the memory
    recalls is replaced by its remembered ids; the text around it is encoded in pieces cut at
    those points, as the earlier turn's prompt was, so turn N+1's ids start with turn N's prompt
    and reply ids:

        rendered:  | before_1 | reply_1 | before_2 | reply_2 | rest   |
        ids:       | encode   | memory  | encode   | memory  | encode |

    The ids always decode to the rendered text. With no memory, or no recalled reply found, this
    is exactly encode(rendered).
    """
    ids: list[int] = []
    encoded = searched = 0        # rendered[:encoded] is in ids; rendered[:searched] is matched to messages
    for message in messages:
        key = reply_key(message) if memory is not None else None
        reply = memory.recall(salt, key) if key is not None else None
        text = reply.text if reply is not None else message.get("content")
        start = rendered.find(text, searched) if isinstance(text, str) and text else -1
        if start < 0:
            continue
        searched = start + len(text)
        if reply is not None:
            ids += tokenizer.encode(rendered[encoded:start])
            ids += reply.ids
            encoded = searched
    return ChatPrompt(ids + tokenizer.encode(rendered[encoded:]), rendered)


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict], memory: ReplyMemory | None,
                    salt: str | None = None, **template_kwargs) -> list[int]:
    """`prompt_ids` of the chat template rendered over `messages` as they are."""
    return prompt_ids(tokenizer, tokenizer.render_chat(messages, **template_kwargs), messages, memory, salt).ids
