"""Engine: wires loader, model, cache, scheduler and runner; `step()` runs one batch and emits outputs."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from reprise.cache.manager import CacheManager
from reprise.cache.match import CacheStats, Match
from reprise.config import EngineConfig, format_bytes
from reprise.engine.detokenize import IncrementalDetokenizer
from reprise.chat.grammar import Grammars
from reprise.engine.request import FinishReason, Request, RequestOutput, RequestStatus, Sampled, SamplingParams
from reprise.engine.runner import ModelRunner, PromptLogprobs, kv_bytes_per_block, state_bytes_per_slot
from reprise.engine.sampler import Sampler
from reprise.engine.scheduler import Scheduler
from reprise.engine.speculative import SPECULATIVE_METHODS, NgramDrafter
from reprise.engine.startup import default_kv_bytes, resolve_dtype, resolve_weights
from reprise.engine.tier_link import TierLink
from reprise.engine.tiers import build_observers, build_tiers, fingerprint, kv_layout_string, replica_id, wants_keys
from reprise.loader import load_model
from reprise.models import build_model, state_specs
from reprise.models.layers.quant import weights_bytes

log = logging.getLogger("reprise")

STATE_FRACTION = 4              # hybrid models: recurrent-state slots get up to 1/4 of --kv-cache-bytes


class BatchFailed(RuntimeError):
    """A batch raised: `outputs` are the finished (aborted) outputs of its requests."""

    def __init__(self, outputs: list[RequestOutput], error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.outputs = outputs


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    cache: CacheStats
    num_draft_tokens: int = 0        # speculative decoding: tokens proposed and verified
    num_accepted_tokens: int = 0     # of those, the ones the model agreed with
    weights_bytes: int = 0           # the model's weights as held (quantized or dense)
    kv_pool_bytes: int = 0           # KV blocks and recurrent-state slots, reserved; RAM is taken as pages are written
    tiers: tuple = ()                # (name, TierStats, prompt tokens looked up, prompt tokens reused) per tier


class Engine:
    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(config.dtype, config.weights, self.device)
        loaded = load_model(config.model)
        self.model_config, self.tokenizer, self.model_path = loaded.config, loaded.tokenizer, loaded.path
        self.native_weights = resolve_weights(config.weights, config.dtype, self.dtype, loaded.is_gguf, self.device)
        model = build_model(self.model_config, config.compile)
        model.load_weights(loaded.weights(native=self.native_weights))
        model.to(device=self.device, dtype=self.dtype).eval()
        self.weights_bytes = weights_bytes(model)
        self.block_size = config.block_size
        self.kv_cache_bytes = config.kv_cache_bytes or default_kv_bytes()
        layout = model.cache_layout
        self.state_slot_bytes = state_bytes_per_slot(self.model_config, self.dtype)
        num_state_slots = self._num_state_slots(layout)
        block_bytes = kv_bytes_per_block(self.model_config, self.block_size, self.dtype)
        self.num_blocks = (self.kv_cache_bytes - num_state_slots * self.state_slot_bytes) // block_bytes
        if self.num_blocks < 2:
            raise ValueError(f"--kv-cache-bytes {format_bytes(self.kv_cache_bytes)} holds fewer than 2 blocks "
                             f"of {format_bytes(block_bytes)}; give it more")
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.tiers = self._tier_link(model, layout)
        self.cache = CacheManager(self.num_blocks, self.block_size, enable_prefix_cache=config.prefix_cache,
                                  layout=layout, num_state_slots=num_state_slots,
                                  max_pinned_fraction=config.max_pinned_fraction, listener=self.tiers)
        if self.tiers is not None:
            self.tiers.cache = self.cache
        grid = math.lcm(self.block_size, model.chunk_alignment)      # hot and cold cut chunks alike
        interval = -(-config.checkpoint_interval // grid) * grid       # rounded up onto the chunk grid
        self.drafter = self._drafter(layout)
        self.scheduler = Scheduler(self.cache, self.block_size, config.max_num_seqs, config.max_num_batched_tokens,
                                   chunk_grid=grid, checkpoint_interval=interval, drafter=self.drafter,
                                   max_model_len=self.max_model_len, loads=self.tiers)
        self.grammars = Grammars(self.tokenizer)
        sampler = Sampler(config.seed, self.model_config.vocab_size, self.tokenizer.eos_token_ids, self.grammars,
                          self.device)
        self.runner = ModelRunner(model, self.model_config, self.num_blocks, self.block_size, self.max_model_len,
                                  self.device, self.dtype, sampler, num_state_slots)
        if self.tiers is not None:
            self.tiers.kv, self.tiers.states = self.runner.kv, self.runner.states
        if config.compile and not layout.has_recurrent:
            self._build_decode_graph(model)
        self.kv_pool_bytes = self.runner.kv.nbytes + sum(states.nbytes for states in self.runner.states)
        self._requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._num_steps = 0

    def _build_decode_graph(self, model) -> None:
        """Compiles the decode graph now, before the first request (docs/compile.md). Where it cannot
        be built (no C++ compiler, say), the engine decodes eagerly and the log says why."""
        start = time.perf_counter()
        try:
            self.runner.warm_up()
        except Exception as error:      # noqa: BLE001 - inductor's failures share no type
            log.warning("the decode graph did not build, decoding eagerly: %s: %s", type(error).__name__, error)
            model.decode_graph = None
            return
        log.info("decode graph ready in %.1f s (docs/compile.md)", time.perf_counter() - start)

    def _tier_link(self, model, layout) -> TierLink | None:
        """The tiers and KV-event observers (build_tiers, build_observers), when any is configured
        and the prefix cache is on; the model's fingerprint is computed only then."""
        config = self.config
        if not config.prefix_cache or not wants_keys(config):
            return None
        states = [(spec.shape, spec.dtype or self.dtype) for spec in state_specs(self.model_config)]
        layout_text = kv_layout_string(layout, self.model_config.num_key_value_heads, self.model_config.head_dim,
                                       states)
        digest = fingerprint(model, self.dtype, self.block_size, layout_text)
        return TierLink(build_tiers(config, digest), build_observers(config, digest, self.block_size), None, digest,
                        self.block_size)

    @property
    def replica_id(self) -> str | None:
        """The id this engine publishes its KV events under (with --kv-store), else None."""
        return replica_id(self.tiers.observers) if self.tiers is not None else None

    def lookup(self, prompt_ids: list[int], salt: str | None) -> Match:
        """The cache match `prompt_ids` would get now under `salt`, without running (POST /v1/cache/lookup)."""
        return self.cache.match(prompt_ids, salt)

    def check_cache(self) -> tuple[CacheStats, str | None]:
        """The cache's block states and its recounted invariants (DESIGN.md section 3): the first
        violation found, or None. Walks the whole pool: tests and soak runs only."""
        try:
            self.cache.check_invariants()
        except AssertionError as error:
            return self.cache.stats, str(error)
        return self.cache.stats, None

    def close(self) -> None:
        """Flushes the tiers' queued writes and stops their threads (graceful shutdown)."""
        if self.tiers is not None:
            self.tiers.close()

    def _num_state_slots(self, layout) -> int:
        """Hybrid models: a working slot per running sequence plus checkpoints, within a quarter of
        the budget (at least 2 checkpoint slots); 0 slots otherwise."""
        if not layout.has_recurrent:
            return 0
        return max(self.kv_cache_bytes // STATE_FRACTION // self.state_slot_bytes, self.config.max_num_seqs + 2)

    def _drafter(self, layout) -> NgramDrafter | None:
        """The drafter --speculative asks for; None when off, or (said once, in the log) when a
        recurrent layer's state could not roll back rejected drafts: then every request decodes plainly."""
        config = self.config
        if config.speculative is None:
            return None
        if config.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"unknown --speculative {config.speculative!r} "
                             f"(use one of {', '.join(SPECULATIVE_METHODS)})")
        drafter = NgramDrafter(config.spec_tokens, config.spec_ngram_max, config.spec_ngram_min)
        if layout.has_recurrent:
            log.warning("speculative decoding is off: %s has recurrent layers, whose state cannot roll back "
                        "rejected draft tokens; every request decodes one token per step", self.model_path)
            return None
        return drafter

    @property
    def pool_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def check_prompt(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """Raises ValueError with what to change when a request can never run."""
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        limit = min(self.max_model_len, self.pool_tokens)
        wanted = num_prompt_tokens + (max_tokens or 1)
        if wanted > limit:
            what = "context window" if self.max_model_len <= self.pool_tokens else "KV cache pool"
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens or 1}) = {wanted} "
                             f"exceeds the {what} of {limit} tokens; shorten the prompt or lower max_tokens")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, salt: str | None = None,
                    request_id: str | None = None, pins: tuple[tuple[int, float], ...] = ()) -> Request:
        """Queues a request. `pins`: (num_tokens, ttl_seconds) prefixes of the prompt to keep
        pinned in the cache once it ends (see cache/pins.py)."""
        self.check_prompt(len(prompt_ids), params.max_tokens)
        request = Request(prompt_ids, params, salt, request_id, pins)
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.runner.sampler.add(request.request_id, params, request.prompt_ids)    # GrammarError: a ValueError
        self._requests[request.request_id] = request
        self._detokenizers[request.request_id] = IncrementalDetokenizer(self.tokenizer, params.stop,
                                                                          params.skip_special_tokens)
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self._requests.get(request_id)
        if request is None:
            return None
        self.scheduler.finish(request, FinishReason.ABORT)
        return self._emit(request, "", [])

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        """Runs one batch. If its forward or sampling raises, its requests are ended (their blocks
        freed, what they had computed before the batch kept in the cache) and BatchFailed carries
        their outputs; every other request is untouched and the next step goes on."""
        if self.tiers is not None and self.tiers.num_loading:
            idle = not self.scheduler.waiting and not self.scheduler.running
            self.scheduler.loaded(self.tiers.poll(timeout=0.005 if idle else 0.0))
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        try:
            self._inject_fault()
            sampled, prompt_logprobs = self.runner.execute(plan)
        except Exception as error:
            raise BatchFailed([self._fail(self._requests[i]) for i in plan.request_ids], error) from error
        self._record_logprobs(plan, sampled, prompt_logprobs)
        advanced = self.scheduler.update(plan, [s.token_ids for s in sampled])
        return [self._advance(request, num_new) for request, num_new in advanced]

    def _fail(self, request: Request) -> RequestOutput:
        self.scheduler.fail(request)
        return self._emit(request, "", [])

    def _inject_fault(self) -> None:
        """--inject-fault-every N (tests only): every Nth batch fails."""
        every = self.config.inject_fault_every
        if every:
            self._num_steps += 1
            if self._num_steps % every == 0:
                raise RuntimeError(f"injected fault in batch {self._num_steps}")

    def _record_logprobs(self, plan, sampled: list[Sampled], prompt_logprobs: list[PromptLogprobs]) -> None:
        """Files the step's logprobs with their requests (sampled: in the runner's sampling order)."""
        for item, drawn in zip(plan.sampling, sampled):
            request = self._requests[item.request_id]
            if request.logprobs is not None:
                request.logprobs.extend(drawn.logprobs)
        for scored in prompt_logprobs:
            request = self._requests[scored.request_id]
            request.prompt_logprobs[scored.first:scored.first + len(scored.logprobs)] = scored.logprobs

    def _advance(self, request: Request, num_new: int) -> RequestOutput:
        """Puts the request's `num_new` newest tokens through the stop checks one by one, as if each
        came from its own step; the first that stops ends the request and drops the ones after it."""
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        first = len(request.output_ids) - num_new
        delta, reason, num_output = "", None, first
        while reason is None and num_output < len(request.output_ids):
            num_output += 1
            piece, reason = self._check(request, request.output_ids[num_output - 1], num_output)
            delta += piece
        new_ids = request.output_ids[first:num_output]
        if reason is not None:
            self.scheduler.truncate_output(request, num_output)
            delta += self._detokenizers[request.request_id].flush()
            self.scheduler.finish(request, reason)
        return self._emit(request, delta, new_ids)

    def _check(self, request: Request, token: int, num_output: int) -> tuple[str, FinishReason | None]:
        """The `num_output`-th output token through the stop conditions: (its final text, the
        reason it ends the request or None)."""
        params = request.params
        if (token in self.tokenizer.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return "", FinishReason.STOP
        detokenizer = self._detokenizers[request.request_id]
        delta = detokenizer.push(token)
        if detokenizer.stopped:
            return delta, FinishReason.STOP
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return delta, FinishReason.LENGTH
        if len(request.prompt_ids) + num_output >= self.max_model_len:
            return delta, FinishReason.LENGTH
        return delta, None

    def _emit(self, request: Request, delta: str, delta_ids: list[int]) -> RequestOutput:
        finished = request.status is RequestStatus.FINISHED
        detokenizer = self._detokenizers[request.request_id]
        if finished:
            del self._requests[request.request_id]
            del self._detokenizers[request.request_id]
            self.runner.sampler.forget(request.request_id)
        metrics = {"arrival": request.arrival, "first_token": request.first_token_time,
                   "finished": time.monotonic() if finished else None, "preemptions": request.num_preemptions}
        scored = request.logprobs
        delta_logprobs = scored[len(request.output_ids) - len(delta_ids):len(request.output_ids)] \
            if scored is not None else None
        logprobs = scored[:len(request.output_ids)] if scored is not None and finished else None
        return RequestOutput(
            request.request_id, request.prompt_ids, list(request.output_ids) if finished else None, detokenizer.text,
            delta, delta_ids, request.cached_tokens or 0, request.finish_reason, request.miss, request.diverged_at,
            metrics, logprobs, request.prompt_logprobs, dict(request.cached_tokens_by_tier), delta_logprobs)

    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        num_loading = self.tiers.num_loading if self.tiers is not None else 0     # waiting on a tier load
        return EngineStats(len(scheduler.running), len(scheduler.waiting) + num_loading, scheduler.num_preemptions,
                           self.cache.stats, scheduler.num_draft_tokens, scheduler.num_accepted_tokens,
                           self.weights_bytes, self.kv_pool_bytes,
                           self.tiers.stats() if self.tiers is not None else ())
