"""Anthropic Messages responses: the message body and the SSE event sequence, from a chat job.

`AnthropicAPI.exchange(body, salt)` converts the body (anthropic.py), builds the chat job on the
shared Serving (template, reply memory, engine, cache) and returns an `Exchange`, which renders
the job's output as a message (`body`) or as Anthropic's events (`events`):

    message_start (usage so far: the prompt's split; sent once the prompt is admitted, so the
                   cache read is known), then per content block (thinking, text, tool_use, in the
                   order the reply writes them): content_block_start, content_block_delta
                   (thinking_delta, text_delta, input_json_delta), content_block_stop; then
    message_delta (stop_reason, stop_sequence, the whole usage), message_stop.

Retention: each `cache_control` breakpoint pins the prompt up to its end for its TTL ("5m" or
"1h"; the job's `pins`, which the engine keeps once the request ends).

An error after the stream started is one `error` event. With `cache_report`, the message (in a
stream, message_start's message) carries `cache`: prompt_blocks.block_report plus `breakpoints`,
the token position and TTL of each `cache_control` the client marked.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from reprise.engine.async_engine import RequestStream
from reprise.engine.request import FinishReason, RequestOutput
from reprise.server.anthropic import ContentBlock, MessagesPrompt, MessagesRequest, chat_request
from reprise.server.anthropic_cache import Fingerprint, Record, Records, diagnose, fingerprint, message_digest, usage
from reprise.server.config import tenant_cache_salt
from reprise.server.errors import error_body, stream_failure
from reprise.server.prompt_blocks import Breakpoint, Span, block_report, breakpoints, locate
from reprise.server.protocol import CacheReport
from reprise.server.serving import Job, Serving

TTL_SECONDS = {"5m": 300, "1h": 3600}


class AnthropicAPI:
    """The Messages API over one Serving; keeps the diagnostics records."""

    def __init__(self, serving: Serving):
        self.serving = serving
        self.records = Records()

    def exchange(self, body: MessagesRequest, tenant_salt: str | None) -> Exchange:
        chat, blocks = chat_request(body)
        job = self.serving.chat_job(chat, tenant_salt)
        job = replace(job, id=f"msg_{uuid.uuid4().hex[:24]}")
        spans = locate(job.turn.prompt.rendered, blocks)
        points = breakpoints(self.serving.tokenizer, job.turn.prompt, spans, blocks)
        job = replace(job, pins=tuple((point.num_tokens, TTL_SECONDS[point.block.ttl]) for point in points))
        previous = body.diagnostics.previous_message_id if body.diagnostics else None
        return Exchange(self, job, body, spans, points, previous)

    def count_tokens(self, body: MessagesPrompt, tenant_salt: str | None) -> dict:
        chat, _ = chat_request(body)
        self.serving.check_model(chat.model)
        return {"input_tokens": len(self.serving.chats.turn(chat, self.serving.replies, _salt(chat, tenant_salt))
                                    .prompt.ids)}


@dataclass
class Exchange:
    api: AnthropicAPI
    job: Job
    request: MessagesRequest
    spans: list[Span]
    breakpoints: list[Breakpoint]
    previous_id: str | None

    @property
    def breakpoint(self) -> int | None:
        """Where the last breakpoint ends, in tokens; None without one."""
        return max((point.num_tokens for point in self.breakpoints), default=None)

    def body(self, outputs: list[RequestOutput]) -> dict:
        """The non-streaming message."""
        output = outputs[0]
        reply = self.job.turn.parse(output)
        content = []
        if reply.reasoning is not None:
            content.append({"type": "thinking", "thinking": reply.reasoning, "signature": ""})
        if reply.content:
            content.append({"type": "text", "text": reply.content})
        content += [_tool_use(call["id"], call["function"]["name"], call["function"]["arguments"])
                    for call in reply.tool_calls]
        message = self._message(output, content, bool(reply.tool_calls))
        self._remember(output, content)
        return message

    async def events(self, streams: list[RequestStream]) -> AsyncIterator[str]:
        """The SSE body (see the module doc)."""
        serving, job = self.api.serving, self.job
        reader = job.turn.reader(job.request_id(0))
        blocks = ContentBlockStream()
        started = False
        try:
            async for _, output in serving.stream(job, streams):
                if not started:         # the first output: the prompt is admitted, its cache read known
                    yield _event("message_start", {"message": self._message(output, [], False, finished=False)})
                    started = True
                for delta in reader.feed(output.delta_text) + (reader.finish() if output.finished else []):
                    for event in blocks.feed(delta):
                        yield event
                if output.finished:
                    for event in blocks.close():
                        yield event
                    message = self._message(output, [], reader.num_tool_calls > 0)
                    self._remember(output, blocks.content)
                    delta = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
                    yield _event("message_delta", {"delta": delta, "usage": message["usage"]})
                    yield _event("message_stop", {})
        except Exception as error:      # noqa: BLE001 - headers are sent: report in the stream
            failure = stream_failure(job.id, error, serving.config.log_prompts)
            yield _event("error", error_body(failure.status, failure.message, path="/v1/messages"))

    def _message(self, output: RequestOutput, content: list[dict], calls: bool, finished: bool = True) -> dict:
        serving, job = self.api.serving, self.job
        prompt_ids = output.prompt_token_ids
        num_output = len(output.token_ids) if finished else 0
        stop_reason, stop_sequence = _stop(serving, job, output, calls) if finished else (None, None)
        message = {"id": job.id, "type": "message", "role": "assistant", "model": job.model, "content": content,
                   "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                   "usage": usage(len(prompt_ids), output.cached_tokens, self.breakpoint, num_output)}
        if self.previous_id is not None:
            previous = self.api.records.get(job.salt, self.previous_id)
            message["diagnostics"] = diagnose(previous, self._fingerprint(), output.cached_tokens, len(prompt_ids))
        if job.cache_report:
            message["cache"] = self._cache_report(output)
        return message

    def _cache_report(self, output: RequestOutput) -> dict:
        tokenizer, prompt = self.api.serving.tokenizer, self.job.turn.prompt
        report = block_report(CacheReport.of([output]), tokenizer, prompt, self.spans)
        report["breakpoints"] = [{"block": point.block.kind, "index": point.block.index, "tokens": point.num_tokens,
                                  "ttl": point.block.ttl} for point in self.breakpoints]
        return report

    def _fingerprint(self) -> Fingerprint:
        return fingerprint(self.request, self.job.model)

    def _remember(self, output: RequestOutput, content: list[dict]) -> None:
        if output.finish_reason is FinishReason.ABORT:
            return
        current = self._fingerprint()
        reply = message_digest("assistant", [_block(part) for part in content])
        record = Record(replace(current, messages=(*current.messages, reply)),
                        len(output.prompt_token_ids) + len(output.token_ids) - 1)
        self.api.records.put(self.job.salt, self.job.id, record)


class ContentBlockStream:
    """ReplyReader deltas -> content block events (start, deltas, stop); `content` holds the
    blocks as the message would (a tool_use's `input` parsed when its block stops)."""

    def __init__(self):
        self.content: list[dict] = []
        self._kind: str | None = None
        self._arguments = ""

    def feed(self, delta: dict) -> list[str]:
        if "reasoning_content" in delta:
            return self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}) + \
                self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]})
        if "content" in delta:
            return self._open("text", {"type": "text", "text": ""}) + \
                self._delta({"type": "text_delta", "text": delta["content"]})
        events = []
        for piece in delta["tool_calls"]:
            if piece.get("id") is not None:
                events += self.close()
                events += self._open("tool_use", {"type": "tool_use", "id": piece["id"],
                                                  "name": piece["function"]["name"], "input": {}})
            if piece["function"].get("arguments"):
                events += self._delta({"type": "input_json_delta", "partial_json": piece["function"]["arguments"]})
        return events

    def close(self) -> list[str]:
        if self._kind is None:
            return []
        if self._kind == "tool_use":
            self.content[-1]["input"] = _input(self._arguments)
        self._kind, self._arguments = None, ""
        return [_event("content_block_stop", {"index": len(self.content) - 1})]

    def _open(self, kind: str, block: dict) -> list[str]:
        if self._kind == kind and kind != "tool_use":
            return []
        events = self.close()
        self.content.append(dict(block))
        self._kind = kind
        return events + [_event("content_block_start", {"index": len(self.content) - 1, "content_block": block})]

    def _delta(self, delta: dict) -> list[str]:
        block = self.content[-1]
        for field, key in (("thinking", "thinking"), ("text", "text")):
            if delta["type"] == f"{field}_delta":
                block[key] += delta[key]
        if delta["type"] == "input_json_delta":
            self._arguments += delta["partial_json"]
        return [_event("content_block_delta", {"index": len(self.content) - 1, "delta": delta})]


def _stop(serving: Serving, job: Job, output: RequestOutput, calls: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence): tool_use, max_tokens, stop_sequence (the one that matched),
    or end_turn."""
    if output.finish_reason is FinishReason.LENGTH:
        return "max_tokens", None
    if calls:
        return "tool_use", None
    stop_ids = serving.tokenizer.eos_token_ids | set(job.params[0].stop_token_ids)
    if output.token_ids and output.token_ids[-1] not in stop_ids:
        tail = serving.tokenizer.decode(output.token_ids, skip_special_tokens=True)[len(output.text):]
        matched = next((stop for stop in job.params[0].stop or () if stop in tail), None)
        if matched is not None:
            return "stop_sequence", matched
    return "end_turn", None


def _tool_use(call_id: str, name: str, arguments: str) -> dict:
    return {"type": "tool_use", "id": call_id, "name": name, "input": _input(arguments)}


def _input(arguments: str) -> dict:
    """A call's input; {} when the arguments were cut short (max_tokens) or are not an object."""
    try:
        parsed = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _block(part: dict) -> ContentBlock:
    return ContentBlock.model_validate(part)


def _salt(chat, tenant_salt: str | None) -> str | None:
    return tenant_cache_salt(tenant_salt, chat.cache_salt)


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"
