"""Logprobs in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}`
and text completions' `{tokens, token_logprobs, top_logprobs, text_offset}`.

A token's text is its own decoding; a token that holds part of a multi-byte character decodes to
U+FFFD, as in other servers, while `bytes` (chat) are the token's own bytes when it has them.
"""
from __future__ import annotations

from collections.abc import Sequence

from reprise.engine.request import TokenLogprob
from reprise.loader import Tokenizer


def chat_logprobs(tokenizer: Tokenizer, scored: Sequence[TokenLogprob]) -> dict:
    return {"content": [{**_entry(tokenizer, item.token_id, item.logprob),
                         "top_logprobs": [_entry(tokenizer, token, logprob) for token, logprob in item.top]}
                        for item in scored]}


def completion_logprobs(tokenizer: Tokenizer, scored: Sequence[TokenLogprob], offset: int,
                        prompt_scored: Sequence[TokenLogprob | None] = (), prompt_ids: Sequence[int] = ()) -> dict:
    """The generated tokens' logprobs, their text starting at character `offset`; with `prompt_scored`
    (echo), the prompt's tokens first (its first token has no logprob: null)."""
    tokens, values, tops, offsets = [], [], [], []
    items = [(token, entry) for token, entry in zip(prompt_ids, prompt_scored)]
    items += [(entry.token_id, entry) for entry in scored]
    for token, entry in items:
        text = _text(tokenizer, token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(entry.logprob if entry is not None else None)
        tops.append({_text(tokenizer, t): lp for t, lp in entry.top} if entry is not None else None)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(tokenizer: Tokenizer, scored: Sequence[TokenLogprob | None]) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first: null), token id -> {logprob,
    decoded_token} for the token itself and the top ones at its position."""
    return [None if entry is None else {
        str(token): {"logprob": logprob, "decoded_token": _text(tokenizer, token)}
        for token, logprob in ((entry.token_id, entry.logprob), *entry.top)} for entry in scored]


def _entry(tokenizer: Tokenizer, token: int, logprob: float) -> dict:
    text = _text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}


def _text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])
