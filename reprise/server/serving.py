"""From validated request bodies to engine runs: prompts, limits, concurrent generation.

A `Job` is one HTTP request ready to run: its prompts as token ids (several for a text completion
with a list of prompts, run concurrently), its SamplingParams and salt. `Serving.stream(job)`
yields `(choice_index, RequestOutput)` as tokens come; closing it early aborts every prompt still
running, which returns their blocks to the pool.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import jinja2

from reprise.engine.async_engine import AsyncEngine
from reprise.engine.request import FinishReason, RequestOutput, SamplingParams
from reprise.loader import ReplyMemory, chat_prompt_ids
from reprise.server.errors import APIError
from reprise.server.metrics import ServerMetrics
from reprise.server.protocol import (CacheLookupRequest, CacheReport, ChatCompletionRequest, ChatMessage,
                                     CompletionRequest, GenerationRequest)

_TEMPLATE_ERRORS = (jinja2.TemplateError, ValueError, TypeError, KeyError)


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

    def __init__(self, async_engine: AsyncEngine, metrics: ServerMetrics, served_model_name: str | None = None):
        engine = async_engine.engine
        self.async_engine = async_engine
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.metrics = metrics
        self.replies = ReplyMemory()
        self.model_name = served_model_name or engine.model_config.name or _stem(engine.model_path)
        aliases = {self.model_name, "default", str(engine.model_path), engine.config.model}
        self._accepted_names = {name for name in aliases if name}

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self._accepted_names:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           "model", "model_not_found")

    def chat_job(self, body: ChatCompletionRequest) -> Job:
        self._check_request(body)
        prompt_ids = self.chat_prompt(body.messages, body.chat_template_kwargs)
        return self._job(body, "chatcmpl", chat=True, prompts=[prompt_ids])

    def completion_job(self, body: CompletionRequest) -> Job:
        self._check_request(body)
        prompts = [self.text_prompt(prompt) for prompt in body.prompts()]
        return self._job(body, "cmpl", chat=False, prompts=prompts)

    def chat_prompt(self, messages: list[ChatMessage], template_kwargs: dict | None) -> list[int]:
        rendered = [message.as_template_message() for message in messages]
        try:
            return chat_prompt_ids(self.tokenizer, rendered, self.replies, **(template_kwargs or {}))
        except _TEMPLATE_ERRORS as error:
            raise APIError(400, f"cannot apply the chat template to these messages: {error}", "messages") from error

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
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

    def _job(self, body: GenerationRequest, prefix: str, chat: bool, prompts: list[list[int]]) -> Job:
        max_tokens = self.fit(prompts, body.requested_max_tokens(), "messages" if chat else "prompt")
        return Job(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), self.model_name, chat, prompts,
                   body.sampling_params(max_tokens), body.cache_salt, bool(body.stream), body.include_usage,
                   bool(body.cache_report))

    def fit(self, prompts: list[list[int]], max_tokens: int | None, param: str) -> int:
        """max_tokens to run with (None = all the room left); 400 past the context, 413 past the pool."""
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
        if wanted > pool:
            raise APIError(413, f"The request needs {wanted} tokens of KV cache ({longest} in the prompt, "
                           f"{max_tokens} for the completion) but the whole KV pool holds {pool} tokens. Reduce the "
                           f"prompt or max_tokens, or start the server with a larger --kv-cache-bytes.",
                           param, "kv_cache_exceeded")
        return max_tokens

    async def run(self, job: Job) -> list[RequestOutput]:
        """Runs every prompt to the end; the final outputs in prompt order."""
        final: dict[int, RequestOutput] = {}
        async for index, output in self.stream(job):
            if output.finished:
                final[index] = output
        return [final[index] for index in range(len(job.prompts))]

    async def stream(self, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Merges the prompts' output streams. Raises the first engine error; closing early aborts all."""
        merged: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._pump(job, index, merged)) for index in range(len(job.prompts))]
        num_running = len(tasks)
        try:
            while num_running:
                index, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                num_running -= item.finished
                yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def _pump(self, job: Job, index: int, merged: asyncio.Queue) -> None:
        outputs = self.async_engine.generate(job.prompts[index], job.params, job.salt, f"{job.id}-{index}")
        try:
            async for output in outputs:
                if output.finished:
                    self._finished(job, output)
                merged.put_nowait((index, output))
        except ValueError as error:     # raised before the first output: the engine refused the request
            merged.put_nowait((index, APIError(400, str(error), "prompt")))
        except Exception as error:      # noqa: BLE001 - handed to the consumer, which raises it
            merged.put_nowait((index, error))
        finally:
            await outputs.aclose()

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

    async def lookup(self, body: CacheLookupRequest) -> CacheReport:
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
        match = await asyncio.to_thread(self.async_engine.call, self.engine.cache.match, prompt_ids, body.cache_salt)
        return CacheReport(cached_tokens=match.cached_tokens, prompt_tokens=len(prompt_ids),
                           diverged_at=match.diverged_at, miss_reason=match.miss.value if match.miss else None)


def _stem(path) -> str:
    name = Path(str(path)).name
    return name[:-len(".gguf")] if name.endswith(".gguf") else name
