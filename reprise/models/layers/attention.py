"""Paged attention: one path that reads K/V through block tables, for prefill chunks and decodes alike.

The KV cache of a layer is a pair of tensors [num_blocks, block_size, kv_heads, head_dim]. A step's
tokens are laid out flat: first each prefill chunk (one sequence after another), then every decode
token (one per sequence). New K/V are written to their slots first, then each query reads its
sequence's keys through the block table, so a chunk sees the cached prefix and itself.

    tokens:   | prefill seq A (q_len_a) | prefill seq B (q_len_b) | decode x1 | decode x1 | ...
    keys:     A: block_table_a[:ctx_len_a]            decode: block_tables[b][:ctx_lens[b]], padded
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillChunk:
    q_start: int                 # first token of this chunk in the flat batch
    q_len: int                   # tokens computed in this chunk
    ctx_len: int                 # keys visible to the chunk's last token (cached prefix + chunk)
    block_table: torch.Tensor    # [ceil(ctx_len / block_size)] block ids
    mask: torch.Tensor | None    # [1, 1, q_len, ctx_len] additive (0 / -inf); None when the chunk starts at 0


@dataclass(frozen=True)
class DecodeBatch:
    q_start: int                 # decode tokens are the last `num_seqs` tokens of the batch
    block_tables: torch.Tensor   # [num_seqs, max_blocks], padded with any valid block id
    mask: torch.Tensor           # [num_seqs, 1, 1, max_blocks * block_size] bool: key is visible


@dataclass(frozen=True)
class AttentionBatch:
    slot_mapping: torch.Tensor   # [num_tokens] flat slot (block * block_size + offset) for new K/V
    prefills: tuple[PrefillChunk, ...]
    decode: DecodeBatch | None


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
    keys = _gather(k_cache, chunk.block_table, chunk.ctx_len).transpose(0, 1)
    values = _gather(v_cache, chunk.block_table, chunk.ctx_len).transpose(0, 1)
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
