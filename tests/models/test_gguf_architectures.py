"""Families loaded from GGUF files written as llama.cpp's converter writes them: logits equal transformers'
on the same weights."""
from __future__ import annotations

import torch
import transformers

from reprise.cache.layout import LayerKind
from reprise.config import EngineConfig
from reprise.engine.engine import Engine
from tests.loader.loader_testing import VOCAB, write_gguf
from tests.models.helpers import engine_logits

NUM_PROMPT, NUM_DECODE = 70, 30
# convert_hf_to_gguf's names for Gemma 3 (gguf-py's tensor map), written out here
GEMMA3_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# six layers: llama.cpp's built-in pattern makes every 6th layer full, as Gemma 3's configs do
GEMMA3 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
              sliding_window=16, query_pre_attn_scalar=16, final_logit_softcapping=30.0,
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})


def gemma3_reference() -> transformers.Gemma3ForCausalLM:
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3)).eval()
    with torch.no_grad():      # norms start at 0 (for 1 + weight): move them so a wrong offset shows
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def gemma3_gguf(model, path: str) -> str:
    """The model as convert_hf_to_gguf writes Gemma 3: norms stored as 1 + weight, q/k rows unpermuted,
    tied embeddings, the window and softcap in metadata, the layer pattern and local RoPE base left out."""
    tensors = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        data = value.float().numpy()
        if name.endswith("norm.weight"):
            data = data + 1
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, layer, *middle, suffix = name.split(".")
            gguf_name = f"blk.{layer}.{GEMMA3_NAMES['.'.join(middle)]}.{suffix}"
        tensors[gguf_name] = (data, None)
    return write_gguf(path, "gemma3", tensors, num_layers=6, hidden=64, heads=4, kv_heads=2, ffn=128, head_dim=16,
                      rope_theta=1e6, metadata={"{arch}.attention.sliding_window": 16,
                                                "{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": 2.0,
                                                "{arch}.final_logit_softcapping": 30.0})


def test_gemma3_gguf_matches_transformers(tmp_path):
    model = gemma3_reference()
    path = gemma3_gguf(model, str(tmp_path / "gemma3.gguf"))
    engine = Engine(EngineConfig(model=path, dtype="float32", kv_cache_bytes=4 * 2**20, block_size=16))
    config = engine.model_config
    assert config.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert (config.rope_local_base_freq, config.query_pre_attn_scalar, config.sliding_window) == (1e4, 16.0, 16)
    assert set(engine.runner.model.cache_layout.layer_kinds) == {LayerKind.SLIDING, LayerKind.FULL}
    ids = torch.randint(0, VOCAB, (NUM_PROMPT + NUM_DECODE,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = engine_logits(engine, ids, NUM_PROMPT, chunk=48)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0, NUM_PROMPT - 1:].float()
    assert (ours - reference).abs().max().item() < 1e-4
