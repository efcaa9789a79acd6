"""The library: LLM and ChatSession, a thin layer over Engine."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from reprise.config import EngineConfig, parse_bytes
from reprise.engine.engine import Engine
from reprise.engine.request import RequestOutput, SamplingParams
from reprise.chat.continuity import ReplyMemory, chat_prompt_ids, reply_ids


class LLM:
    """`LLM(model=None)` loads the default model; `generate` runs prompts to completion, batched.

    `options` are further EngineConfig fields, e.g. `weights="native" | "bfloat16" | "float32"`;
    `compile=True` decodes through torch.compile (docs/compile.md).
    `disk_cache_dir` puts a disk tier under the KV pool (`disk_cache_bytes`, default 10GiB;
    docs/disk-cache.md); `close()` flushes its queued writes (also done at interpreter exit)."""

    def __init__(self, model: str | None = None, dtype: str | None = None, kv_cache_bytes: int | str | None = None,
                 prefix_cache: bool = True, disk_cache_dir: str | None = None,
                 disk_cache_bytes: int | str | None = None, **options):
        kv = parse_bytes(kv_cache_bytes) if kv_cache_bytes is not None else None
        disk = parse_bytes(disk_cache_bytes) if disk_cache_bytes is not None else None
        self.engine = Engine(EngineConfig(model=model, dtype=dtype, kv_cache_bytes=kv, prefix_cache=prefix_cache,
                                          disk_cache_dir=None if disk_cache_dir is None else str(disk_cache_dir),
                                          disk_cache_bytes=disk, **options))
        self.tokenizer = self.engine.tokenizer
        self.replies = ReplyMemory()

    def close(self) -> None:
        """Flushes the tiers' queued writes and stops their threads."""
        self.engine.close()

    @property
    def weights_bytes(self) -> int:
        """Resident bytes of the model's weights (quantized blocks and scales, or dense tensors)."""
        return self.engine.weights_bytes

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | None = None, salt: str | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts: a string, strings, or lists of token ids."""
        params = params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        prompt_ids = [p if not isinstance(p, str) else self.tokenizer.encode(p) for p in prompts]
        return self._run([list(ids) for ids in prompt_ids], params, salt)

    def chat(self, messages: list[dict], params: SamplingParams | None = None,
             salt: str | None = None) -> RequestOutput:
        """Applies the chat template (reusing the exact ids of replies this LLM produced) and generates."""
        *_, output = self.stream_chat(messages, params, salt)
        return output

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None,
                    salt: str | None = None) -> Iterator[RequestOutput]:
        """Like chat, yielding an output per new token; the last one is finished."""
        params = params or SamplingParams()
        ids = chat_prompt_ids(self.tokenizer, messages, self.replies, salt)
        request = self.engine.add_request(ids, params, salt)
        for output in self._outputs({request.request_id}):
            if output.finished:
                spelled = reply_ids(output.token_ids, output.finish_reason,
                                    self.tokenizer.eos_token_ids | set(params.stop_token_ids))
                if spelled is not None:
                    self.replies.remember(salt, output.text, output.text, spelled)
            yield output

    def _run(self, prompt_ids: list[list[int]], params: SamplingParams, salt: str | None) -> list[RequestOutput]:
        requests = [self.engine.add_request(ids, params, salt) for ids in prompt_ids]
        final = {o.request_id: o for o in self._outputs({r.request_id for r in requests}) if o.finished}
        return [final[r.request_id] for r in requests]

    def _outputs(self, request_ids: set[str]) -> Iterator[RequestOutput]:
        """Steps the engine until these requests finish; aborts them if the caller stops early."""
        pending = set(request_ids)
        try:
            while pending:
                for output in self.engine.step():
                    if output.request_id in pending:
                        if output.finished:
                            pending.discard(output.request_id)
                        yield output
        finally:
            for request_id in pending:
                self.engine.abort(request_id)


class ChatSession:
    """A multi-turn conversation: each `send` resends the history, which turn N's cache covers."""

    def __init__(self, llm: LLM, system: str | None = None, salt: str | None = None):
        self.llm = llm
        self.salt = salt
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def send(self, text: str, params: SamplingParams | None = None) -> RequestOutput:
        *_, output = self.stream(text, params)
        return output

    def stream(self, text: str, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields the reply as it is generated; the history grows by the turn once it finishes."""
        messages = [*self.messages, {"role": "user", "content": text}]
        for output in self.llm.stream_chat(messages, params, self.salt):
            if output.finished:
                self.messages = [*messages, {"role": "assistant", "content": output.text}]
            yield output
