"""Response bodies and server-sent event streams, in OpenAI's shapes.

Streams: chat first sends each choice's `delta: {role: "assistant"}`; then content chunks (no
usage field); each choice's last chunk carries its finish_reason. With
`stream_options.include_usage`, one more chunk with `choices: []` carries the usage, once. Then
`data: [DONE]`. With `cache_report`, the cache object rides on the request's final chunk: the
usage chunk if there is one, else the last finish chunk.
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from reprise.engine.async_engine import EngineDead, RequestStream
from reprise.engine.request import RequestOutput
from reprise.server.errors import APIError, log_failure, sse_error
from reprise.server.protocol import CacheReport, Usage
from reprise.server.serving import Job, Serving

log = logging.getLogger("reprise")
DONE = "data: [DONE]\n\n"


def response_body(job: Job, outputs: list[RequestOutput]) -> dict:
    """The non-streaming response: one choice per prompt, usage always, cache when asked."""
    if job.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                    "finish_reason": _reason(o)} for i, o in enumerate(outputs)]
    else:
        choices = [{"index": i, "text": o.text, "logprobs": None, "finish_reason": _reason(o)}
                   for i, o in enumerate(outputs)]
    body = _envelope(job, "chat.completion" if job.chat else "text_completion", choices)
    body["usage"] = Usage.of(outputs).model_dump()
    if job.cache_report:
        body["cache"] = CacheReport.of(outputs).model_dump()
    return body


async def event_stream(serving: Serving, job: Job, streams: list[RequestStream]) -> AsyncIterator[str]:
    """The SSE body of a streaming request. Engine failures become one error event, then [DONE]."""
    final: dict[int, RequestOutput] = {}
    try:
        if job.chat:
            for index in range(len(job.prompts)):
                yield _chunk(job, [_choice(job, index, "", None, role=True)])
        async for index, output in serving.stream(job, streams):
            if output.finished:
                final[index] = output
                yield _finish_chunk(job, index, output, final)
            elif output.delta_text:
                yield _chunk(job, [_choice(job, index, output.delta_text, None)])
        if job.include_usage:
            yield _chunk(job, [], **_extras(job, final, usage=True))
    except Exception as error:          # noqa: BLE001 - headers are sent: report in the stream, then end it
        if isinstance(error, (APIError, EngineDead)):       # our own messages: they quote no input
            log.error("stream %s failed: %s", job.id, error)
        else:
            log_failure(f"stream {job.id} failed", error, serving.config.log_prompts)
        yield sse_error(error if isinstance(error, APIError) else APIError(503, f"generation failed: {error}"))
    yield DONE


def _finish_chunk(job: Job, index: int, output: RequestOutput, final: dict[int, RequestOutput]) -> str:
    last = len(final) == len(job.prompts) and not job.include_usage
    extras = _extras(job, final, usage=False) if last else {}
    return _chunk(job, [_choice(job, index, output.delta_text, _reason(output))], **extras)


def _extras(job: Job, final: dict[int, RequestOutput], usage: bool) -> dict:
    outputs = [final[index] for index in sorted(final)]
    extras = {"usage": Usage.of(outputs).model_dump()} if usage else {}
    if job.cache_report:
        extras["cache"] = CacheReport.of(outputs).model_dump()
    return extras


def _choice(job: Job, index: int, text: str, finish_reason: str | None, role: bool = False) -> dict:
    if not job.chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _chunk(job: Job, choices: list[dict], **extras) -> str:
    body = _envelope(job, "chat.completion.chunk" if job.chat else "text_completion", choices)
    body.update(extras)
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _envelope(job: Job, kind: str, choices: list[dict]) -> dict:
    return {"id": job.id, "object": kind, "created": job.created, "model": job.model, "choices": choices}


def _reason(output: RequestOutput) -> str | None:
    return output.finish_reason.value if output.finish_reason is not None else None
