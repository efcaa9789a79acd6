"""Request, its sampling parameters, its status and the RequestOutput it produces."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reprise.cache.manager import MissReason, SeqCache


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

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
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


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS, a stop token or a stop string
    LENGTH = "length"      # max_tokens or the context window
    ABORT = "abort"        # cancelled by the caller (e.g. a client disconnect)


@dataclass(frozen=True)
class RequestOutput:
    """What a request produced so far; `finished` marks the last one. Deltas are for streaming."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta_text: str
    delta_token_ids: list[int]
    cached_tokens: int
    finish_reason: FinishReason | None
    miss: MissReason | None = None            # why the match stopped short of the nearest cached one
    diverged_at: int | None = None            # position where the prompt left the nearest cached one
    metrics: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


_ids = itertools.count()


class Request:
    """Mutable engine-side state of one request. Positions [0, num_computed) have KV in its blocks."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, salt: str | None = None,
                 request_id: str | None = None):
        self.request_id = request_id or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.salt = salt
        self.output_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.num_computed = 0
        self.cache: SeqCache | None = None
        self.cached_tokens: int | None = None     # set at first admission, kept across preemption
        self.miss: MissReason | None = None
        self.diverged_at: int | None = None
        self.finish_reason: FinishReason | None = None
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.num_preemptions = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still without KV: the rest of the prompt, or 1 (the newest sampled token) when decoding."""
        return self.num_tokens - self.num_computed
