"""Gemma 3's text model: sliding-window and full attention layers interleaved per `layer_types`.

Differences from Llama: embeddings scaled by sqrt(hidden_size) (rounded to the compute dtype, as the
reference does); RMSNorms store weight - 1; four norms per layer (before and after attention and
MLP); q/k RMSNorm; attention scale query_pre_attn_scalar^-1/2; gelu-tanh MLP; sliding layers use
their own RoPE base, full layers the global base and its scaling; optional final logit softcapping.
The reference ignores attn_logit_softcapping for Gemma 3, and so does this model.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from reprise.cache.layout import LayerKind
from reprise.models.config import ModelConfig, cache_layout
from reprise.models.layers.attention import Attention
from reprise.models.layers.batch import ForwardBatch
from reprise.models.layers.mlp import MLP
from reprise.models.layers.norm import OffsetRMSNorm
from reprise.models.layers.rope import RotaryEmbedding
from reprise.models.layers.weights import head_logits, load_weights


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str, kind: LayerKind):
        super().__init__()
        # the RoPE base follows the declared type; the batch follows the cache kind, which is FULL
        # for a window that never cuts
        self.local = layer_type == "sliding_attention"
        self.sliding = kind is LayerKind.SLIDING
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = OffsetRMSNorm(size, eps)
        self.self_attn = Attention(config, OffsetRMSNorm)
        self.post_attention_layernorm = OffsetRMSNorm(size, eps)
        self.pre_feedforward_layernorm = OffsetRMSNorm(size, eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = OffsetRMSNorm(size, eps)

    def forward(self, x, ropes, kv_cache, batch: ForwardBatch):
        rope = ropes[1] if self.local else ropes[0]
        attention = batch.sliding if self.sliding else batch.full
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, kv_cache, attention))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(nn.Module):
    chunk_alignment = 1     # prefill chunks may end at any token

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.cache_layout = cache_layout(config)
        self.global_rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.local_rope = RotaryEmbedding(config.head_dim, config.rope_local_base_freq or config.rope_theta, None)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, layer_type, kind)
                                    for layer_type, kind in zip(config.layer_types, self.cache_layout.layer_kinds))
        self.norm = OffsetRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[tuple[torch.Tensor, ...]],
                batch: ForwardBatch, logits_indices: torch.Tensor) -> torch.Tensor:
        """Returns float32 logits for the tokens at logits_indices only (the ones that sample)."""
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        ropes = self.global_rope(positions, x.dtype), self.local_rope(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, caches):
            x = layer(x, ropes, kv_cache, batch)
        x = self.norm(x[logits_indices])
        logits = head_logits(self, x).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights)
