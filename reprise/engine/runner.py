"""ModelRunner: owns the weights and KV tensors, turns a scheduled step into tensors, runs it, samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from reprise.engine.request import Request
from reprise.engine.sampler import Sampler
from reprise.models.config import ModelConfig
from reprise.models.layers.attention import AttentionBatch, DecodeBatch, PrefillChunk
from reprise.models.layers.rope import RotaryEmbedding


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    num_tokens: int             # tokens computed this step, from request.num_computed on
    samples: bool               # the chunk reaches the last token, so its logits pick the next one


@dataclass(frozen=True)
class StepPlan:
    """One engine step: prefill chunks, then decodes (one token each), after the block copies."""

    prefills: tuple[ScheduledChunk, ...]
    decodes: tuple[Request, ...]
    copies: tuple[tuple[int, int], ...]          # (src, dst) block copies for partial-block matches

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 max_model_len: int, device: torch.device, dtype: torch.dtype, seed: int):
        self.model, self.config, self.device, self.dtype = model, config, device, dtype
        self.block_size = block_size
        shape = (config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        # one tensor, so a block copy is one op for every layer; zeros, not empty: padded decode keys are
        # masked, but 0 * NaN from garbage memory would still be NaN
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.kv_caches = [(layer[0], layer[1]) for layer in self.kv]
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, max_model_len, device, dtype)
        self.sampler = Sampler(seed)

    def execute(self, plan: StepPlan) -> list[int]:
        """Runs one step; returns the sampled token of each chunk that samples, then of each decode."""
        logits, sampling = self.forward(plan)
        return self.sampler.sample(logits, [r.request_id for r in sampling], [r.params for r in sampling])

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> tuple[torch.Tensor, list[Request]]:
        """Float32 logits [num_sampling, vocab] and the requests they belong to, in plan order."""
        self._copy_blocks(plan.copies)
        input_ids, positions, batch, logits_indices, sampling = self._prepare(plan)
        return self.model(input_ids, self.rope.table(positions), self.kv_caches, batch, logits_indices), sampling

    def _copy_blocks(self, copies) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        self.kv[:, :, dst] = self.kv[:, :, src]

    def _prepare(self, plan: StepPlan):
        ids, positions, chunks, logits_indices, sampling = [], [], [], [], []
        for item in plan.prefills:
            request, start = item.request, item.request.num_computed
            end = start + item.num_tokens
            chunks.append(self._prefill_chunk(request, start, end, len(ids)))
            ids.extend(request.all_ids[start:end])
            positions.append(torch.arange(start, end))
            if item.samples:
                logits_indices.append(len(ids) - 1)
                sampling.append(request)
        decode = self._decode_batch(plan.decodes, len(ids)) if plan.decodes else None
        for request in plan.decodes:
            ids.append(request.all_ids[-1])
            positions.append(torch.tensor([request.num_tokens - 1]))
            logits_indices.append(len(ids) - 1)
            sampling.append(request)
        pos = torch.cat(positions)
        slots = self._slots(plan, pos)
        batch = AttentionBatch(slots.to(self.device), tuple(chunks), decode)
        to = dict(device=self.device)
        return (torch.tensor(ids, **to), pos.to(self.device), batch,
                torch.tensor(logits_indices, dtype=torch.long, **to), sampling)

    def _slots(self, plan: StepPlan, positions: torch.Tensor) -> torch.Tensor:
        """Flat KV slot of every token: its sequence's block for position // block_size, plus offset."""
        tables = [(item.request, item.num_tokens) for item in plan.prefills] + [(r, 1) for r in plan.decodes]
        block_ids = torch.cat([torch.tensor(r.cache.block_table, dtype=torch.long) for r, _ in tables])
        offsets, total = [], 0
        for request, count in tables:
            offsets.append(torch.full((count,), total, dtype=torch.long))
            total += len(request.cache.block_table)
        index = torch.cat(offsets) + positions // self.block_size
        return block_ids[index] * self.block_size + positions % self.block_size

    def _prefill_chunk(self, request: Request, start: int, end: int, q_start: int) -> PrefillChunk:
        num_blocks = -(-end // self.block_size)
        table = torch.tensor(request.cache.block_table[:num_blocks], device=self.device)
        mask = None
        if start > 0:      # additive and 4-D: the form SDPA's fused CPU kernel takes (a bool mask falls back to math)
            keys = torch.arange(end, device=self.device)
            hidden = keys[None, :] > torch.arange(start, end, device=self.device)[:, None]
            mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(hidden, float("-inf"))
            mask = mask[None, None]
        return PrefillChunk(q_start, end - start, end, table, mask)

    def _decode_batch(self, requests: tuple[Request, ...], q_start: int) -> DecodeBatch:
        width = max(-(-r.num_tokens // self.block_size) for r in requests)
        tables = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            blocks = request.cache.block_table[:width]
            tables[row, :len(blocks)] = torch.tensor(blocks)
        lengths = torch.tensor([r.num_tokens for r in requests])
        mask = torch.arange(width * self.block_size)[None, :] < lengths[:, None]
        return DecodeBatch(q_start, tables.to(self.device), mask[:, None, None, :].to(self.device))
