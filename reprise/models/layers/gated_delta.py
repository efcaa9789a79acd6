"""Gated DeltaNet (Qwen3.5's linear attention): a short causal conv, then the gated delta rule.

Per value head, with a state S [key_dim, value_dim] and per token t (g_t <= 0, 0 < beta_t < 1):

    S <- exp(g_t) * S                        decay
    S <- S + k_t (beta_t * (v_t - S^T k_t))^T    write the part of v_t that S does not already predict
    o_t = S^T q_t

`step_gated_delta` runs this token by token (decode); `chunked_gated_delta` runs it in chunks of
RECURRENT_CHUNK tokens, as matmuls within a chunk and the recurrence across chunks (prefill). The two
agree to rounding. A chunked run's arithmetic depends on where its chunks start: a prefill that
resumes from a saved state at a multiple of RECURRENT_CHUNK computes exactly what a cold run cut
there computes, which is why hybrid prefills are cut on that grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reprise.models.config import ModelConfig
from reprise.models.layers.batch import RecurrentBatch
from reprise.models.layers.norm import GatedRMSNorm

RECURRENT_CHUNK = 64


@dataclass(frozen=True)
class StateSpec:
    """One state tensor of a recurrent layer, per sequence (slot)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None        # None: the compute dtype


def step_gated_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row. q, k: [rows, heads, dk]; v: [rows, heads, dv]; g, beta: [rows, heads];
    state: [rows, heads, dk, dv]. Returns (out [rows, heads, dv], new state); all float32."""
    state = state * g.exp()[..., None, None]
    predicted = (k.unsqueeze(-2) @ state).squeeze(-2)
    delta = (v - predicted) * beta[..., None]
    state = state + k.unsqueeze(-1) * delta.unsqueeze(-2)
    return (q.unsqueeze(-2) @ state).squeeze(-2), state


def chunked_gated_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence. q, k: [tokens, heads, dk]; v: [tokens, heads, dv]; g, beta: [tokens, heads];
    state: [heads, dk, dv]. Returns (out [tokens, heads, dv], state after the last token); float32.

    Within a chunk, with G_t the cumulative log decay from the chunk's start through t and S0 the
    state before it, the values written, U = (I + L)^-1 (beta V - beta exp(G) K S0), where
    L[t, j] = beta_t exp(G_t - G_j) k_t.k_j for j < t, make the whole chunk a few matmuls; only the
    state crosses chunk boundaries. The tail is padded with g = beta = k = 0, which changes nothing.
    """
    length, size = q.shape[0], RECURRENT_CHUNK
    pad = -length % size
    q, k, v = (F.pad(x.transpose(0, 1), (0, 0, 0, pad)).unflatten(1, (-1, size)) for x in (q, k, v))
    g, beta = (F.pad(x.transpose(0, 1), (0, pad)).unflatten(1, (-1, size)) for x in (g, beta))
    decay = g.cumsum(-1)                                               # [heads, chunks, size]
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    # exp(G_t - G_j) for j <= t; masked before exp, where G_t - G_j > 0 could overflow
    pairwise = (decay[..., :, None] - decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta[..., None]
    lower = (k_beta @ k.transpose(-1, -2) * pairwise).tril(-1)
    solved = torch.linalg.solve_triangular(lower, torch.cat([v * beta[..., None], k_beta * decay.exp()[..., None]], -1),
                                           upper=False, unitriangular=True)
    written, state_part = solved.split([v.shape[-1], k.shape[-1]], dim=-1)
    scores = q @ k.transpose(-1, -2) * pairwise                        # within-chunk reads, self included
    q_decayed = q * decay.exp()[..., None]                            # reads of the state before the chunk
    k_to_end = k * (decay[..., -1:] - decay).exp()[..., None]         # decay from t to the chunk's end
    chunk_decay = decay[..., -1].exp()[..., None, None]
    outs = []
    for i in range(q.shape[1]):
        values = written[:, i] - state_part[:, i] @ state
        outs.append(q_decayed[:, i] @ state + scores[:, i] @ values)
        state = state * chunk_decay[:, i] + k_to_end[:, i].transpose(-1, -2) @ values
    return torch.cat(outs, dim=1)[:, :length].transpose(0, 1), state


def state_specs(config: ModelConfig) -> tuple[StateSpec, ...]:
    """A Gated DeltaNet layer's state: the conv's last kernel-1 inputs (exactly the inputs, so in the
    compute dtype) and the delta-rule state S, in float32 whatever the compute dtype: S sums every past
    token's decayed update, and in bfloat16 those updates would round away as it runs; a checkpoint
    restored later must also hold exactly what a cold run would have at that position."""
    num_heads, key_dim = config.linear_num_value_heads, config.linear_key_head_dim
    value_dim = config.linear_value_head_dim
    conv_dim = 2 * config.linear_num_key_heads * key_dim + num_heads * value_dim
    return (StateSpec((config.linear_conv_kernel_dim - 1, conv_dim), None),
            StateSpec((num_heads, key_dim, value_dim), torch.float32))


class GatedDeltaNet(nn.Module):
    """Token mixer of a linear-attention layer. Its cache is (conv states, delta states), each with a
    leading slot dimension; a prefill chunk continues from its slot and leaves its state there."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.key_dim, self.value_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_size, self.value_size = self.num_k_heads * self.key_dim, self.num_v_heads * self.value_dim
        self.conv_dim = 2 * self.key_size + self.value_size
        self.kernel = config.linear_conv_kernel_dim
        self.heads_tiled = config.linear_value_heads_tiled
        self.in_proj = nn.Linear(config.hidden_size, self.conv_dim + self.value_size + 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.value_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], batch: RecurrentBatch) -> torch.Tensor:
        conv_states, states = cache
        mixed, z, b, a = self.in_proj(x).split([self.conv_dim, self.value_size, self.num_v_heads, self.num_v_heads], -1)
        out = x.new_empty(x.shape[0], self.num_v_heads, self.value_dim)
        for chunk in batch.prefills:
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            window = torch.cat([conv_states[chunk.slot], mixed[rows]])          # [kernel - 1 + q_len, conv_dim]
            conv_states[chunk.slot] = window[window.shape[0] - self.kernel + 1:]
            out[rows], states[chunk.slot] = chunked_gated_delta(*self._inputs(self._conv(window), a[rows], b[rows]),
                                                                states[chunk.slot])
        if batch.decode_slots is not None:
            rows, slots = slice(batch.decode_start, x.shape[0]), batch.decode_slots
            window = torch.cat([conv_states[slots], mixed[rows, None]], dim=1)  # [rows, kernel, conv_dim]
            conv_states[slots] = window[:, 1:]
            out[rows], states[slots] = step_gated_delta(*self._inputs(self._conv(window)[:, 0], a[rows], b[rows]),
                                                        states[slots])
        return self.out_proj(self.norm(out, z.view(out.shape)).flatten(1))

    def _conv(self, window: torch.Tensor) -> torch.Tensor:
        """Depthwise causal conv + silu: [..., kernel - 1 + tokens, conv_dim] -> [..., tokens, conv_dim]."""
        out = F.conv1d(window.transpose(-1, -2).float(), self.conv1d.weight.float(), groups=self.conv_dim)
        return F.silu(out).transpose(-1, -2).to(window.dtype)

    def _inputs(self, mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        """q, k (unit length, q scaled, one per value head), v, g and beta in float32."""
        q, k, v = mixed.float().split([self.key_size, self.key_size, self.value_size], dim=-1)
        q = self._per_value_head(_unit(q.unflatten(-1, (self.num_k_heads, self.key_dim)))) * self.key_dim ** -0.5
        k = self._per_value_head(_unit(k.unflatten(-1, (self.num_k_heads, self.key_dim))))
        v = v.unflatten(-1, (self.num_v_heads, self.value_dim))
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        return q, k, v, g, b.sigmoid().float()

    def _per_value_head(self, x: torch.Tensor) -> torch.Tensor:
        """[..., key heads, dk] -> [..., value heads, dk]: each key head read by V/K value heads, grouped
        (HF's order) or tiled (GGUF's, see loader/gguf_families.py)."""
        group = self.num_v_heads // self.num_k_heads
        if self.heads_tiled:
            return torch.cat([x] * group, dim=-2)
        return x.repeat_interleave(group, -2)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalize the last dimension, with the epsilon the reference kernels use."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)
