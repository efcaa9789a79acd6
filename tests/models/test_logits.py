"""reprise's logits equal transformers' for the same weights: tiny random models and the default model."""
from __future__ import annotations

import pytest
import torch
import transformers

from reprise.config import EngineConfig
from reprise.engine.engine import Engine
from reprise.loader import default_model_path, load_model
from tests.models.helpers import engine_logits

NUM_PROMPT, NUM_DECODE = 64, 16
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3-rope-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
}


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits[NUM_PROMPT - 1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_random_model_matches_transformers(family, tmp_path):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **extra)).eval()
    model.save_pretrained(tmp_path)
    _write_tokenizer(tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_bytes=4 * 2**20, block_size=16))
    ids = torch.randint(0, TINY["vocab_size"], (NUM_PROMPT + NUM_DECODE,)).tolist()
    ours = engine_logits(engine, ids, NUM_PROMPT)
    assert (ours - reference_logits(model, ids)).abs().max().item() < 1e-3


def test_default_model_matches_transformers():
    # transformers' GGUF path needs `accelerate`; its model class with the GGUF's dequantized weights is the
    # same reference (tests/loader proves those weights equal transformers' own GGUF processing, bit for bit)
    loaded = load_model(default_model_path())
    c = loaded.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings)
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = reference.load_state_dict(dict(loaded.weights()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    reference.tie_weights()
    engine = Engine(EngineConfig(dtype="float32", kv_cache_bytes=16 * 2**20))
    text = "The quick brown fox jumps over the lazy dog. " * 20
    ids = engine.tokenizer.encode(text)[:NUM_PROMPT + NUM_DECODE]
    ours = engine_logits(engine, ids, NUM_PROMPT)
    assert (ours - reference_logits(reference, ids)).abs().max().item() < 1e-3


def _write_tokenizer(directory) -> None:
    """A small byte-level BPE tokenizer so the directory is a complete model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    tokenizer = Tokenizer(models.BPE(vocab={chr(i + 33): i for i in range(94)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
