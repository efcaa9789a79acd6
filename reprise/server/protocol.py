"""Request and response bodies of the OpenAI-compatible API (pydantic 2).

Unknown fields are ignored, as OpenAI's servers do. Requests turn into engine terms here:
`sampling_params()` builds SamplingParams, `unsupported()` names a field reprise refuses.
Extensions: `top_k`, `ignore_eos`, `stop_token_ids`, `cache_salt`, `cache_report`,
`chat_template_kwargs`, `speculative` (false opts a request out of speculative decoding).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from reprise.engine.request import RequestOutput, SamplingParams
from reprise.server.errors import APIError

_GREEDY_BELOW = 1e-5            # as vLLM's _SAMPLING_EPS

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None

    def as_template_message(self) -> dict:
        """{role, content: str}; text parts are joined with newlines, other part types refused."""
        if not isinstance(self.content, list):
            return {"role": self.role, "content": self.content or ""}
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"content part type {part.type!r} is not supported; send text parts",
                               "messages")
            texts.append(part.text)
        return {"role": self.role, "content": "\n".join(texts)}


class StreamOptions(_Body):
    include_usage: bool = False


class GenerationRequest(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)  # None (or null) = OpenAI's 1.0
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)            # 0 or -1 = off
    seed: int | None = Field(None, ge=-2**63, lt=2**64)   # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    cache_salt: str | None = None
    cache_report: bool | None = None
    speculative: bool | None = None            # false = no speculative decoding for this request

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        """None = as many as fit in the context."""
        return self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first feature reprise refuses, else None."""
        if self.n not in (None, 1):
            return "n", "n must be 1: reprise returns one choice per prompt"
        return None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=_temperature(self.temperature), top_p=_or(self.top_p, 1.0), top_k=max(self.top_k or 0, 0),
                max_tokens=max_tokens, stop=self.stop, stop_token_ids=tuple(self.stop_token_ids or ()),
                seed=self.seed, ignore_eos=bool(self.ignore_eos), speculative=self.speculative is not False)
        except ValueError as error:
            raise APIError(400, str(error)) from error


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs or self.top_logprobs is not None:
            return "logprobs", "logprobs are not supported"
        return super().unsupported()


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(GenerationRequest):
    prompt: PromptInput
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None

    def requested_max_tokens(self) -> int | None:
        return _or(self.max_tokens, 16)             # OpenAI's default for text completions

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported"
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "best_of must be 1"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The prompts in order: one string or token-id list each."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        return list(prompt)


class CacheLookupRequest(_Body):
    """POST /v1/cache/lookup: one prompt (text, token ids) or chat messages, matched without running."""

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    cache_salt: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CacheReport(BaseModel):
    """How much of a prompt the cache held, and why the match stopped where it did."""

    cached_tokens: int
    prompt_tokens: int
    diverged_at: int | None = None
    miss_reason: str | None = None

    @classmethod
    def of(cls, outputs: list[RequestOutput]) -> CacheReport:
        """One prompt: its own report. Several: the sums, with no single divergence point."""
        cached = sum(o.cached_tokens for o in outputs)
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        if len(outputs) != 1:
            return cls(cached_tokens=cached, prompt_tokens=prompt)
        miss = outputs[0].miss
        return cls(cached_tokens=cached, prompt_tokens=prompt, diverged_at=outputs[0].diverged_at,
                   miss_reason=miss.value if miss is not None else None)


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, outputs: list[RequestOutput]) -> Usage:
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(o.token_ids) for o in outputs)
        cached = sum(o.cached_tokens for o in outputs)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _temperature(value: float | None) -> float:
    """OpenAI's default 1.0 for None; below _GREEDY_BELOW it is greedy, as dividing logits by it
    would overflow float32 into inf - inf = NaN probabilities and fail the whole batch's step."""
    temperature = _or(value, 1.0)
    return 0.0 if temperature < _GREEDY_BELOW else temperature


def _or(value, default):
    return default if value is None else value
