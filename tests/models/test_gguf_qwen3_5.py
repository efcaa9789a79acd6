"""Qwen3.5 (hybrid: Gated DeltaNet and gated full attention) from a GGUF file written as llama.cpp's
converter writes it (architecture `qwen35`): logits equal transformers' on the same weights."""
from __future__ import annotations

import gguf
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from reprise.cache.layout import LayerKind
from reprise.config import EngineConfig
from reprise.engine.engine import Engine
from tests.loader.loader_testing import VOCAB, write_gguf
from tests.models.helpers import engine_logits

NUM_PROMPT, NUM_DECODE = 150, 16
NUM_K_HEADS, NUM_V_HEADS, HEAD_DIM = 2, 4, 32          # value heads twice the key heads: the converter reorders them
QWEN3_5 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=HEAD_DIM, max_position_embeddings=512, rms_norm_eps=1e-5,
               linear_num_key_heads=NUM_K_HEADS, linear_num_value_heads=NUM_V_HEADS, linear_key_head_dim=32,
               linear_value_head_dim=32, linear_conv_kernel_dim=4, tie_word_embeddings=True,
               layer_types=["linear_attention"] * 3 + ["full_attention"])
# convert_hf_to_gguf's names for Qwen3.5 (gguf-py's tensor map for MODEL_ARCH.QWEN35), written out here
NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "linear_attn.in_proj_qkv": "attn_qkv", "linear_attn.in_proj_z": "attn_gate", "linear_attn.in_proj_b": "ssm_beta",
    "linear_attn.in_proj_a": "ssm_alpha", "linear_attn.out_proj": "ssm_out", "linear_attn.norm": "ssm_norm",
    "linear_attn.conv1d": "ssm_conv1d",
}


def reference() -> transformers.Qwen3_5ForCausalLM:
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**QWEN3_5)).eval()
    with torch.no_grad():      # norms start at 0 (for 1 + weight) or 1: move them so a wrong offset shows
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def tiled(tensor: torch.Tensor, dim: int, head_dim: int) -> torch.Tensor:
    """The converter's V-head reorder: grouped by key head [K, V/K, d] -> tiled [V/K, K, d] along `dim`."""
    shape = list(tensor.shape)
    grouped = tensor.reshape(*shape[:dim], NUM_K_HEADS, NUM_V_HEADS // NUM_K_HEADS, head_dim, *shape[dim + 1:])
    return grouped.transpose(dim, dim + 1).reshape(shape)


def converted(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One tensor as Qwen3_5TextModel.modify_tensors writes it: (GGUF name, values)."""
    key_rows = 2 * NUM_K_HEADS * 32
    if name.endswith(".in_proj_qkv.weight") or name.endswith(".conv1d.weight"):
        value = value.squeeze()
        value = torch.cat([value[:key_rows], tiled(value[key_rows:], 0, 32)])
    elif name.endswith(".in_proj_z.weight"):
        value = tiled(value, 0, 32)
    elif name.endswith((".in_proj_a.weight", ".in_proj_b.weight", ".A_log", ".dt_bias")):
        value = tiled(value, 0, 1)
    elif name.endswith(".out_proj.weight"):
        value = tiled(value, 1, 32)
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        value = value + 1
    if name == "model.embed_tokens.weight":
        return "token_embd.weight", value
    if name == "model.norm.weight":
        return "output_norm.weight", value
    _, _, layer, *middle, suffix = name.split(".")
    if suffix == "A_log":
        return f"blk.{layer}.ssm_a", -torch.exp(value)
    if suffix == "dt_bias":
        return f"blk.{layer}.ssm_dt.bias", value
    return f"blk.{layer}.{NAMES['.'.join(middle)]}.{suffix}", value


def qwen3_5_gguf(model, path: str, qtype: Q | None = None) -> str:
    """The model as convert_hf_to_gguf writes Qwen3.5, 2-D weights stored as `qtype` (None: float32)."""
    tensors = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        gguf_name, data = converted(name, value.float())
        data = data.numpy()
        if qtype is not None and data.ndim == 2 and "conv1d" not in gguf_name:
            tensors[gguf_name] = (gguf.quants.quantize(data, qtype), qtype)
        else:
            tensors[gguf_name] = (data, None)
    return write_gguf(path, "qwen35", tensors, num_layers=4, hidden=64, heads=4, kv_heads=2, ffn=128,
                      head_dim=HEAD_DIM, rope_theta=1e4,
                      metadata={"{arch}.ssm.conv_kernel": 4, "{arch}.ssm.state_size": 32,
                                "{arch}.ssm.group_count": NUM_K_HEADS, "{arch}.ssm.time_step_rank": NUM_V_HEADS,
                                "{arch}.ssm.inner_size": NUM_V_HEADS * 32, "{arch}.full_attention_interval": 4,
                                "{arch}.rope.dimension_count": HEAD_DIM // 4})


def prompt_ids() -> list[int]:
    return torch.randint(0, VOCAB, (NUM_PROMPT + NUM_DECODE,), generator=torch.Generator().manual_seed(1)).tolist()


def test_qwen3_5_gguf_matches_transformers(tmp_path):
    model = reference()
    path = qwen3_5_gguf(model, str(tmp_path / "qwen35.gguf"))
    engine = Engine(EngineConfig(model=path, dtype="float32", kv_cache_bytes=4 * 2**20, block_size=16))
    config = engine.model_config
    assert config.architecture == "qwen3_5" and config.partial_rotary_factor == 0.25
    assert config.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert config.linear_value_heads_tiled
    assert engine.runner.model.cache_layout.layer_kinds == (LayerKind.RECURRENT,) * 3 + (LayerKind.FULL,)
    ids = prompt_ids()
    ours = engine_logits(engine, ids, NUM_PROMPT, chunk=64)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, NUM_PROMPT - 1:].float()
    assert (ours - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_qwen3_5_gguf_native_weights_are_as_close_as_bfloat16_weights(qtype, tmp_path):
    """Quantized 2-D weights kept native: logits against the dequantized float32 reference no further off,
    on average, than twice dequantized bfloat16 weights."""
    path = qwen3_5_gguf(reference(), str(tmp_path / f"qwen35-{qtype.name}.gguf"), qtype)
    ids = prompt_ids()

    def logits(**options):
        engine = Engine(EngineConfig(model=path, kv_cache_bytes=4 * 2**20, block_size=16, **options))
        return engine_logits(engine, ids, NUM_PROMPT, chunk=64).float(), engine
    expected, _ = logits(dtype="float32", weights="float32")
    native, engine = logits(dtype="bfloat16", weights="native")
    dense, _ = logits(dtype="bfloat16", weights="bfloat16")
    assert engine.native_weights
    assert (native - expected).abs().mean() <= 2 * (dense - expected).abs().mean()
