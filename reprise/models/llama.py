"""The Llama family: Llama 2/3, SmolLM2, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm), Mistral.

The model sees only attention inputs (AttentionBatch) and its KV tensors; it knows nothing of
requests, blocks or the cache. q/k/v and gate/up projections are fused at load so a layer is four
matmuls.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from reprise.models.config import ModelConfig
from reprise.models.layers.attention import AttentionBatch, paged_attention
from reprise.models.layers.norm import RMSNorm
from reprise.models.layers.rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.scale = self.head_dim ** -0.5

    def forward(self, x, rope, kv_cache, batch: AttentionBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(paged_attention(q, k, v, *kv_cache, batch, self.scale))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, kv_cache, batch):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], batch: AttentionBatch,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """Returns float32 logits for the tokens at logits_indices only (the ones that sample)."""
        x = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, rope, kv_cache, batch)
        x = self.norm(x[logits_indices])
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Takes Hugging Face names; fuses q/k/v and gate/up as their parts arrive."""
        params = dict(self.named_parameters())
        pending: dict[str, dict[str, torch.Tensor]] = {}
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            target, part = _fused_target(name)
            if target is None:
                if name not in params:
                    if name == "lm_head.weight" and self.lm_head is None:
                        continue
                    raise KeyError(f"unexpected weight {name}")
                params[name].data.copy_(tensor)
                loaded.add(name)
                continue
            parts = pending.setdefault(target, {})
            parts[part] = tensor
            order = _FUSED_ORDER[target.rsplit(".", 2)[-2]]
            if all(p in parts for p in order):
                params[target].data.copy_(torch.cat([parts[p] for p in order], dim=0))
                loaded.add(target)
                del pending[target]
        missing = set(params) - loaded
        if missing or pending:
            raise KeyError(f"weights missing from the model files: {sorted(missing)[:5]}")


_FUSED_ORDER = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_FUSED_PART = {p: fused for fused, parts in _FUSED_ORDER.items() for p in parts}


def _fused_target(name: str) -> tuple[str | None, str | None]:
    """'layers.3.self_attn.k_proj.bias' -> ('layers.3.self_attn.qkv_proj.bias', 'k_proj')."""
    pieces = name.split(".")
    if len(pieces) >= 2 and pieces[-2] in _FUSED_PART:
        part = pieces[-2]
        return ".".join([*pieces[:-2], _FUSED_PART[part], pieces[-1]]), part
    return None, None
