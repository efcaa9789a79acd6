"""ModelRunner: owns the weights, KV and state tensors, turns a scheduled step into tensors, runs it, samples.

It never sees a `Request`: a StepPlan carries ids, tokens, positions and block ids, and the runner
keeps each running request's block table from step to step (vLLM v1's `InputBatch`), updated from
the block ids the plan sends (usually none for a decode), until the plan drops the request."""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from reprise.cache.layout import LayerKind
from reprise.engine.distributions import token_logprobs
from reprise.engine.plan import ScheduledChunk, StepPlan
from reprise.engine.request import Sampled, TokenLogprob
from reprise.engine.sampler import Sampler
from reprise.models import state_specs
from reprise.models.config import ModelConfig, cache_layout
from reprise.engine.metadata import SeqRows, attention_batch, slot_mapping
from reprise.models.layers.batch import AttentionBatch, ForwardBatch, RecurrentBatch, RecurrentChunk
from reprise.models.layers.native import cpu_flags


@dataclass(frozen=True)
class PromptLogprobs:
    """Logprobs of prompt tokens [first, first + len(logprobs)) of one request, from one chunk."""

    request_id: str
    first: int
    logprobs: list[TokenLogprob]


def cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block across the attention (FULL and SLIDING) layers."""
    element = torch.empty((), dtype=dtype).element_size()
    num_layers = cache_layout(config).num_attention_layers
    return 2 * num_layers * block_size * config.num_key_value_heads * config.head_dim * element


def state_bytes_per_slot(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one state slot across the recurrent layers (0 for a model without any)."""
    num_layers = cache_layout(config).layer_kinds.count(LayerKind.RECURRENT)
    per_layer = sum(math.prod(spec.shape) * torch.empty((), dtype=spec.dtype or dtype).element_size()
                    for spec in state_specs(config))
    return num_layers * per_layer


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose memory costs RAM only as it is written: on CPU, anonymous private mmap pages,
    which the kernel maps to the shared zero page until first written (the tensor keeps the mapping
    alive). Elsewhere, torch.zeros."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if num_bytes == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(shape)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 max_model_len: int, device: torch.device, dtype: torch.dtype, sampler: Sampler,
                 num_state_slots: int = 0):
        self.model, self.config, self.device, self.dtype = model, config, device, dtype
        self.block_size = block_size
        layout = model.cache_layout
        if layout.has_recurrent and num_state_slots < 1:
            raise ValueError("a model with recurrent layers needs num_state_slots >= 1")
        self.kinds = set(layout.layer_kinds)
        # a window that covers every position a sequence can reach never cuts: sliding layers then
        # share the full-attention inputs
        window = layout.sliding_window
        self.window = window if window is not None and window < max_model_len else None
        shape = (layout.num_attention_layers, 2, config.num_key_value_heads, num_blocks, block_size, config.head_dim)
        # one tensor, so a block copy is one op for every layer; heads outside blocks, so one head's keys
        # of consecutive blocks are one contiguous run (decode attention at 3,000 keys read them ~1.7x
        # faster than strided by kv_heads * head_dim); zeros, not empty: padded decode keys are masked,
        # but 0 * NaN from garbage memory would still be NaN
        self.kv = lazy_zeros(shape, dtype, device)
        num_recurrent = layout.layer_kinds.count(LayerKind.RECURRENT)
        # one tensor per state kind, all recurrent layers and slots, so a slot copy is one op per kind
        self.states = [lazy_zeros((num_recurrent, num_state_slots, *spec.shape), spec.dtype or dtype, device)
                       for spec in state_specs(config)]
        self.caches = self._layer_caches(layout)
        self.sampler = sampler
        self.block_tables: dict[str, list[int | None]] = {}    # per running request, kept across steps

    def _layer_caches(self, layout) -> list[tuple[torch.Tensor, ...]]:
        """Per layer, views into the shared tensors: (k, v) for attention, its states for recurrent layers."""
        caches, num_attention, num_recurrent = [], 0, 0
        for kind in layout.layer_kinds:
            if kind is LayerKind.RECURRENT:
                caches.append(tuple(states[num_recurrent] for states in self.states))
                num_recurrent += 1
            else:
                caches.append(tuple(self.kv[num_attention]))
                num_attention += 1
        return caches

    def execute(self, plan: StepPlan) -> tuple[list[Sampled], list[PromptLogprobs]]:
        """Runs one step; returns what was sampled for each chunk that samples, then each verify
        (1 to len(draft_ids) + 1 tokens), then each decode (one token each); and the prompt
        logprobs of the chunks of requests that asked for them."""
        logits, prompt_logprobs = self.forward(plan)
        items = plan.sampling
        sampled = self.sampler.sample(logits, [item.request_id for item in items], [item.draft_ids for item in items])
        return sampled, prompt_logprobs

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> tuple[torch.Tensor, list[PromptLogprobs]]:
        """Float32 logits, one row per sampling position of `plan.sampling`'s items, in order (a verify
        has 1 + len(draft_ids) rows, the others one); then the prompt logprobs of chunks whose request
        asked for them."""
        self._update_tables(plan)
        self.copy_blocks(plan.copies)
        self._copy_states(plan.state_copies)
        self._reset_states(plan)
        input_ids, positions, batch, logits_indices = self._prepare(plan)
        num_sampling = len(logits_indices)
        scored, rows = self._scored_prompt_rows(plan)
        if scored:
            logits_indices = torch.cat([logits_indices, rows])
        logits = self.model(input_ids, positions, self.caches, batch, logits_indices)
        self._copy_states(plan.state_snapshots)
        return logits[:num_sampling], self._prompt_logprobs(logits[num_sampling:], scored)

    def _update_tables(self, plan: StepPlan) -> None:
        """Forgets dropped requests, then brings each scheduled one's block table up to date."""
        for request_id in plan.dropped:
            self.block_tables.pop(request_id, None)
        for item in plan.items:
            table = self.block_tables.setdefault(item.request_id, [])
            if item.num_kept_blocks < len(table) or item.new_block_ids:
                del table[item.num_kept_blocks:]
                table.extend(item.new_block_ids)
            num_released = item.num_released_blocks
            if num_released and table[num_released - 1] is not None:
                table[:num_released] = [None] * num_released

    def _scored_prompt_rows(self, plan: StepPlan) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """The prefill chunks that score prompt tokens (the row at position p scores token p + 1),
        and the batch rows that do."""
        scored, rows, first = [], [], 0
        for item in plan.prefills:
            if item.scored_ids:
                scored.append(item)
                rows.append(torch.arange(first, first + len(item.scored_ids)))
            first += item.num_tokens
        return scored, (torch.cat(rows).to(self.device) if rows else torch.empty(0))

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, scored: list[ScheduledChunk]) -> list[PromptLogprobs]:
        results, row = [], 0
        for item in scored:
            count = len(item.scored_ids)
            logprobs = token_logprobs(logits[row:row + count], list(item.scored_ids), item.prompt_logprobs)
            results.append(PromptLogprobs(item.request_id, item.start + 1, logprobs))
            row += count
        return results

    def copy_blocks(self, copies) -> None:
        if copies:
            src, dst = self._pairs(copies)
            self.kv[:, :, :, dst] = self.kv[:, :, :, src]

    def _copy_states(self, copies) -> None:
        if copies:
            src, dst = self._pairs(copies)
            for states in self.states:
                states[:, dst] = states[:, src]

    def _pairs(self, copies) -> tuple[torch.Tensor, torch.Tensor]:
        src, dst = zip(*copies)
        return torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)

    def _reset_states(self, plan: StepPlan) -> None:
        """A sequence computed from position 0 starts from zero states (nothing before it)."""
        fresh = [item.state_slot for item in plan.prefills if item.start == 0]
        if self.states and fresh:
            slots = torch.tensor(fresh, device=self.device)
            for states in self.states:
                states[:, slots] = 0

    def _prepare(self, plan: StepPlan):
        ids, positions, logits_indices = [], [], []
        for item in plan.prefills:
            ids.extend(item.token_ids)
            positions.extend(range(item.start, item.start + item.num_tokens))
            if item.samples:
                logits_indices.append(len(ids) - 1)
        for verify in plan.verifies:
            ids.extend(verify.token_ids)
            positions.extend(range(verify.start, verify.start + verify.num_tokens))
            logits_indices.extend(range(len(ids) - verify.num_tokens, len(ids)))
        num_chunked = len(ids)
        for item in plan.decodes:
            ids.extend(item.token_ids)
            positions.append(item.start)
            logits_indices.append(len(ids) - 1)
        batch = self._batch(plan, num_chunked)
        to = dict(dtype=torch.long, device=self.device)
        return (torch.tensor(ids, **to), torch.tensor(positions, **to), batch,
                torch.tensor(logits_indices, **to))

    def _batch(self, plan: StepPlan, num_chunked: int) -> ForwardBatch:
        full = sliding = recurrent = None
        if self.kinds - {LayerKind.RECURRENT}:
            full, sliding = self._attention(self._rows(plan))
        if LayerKind.RECURRENT in self.kinds:
            if plan.verifies:
                raise ValueError("a recurrent layer cannot roll back the state of rejected draft tokens")
            recurrent = self._recurrent_batch(plan, num_chunked)
        return ForwardBatch(full, sliding, recurrent)

    def _attention(self, rows: list[SeqRows]) -> tuple[AttentionBatch | None, AttentionBatch | None]:
        """The full and sliding attention metadata of these rows (None for a kind the model lacks)."""
        slots = slot_mapping(rows, self.block_size).to(self.device)
        graph = getattr(self.model, "decode_graph", None) is not None   # None where it did not build
        batch = lambda window: attention_batch(rows, slots, self.block_size, window, self.device, self.dtype, graph)
        full = batch(None) if LayerKind.FULL in self.kinds or self.window is None else None
        sliding = None
        if LayerKind.SLIDING in self.kinds:
            sliding = full if self.window is None else batch(self.window)
        return full, sliding

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Decodes one token through the model, so that a compiled decode graph (layers/compiled.py:
        one for every batch size) is built, or loaded from the kernel cache, before the first
        request. Attention-only models; it writes one slot of block 0, which holds nothing yet, and
        samples nothing."""
        rows = [SeqRows("warm-up", [0], 0, 1, False)]
        token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.model(token, token, self.caches, ForwardBatch(*self._attention(rows), None), token)

    def _rows(self, plan: StepPlan) -> list[SeqRows]:
        """Each sequence's tokens in batch order: prefill chunks, verifies (chunks too), decodes."""
        tables = self.block_tables
        rows = [SeqRows(item.request_id, tables[item.request_id], item.start, item.num_tokens, True)
                for item in (*plan.prefills, *plan.verifies)]
        rows += [SeqRows(item.request_id, tables[item.request_id], item.start, 1, False) for item in plan.decodes]
        return rows

    def _recurrent_batch(self, plan: StepPlan, num_prefill: int) -> RecurrentBatch:
        chunks, q_start = [], 0
        for item in plan.prefills:
            chunks.append(RecurrentChunk(q_start, item.num_tokens, item.state_slot))
            q_start += item.num_tokens
        slots = None
        if plan.decodes:
            slots = torch.tensor([item.state_slot for item in plan.decodes], dtype=torch.long, device=self.device)
        return RecurrentBatch(tuple(chunks), num_prefill, slots)
