"""Qwen3.5's text model: a hybrid of Gated DeltaNet layers (recurrent state) and gated full attention.

Full-attention layers: q_proj also yields a sigmoid gate on the attention output; q/k RMSNorm; RoPE
on the first partial_rotary_factor of each head. Qwen3.5's multimodal RoPE gives text tokens the same
position on all three axes, which makes it plain RoPE. Its RMSNorms store weight - 1.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from reprise.cache.layout import LayerKind
from reprise.models.config import ModelConfig, cache_layout
from reprise.models.layers.attention import Attention
from reprise.models.layers.batch import ForwardBatch
from reprise.models.layers.gated_delta import RECURRENT_CHUNK, GatedDeltaNet
from reprise.models.layers.mlp import MLP
from reprise.models.layers.norm import OffsetRMSNorm
from reprise.models.layers.rope import RotaryEmbedding
from reprise.models.layers.weights import head_logits, load_weights


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, kind: LayerKind):
        super().__init__()
        self.input_layernorm = OffsetRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.recurrent = kind is LayerKind.RECURRENT
        if self.recurrent:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = Attention(config, OffsetRMSNorm, gated=True)
        self.post_attention_layernorm = OffsetRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache, batch: ForwardBatch):
        h = self.input_layernorm(x)
        if self.recurrent:
            x = x + self.linear_attn(h, cache, batch.recurrent)
        else:
            x = x + self.self_attn(h, rope, cache, batch.full)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3_5ForCausalLM(nn.Module):
    chunk_alignment = RECURRENT_CHUNK    # the recurrence computes in chunks: cuts on its grid keep hot == cold

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.cache_layout = cache_layout(config)
        rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        self.rope = RotaryEmbedding(rotary_dim, config.rope_theta, config.rope_scaling)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, kind) for kind in self.cache_layout.layer_kinds)
        self.norm = OffsetRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[tuple[torch.Tensor, ...]],
                batch: ForwardBatch, logits_indices: torch.Tensor) -> torch.Tensor:
        """Returns float32 logits for the tokens at logits_indices only (the ones that sample)."""
        x = self.embed_tokens(input_ids)
        rope = self.rope(positions, x.dtype)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rope, cache, batch)
        x = self.norm(x[logits_indices])
        return head_logits(self, x).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights)
