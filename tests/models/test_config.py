"""Cache layouts and sizes declared from config.json, for every layout transformers has written."""
from __future__ import annotations

import json

import torch

from reprise.cache.layout import LayerKind
from reprise.engine.runner import kv_bytes_per_block, state_bytes_per_slot
from reprise.loader.hf import hf_config
from reprise.models.config import cache_layout

FULL, SLIDING, RECURRENT = LayerKind.FULL, LayerKind.SLIDING, LayerKind.RECURRENT
SIZES = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)


def config_from(tmp_path, architecture: str, **raw):
    with open(tmp_path / "config.json", "w") as file:
        json.dump({"architectures": [architecture], **SIZES, **raw}, file)
    return hf_config(str(tmp_path))


def test_mistral_window_shorter_than_the_context_slides(tmp_path):
    layout = cache_layout(config_from(tmp_path, "MistralForCausalLM", num_hidden_layers=2, sliding_window=32))
    assert layout.layer_kinds == (SLIDING, SLIDING) and layout.sliding_window == 32 and layout.all_sliding


def test_mistral_window_as_long_as_the_context_is_full(tmp_path):
    layout = cache_layout(config_from(tmp_path, "MistralForCausalLM", num_hidden_layers=2, sliding_window=512))
    assert layout.layer_kinds == (FULL, FULL) and layout.sliding_window is None


def test_gemma3_legacy_config_reads_like_the_per_layer_type_one(tmp_path):
    legacy = config_from(tmp_path, "Gemma3ForCausalLM", num_hidden_layers=7, head_dim=16, sliding_window=16,
                         sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=1e4,
                         rope_scaling={"rope_type": "linear", "factor": 8.0})
    current = config_from(tmp_path, "Gemma3ForCausalLM", num_hidden_layers=7, head_dim=16, sliding_window=16,
                          layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2
                          + ["sliding_attention"],
                          rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert legacy == current
    assert (current.rope_theta, current.rope_local_base_freq) == (1e6, 1e4)
    assert current.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert (current.query_pre_attn_scalar, current.hidden_act) == (256, "gelu_pytorch_tanh")
    assert cache_layout(current).layer_kinds == (SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL, SLIDING)


def test_qwen3_5_sizes_count_attention_blocks_and_recurrent_slots(tmp_path):
    config = config_from(tmp_path, "Qwen3_5ForCausalLM", num_hidden_layers=4, head_dim=32, linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                          "mrope_section": [11, 11, 10], "mrope_interleaved": True})
    assert cache_layout(config).layer_kinds == (RECURRENT, RECURRENT, RECURRENT, FULL)     # full_attention_interval 4
    assert (config.rope_theta, config.rope_scaling, config.partial_rotary_factor) == (1e7, None, 0.25)
    # one attention layer: k and v, 16 positions, 2 heads of 32
    assert kv_bytes_per_block(config, 16, torch.float32) == 2 * 16 * 2 * 32 * 4
    # three recurrent layers: conv (kernel - 1 = 3 inputs of 2*2*16 + 4*16 = 128 channels, compute dtype)
    # and the delta state (4 heads of 16 x 16, always float32)
    assert state_bytes_per_slot(config, torch.float32) == 3 * (3 * 128 * 4 + 4 * 16 * 16 * 4)
    assert state_bytes_per_slot(config, torch.bfloat16) == 3 * (3 * 128 * 2 + 4 * 16 * 16 * 4)
