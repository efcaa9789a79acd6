"""From validated request bodies to engine runs: prompts, limits, concurrent generation.

A `Job` is one HTTP request ready to run: its prompts as token ids (several for a text completion
with a list of prompts, run concurrently), its SamplingParams and salt. `Serving.start(job)` admits
it (429 when the waiting queue is full) and queues its prompts in one go, with no await between
the count and the queueing; `Serving.stream(job, streams)` then yields `(choice_index,
RequestOutput)` as tokens come. Closing the streams early aborts every prompt still running, which
returns their blocks to the pool.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import jinja2

from reprise.engine.async_engine import AsyncEngine, EngineDead, RequestStream
from reprise.engine.request import FinishReason, RequestOutput, SamplingParams
from reprise.loader import ReplyMemory, chat_prompt_ids
from reprise.server.config import ServerConfig, tenant_cache_salt
from reprise.server.errors import APIError
from reprise.server.metrics import ServerMetrics
from reprise.server.protocol import (CacheLookupRequest, CacheReport, ChatCompletionRequest, ChatMessage,
                                     CompletionRequest, GenerationRequest)

_TEMPLATE_ERRORS = (jinja2.TemplateError, ValueError, TypeError, KeyError)
RETRY_AFTER_S = 1               # a full queue drains in about a request's time; a short wait is right
log = logging.getLogger("reprise")


@dataclass(frozen=True)
class Job:
    """One API request, ready to run. `chat` selects the chat response shapes."""

    id: str
    created: int
    model: str
    chat: bool
    prompts: list[list[int]]
    params: SamplingParams
    salt: str | None
    stream: bool
    include_usage: bool
    cache_report: bool


class Serving:
    """Turns API requests into engine runs; owns the reply memory that keeps chat tokens continuous."""

    def __init__(self, async_engine: AsyncEngine, metrics: ServerMetrics, config: ServerConfig = ServerConfig()):
        engine = async_engine.engine
        self.async_engine = async_engine
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.metrics = metrics
        self.config = config
        self.replies = ReplyMemory()
        self.model_name = config.served_model_name or engine.model_config.name or _stem(engine.model_path)
        aliases = {self.model_name, "default", str(engine.model_path), engine.config.model}
        self._accepted_names = {name for name in aliases if name}

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self._accepted_names:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           "model", "model_not_found")

    def chat_job(self, body: ChatCompletionRequest, tenant_salt: str | None = None) -> Job:
        """`tenant_salt`: the caller's key-derived salt (--salt-per-key), combined with body.cache_salt."""
        self._check_request(body)
        prompt_ids = self.chat_prompt(body.messages, body.chat_template_kwargs)
        return self._job(body, "chatcmpl", chat=True, prompts=[prompt_ids], tenant_salt=tenant_salt)

    def completion_job(self, body: CompletionRequest, tenant_salt: str | None = None) -> Job:
        self._check_request(body)
        prompts = [self.text_prompt(prompt) for prompt in body.prompts()]
        return self._job(body, "cmpl", chat=False, prompts=prompts, tenant_salt=tenant_salt)

    def chat_prompt(self, messages: list[ChatMessage], template_kwargs: dict | None) -> list[int]:
        rendered = [message.as_template_message() for message in messages]
        try:
            return chat_prompt_ids(self.tokenizer, rendered, self.replies, **(template_kwargs or {}))
        except _TEMPLATE_ERRORS as error:
            raise APIError(400, f"cannot apply the chat template to these messages: {error}", "messages") from error

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            try:
                return self.tokenizer.encode(prompt)
            except (ValueError, TypeError) as error:     # e.g. a lone surrogate, which UTF-8 cannot hold
                raise APIError(400, f"cannot tokenize the prompt: {type(error).__name__}", "prompt") from error
        vocab_size = self.engine.model_config.vocab_size
        bad = next((token for token in prompt if not 0 <= token < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt")
        return list(prompt)

    def _check_request(self, body: GenerationRequest) -> None:
        self.check_model(body.model)
        refused = body.unsupported()
        if refused is not None:
            raise APIError(400, refused[1], refused[0])

    def _job(self, body: GenerationRequest, prefix: str, chat: bool, prompts: list[list[int]],
             tenant_salt: str | None) -> Job:
        max_tokens = self.fit(prompts, body.requested_max_tokens(), "messages" if chat else "prompt")
        job = Job(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), self.model_name, chat, prompts,
                  body.sampling_params(max_tokens), tenant_cache_salt(tenant_salt, body.cache_salt),
                  bool(body.stream), body.include_usage, bool(body.cache_report))
        if self.config.log_prompts:
            for index, prompt_ids in enumerate(prompts):
                log.info("%s prompt %d (%d tokens): %r", job.id, index, len(prompt_ids),
                         self.tokenizer.decode(prompt_ids))
        return job

    def fit(self, prompts: list[list[int]], max_tokens: int | None, param: str) -> int:
        """max_tokens to run with (None = all the room left); 400 past the model's context, 413 past
        a limit of this server (--max-prompt-tokens, the KV pool, prompts per request)."""
        if any(not prompt for prompt in prompts):
            raise APIError(400, "the prompt is empty", param)
        context, pool = self.engine.max_model_len, self.engine.num_blocks * self.engine.block_size
        longest = max(len(prompt) for prompt in prompts)
        if max_tokens is None:
            max_tokens = max(min(context, pool) - longest, 1)
        wanted = longest + max_tokens
        if wanted > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{wanted} tokens ({longest} in the prompt, {max_tokens} for the completion). Please "
                           f"reduce the length of the prompt or max_tokens.", param, "context_length_exceeded")
        self._check_server_limits(prompts, param)
        if wanted > pool:
            raise APIError(413, f"The request needs {wanted} tokens of KV cache ({longest} in the prompt, "
                           f"{max_tokens} for the completion) but the whole KV pool holds {pool} tokens. Reduce the "
                           f"prompt or max_tokens, or start the server with a larger --kv-cache-bytes.",
                           param, "kv_cache_exceeded")
        return max_tokens

    def _check_server_limits(self, prompts: list[list[int]], param: str) -> None:
        num_prompt_tokens = sum(len(prompt) for prompt in prompts)
        limit = self.config.max_prompt_tokens
        if limit is not None and num_prompt_tokens > limit:
            raise APIError(413, f"The request has {num_prompt_tokens} prompt tokens; this server accepts at most "
                           f"{limit} per request (--max-prompt-tokens).", param, "prompt_too_long")
        if len(prompts) > self.config.max_waiting:
            raise APIError(413, f"The request has {len(prompts)} prompts; this server queues at most "
                           f"{self.config.max_waiting} (--max-waiting).", param, "too_many_prompts")

    def start(self, job: Job) -> list[RequestStream]:
        """Queues every prompt of the job, or none: 429 (with Retry-After) when they would take the
        waiting queue past --max-waiting, 503 when the engine thread is gone."""
        num_waiting = self.async_engine.num_waiting
        if num_waiting + len(job.prompts) > self.config.max_waiting:
            raise APIError(429, f"The server is busy: {num_waiting} requests are waiting to run (at most "
                           f"{self.config.max_waiting}). Retry after {RETRY_AFTER_S} s.", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        streams: list[RequestStream] = []
        try:
            for index, prompt_ids in enumerate(job.prompts):
                streams.append(self.async_engine.generate(prompt_ids, job.params, job.salt, f"{job.id}-{index}"))
        except (ValueError, EngineDead) as error:
            for stream in streams:
                stream.close()
            if isinstance(error, EngineDead):
                raise APIError(503, str(error)) from error
            raise APIError(400, str(error), "prompt") from error
        return streams

    async def run(self, job: Job, streams: list[RequestStream]) -> list[RequestOutput]:
        """Runs every prompt to the end; the final outputs in prompt order."""
        final: dict[int, RequestOutput] = {}
        async for index, output in self.stream(job, streams):
            if output.finished:
                final[index] = output
        return [final[index] for index in range(len(job.prompts))]

    async def stream(self, job: Job, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Merges the prompts' output streams. Raises the first engine error; closing early aborts all."""
        merged: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._pump(job, index, stream, merged))
                 for index, stream in enumerate(streams)]
        num_running = len(tasks)
        try:
            while num_running:
                index, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                num_running -= item.finished
                yield index, item
        finally:
            for task, stream in zip(tasks, streams):
                task.cancel()
                stream.close()          # a task cancelled before it started never reaches its finally

    async def _pump(self, job: Job, index: int, stream: RequestStream, merged: asyncio.Queue) -> None:
        try:
            async for output in stream:
                if output.finished:
                    self._finished(job, output)
                merged.put_nowait((index, output))
        except ValueError as error:     # the engine refused the add (it raises before any output)
            merged.put_nowait((index, APIError(400, str(error), "prompt")))
        except Exception as error:      # noqa: BLE001 - handed to the consumer, which raises it
            merged.put_nowait((index, error))
        finally:
            stream.close()

    def _finished(self, job: Job, output: RequestOutput) -> None:
        self.metrics.observe(output)
        if job.chat and output.finish_reason is not FinishReason.ABORT:
            reply_ids = self._reply_ids(output, job.params)
            if reply_ids is not None:
                self.replies.remember(output.text, reply_ids)

    def _reply_ids(self, output: RequestOutput, params: SamplingParams) -> list[int] | None:
        """The ids that spell `output.text`: without a final EOS or stop token; None after a stop string."""
        ids = list(output.token_ids)
        if ids and (ids[-1] in self.tokenizer.eos_token_ids or ids[-1] in params.stop_token_ids):
            return ids[:-1]
        if output.finish_reason is FinishReason.STOP:
            return None                 # cut at a stop string: the ids spell more than the text
        return ids

    async def lookup(self, body: CacheLookupRequest, tenant_salt: str | None = None) -> CacheReport:
        """The cache match a request would get, without running it (POST /v1/cache/lookup)."""
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            prompt_ids = self.chat_prompt(body.messages, body.chat_template_kwargs)
        else:
            prompt_ids = self.text_prompt(body.prompt)
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", "prompt")
        salt = tenant_cache_salt(tenant_salt, body.cache_salt)
        match = await asyncio.to_thread(self.async_engine.call, self.engine.cache.match, prompt_ids, salt)
        return CacheReport(cached_tokens=match.cached_tokens, prompt_tokens=len(prompt_ids),
                           diverged_at=match.diverged_at, miss_reason=match.miss.value if match.miss else None)


def _stem(path) -> str:
    name = Path(str(path)).name
    return name[:-len(".gguf")] if name.endswith(".gguf") else name
