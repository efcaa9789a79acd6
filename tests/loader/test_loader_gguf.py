"""GGUF loading: config from metadata, names, dequantization of every type, llama's q/k row order."""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from reprise.loader import load_model
from tests.loader.loader_testing import (
    FFN, HEADS, HIDDEN, K_QUANT_SCALE_OFFSETS, KV_HEADS, PYTHON_QUANTIZABLE, VOCAB, gguf_to_hf, hf_to_gguf,
    tiny_qwen2_tensors, write_gguf,
)

def tiny_gguf(tmp_path, arch: str, tensors: dict, **options) -> str:
    sizes = dict(num_layers=1, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, ffn=FFN)
    return write_gguf(str(tmp_path / f"{arch}.gguf"), arch, tensors, **{**sizes, **options})


def test_default_model_config(default_model):
    config = default_model.config
    assert (config.architecture, config.num_hidden_layers, config.hidden_size, config.intermediate_size) == \
        ("llama", 30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.tie_word_embeddings, config.max_position_embeddings) == (49152, True, 8192)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == pytest.approx(1e-5)
    assert (config.rope_scaling, config.attention_bias, config.qk_norm, config.sliding_window) == \
        (None, False, False, None)
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))


def test_default_model_names_follow_gguf_py_table(default_reader, default_weights):
    """Every HF name we produce maps back to its GGUF name through gguf-py's own table (as transformers uses)."""
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    expected = {tensor.name for tensor in default_reader.tensors}
    ours = {}
    for name, tensor in default_weights.items():
        base, _, suffix = name.rpartition(".")
        ours[f"{table.get_name(base)}.{suffix}"] = tuple(tensor.shape)
    assert set(ours) == set(expected) and len(default_weights) == 272
    assert "lm_head.weight" not in default_weights
    assert ours["token_embd.weight"] == (49152, 576) and ours["blk.0.attn_k.weight"] == (192, 576)
    assert ours["blk.0.ffn_down.weight"] == (576, 1536) and ours["output_norm.weight"] == (576,)


@pytest.mark.parametrize("gguf_name", ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                                       "blk.29.attn_q.weight", "blk.29.attn_k.weight", "blk.0.attn_v.weight",
                                       "blk.7.ffn_down.weight", "blk.7.attn_norm.weight", "output_norm.weight"])
def test_default_weights_equal_transformers(gguf_name, default_weights, transformers_gguf):
    """Q8_0 / Q4_1 / F32 dequantized, and q/k un-permuted, exactly as transformers' GGUF loader does it."""
    reference = transformers_gguf(gguf_name)
    ours = default_weights[gguf_to_hf(gguf_name)]
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    assert torch.equal(ours, reference)


