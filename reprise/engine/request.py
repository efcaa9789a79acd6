"""Request, its sampling parameters, its status and the RequestOutput it produces."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from reprise.chat.spec import GuidedSpec

if TYPE_CHECKING:
    from reprise.cache.match import MissReason, SeqCache

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """The OpenAI meanings. temperature=0 is greedy; top_k=0 and top_p=1 turn those filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16              # None = until EOS or the context is full
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    speculative: bool = True                 # False = never draft for this request (when the engine speculates)
    presence_penalty: float = 0.0            # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0           # subtracted per occurrence in the output so far
    repetition_penalty: float = 1.0          # CTRL's: logits of prompt and output tokens divided (>0) or multiplied
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit); -100 bans, 100 forces
    min_p: float = 0.0                       # drop tokens whose probability is below min_p * the top one's
    min_tokens: int = 0                      # EOS and stop_token_ids are masked until this many tokens
    logprobs: int | None = None              # None = none; k = the sampled token's logprob and the top k
    prompt_logprobs: int | None = None       # the same for every prompt token; the prompt is then recomputed
    guided: GuidedSpec | None = None         # the output must match (constrained decoding)
    skip_special_tokens: bool = True         # False: special tokens' text stays in the output (tool markers)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError("min_tokens must be in [0, max_tokens]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}]")
        bias = dict(self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias)
        if any(not -100 <= value <= 100 for value in bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        object.__setattr__(self, "logit_bias", tuple(sorted((int(k), float(v)) for k, v in bias.items())))
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def may_draft(self) -> bool:
        """Speculative decoding may verify several tokens at once: only when each token's
        distribution does not depend on the ones drafted before it in the same step."""
        return self.speculative and self.guided is None and not self.penalized and not self.min_tokens

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the tokens so far (penalties), not on the step alone."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability under the model (log_softmax of the raw logits, before any
    sampling control, as vLLM reports it) and the `top` most likely tokens at its position,
    most likely first, as (token id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Sampled:
    """What the sampler drew for one request in one step: 1 token, or for a verify 1 to
    len(draft) + 1; `logprobs` has one entry per token when the request asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    LOADING = "loading"      # its prefix is being read from a tier into pool blocks; then it waits again
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS, a stop token or a stop string
    LENGTH = "length"      # max_tokens or the context window
    ABORT = "abort"        # cancelled by the caller (e.g. a client disconnect)


@dataclass(frozen=True)
class RequestOutput:
    """What a request produced: the step's delta on every output; the whole output (`token_ids`,
    `logprobs`) only on the finished one, so a stream costs O(new tokens) per step, not O(length).
    `text` is the final text so far on every output (a string: shared, never copied)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] | None               # all output ids on the finished output; None before
    text: str
    delta_text: str
    delta_token_ids: list[int]
    cached_tokens: int
    finish_reason: FinishReason | None
    miss: MissReason | None = None            # why the match stopped short of the nearest cached one
    diverged_at: int | None = None            # position where the prompt left the nearest cached one
    metrics: dict = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None          # one per token_ids entry, when asked for (finished only)
    prompt_logprobs: list[TokenLogprob | None] | None = None   # one per prompt token (the first: None)
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)   # "memory", "disk", ...: sums to cached_tokens
    delta_logprobs: list[TokenLogprob] | None = None    # one per delta_token_ids entry, when asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


_ids = itertools.count()


class Request:
    """Mutable engine-side state of one request. Positions [0, num_computed) have KV in its blocks."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, salt: str | None = None,
                 request_id: str | None = None, pins: tuple[tuple[int, float], ...] = ()):
        self.request_id = request_id or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.salt = salt
        self.pins = pins        # (num_tokens, ttl_seconds): prefixes the cache keeps pinned after it ends
        self.output_ids: list[int] = []
        self._all_ids = list(prompt_ids)      # prompt + output, grown with output_ids (see all_ids)
        self.status = RequestStatus.WAITING
        self.num_computed = 0
        self.cache: SeqCache | None = None
        self.cached_tokens: int | None = None     # set at first admission, kept across preemption
        self.miss: MissReason | None = None
        self.diverged_at: int | None = None
        self.finish_reason: FinishReason | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = \
            [None] * len(prompt_ids) if params.prompt_logprobs is not None else None
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.tier_load: tuple[str, int, int] | None = None    # (tier, first token, end) loaded before admission
        self.cached_tokens_by_tier: dict[str, int] = {}

    @property
    def all_ids(self) -> list[int]:
        """Prompt then output ids, one list kept in step with output_ids (read it, never modify it).
        Tokens appended to output_ids join it on the next read; dropping tokens goes through
        truncate_output, so a drop followed by an append can never leave it stale."""
        ids = self._all_ids
        missing = len(self.prompt_ids) + len(self.output_ids) - len(ids)
        if missing > 0:
            ids.extend(self.output_ids[-missing:])
        elif missing < 0:
            del ids[missing:]
        return ids

    def truncate_output(self, num_output: int) -> None:
        """Keeps the first `num_output` output tokens."""
        del self.output_ids[num_output:]
        del self._all_ids[len(self.prompt_ids) + num_output:]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still without KV: the rest of the prompt, or 1 (the newest sampled token) when decoding."""
        return self.num_tokens - self.num_computed
