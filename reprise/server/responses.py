"""Response bodies and server-sent event streams, in OpenAI's shapes.

A job has one choice per engine request: `n` choices of each prompt, in a row. Chat replies are
read (reasoning, tool calls) by the turn's ReplyReader: a reply with calls has `tool_calls` and
finish_reason "tool_calls", and its markup never reaches `content`.

Streams: chat first sends each choice's `delta: {role: "assistant"}`; then content, reasoning
and tool-call deltas (no usage field); each choice's last chunk carries its finish_reason. With
`stream_options.include_usage`, one more chunk with `choices: []` carries the usage, once. Then
`data: [DONE]`. With `cache_report`, the cache object rides on the request's final chunk: the
usage chunk if there is one, else the last finish chunk. Logprobs ride on the chunk of the
tokens they score.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from reprise.engine.async_engine import RequestStream
from reprise.engine.request import RequestOutput
from reprise.server.errors import sse_error, stream_failure
from reprise.server.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs
from reprise.server.prompt_blocks import block_report, chat_blocks, locate
from reprise.server.protocol import CacheReport, Usage
from reprise.server.serving import Job, Serving

DONE = "data: [DONE]\n\n"


def response_body(serving: Serving, job: Job, outputs: list[RequestOutput]) -> dict:
    """The non-streaming response: one choice per engine request, usage always, cache when asked."""
    tokenizer = serving.tokenizer
    choices = []
    for index, output in enumerate(outputs):
        if job.chat:
            reply = job.turn.parse(output)
            logprobs = chat_logprobs(tokenizer, output.logprobs) if output.logprobs is not None else None
            choices.append({"index": index, "message": reply.message(), "logprobs": logprobs,
                            "finish_reason": _reason(output, bool(reply.tool_calls))})
        else:
            echo = job.echo[index // job.n] if job.echo is not None else ""
            choices.append({"index": index, "text": echo + output.text,
                            "logprobs": _completion_logprobs(serving, job, output, echo=bool(echo)),
                            "finish_reason": _reason(output, False)})
        if output.prompt_logprobs is not None and not job.echo:     # vLLM's field, per choice
            choices[-1]["prompt_logprobs"] = prompt_logprobs(tokenizer, output.prompt_logprobs)
    body = _envelope(job, "chat.completion" if job.chat else "text_completion", choices)
    body["usage"] = Usage.of(outputs, job.n).model_dump()
    if job.cache_report:
        body["cache"] = _cache_report(serving, job, outputs)
    return body


async def event_stream(serving: Serving, job: Job, streams: list[RequestStream]) -> AsyncIterator[str]:
    """The SSE body of a streaming request. Engine failures become one error event, then [DONE]."""
    final: dict[int, RequestOutput] = {}
    readers = [job.turn.reader(job.request_id(index)) for index in range(len(job.prompts))] if job.chat else None
    try:
        for index in range(len(job.prompts)):
            if job.chat:
                yield _chunk(job, [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}])
            elif job.echo is not None:
                yield _chunk(job, [_text_choice(index, job.echo[index // job.n], None, None)])
        async for index, output in serving.stream(job, streams):
            if output.finished:
                final[index] = output
            for chunk in _output_chunks(serving, job, index, output, readers, final):
                yield chunk
        if job.include_usage:
            yield _chunk(job, [], **_extras(serving, job, final, usage=True))
    except Exception as error:          # noqa: BLE001 - headers are sent: report in the stream, then end it
        yield sse_error(stream_failure(job.id, error, serving.config.log_prompts))
    yield DONE


def _output_chunks(serving: Serving, job: Job, index: int, output: RequestOutput, readers, final) -> list[str]:
    """The chunks for one output delta of choice `index`: its text pieces, then (when it is the
    last) the finish chunk, which also carries the job's extras when it is the last of all."""
    logprobs = _delta_logprobs(serving, job, output)
    if not job.chat:
        pieces = [_text_choice(index, output.delta_text, logprobs, None)] if output.delta_text or logprobs else []
    else:
        reader = readers[index]
        deltas = reader.feed(output.delta_text) + (reader.finish() if output.finished else [])
        if logprobs is not None and not deltas:
            deltas = [{}]
        pieces = [{"index": index, "delta": delta, "logprobs": logprobs if i == 0 else None, "finish_reason": None}
                  for i, delta in enumerate(deltas)]
    chunks = [_chunk(job, [piece]) for piece in pieces]
    if output.finished:
        last = len(final) == len(job.prompts) and not job.include_usage
        calls = job.chat and readers[index].num_tool_calls > 0
        finish = ({"index": index, "delta": {}, "logprobs": None, "finish_reason": _reason(output, calls)}
                  if job.chat else _text_choice(index, "", None, _reason(output, False)))
        chunks.append(_chunk(job, [finish], **(_extras(serving, job, final, usage=False) if last else {})))
    return chunks


def _delta_logprobs(serving: Serving, job: Job, output: RequestOutput) -> dict | None:
    scored = output.delta_logprobs
    if not scored:
        return None
    if job.chat:
        return chat_logprobs(serving.tokenizer, scored)
    offset = len(output.text) - len(output.delta_text)
    return completion_logprobs(serving.tokenizer, scored, offset)


def _completion_logprobs(serving: Serving, job: Job, output: RequestOutput, echo: bool) -> dict | None:
    """Logprobs of the generated tokens, after the prompt's (the first scored None) when echoed."""
    if output.logprobs is None:
        return None
    if echo and output.prompt_logprobs is not None:
        return completion_logprobs(serving.tokenizer, output.logprobs, 0, output.prompt_logprobs,
                                   output.prompt_token_ids)
    return completion_logprobs(serving.tokenizer, output.logprobs, 0)


def _extras(serving: Serving, job: Job, final: dict[int, RequestOutput], usage: bool) -> dict:
    outputs = [final[index] for index in sorted(final)]
    extras = {"usage": Usage.of(outputs, job.n).model_dump()} if usage else {}
    if job.cache_report:
        extras["cache"] = _cache_report(serving, job, outputs)
    return extras


def _cache_report(serving: Serving, job: Job, outputs: list[RequestOutput]) -> dict:
    """The cache report of the job's prompts (their first choices); for chat, in the client's terms:
    the block (system, tool, message) where reuse stopped and why (prompt_blocks.block_report)."""
    report = CacheReport.of(outputs[::job.n])
    if not job.chat:
        return report.model_dump()
    turn = job.turn
    spans = locate(turn.prompt.rendered, chat_blocks(turn.messages, turn.tools))
    return block_report(report, serving.tokenizer, turn.prompt, spans)


def _text_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def _chunk(job: Job, choices: list[dict], **extras) -> str:
    body = _envelope(job, "chat.completion.chunk" if job.chat else "text_completion", choices)
    body.update(extras)
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _envelope(job: Job, kind: str, choices: list[dict]) -> dict:
    return {"id": job.id, "object": kind, "created": job.created, "model": job.model, "choices": choices}


def _reason(output: RequestOutput, tool_calls: bool) -> str | None:
    if output.finish_reason is None:
        return None
    return "tool_calls" if tool_calls and output.finish_reason.value == "stop" else output.finish_reason.value
