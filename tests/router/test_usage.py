"""The router reads reported cached tokens from the three APIs' usage, whole bodies and streams."""
from __future__ import annotations

import json

from reprise.router.metrics import UsageReader


def read(chunks: list[bytes], streaming: bool) -> int | None:
    reader = UsageReader(streaming)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.finish()


def test_chat_completion_body():
    body = json.dumps({"usage": {"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 32}}}).encode()
    assert read([body[:10], body[10:]], streaming=False) == 32


def test_chat_stream_with_usage_split_across_chunks():
    stream = (b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
              b'data: {"choices": [], "usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 8}}}\n\n'
              b"data: [DONE]\n\n")
    assert read([stream[i:i + 7] for i in range(0, len(stream), 7)], streaming=True) == 8


def test_messages_and_responses_spellings():
    messages = json.dumps({"usage": {"input_tokens": 5, "cache_read_input_tokens": 48}}).encode()
    assert read([messages], streaming=False) == 48
    started = b'event: message_start\ndata: {"type": "message_start", "message": {"usage": {"cache_read_input_tokens": 16}}}\n\n'
    assert read([started], streaming=True) == 16
    completed = (b'event: response.completed\ndata: {"type": "response.completed", "response": {"usage": '
                 b'{"input_tokens_details": {"cached_tokens": 64}}}}\n\n')
    assert read([completed], streaming=True) == 64


def test_no_usage_is_none():
    assert read([b'{"error": {"message": "no"}}'], streaming=False) is None
    assert read([b"data: [DONE]\n\n"], streaming=True) is None
