"""Hybrid (Qwen3.5) and sliding-window (Gemma 3, Mistral) models: reprise's logits equal transformers'
through the engine path, with prefill chunks and decodes past the window."""
from __future__ import annotations

import pytest
import torch
import transformers

from reprise.cache.layout import LayerKind
from reprise.config import EngineConfig
from reprise.engine.engine import Engine
from tests.models.helpers import engine_logits
from tests.models.test_logits import _write_tokenizer

SIZES = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)
QWEN3_5 = dict(num_hidden_layers=4, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=16, linear_value_head_dim=16,
               layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"])
GEMMA3 = dict(num_hidden_layers=4, head_dim=16, sliding_window=16, query_pre_attn_scalar=24,
              final_logit_softcapping=30.0,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
MISTRAL = dict(num_hidden_layers=3, sliding_window=32)
# name: config class, model class, config options, prompt tokens, decoded tokens, prefill chunk, kinds
CASES = {
    "qwen3_5": (transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM, QWEN3_5, 150, 16, 64,
                {LayerKind.RECURRENT, LayerKind.FULL}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, GEMMA3, 70, 30, 48,
               {LayerKind.SLIDING, LayerKind.FULL}),
    "mistral-sliding": (transformers.MistralConfig, transformers.MistralForCausalLM, MISTRAL, 70, 30, 48,
                        {LayerKind.SLIDING}),
}


def tiny_model(tmp_path, config_cls, model_cls, options):
    torch.manual_seed(0)
    model = model_cls(config_cls(**SIZES, **options)).eval()
    with torch.no_grad():      # norms start at 0 (for 1 + weight) or 1: move them so a wrong formula shows
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    _write_tokenizer(tmp_path)
    return model


@pytest.mark.parametrize("case", CASES)
def test_tiny_model_matches_transformers(case, tmp_path):
    config_cls, model_cls, options, num_prompt, num_decode, chunk, kinds = CASES[case]
    model = tiny_model(tmp_path, config_cls, model_cls, options)
    engine = Engine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_bytes=4 * 2**20, block_size=16))
    assert set(engine.runner.model.cache_layout.layer_kinds) == kinds
    ids = torch.randint(0, SIZES["vocab_size"], (num_prompt + num_decode,)).tolist()
    window = options.get("sliding_window") if kinds == {LayerKind.SLIDING} else None
    ours = engine_logits(engine, ids, num_prompt, chunk=chunk, drop_outside=window)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0, num_prompt - 1:].float()
    assert (ours - reference).abs().max().item() < 1e-5


def test_compiled_decode_past_the_window_matches_transformers(tmp_path):
    """The compiled graph's decode attention (reprise::decode_attention) on a sliding-window model:
    keys from the window's first position only, the blocks wholly older than it released."""
    config_cls, model_cls, options, num_prompt, num_decode, chunk, _ = CASES["mistral-sliding"]
    model = tiny_model(tmp_path, config_cls, model_cls, options)
    engine = Engine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_bytes=4 * 2**20, block_size=16,
                                 compile=True))
    assert engine.runner.model.decode_graph is not None
    ids = torch.randint(0, SIZES["vocab_size"], (num_prompt + num_decode,)).tolist()
    ours = engine_logits(engine, ids, num_prompt, chunk=chunk, drop_outside=options["sliding_window"])
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0, num_prompt - 1:].float()
    assert (ours - reference).abs().max().item() < 1e-5
