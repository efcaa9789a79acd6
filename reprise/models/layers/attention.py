"""Paged attention over the KV cache, for prefill chunks and decodes, and the self-attention module
the families share.

The KV cache of a layer is a pair of tensors [kv_heads, num_blocks, block_size, head_dim], heads
outermost: one head's keys at consecutive slots (flat slot = block * block_size + offset) lie one
after another, so the keys a kernel reads for a head are one contiguous run, not every kv_heads-th
row. New K/V are written to their slots first. Then a chunk attends causally to its own fresh K/V
and to its sequence's earlier keys, read segment by segment from the cache (in place where its
blocks are consecutive: see batch.py), the results merged by their logsumexp. Decodes go in groups of similar
context length, each through one padded gather into buffers every layer of the step reuses, or, for
a lone sequence whose blocks follow each other, read in place: the same keys under the same additive
mask (built once per step by metadata.py), so the same arithmetic either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reprise.models.config import ModelConfig
from reprise.models.layers.batch import AttentionBatch, DecodeBatch, KeySegment, PaddedDecode, WindowedKeys
from reprise.models.layers.rope import apply_rotary


class Attention(nn.Module):
    """q/k/v fused into one projection; optional per-head q/k norm (`norm` is its class); with
    `gated`, q_proj also yields a per-head output gate (Qwen3.5: [q_h, gate_h] per head)."""

    def __init__(self, config: ModelConfig, norm: type[nn.Module] | None = None, gated: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.gated = config.head_dim, gated
        self.q_size = self.num_heads * self.head_dim * (2 if gated else 1)
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = norm(self.head_dim, config.rms_norm_eps) if norm else None
        self.k_norm = norm(self.head_dim, config.rms_norm_eps) if norm else None
        self.scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5

    def forward(self, x, rope, kv_cache, batch: AttentionBatch) -> torch.Tensor:
        q, k, v, gate = self.project(x, *rope)
        out = paged_attention(q, k, v, *kv_cache, batch, self.scale)
        if gate is not None:
            out = out * torch.sigmoid(gate.reshape(out.shape))
        return self.o_proj(out)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(q, k, v, gate) of the rows of x: fused projection, q/k norm, rope; gate is None unless gated."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        gate = None
        if self.gated:
            q, gate = q.reshape(-1, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, gate


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, dim], written at their flat slots of every head."""
    _flat(k_cache).index_copy_(1, slot_mapping, k.transpose(0, 1))
    _flat(v_cache).index_copy_(1, slot_mapping, v.transpose(0, 1))


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """[kv_heads, num_blocks * block_size, dim]: a view of the cache by flat slot."""
    return cache.view(cache.shape[0], -1, cache.shape[-1])


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads * dim]."""
    write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
    out = torch.empty_like(q)
    for chunk in batch.prefills:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        if chunk.windowed is not None:
            out[rows] = _windowed(q[rows], k_cache, v_cache, chunk.windowed, scale)
        else:
            out[rows] = _prefill(q[rows], k[rows], v[rows], k_cache, v_cache, chunk.prefix, scale)
    if batch.decode is not None:
        rows = slice(batch.decode.q_start, q.shape[0])
        out[rows] = _decode(q[rows], k_cache, v_cache, batch.decode, scale)
    return out.flatten(1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [..., q_len, dim], float32 logsumexp [..., q_len]) of softmax attention over these keys
    alone, so attention over several key segments merges exactly (_merge). On CPU, the fused kernel
    SDPA itself runs; it reads strided K/V (cache views) as they lie, with the same arithmetic as
    a contiguous copy. `causal` aligns the diagonal top-left (query i sees keys 0..i)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal, scale=scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(q.dtype), lse


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of disjoint key sets, from each set's (out, logsumexp)."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([part_lse for _, part_lse in parts]).logsumexp(0)
    out = sum(part.float() * torch.exp(part_lse - lse)[..., None] for part, part_lse in parts)
    return out.to(parts[0][0].dtype)


def _keys(cache: torch.Tensor, segment: KeySegment) -> torch.Tensor:
    """[1, kv_heads, length, dim]: a view of the cache where the segment's blocks are consecutive."""
    if segment.slots is None:
        return _flat(cache)[None, :, segment.start:segment.start + segment.length]
    return _flat(cache).index_select(1, segment.slots)[None]


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             prefix: tuple[KeySegment, ...], scale: float) -> torch.Tensor:
    """A chunk: causal over its own fresh K/V, plus every key of the prefix, merged. K/V are never
    repeated per query head: the own part expands them (stride 0), and the prefix part stacks a
    KV head's query heads as rows of one query matrix (no mask, so rows are independent)."""
    q_len, num_heads, dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    heads = q.view(q_len, num_kv_heads, group, dim).permute(1, 2, 0, 3)            # [kv_heads, group, q, dim]
    own_k = k.permute(1, 0, 2)[:, None].expand(num_kv_heads, group, q_len, dim)
    own_v = v.permute(1, 0, 2)[:, None].expand(num_kv_heads, group, q_len, dim)
    parts = [_attend(heads, own_k, own_v, scale, causal=True)]
    stacked = heads.reshape(1, num_kv_heads, group * q_len, dim)
    for segment in prefix:
        out, lse = _attend(stacked, _keys(k_cache, segment), _keys(v_cache, segment), scale)
        parts.append((out.view(num_kv_heads, group, q_len, dim), lse.view(num_kv_heads, group, q_len)))
    return _merge(parts).permute(2, 0, 1, 3).reshape(q_len, num_heads, dim)


