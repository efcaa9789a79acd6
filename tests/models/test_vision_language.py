"""Vision-language checkpoints (every Qwen3.5 release, Gemma 3 4B and up): reprise serves their text decoder,
whose logits equal the transformers wrapper's for input ids alone; vision and MTP weights are left unread."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from reprise.config import EngineConfig
from reprise.engine.engine import Engine
from reprise.loader import load_model
from reprise.loader.hf import hf_config
from reprise.models import build_model
from tests.models.helpers import engine_logits
from tests.models.test_hybrid_logits import GEMMA3, QWEN3_5, SIZES
from tests.models.test_logits import _write_tokenizer

QWEN3_5_TEXT = dict(QWEN3_5, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25,
                                              "mrope_section": [2, 1, 1], "mrope_interleaved": True})
QWEN3_5_VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                      temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
# Gemma3ForConditionalGeneration never caps its logits, unlike Gemma3ForCausalLM; released Gemma 3 configs say null
GEMMA3_TEXT = dict(GEMMA3, final_logit_softcapping=None)
GEMMA3_VISION = dict(model_type="siglip_vision_model", num_hidden_layers=1, hidden_size=32, intermediate_size=32,
                     num_attention_heads=2, image_size=16, patch_size=4)
# Qwen3.5 releases also carry a multi-token-prediction head, which transformers' model has no module for
MTP = {"mtp.fc.weight": torch.ones(64, 128), "mtp.layers.0.mlp.up_proj.weight": torch.ones(112, 64)}
# name: config class, model class, text config, vision config, other options, weights added to the file,
#       prompt tokens, decoded tokens, prefill chunk
CASES = {
    "qwen3_5": (transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration, QWEN3_5_TEXT,
                QWEN3_5_VISION, {}, MTP, 150, 16, 64),
    "gemma3": (transformers.Gemma3Config, transformers.Gemma3ForConditionalGeneration, GEMMA3_TEXT, GEMMA3_VISION,
               dict(mm_tokens_per_image=4), {}, 70, 30, 48),
}


def tiny_vision_language_model(tmp_path, case: str, extra_weights: dict[str, torch.Tensor]):
    """The case's random wrapper model, saved with `extra_weights` added to its safetensors file."""
    config_cls, model_cls, text, vision, options = CASES[case][:5]
    torch.manual_seed(0)
    model = model_cls(config_cls(text_config=dict(**SIZES, **text), vision_config=vision, **options)).eval()
    with torch.no_grad():      # norms start at 0 (for 1 + weight) or 1: move them so a wrong formula shows
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path)
    file = str(tmp_path / "model.safetensors")
    save_file({**load_file(file), **extra_weights}, file, metadata={"format": "pt"})
    _write_tokenizer(tmp_path)
    return model


@pytest.mark.parametrize("case", CASES)
def test_text_decoder_matches_transformers_wrapper(case, tmp_path):
    extra_weights, num_prompt, num_decode, chunk = CASES[case][5:]
    model = tiny_vision_language_model(tmp_path, case, extra_weights)
    engine = Engine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_bytes=4 * 2**20, block_size=16))
    assert engine.model_config.tie_word_embeddings == (case == "gemma3")     # each wrapper's default
    ids = torch.randint(0, SIZES["vocab_size"], (num_prompt + num_decode,)).tolist()
    ours = engine_logits(engine, ids, num_prompt, chunk=chunk)
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0, num_prompt - 1:].float()
    assert (ours - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_weights_come_under_text_model_names(case, tmp_path):
    tiny_vision_language_model(tmp_path, case, {})
    names = {name for name, _ in load_model(str(tmp_path)).weights()}
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert ("lm_head.weight" in names) == (case == "qwen3_5")
    assert all(name.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head."))
               for name in names)


def test_unknown_weight_still_fails_the_load(tmp_path):
    tiny_vision_language_model(tmp_path, "gemma3", {"model.audio_tower.proj.weight": torch.ones(4, 4)})
    loaded = load_model(str(tmp_path))
    with pytest.raises(KeyError, match="unexpected weight audio_tower.proj.weight"):
        build_model(loaded.config).load_weights(loaded.weights())


def test_gemma3_sparse_text_config_reads_as_transformers_does(tmp_path):
    # laid out like google/gemma-3-4b-it's: text_config lists only what differs from Gemma3TextConfig's defaults
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
           "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                           "num_hidden_layers": 34, "sliding_window": 1024,
                           "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                             "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                             "patch_size": 14, "vision_use_head": False}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = hf_config(str(tmp_path))
    reference = transformers.AutoConfig.from_pretrained(str(tmp_path))
    text = reference.text_config
    assert ours.architecture == "gemma3" and ours.eos_token_ids == (1, 106)
    assert ours.tie_word_embeddings is reference.tie_word_embeddings is True
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "rms_norm_eps"):
        assert getattr(ours, key) == getattr(text, key), key
    assert ours.layer_types == tuple(text.layer_types)
    assert ours.query_pre_attn_scalar == text.query_pre_attn_scalar
    full, sliding = text.rope_parameters["full_attention"], text.rope_parameters["sliding_attention"]
    assert (ours.rope_theta, ours.rope_local_base_freq) == (full["rope_theta"], sliding["rope_theta"])
    assert ours.rope_scaling == {"rope_type": "linear", "factor": 8.0} and full["factor"] == 8.0
