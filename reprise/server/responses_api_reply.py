"""Responses API answers: the response object and its typed SSE events, from a chat job.

`ResponsesAPI.exchange(body, salt)` builds the job (responses_api.py) and returns an `Exchange`
whose `body(outputs)` is the response object and `events(streams)` its stream:

    response.created, response.in_progress; per output item, in the order the reply writes
    them (reasoning, message, function_call): response.output_item.added, its deltas
    (response.reasoning_text.delta; response.content_part.added + response.output_text.delta;
    response.function_call_arguments.delta), their .done events, response.output_item.done;
    then response.completed (response.incomplete when max_output_tokens cut it), whose
    `response` is the whole object, usage included. Every event has a `sequence_number`.

Usage: `input_tokens` (the prompt), `input_tokens_details.cached_tokens` (read from the
cache), `output_tokens`, `output_tokens_details.reasoning_tokens` (the reasoning text's tokens),
`total_tokens`. With `cache_report`, the response has `cache` (prompt_blocks.block_report).
A stored response keeps its conversation for `previous_response_id` once it finishes.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from reprise.engine.async_engine import RequestStream
from reprise.engine.request import FinishReason, RequestOutput
from reprise.server.errors import stream_failure
from reprise.server.prompt_blocks import block_report, locate
from reprise.server.protocol import CacheReport
from reprise.server.reply import ParsedReply
from reprise.server.responses_api import Conversation, Conversations, ResponsesRequest, ResponsesTurn, responses_turn
from reprise.server.serving import Serving


class ResponsesAPI:
    """The Responses API over one Serving; keeps the stored conversations."""

    def __init__(self, serving: Serving):
        self.serving = serving
        self.conversations = Conversations()

    def exchange(self, body: ResponsesRequest, tenant_salt: str | None) -> Exchange:
        turn = responses_turn(self.serving, self.conversations, body, tenant_salt)
        response_id = f"resp_{uuid.uuid4().hex}"
        return Exchange(self, replace(turn, job=replace(turn.job, id=response_id)), body)


@dataclass
class Exchange:
    api: ResponsesAPI
    turn: ResponsesTurn
    request: ResponsesRequest

    @property
    def job(self):
        return self.turn.job

    def body(self, outputs: list[RequestOutput]) -> dict:
        output = outputs[0]
        reply = self.job.turn.parse(output)
        self._keep(output, reply)
        return self._response(output, reply)

    async def events(self, streams: list[RequestStream]) -> AsyncIterator[str]:
        serving, job = self.api.serving, self.job
        reader = job.turn.reader(job.request_id(0))
        items = OutputItemStream(job.id)
        try:
            yield items.event("response.created", response=self._response(None, None))
            yield items.event("response.in_progress", response=self._response(None, None))
            async for _, output in serving.stream(job, streams):
                for delta in reader.feed(output.delta_text) + (reader.finish() if output.finished else []):
                    for event in items.feed(delta):
                        yield event
                if output.finished:
                    for event in items.close():
                        yield event
                    self._keep(output, reader.reply)
                    response = self._response(output, reader.reply)
                    yield items.event(f"response.{response['status']}", response=response)
        except Exception as error:      # noqa: BLE001 - headers are sent: report in the stream
            failure = stream_failure(job.id, error, serving.config.log_prompts)
            yield items.event("error", code=failure.code, message=failure.message, param=failure.param)

    def _response(self, output: RequestOutput | None, reply: ParsedReply | None) -> dict:
        """The response object; in progress (no output yet) when `output` is None."""
        request, job = self.request, self.job
        cut = output is not None and output.finish_reason is FinishReason.LENGTH
        body = {"id": job.id, "object": "response", "created_at": job.created, "model": job.model,
                "status": "in_progress" if output is None else "incomplete" if cut else "completed",
                "output": output_items(job.id, reply) if reply is not None else [],
                "incomplete_details": {"reason": "max_output_tokens"} if cut else None, "error": None,
                "instructions": request.instructions, "previous_response_id": request.previous_response_id,
                "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or ()],
                "tool_choice": _choice(request), "parallel_tool_calls": request.parallel_tool_calls is not False,
                "text": {"format": request.text.format.model_dump(by_alias=True, exclude_none=True)
                         if request.text and request.text.format else {"type": "text"}},
                "max_output_tokens": request.max_output_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "store": request.store is not False, "metadata": request.metadata or {},
                "prompt_cache_key": request.prompt_cache_key,
                "prompt_cache_retention": request.prompt_cache_retention, "usage": None}
        if output is not None:
            body["usage"] = self._usage(output, reply)
            if job.cache_report:
                spans = locate(job.turn.prompt.rendered, self.turn.blocks)
                body["cache"] = block_report(CacheReport.of([output]), self.api.serving.tokenizer, job.turn.prompt,
                                             spans)
        return body

    def _usage(self, output: RequestOutput, reply: ParsedReply) -> dict:
        num_prompt, num_output = len(output.prompt_token_ids), len(output.token_ids)
        reasoning = len(self.api.serving.tokenizer.encode(reply.reasoning)) if reply.reasoning else 0
        return {"input_tokens": num_prompt, "input_tokens_details": {"cached_tokens": output.cached_tokens},
                "output_tokens": num_output, "output_tokens_details": {"reasoning_tokens": min(reasoning, num_output)},
                "total_tokens": num_prompt + num_output}

    def _keep(self, output: RequestOutput, reply: ParsedReply) -> None:
        if self.request.store is False or output.finish_reason is FinishReason.ABORT:
            return
        messages = (*self.turn.conversation, reply.as_history_message())
        conversation = Conversation(messages, (*output.prompt_token_ids, *output.token_ids))
        self.api.conversations.put(self.job.salt, self.job.id, conversation)


def output_items(response_id: str, reply: ParsedReply) -> list[dict]:
    """The output items of a finished reply: reasoning, message, function calls."""
    items = []
    if reply.reasoning is not None:
        items.append(_reasoning_item(response_id, reply.reasoning))
    if reply.content:
        items.append(_message_item(response_id, reply.content))
    items += [_call_item(call["id"], call["function"]["name"], call["function"]["arguments"])
              for call in reply.tool_calls]
    return items


class OutputItemStream:
    """Reader deltas -> typed events, with sequence numbers; one open item at a time."""

    def __init__(self, response_id: str):
        self._response_id = response_id
        self._sequence = 0
        self._items: list[dict] = []
        self._open: dict | None = None

    def event(self, kind: str, **data) -> str:
        body = {"type": kind, "sequence_number": self._sequence, **data}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def feed(self, delta: dict) -> list[str]:
        if "reasoning_content" in delta:
            return self._start("reasoning", lambda: _reasoning_item(self._response_id, "")) + \
                self._add("response.reasoning_text.delta", delta["reasoning_content"], content_index=0)
        if "content" in delta:
            return self._start("message", lambda: _message_item(self._response_id, "")) + \
                self._add("response.output_text.delta", delta["content"], content_index=0, logprobs=[])
        events = []
        for piece in delta["tool_calls"]:
            if piece.get("id") is not None:
                events += self.close()
                events += self._start("function_call", lambda: _call_item(piece["id"], piece["function"]["name"], ""))
            if piece["function"].get("arguments"):
                events += self._add("response.function_call_arguments.delta", piece["function"]["arguments"])
        return events

    def close(self) -> list[str]:
        item = self._open
        if item is None:
            return []
        self._open = None
        index, where = len(self._items) - 1, {"item_id": item["id"], "output_index": len(self._items) - 1}
        item["status"] = "completed"
        if item["type"] == "reasoning":
            events = [self.event("response.reasoning_text.done", **where, content_index=0,
                                 text=item["content"][0]["text"])]
        elif item["type"] == "message":
            part = item["content"][0]
            events = [self.event("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[]),
                      self.event("response.content_part.done", **where, content_index=0, part=part)]
        else:
            events = [self.event("response.function_call_arguments.done", **where, name=item["name"],
                                 arguments=item["arguments"])]
        return events + [self.event("response.output_item.done", output_index=index, item=item)]

    def _start(self, kind: str, make) -> list[str]:
        if self._open is not None and self._open["type"] == kind and kind != "function_call":
            return []
        events = self.close()
        item = make()
        item["status"] = "in_progress"
        self._items.append(item)
        self._open = item
        index = len(self._items) - 1
        events.append(self.event("response.output_item.added", output_index=index, item=json.loads(json.dumps(item))))
        if kind == "message":
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=index,
                                     content_index=0, part=dict(item["content"][0])))
        return events

    def _add(self, kind: str, text: str, **extra) -> list[str]:
        item = self._open
        if item["type"] == "function_call":
            item["arguments"] += text
        else:
            item["content"][0]["text"] += text
        return [self.event(kind, item_id=item["id"], output_index=len(self._items) - 1, delta=text, **extra)]


def _reasoning_item(response_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": f"rs_{response_id[5:]}", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}


def _message_item(response_id: str, text: str) -> dict:
    return {"type": "message", "id": f"msg_{response_id[5:]}", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call_id: str, name: str, arguments: str) -> dict:
    return {"type": "function_call", "id": f"fc_{call_id[5:]}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed"}


def _choice(request: ResponsesRequest):
    choice = request.tool_choice
    return choice.model_dump() if choice is not None and not isinstance(choice, str) else (choice or "auto")
