"""Hugging Face directories: tiny random models saved by transformers load back tensor for tensor."""
from __future__ import annotations

import json
import os

import pytest
import torch

from reprise.loader import load_model
from tests.loader.loader_testing import VOCAB, write_tokenizer

SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}


def save_tiny(path, family: str, dtype=torch.float32, max_shard_size=None, **config_options):
    """A random tiny model of `family` saved with save_pretrained; returns its state dict."""
    import transformers
    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                 "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                                 "mistral": ("MistralConfig", "MistralForCausalLM")}[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SIZES, **config_options})
    model = getattr(transformers, model_class)(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    write_tokenizer(str(path))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(loaded, state: dict, tied: bool) -> None:
    weights = dict(loaded.weights())
    expected = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    assert set(weights) == set(expected)
    for name, value in expected.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], value.float()), name


@pytest.mark.parametrize("family, options, expected", [
    ("llama", {"tie_word_embeddings": True, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_ROPE),
               "max_position_embeddings": 4096},
     {"tie_word_embeddings": True, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "attention_bias": False}),
    ("qwen2", {}, {"attention_bias": True, "qk_norm": False, "sliding_window": None, "tie_word_embeddings": False}),
    ("qwen3", {"head_dim": 32}, {"qk_norm": True, "attention_bias": False, "head_dim": 32}),
    ("mistral", {"sliding_window": 64}, {"sliding_window": 64, "attention_bias": False, "head_dim": 16}),
])
def test_tiny_model_loads_back_exactly(tmp_path, family, options, expected):
    state = save_tiny(tmp_path, family, **options)
    loaded = load_model(str(tmp_path))
    config = loaded.config
    assert config.architecture == family
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == \
        (VOCAB, 64, 96, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    assert_same_weights(loaded, state, config.tie_word_embeddings)
    if family == "qwen2":
        assert "model.layers.1.self_attn.k_proj.bias" in state
    if family == "qwen3":
        assert state["model.layers.0.self_attn.q_norm.weight"].shape == (32,)


def test_sharded_bfloat16_checkpoint(tmp_path):
    state = save_tiny(tmp_path, "llama", dtype=torch.bfloat16, max_shard_size="40KB")
    shards = [name for name in os.listdir(tmp_path) if name.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert_same_weights(load_model(str(tmp_path)), state, tied=False)


def test_eos_ids_from_generation_config_and_tokenizer(tmp_path):
    save_tiny(tmp_path, "qwen2", bos_token_id=None, eos_token_id=5)
    with open(tmp_path / "generation_config.json", "w") as file:
        json.dump({"eos_token_id": [258, 7], "bos_token_id": 3}, file)
    loaded = load_model(str(tmp_path))
    assert loaded.config.eos_token_ids == (5, 258, 7)
    assert loaded.config.bos_token_id == 3
    # <|im_end|> (the tokenizer's eos_token, the last id) stops generation too
    assert loaded.tokenizer.eos_token_ids == frozenset({5, 258, 7, VOCAB - 1})
    assert loaded.tokenizer.bos_token_id is None
    assert loaded.config.name == os.path.basename(tmp_path)


def test_legacy_rope_layout(tmp_path):
    """Configs written before transformers 5: top-level rope_theta, rope_scaling saying "type"."""
    save_tiny(tmp_path, "llama")
    with open(tmp_path / "config.json") as file:
        raw = json.load(file)
    raw.pop("rope_parameters")
    raw.update(rope_theta=123.0, rope_scaling={"type": "linear", "factor": 2.0})
    with open(tmp_path / "config.json", "w") as file:
        json.dump(raw, file)
    config = load_model(str(tmp_path)).config
    assert (config.rope_theta, config.rope_scaling) == (123.0, {"rope_type": "linear", "factor": 2.0})
