"""Request and response bodies of the OpenAI-compatible API (pydantic 2).

Unknown fields are ignored, as OpenAI's servers do. Requests turn into engine terms here:
`sampling_params()` builds SamplingParams, `unsupported()` names a field reprise refuses.
Extensions: `top_k`, `ignore_eos`, `stop_token_ids`, `cache_salt`, `cache_report`,
`chat_template_kwargs`, `speculative` (false opts a request out of speculative decoding).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reprise.chat.spec import GuidedSpec
from reprise.engine.request import MAX_LOGPROBS, RequestOutput, SamplingParams
from reprise.server.errors import APIError
from reprise.server.guided import GuidedFields, NamedToolChoice, Tool

MAX_CHOICES = 16
# Known OpenAI and vLLM fields whose meaning reprise does not implement: refused (400) unless their
# value is one of the harmless ones listed, never accepted and ignored.
REFUSED: dict[str, tuple[tuple, str]] = {
    "audio": ((None,), ": it generates text only"),
    "modalities": ((None, ["text"]), ": it generates text only"),
    "prediction": ((None,), " (predicted outputs)"),
    "web_search_options": ((None,), ": it has no web search"),
    "functions": ((None,), ": send tools instead"),
    "function_call": ((None,), ": send tool_choice instead"),
    "store": ((None, False), ": it stores no chat completions"),
    "reasoning_effort": ((None,), ": use chat_template_kwargs (for example enable_thinking) instead"),
    "verbosity": ((None,), ""),
    "service_tier": ((None, "auto", "default"), ": it has one tier"),
    "best_of": ((None, 1), ": best_of must be 1"),
    "suffix": ((None, ""), " (insertion)"),
    "use_beam_search": ((None, False), " (beam search)"),
    "length_penalty": ((None, 1, 1.0), " (beam search)"),
    "truncate_prompt_tokens": ((None,), ""),
    "guided_whitespace_pattern": ((None,), ""),
    "guided_decoding_backend": ((None, "llguidance", "auto"), ": its grammar engine is llguidance"),
    "skip_special_tokens": ((None, True), ""),
    "spaces_between_special_tokens": ((None, True), ""),
    "include_stop_str_in_output": ((None, False), ""),
    "echo": ((None, False), " on chat completions"),
    "allowed_token_ids": ((None,), ": use logit_bias instead"),
    "bad_words": ((None, []), ": use logit_bias instead"),
}

_GREEDY_BELOW = 1e-5            # as vLLM's _SAMPLING_EPS

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def as_template_message(self) -> dict:
        """The OpenAI message as a plain dict (None fields left out); text parts are joined with
        newlines, other part types refused."""
        message = self.model_dump(exclude_none=True, exclude={"content"})
        message["content"] = self._text()
        return message

    def _text(self) -> str | None:
        if not isinstance(self.content, list):
            return self.content if self.content is not None or self.tool_calls else ""
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"content part type {part.type!r} is not supported; send text parts",
                               "messages")
            texts.append(part.text)
        return "\n".join(texts)


class StreamOptions(_Body):
    include_usage: bool = False


class GenerationRequest(GuidedFields):
    """Fields shared by chat and text completions. Known fields reprise does not implement are
    refused by name (REFUSED); fields nobody defines are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)  # None (or null) = OpenAI's 1.0
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)            # 0 or -1 = off
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=-2**63, lt=2**64)   # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    cache_salt: str | None = None
    cache_report: bool | None = None
    speculative: bool | None = None            # false = no speculative decoding for this request

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def num_choices(self) -> int:
        return self.n or 1

    def requested_max_tokens(self) -> int | None:
        """None = as many as fit in the context."""
        return self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first known field reprise refuses, else None."""
        for name, value in (self.model_extra or {}).items():
            refused = REFUSED.get(name)
            if refused is not None and value not in refused[0]:
                return name, f"{name} is not supported by this server{refused[1]}"
        return None

    def logprobs_wanted(self) -> int | None:
        """How many top logprobs each generated token carries; None = no logprobs."""
        return None

    def sampling_params(self, max_tokens: int, guided: GuidedSpec | None = None,
                        skip_special_tokens: bool = True) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=_temperature(self.temperature), top_p=_or(self.top_p, 1.0), top_k=max(self.top_k or 0, 0),
                max_tokens=max_tokens, stop=self.stop, stop_token_ids=tuple(self.stop_token_ids or ()),
                seed=self.seed, ignore_eos=bool(self.ignore_eos), speculative=self.speculative is not False,
                presence_penalty=_or(self.presence_penalty, 0.0), frequency_penalty=_or(self.frequency_penalty, 0.0),
                repetition_penalty=_or(self.repetition_penalty, 1.0), logit_bias=self._logit_bias(),
                min_p=_or(self.min_p, 0.0), min_tokens=_or(self.min_tokens, 0), logprobs=self.logprobs_wanted(),
                prompt_logprobs=self.prompt_logprobs, guided=guided, skip_special_tokens=skip_special_tokens)
        except ValueError as error:
            raise APIError(400, str(error)) from error

    def _logit_bias(self) -> dict[int, float]:
        try:
            return {int(token): bias for token, bias in (self.logit_bias or {}).items()}
        except ValueError as error:
            raise APIError(400, "logit_bias keys must be token ids", "logit_bias") from error


class ChatPromptFields(_Body):
    """What shapes a chat prompt besides the messages (vLLM's meanings for the last three)."""

    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False          # assistant prefill: the reply continues the last message
    chat_template_kwargs: dict[str, Any] | None = None


class ChatCompletionRequest(GenerationRequest, ChatPromptFields):
    model_config = ConfigDict(extra="allow")       # the extras are checked against REFUSED

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_wanted(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(GenerationRequest):
    prompt: PromptInput
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None

    def requested_max_tokens(self) -> int | None:
        return _or(self.max_tokens, 16)             # OpenAI's default for text completions

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def echo_logprobs(self) -> int | None:
        """echo with logprobs scores the prompt too (then it is recomputed, not read from the cache)."""
        return self.logprobs if self.echo and self.logprobs is not None else self.prompt_logprobs

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


class PromptOrMessages(ChatPromptFields):
    """One prompt (text or token ids) or chat messages, for routes that do not generate."""

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)


class CacheLookupRequest(PromptOrMessages):
    """POST /v1/cache/lookup: matched as the completion would be, without running."""

    cache_salt: str | None = None


class TokenizeRequest(PromptOrMessages):
    """POST /tokenize (vLLM's shape)."""

    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's shape)."""

    model: str | None = None
    tokens: list[int]


class CacheReport(BaseModel):
    """How much of a prompt the cache held, and why the match stopped where it did."""

    cached_tokens: int
    prompt_tokens: int
    diverged_at: int | None = None
    miss_reason: str | None = None
    diverged_message: int | None = None     # chat: the message in which reuse stopped (its index)
    # with tiers under the pool (--disk-cache-dir): cached_tokens by the tier that held them,
    # e.g. {"memory": 16, "disk": 3983}; absent from the report without tiers
    cached_tokens_by_tier: dict[str, int] | None = None

    @classmethod
    def of(cls, outputs: list[RequestOutput]) -> CacheReport:
        """One prompt: its own report. Several: the sums, with no single divergence point."""
        cached = sum(o.cached_tokens for o in outputs)
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        by_tier: dict[str, int] = {}
        for output in outputs:
            for tier, tokens in output.cached_tokens_by_tier.items():
                by_tier[tier] = by_tier.get(tier, 0) + tokens
        tiers = by_tier if set(by_tier) - {"memory"} else None
        if len(outputs) != 1:
            return cls(cached_tokens=cached, prompt_tokens=prompt, cached_tokens_by_tier=tiers)
        miss = outputs[0].miss
        return cls(cached_tokens=cached, prompt_tokens=prompt, diverged_at=outputs[0].diverged_at,
                   miss_reason=miss.value if miss is not None else None, cached_tokens_by_tier=tiers)

    def model_dump(self, **kwargs) -> dict:
        body = super().model_dump(**kwargs)
        if body.get("cached_tokens_by_tier", 0) is None:
            del body["cached_tokens_by_tier"]
        return body


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, outputs: list[RequestOutput], n: int = 1) -> Usage:
        """`n` choices of each prompt, in a row: the prompt counts once (OpenAI's way), with the cached
        tokens of its first choice, the one that computed what the others then read from the cache."""
        prompt = sum(len(o.prompt_token_ids) for o in outputs[::n])
        completion = sum(len(o.token_ids) for o in outputs)
        cached = sum(o.cached_tokens for o in outputs[::n])
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _temperature(value: float | None) -> float:
    """OpenAI's default 1.0 for None; below _GREEDY_BELOW it is greedy, as dividing logits by it
    would overflow float32 into inf - inf = NaN probabilities and fail the whole batch's step."""
    temperature = _or(value, 1.0)
    return 0.0 if temperature < _GREEDY_BELOW else temperature


def _or(value, default):
    return default if value is None else value
