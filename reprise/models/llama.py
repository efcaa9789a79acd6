"""The Llama family: Llama 2/3, SmolLM2, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm), Mistral (with or
without a sliding window on every layer).

The model sees only attention inputs (ForwardBatch) and its KV tensors; it knows nothing of
requests, blocks or the cache. q/k/v and gate/up projections are fused at load so a layer is four
matmuls.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from reprise.cache.layout import LayerKind
from reprise.models.config import ModelConfig, cache_layout
from reprise.models.layers.attention import Attention, paged_attention
from reprise.models.layers.batch import ForwardBatch
from reprise.models.layers.compiled import EAGER, DenseSteps
from reprise.models.layers.mlp import MLP
from reprise.models.layers.norm import RMSNorm
from reprise.models.layers.rope import RotaryEmbedding
from reprise.models.layers.weights import head_logits, load_weights


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, RMSNorm if config.qk_norm else None)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, kv_cache, batch, dense: DenseSteps = EAGER):
        """Attention.forward split around paged attention, so that `dense` can compile the halves
        that are row-wise math (compiled.py) while the attention over the paged cache stays eager."""
        first_decode = batch.decode.q_start if batch.decode is not None else None
        q, k, v = dense(_attention_inputs, self, first_decode, x, *rope)
        out = paged_attention(q, k, v, *kv_cache, batch, self.self_attn.scale)
        return dense(_layer_output, self, first_decode, x, out)[0]


def _attention_inputs(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k, v of the rows of x: input norm, then Attention.project (llama layers have no gate)."""
    return layer.self_attn.project(layer.input_layernorm(x), cos, sin)[:3]


def _layer_output(layer: DecoderLayer, x: torch.Tensor, attention: torch.Tensor):
    """The layer's output rows from its input rows and their attention: o_proj, residual, MLP."""
    x = x + layer.self_attn.o_proj(attention)
    return (x + layer.mlp(layer.post_attention_layernorm(x)),)


class LlamaForCausalLM(nn.Module):
    chunk_alignment = 1     # prefill chunks may end at any token

    def __init__(self, config: ModelConfig, dense: DenseSteps = EAGER):
        super().__init__()
        self.config, self.dense = config, dense
        self.cache_layout = cache_layout(config)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[tuple[torch.Tensor, ...]],
                batch: ForwardBatch, logits_indices: torch.Tensor) -> torch.Tensor:
        """Returns float32 logits for the tokens at logits_indices only (the ones that sample)."""
        x = self.embed_tokens(input_ids)
        rope = self.rope(positions, x.dtype)
        # one kind for every layer: all FULL, or all SLIDING (Mistral with a window)
        attention = batch.sliding if self.cache_layout.layer_kinds[0] is LayerKind.SLIDING else batch.full
        for layer, kv_cache in zip(self.layers, caches):
            x = layer(x, rope, kv_cache, attention, self.dense)
        x = self.norm(x[logits_indices])
        return head_logits(self, x).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights)