def test_default_config_equals_transformers(default_model, transformers_gguf_config):
    reference, config = transformers_gguf_config, default_model.config
    for ours, theirs in (("num_hidden_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
                         ("intermediate_size", "intermediate_size"), ("num_attention_heads", "num_attention_heads"),
                         ("num_key_value_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
                         ("vocab_size", "vocab_size"), ("rope_theta", "rope_theta"),
                         ("rms_norm_eps", "rms_norm_eps"), ("tie_word_embeddings", "tie_word_embeddings"),
                         ("max_position_embeddings", "max_position_embeddings")):
        assert getattr(config, ours) == reference[theirs], ours


@pytest.fixture(scope="module")
def transformers_gguf_config(default_path) -> dict:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    return load_gguf_checkpoint(default_path)["config"]


@pytest.fixture(scope="module")
def transformers_gguf(default_reader, transformers_gguf_config):
    """One tensor as transformers' GGUF loader produces it: gguf's dequantize, then its llama processor."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    processor = LlamaTensorProcessor(config=transformers_gguf_config)
    tensors = {t.name: t for t in default_reader.tensors}

    def load(name: str) -> torch.Tensor:
        tensor = tensors[name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return torch.from_numpy(np.copy(processor.process(weights=values, name=name).weights))
    return load


@pytest.mark.parametrize("qtype", [*PYTHON_QUANTIZABLE, *K_QUANT_SCALE_OFFSETS], ids=lambda q: q.name)
def test_every_quant_type_dequantizes_like_gguf(tmp_path, qtype):
    tensors = tiny_qwen2_tensors(qtype, np.random.default_rng(int(qtype)))
    loaded = load_model(tiny_gguf(tmp_path, "qwen2", tensors))
    weights = dict(loaded.weights())
    assert set(weights) == {gguf_to_hf(name) for name in tensors}
    for name, (stored, raw_dtype) in tensors.items():
        expected = gguf.quants.dequantize(stored, raw_dtype or (Q.F16 if stored.dtype == np.float16 else Q.F32))
        assert np.isfinite(expected).all()
        assert torch.equal(weights[gguf_to_hf(name)], torch.from_numpy(expected.reshape(weights[gguf_to_hf(name)].shape)))
    assert weights["model.embed_tokens.weight"].shape == (VOCAB, HIDDEN)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (HIDDEN, FFN)
    config = loaded.config
    assert (config.architecture, config.attention_bias, config.qk_norm, config.tie_word_embeddings) == \
        ("qwen2", True, False, False)
    assert (config.vocab_size, config.head_dim, config.num_key_value_heads) == (VOCAB, 64, KV_HEADS)


def llama_cpp_permute(weights: torch.Tensor, num_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, as written there."""
    return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def test_llama_round_trip_through_gguf_is_exact(tmp_path):
    """HF state dict -> GGUF the way llama.cpp converts llama (q/k permuted) -> loader: the same tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    state = {k: v.detach().clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    tensors = {}
    for name, value in state.items():
        heads = 4 if ".q_proj." in name else 2 if ".k_proj." in name else None
        stored = llama_cpp_permute(value, heads) if heads else value
        tensors[hf_to_gguf(name)] = (stored.numpy(), None)
    path = write_gguf(str(tmp_path / "llama.gguf"), "llama", tensors, num_layers=2, hidden=64, heads=4,
                      kv_heads=2, ffn=96, pre="llama-bpe")
    loaded = load_model(path)
    weights = dict(loaded.weights())
    assert set(weights) == set(state)
    for name, value in state.items():
        assert torch.equal(weights[name], value), name
    assert loaded.config.tie_word_embeddings and loaded.config.head_dim == 16


def test_qwen3_gguf_has_qk_norm_and_key_length_head_dim(tmp_path):
    rng = np.random.default_rng(3)
    head_dim = 32          # not hidden / heads: only attention.key_length says so
    shapes = {"token_embd.weight": (VOCAB, 64), "output_norm.weight": (64,), "blk.0.attn_norm.weight": (64,),
              "blk.0.attn_q.weight": (4 * head_dim, 64), "blk.0.attn_k.weight": (2 * head_dim, 64),
              "blk.0.attn_v.weight": (2 * head_dim, 64), "blk.0.attn_output.weight": (64, 4 * head_dim),
              "blk.0.attn_q_norm.weight": (head_dim,), "blk.0.attn_k_norm.weight": (head_dim,),
              "blk.0.ffn_norm.weight": (64,), "blk.0.ffn_gate.weight": (96, 64), "blk.0.ffn_up.weight": (96, 64),
              "blk.0.ffn_down.weight": (64, 96)}
    tensors = {name: (rng.standard_normal(shape).astype(np.float32), None) for name, shape in shapes.items()}
    path = write_gguf(str(tmp_path / "qwen3.gguf"), "qwen3", tensors, num_layers=1, hidden=64, heads=4, kv_heads=2,
                      ffn=96, head_dim=head_dim)
    loaded = load_model(path)
    config = loaded.config
    assert (config.architecture, config.qk_norm, config.attention_bias, config.head_dim) == ("qwen3", True, False, 32)
    assert config.tie_word_embeddings
    weights = dict(loaded.weights())
    assert torch.equal(weights["model.layers.0.self_attn.q_norm.weight"],
                       torch.from_numpy(tensors["blk.0.attn_q_norm.weight"][0]))
    # qwen3 is not permuted by llama.cpp, so q comes back as stored
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                       torch.from_numpy(tensors["blk.0.attn_q.weight"][0]))


def llama_cpp_rope_freqs(head_dim: int, theta: float, factor: float, low: float, high: float,
                         original: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs for Llama 3.1, loop for loop."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_freqs_become_hf_rope_scaling(tmp_path):
    rng = np.random.default_rng(4)
    head_dim, hidden = 128, 256
    shapes = {"token_embd.weight": (VOCAB, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (head_dim, hidden),
              "blk.0.attn_v.weight": (head_dim, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (64, hidden), "blk.0.ffn_up.weight": (64, hidden),
              "blk.0.ffn_down.weight": (hidden, 64)}
    tensors = {name: (rng.standard_normal(shape).astype(np.float32), None) for name, shape in shapes.items()}
    tensors["rope_freqs.weight"] = (llama_cpp_rope_freqs(head_dim, 500000.0, 8.0, 1.0, 4.0, 8192), None)
    path = write_gguf(str(tmp_path / "llama31.gguf"), "llama", tensors, num_layers=1, hidden=hidden, heads=2,
                      kv_heads=1, ffn=64, rope_theta=500000.0)
    loaded = load_model(path)
    assert loaded.config.rope_theta == 500000.0
    assert loaded.config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in {name for name, _ in loaded.weights()}


def test_linear_rope_scaling_from_metadata(tmp_path):
    tensors = tiny_qwen2_tensors(Q.F32, np.random.default_rng(5))
    path = tiny_gguf(tmp_path, "qwen2", tensors, metadata={"{arch}.rope.scaling.type": "linear",
                                                            "{arch}.rope.scaling.factor": 4.0})
    assert load_model(path).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