def _windowed(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, keys: WindowedKeys,
              scale: float) -> torch.Tensor:
    """A chunk some of whose keys a sliding window hides from some of its queries: gathered keys
    (at most a window and a chunk of them), repeated per query head, under the additive mask."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[0]
    group = num_heads // num_kv_heads
    k = _gather(k_cache, keys.block_table, keys.num_keys).repeat_interleave(group, dim=0)
    v = _gather(v_cache, keys.block_table, keys.num_keys).repeat_interleave(group, dim=0)
    attn = F.scaled_dot_product_attention(                    # 4-D inputs reach the fused kernel
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=keys.mask, scale=scale)
    return attn[0].transpose(0, 1)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[kv_heads, length, dim] keys (or values) of one sequence, in position order."""
    return cache[:, block_table].flatten(1, 2)[:, :length]


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: DecodeBatch,
            scale: float) -> torch.Tensor:
    """One query per sequence; query heads grouped under their KV head (as the query rows of one
    attention) so K/V are never repeated. Measured on a 2-core CPU, a gather plus one batched call
    per length group beat reading each sequence's segments in place (the kernel then runs on a few
    heads at a time), so decodes gather; prefill chunks, whose work is in the math, read in place."""
    num_seqs, num_heads, dim = q.shape
    num_kv_heads = k_cache.shape[0]
    grouped = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, dim)
    if len(decode.groups) == 1 and decode.groups[0].rows is None:
        return _padded_decode(grouped, k_cache, v_cache, decode.groups[0], scale).view_as(q)
    out = torch.empty_like(q)
    for group in decode.groups:
        out[group.rows] = _padded_decode(grouped[group.rows], k_cache, v_cache, group, scale).view(-1, num_heads, dim)
    return out


def _padded_decode(grouped: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, padded: PaddedDecode,
                   scale: float) -> torch.Tensor:
    num_keys = padded.mask.shape[-1]
    if padded.start is not None:
        keys = _flat(k_cache)[None, :, padded.start:padded.start + num_keys]
        values = _flat(v_cache)[None, :, padded.start:padded.start + num_keys]
    else:
        keys, values = _gather_padded(k_cache, v_cache, padded)
    return F.scaled_dot_product_attention(grouped, keys, values, attn_mask=padded.mask, scale=scale)


def _gather_padded(k_cache: torch.Tensor, v_cache: torch.Tensor,
                   padded: PaddedDecode) -> tuple[torch.Tensor, torch.Tensor]:
    """[seqs, kv_heads, keys, dim] keys and values through the padded block tables, into the step's
    scratch buffers (allocated by the first layer, refilled by the others). One index_select of
    whole (head, block) rows: along the block dim of the 4-D cache it took ~1.4x as long."""
    num_kv_heads, num_blocks, block_size, dim = k_cache.shape
    index = _head_block_rows(padded, num_kv_heads, num_blocks)
    shape = (index.shape[0], block_size * dim)
    if shape not in padded.scratch:
        padded.scratch[shape] = (k_cache.new_empty(shape), v_cache.new_empty(shape))
    keys, values = padded.scratch[shape]
    torch.index_select(k_cache.view(-1, block_size * dim), 0, index, out=keys)
    torch.index_select(v_cache.view(-1, block_size * dim), 0, index, out=values)
    rows = (num_kv_heads, padded.mask.shape[0], -1, dim)     # [kv_heads, seqs, keys, dim]
    return keys.view(rows).transpose(0, 1), values.view(rows).transpose(0, 1)


def _head_block_rows(padded: PaddedDecode, num_kv_heads: int, num_blocks: int) -> torch.Tensor:
    """[kv_heads * seqs * max_blocks] rows of the cache viewed [kv_heads * num_blocks, block_size * dim]
    that hold the padded tables' blocks, head by head: made once a step, by its first layer."""
    key = ("rows", num_kv_heads, num_blocks)
    if key not in padded.scratch:
        heads = torch.arange(num_kv_heads, device=padded.block_tables.device)[:, None] * num_blocks
        padded.scratch[key] = (padded.block_tables + heads).flatten()
    return padded.scratch[key]
