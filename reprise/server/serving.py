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
from dataclasses import dataclass, replace
from pathlib import Path

from reprise.chat.continuity import ReplyMemory
from reprise.chat.grammar import GrammarError
from reprise.chat.spec import GuidedSpec
from reprise.engine.async_engine import AsyncEngine, EngineDead, RequestFailed, RequestStream
from reprise.engine.request import FinishReason, RequestOutput, SamplingParams
from reprise.server.chat_turn import ChatTemplates, ChatTurn
from reprise.server.config import ServerConfig, tenant_cache_salt
from reprise.server.dashboard.ledger import RequestLedger
from reprise.server.errors import APIError
from reprise.server.metrics import ServerMetrics
from reprise.server.protocol import (CacheLookupRequest, CacheReport, ChatCompletionRequest, CompletionRequest,
                                     DetokenizeRequest, GenerationRequest, PromptOrMessages, TokenizeRequest)

RETRY_AFTER_S = 1               # a full queue drains in about a request's time; a short wait is right
CONTINUATION = SamplingParams(temperature=0, max_tokens=1, speculative=False)
log = logging.getLogger("reprise")


@dataclass(frozen=True)
class Job:
    """One API request, ready to run: one engine request per choice (`n` choices of each prompt,
    in a row). `turn` is set for chat completions; `echo` (text completions) holds each prompt's
    text when it is echoed; `pins` are the retention the client asked for (Anthropic's
    cache_control, OpenAI's prompt_cache_retention), for every prompt of the job."""

    id: str
    created: int
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    n: int
    salt: str | None
    stream: bool
    include_usage: bool
    cache_report: bool
    turn: ChatTurn | None = None
    echo: list[str] | None = None
    pins: tuple[tuple[int, float], ...] = ()    # (num_tokens, ttl_seconds) prefixes to keep pinned

    @property
    def chat(self) -> bool:
        return self.turn is not None

    def request_id(self, index: int) -> str:
        """The engine request of choice `index`."""
        return f"{self.id}-{index}"


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
        self.ledger = RequestLedger()           # finished requests, for the dashboard
        self.chats = ChatTemplates(self.tokenizer, config)
        self._background: set[asyncio.Task] = set()
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
        salt = tenant_cache_salt(tenant_salt, body.cache_salt)
        turn = self.chats.turn(body, self.replies, salt)
        guided = self._guided(body, turn.tool_spec())
        return self._job(body, "chatcmpl", [turn.prompt.ids], salt, guided, turn=turn)

    def completion_job(self, body: CompletionRequest, tenant_salt: str | None = None) -> Job:
        self._check_request(body)
        texts = body.prompts()
        prompts = [self.text_prompt(prompt) for prompt in texts]
        echo = [text if isinstance(text, str) else self.tokenizer.decode(text) for text in texts] if body.echo else None
        return self._job(body, "cmpl", prompts, tenant_cache_salt(tenant_salt, body.cache_salt),
                         self._guided(body, None), echo=echo)

    def _guided(self, body: GenerationRequest, tool_spec: GuidedSpec | None) -> GuidedSpec | None:
        """The request's output constraint, checked by the grammar engine (400 naming the field)."""
        given = body.output_spec()
        if given is not None and tool_spec is not None and tool_spec.tool_calls_required:
            raise APIError(400, f"{given[0]} cannot be combined with tool_choice required or a named tool", given[0])
        field, spec = given if given is not None else ("tools", tool_spec)
        if spec is not None:
            try:
                self.engine.grammars.check(spec)
            except GrammarError as error:
                raise APIError(400, f"{field}: {error}", field, "invalid_grammar") from error
        return spec

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

    def _job(self, body: GenerationRequest, prefix: str, prompts: list[list[int]], salt: str | None,
             guided: GuidedSpec | None, turn: ChatTurn | None = None, echo: list[str] | None = None) -> Job:
        max_tokens = self.fit(prompts, body.requested_max_tokens(), "messages" if turn else "prompt")
        skip_special = turn is None or not turn.keeps_special_tokens
        params = body.sampling_params(max_tokens, guided, skip_special)
        if isinstance(body, CompletionRequest) and body.echo_logprobs() is not None:
            params = replace(params, prompt_logprobs=body.echo_logprobs())
        n = body.num_choices
        seeds = [None if params.seed is None else (params.seed + i) % 2**64 for i in range(n)]
        job = Job(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), self.model_name,
                  [prompt for prompt in prompts for _ in range(n)],
                  [replace(params, seed=seed) for _ in prompts for seed in seeds], n, salt,
                  bool(body.stream), body.include_usage, bool(body.cache_report), turn, echo)
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
            for index, (prompt_ids, params) in enumerate(zip(job.prompts, job.params)):
                streams.append(self.async_engine.generate(prompt_ids, params, job.salt, job.request_id(index),
                                                          pins=job.pins))
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
                    await self._finished(job, index, output)
                merged.put_nowait((index, output))
        except ValueError as error:     # the engine refused the add (it raises before any output)
            merged.put_nowait((index, APIError(400, str(error), "prompt")))
        except (RequestFailed, EngineDead) as error:     # our own messages: they quote no input
            merged.put_nowait((index, APIError(503, str(error), code="generation_failed")))
        except Exception as error:      # noqa: BLE001 - handed to the consumer, which raises it
            merged.put_nowait((index, error))
        finally:
            stream.close()

    async def _finished(self, job: Job, index: int, output: RequestOutput) -> None:
        """Files a finished output; a chat turn's reply (which re-renders and tokenizes the whole
        conversation) is filed in a worker thread, before the client sees the output."""
        self.metrics.observe(output)
        self.ledger.record(job.salt, output)
        if job.turn is None or output.finish_reason is FinishReason.ABORT:
            return
        stop_ids = self.tokenizer.eos_token_ids | set(job.params[index].stop_token_ids)
        continuation = await asyncio.to_thread(job.turn.finish, output, stop_ids, self.replies, job.salt)
        if continuation is not None and index == 0 and self.config.continuation_prefill:
            self._prefill(continuation, job.salt, f"{job.id}-next")

    def _prefill(self, prompt_ids: list[int], salt: str | None, request_id: str) -> None:
        """Computes the KV of `prompt_ids` into the cache in the background (one greedy token,
        discarded), so the next turn hits it; skipped when the engine is busy or gone."""
        if self.async_engine.num_waiting >= self.config.max_waiting // 2:
            return
        try:
            stream = self.async_engine.generate(prompt_ids, CONTINUATION, salt, request_id)
        except (ValueError, EngineDead):
            return
        self._background.add(task := asyncio.ensure_future(_drain(stream)))
        task.add_done_callback(self._background.discard)

    async def lookup(self, body: CacheLookupRequest, tenant_salt: str | None = None) -> CacheReport:
        """The cache match a request would get, without running it (POST /v1/cache/lookup)."""
        salt = tenant_cache_salt(tenant_salt, body.cache_salt)
        prompt_ids = await asyncio.to_thread(self._prompt_of, body, self.replies, salt)
        match = await asyncio.to_thread(self.async_engine.call, self.engine.lookup, prompt_ids, salt)
        return CacheReport(cached_tokens=match.cached_tokens, prompt_tokens=len(prompt_ids),
                           diverged_at=match.diverged_at, miss_reason=match.miss.value if match.miss else None)

    def tokenize(self, body: TokenizeRequest) -> dict:
        """POST /tokenize: the prompt's ids as plain tokenization gives them (no reply memory: the
        route names no tenant, so it must not reveal what any tenant was answered)."""
        if body.messages is None and isinstance(body.prompt, str) and body.add_special_tokens:
            self.check_model(body.model)
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=True)
        else:
            ids = self._prompt_of(body, None, None)
        result = {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}
        if body.return_token_strs:
            result["token_strs"] = [self.tokenizer.decode([token]) for token in ids]
        return result

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        return {"prompt": self.tokenizer.decode(self.text_prompt(body.tokens) if body.tokens else [])}

    def _prompt_of(self, body: PromptOrMessages, memory: ReplyMemory | None, salt: str | None) -> list[int]:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        prompt_ids = (self.chats.turn(body, memory, salt).prompt.ids if body.messages is not None
                      else self.text_prompt(body.prompt))
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", "prompt")
        return prompt_ids


async def _drain(stream: RequestStream) -> None:
    async for _ in stream:
        pass


def _stem(path) -> str:
    name = Path(str(path)).name
    return name[:-len(".gguf")] if name.endswith(".gguf") else name
