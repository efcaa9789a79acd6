"""The library: LLM and ChatSession, a thin layer over Engine."""
from __future__ import annotations

from collections.abc import Sequence

from reprise.config import EngineConfig, parse_bytes
from reprise.engine.engine import Engine
from reprise.engine.request import RequestOutput, SamplingParams
from reprise.loader import ReplyMemory, chat_prompt_ids


class LLM:
    """`LLM(model=None)` loads the default model; `generate` runs prompts to completion, batched."""

    def __init__(self, model: str | None = None, dtype: str | None = None, kv_cache_bytes: int | str | None = None,
                 prefix_cache: bool = True, **options):
        kv = parse_bytes(kv_cache_bytes) if kv_cache_bytes is not None else None
        self.engine = Engine(EngineConfig(model=model, dtype=dtype, kv_cache_bytes=kv, prefix_cache=prefix_cache,
                                          **options))
        self.tokenizer = self.engine.tokenizer
        self.replies = ReplyMemory()

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
        ids = chat_prompt_ids(self.tokenizer, messages, self.replies)
        output = self._run([ids], params or SamplingParams(), salt)[0]
        self.replies.remember(output.text, self._reply_ids(output))
        return output

    def _reply_ids(self, output: RequestOutput) -> list[int]:
        ids = output.token_ids
        if ids and ids[-1] in self.tokenizer.eos_token_ids:
            ids = ids[:-1]
        return ids

    def _run(self, prompt_ids: list[list[int]], params: SamplingParams, salt: str | None) -> list[RequestOutput]:
        requests = [self.engine.add_request(ids, params, salt) for ids in prompt_ids]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(requests):
            for output in self.engine.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[r.request_id] for r in requests]


class ChatSession:
    """A multi-turn conversation: each `send` resends the history, which turn N's cache covers."""

    def __init__(self, llm: LLM, system: str | None = None, salt: str | None = None):
        self.llm = llm
        self.salt = salt
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def send(self, text: str, params: SamplingParams | None = None) -> RequestOutput:
        self.messages.append({"role": "user", "content": text})
        output = self.llm.chat(self.messages, params, self.salt)
        self.messages.append({"role": "assistant", "content": output.text})
        return output
