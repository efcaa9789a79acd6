"""The Llama family: Llama 2/3, SmolLM2, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm), Mistral (with or
without a sliding window on every layer).

The model sees only attention inputs (ForwardBatch) and its KV tensors; it knows nothing of
requests, blocks or the cache. q/k/v and gate/up projections are fused at load so a layer is four
matmuls.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from reprise.cache.layout import LayerKind
from reprise.models.config import ModelConfig, cache_layout
from reprise.models.layers.attention import Attention, paged_attention
from reprise.models.layers.batch import AttentionBatch, ForwardBatch
from reprise.models.layers.compiled import DecodeGraph
from reprise.models.layers.mlp import MLP
from reprise.models.layers.norm import RMSNorm
from reprise.models.layers.rope import RotaryEmbedding
from reprise.models.layers.weights import head_logits, load_weights


class DecoderLayer(nn.Module):
    """Its forward is split around paged attention (the model's `hidden` runs the halves) so that a
    compiled decode graph can take the attention as one opaque op (compiled.py)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, RMSNorm if config.qk_norm else None)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


def _attention_inputs(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k, v of the rows of x: input norm, then Attention.project (llama layers have no gate)."""
    return layer.self_attn.project(layer.input_layernorm(x), cos, sin)[:3]


def _layer_output(layer: DecoderLayer, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """The layer's output rows from its input rows and their attention: o_proj, residual, MLP."""
    x = x + layer.self_attn.o_proj(attention)
    return x + layer.mlp(layer.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    chunk_alignment = 1     # prefill chunks may end at any token

    def __init__(self, config: ModelConfig, compile: bool = False):
        super().__init__()
        self.config = config
        self.cache_layout = cache_layout(config)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decode_graph = DecodeGraph() if compile else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[tuple[torch.Tensor, ...]],
                batch: ForwardBatch, logits_indices: torch.Tensor) -> torch.Tensor:
        """Returns float32 logits for the tokens at logits_indices only (the ones that sample)."""
        # one kind for every layer: all FULL, or all SLIDING (Mistral with a window)
        attention = batch.sliding if self.cache_layout.layer_kinds[0] is LayerKind.SLIDING else batch.full
        if self.decode_graph is not None and attention.decode is not None:
            return self.decode_graph(self, input_ids, positions, caches, attention, logits_indices)
        return self.eager(input_ids, positions, caches, attention, logits_indices)

    def eager(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[tuple[torch.Tensor, ...]],
              attention: AttentionBatch, logits_indices: torch.Tensor) -> torch.Tensor:
        def attend(q, k, v, layer: int, scale: float) -> torch.Tensor:
            return paged_attention(q, k, v, *caches[layer], attention, scale)
        return self.logits(self.hidden(input_ids, positions, attend)[logits_indices])

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Callable) -> torch.Tensor:
        """The last layer's output rows; `attend(q, k, v, layer, scale)` is a layer's attention."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for index, layer in enumerate(self.layers):
            q, k, v = _attention_inputs(layer, x, cos, sin)
            x = _layer_output(layer, x, attend(q, k, v, index, layer.self_attn.scale))
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the rows of x, the last layer's output."""
        return head_logits(self, self.norm(x)).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights)
