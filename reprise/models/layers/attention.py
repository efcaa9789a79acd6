"""Paged attention: one path that reads K/V through block tables, for prefill chunks and decodes alike,
and the self-attention module the families share.

The KV cache of a layer is a pair of tensors [num_blocks, block_size, kv_heads, head_dim]. New K/V
are written to their slots first, then each query reads its sequence's keys through its block table
(see batch.py), so a chunk sees the cached prefix and itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reprise.models.config import ModelConfig
from reprise.models.layers.batch import AttentionBatch, DecodeBatch, PrefillChunk
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
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        gate = None
        if self.gated:
            q, gate = q.view(-1, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = paged_attention(q, k, v, *kv_cache, batch, self.scale)
        if gate is not None:
            out = out * torch.sigmoid(gate.reshape(out.shape))
        return self.o_proj(out)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads * dim]."""
    write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
    out = torch.empty_like(q)
    for chunk in batch.prefills:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        out[rows] = _prefill(q[rows], k_cache, v_cache, chunk, scale)
    if batch.decode is not None:
        rows = slice(batch.decode.q_start, q.shape[0])
        out[rows] = _decode(q[rows], k_cache, v_cache, batch.decode, scale)
    return out.flatten(1)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[length, kv_heads, dim] keys (or values) of one sequence, in position order."""
    return cache[block_table].flatten(0, 1)[:length]


def _prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: PrefillChunk,
             scale: float) -> torch.Tensor:
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = _gather(k_cache, chunk.block_table, chunk.num_keys).transpose(0, 1)
    values = _gather(v_cache, chunk.block_table, chunk.num_keys).transpose(0, 1)
    if group > 1:
        keys = keys.repeat_interleave(group, dim=0)
        values = values.repeat_interleave(group, dim=0)
    attn = F.scaled_dot_product_attention(                    # 4-D inputs reach the fused kernel
        q.transpose(0, 1)[None], keys[None], values[None], attn_mask=chunk.mask, is_causal=chunk.mask is None,
        scale=scale)
    return attn[0].transpose(0, 1)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: DecodeBatch,
            scale: float) -> torch.Tensor:
    """One query per sequence; query heads grouped under their KV head so K/V are never repeated."""
    num_seqs, num_heads, dim = q.shape
    num_kv_heads = k_cache.shape[2]
    keys = k_cache[decode.block_tables].flatten(1, 2).permute(0, 2, 1, 3)    # [seqs, kv_heads, keys, dim]
    values = v_cache[decode.block_tables].flatten(1, 2).permute(0, 2, 1, 3)
    grouped = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, dim)
    attn = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=decode.mask, scale=scale)
    return attn.reshape(num_seqs, num_heads, dim)
