"""Helpers for the loader tests: tiny GGUF files and GGUF <-> HF names written out independently."""
from __future__ import annotations

import json
import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

TINY_SPECIALS = ("<|im_start|>", "<|im_end|>")
# "1 2" and "Ġ 1" make the pre-tokenizer visible: they merge only where its regex keeps digits together
TINY_MERGES = ("Ġ t", "h e", "1 2", "Ġ 1")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PYTHON_QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
# K-quants have no Python quantizer: random blocks, with each block's f16 scales set to a sane value
K_QUANT_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
HIDDEN, HEADS, KV_HEADS, FFN = 256, 4, 2, 256

# GGUF name -> HF name, written out here so the tests do not lean on the loader's own table
GGUF_TO_HF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_TO_HF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}


def gguf_to_hf(name: str) -> str:
    if name in GGUF_TO_HF_TOP:
        return GGUF_TO_HF_TOP[name]
    _, layer, part, suffix = name.split(".")
    return f"model.layers.{layer}.{GGUF_TO_HF_LAYER[part]}.{suffix}"


def hf_to_gguf(name: str) -> str:
    inverse = {v: k for k, v in GGUF_TO_HF_TOP.items()}
    if name in inverse:
        return inverse[name]
    _, _, layer, *middle, suffix = name.split(".")
    part = {v: k for k, v in GGUF_TO_HF_LAYER.items()}[".".join(middle)]
    return f"blk.{layer}.{part}.{suffix}"


def tiny_vocab() -> tuple[list[str], list[int]]:
    """256 byte tokens in GPT-2's alphabet, two merges' results, two control tokens."""
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(0xA1, 0xAD)]
    alphabet += [chr(c) for c in range(0xAE, 0x100)]
    alphabet += [chr(256 + n) for n in range(256 - len(alphabet))]
    tokens = alphabet + [merge.replace(" ", "") for merge in TINY_MERGES] + list(TINY_SPECIALS)
    return tokens, [1] * (len(tokens) - 2) + [3, 3]


# SentencePiece pieces after <unk>, <s>, </s>, <start_of_turn>, 256 byte tokens and the letters; higher
# scores merge first. "  " (two spaces) is how Gemma's GGUF spells a whitespace run; <think> is user-defined.
SPM_PIECES = ("\u2581t", "he", "\u2581the", "in", "\u2581in", "ng", "ing", "\u2581a", "an", "\u2581an", "  ", "<think>")


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece vocabulary as llama.cpp writes it: (tokens, scores, token types)."""
    letters = ["\u2581", *"abcdefghijklmnopqrstuvwxyz"]
    tokens = ["<unk>", "<s>", "</s>", "<start_of_turn>", *(f"<0x{b:02X}>" for b in range(256)), *letters, *SPM_PIECES]
    types = [2, 3, 3, 3, *[6] * 256, *[1] * (len(letters) + len(SPM_PIECES) - 1), 4]
    scores = [0.0] * 260 + [-100.0 - i for i in range(len(letters))] + [-1.0 - i for i in range(len(SPM_PIECES))]
    return tokens, scores, types


VOCAB = len(tiny_vocab()[0])          # 256 bytes, 4 merges, 2 specials: <|im_start|> 260, <|im_end|> 261


def write_gguf(path: str, arch: str, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType | None]], *,
               num_layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, head_dim: int | None = None,
               pre: str = "qwen2", rope_theta: float = 10000.0, metadata=None, spm: bool = False) -> str:
    """A complete small GGUF: `tensors` maps GGUF names to (numpy data, raw type or None for F32/F16/F64).
    The vocabulary is tiny_vocab's byte-level BPE, or with `spm` spm_vocab's SentencePiece one."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(num_layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(rope_theta)
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if spm:
        tokens, scores, types = spm_vocab()
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    else:
        tokens, types = tiny_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(list(TINY_MERGES))
        writer.add_bos_token_id(len(tokens) - 2)
        writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template(CHATML)
    for key, value in (metadata or {}).items():
        key = key.format(arch=arch)
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tokenizer(path: str) -> None:
    tokens, _ = tiny_vocab()
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in TINY_MERGES]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as file:
        json.dump({"eos_token": "<|im_end|>", "bos_token": None}, file)


def encode_as(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """`values` stored as `qtype`: quantized by gguf, or random valid K-quant blocks of the same shape."""
    if qtype not in K_QUANT_SCALE_OFFSETS:
        return gguf.quants.quantize(values, qtype)
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = values.shape
    blocks = rng.integers(0, 256, size=(rows * cols // block_elements, block_bytes), dtype=np.uint8)
    for offset in K_QUANT_SCALE_OFFSETS[qtype]:
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, cols // block_elements * block_bytes)


def tiny_qwen2_tensors(qtype: Q, rng: np.random.Generator) -> dict:
    """A one-layer qwen2 (with q/k/v biases): 2-D weights stored as `qtype`, vectors as F32."""
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output.weight": (VOCAB, HIDDEN),
              "blk.0.attn_q.weight": (HIDDEN, HIDDEN), "blk.0.attn_k.weight": (KV_HEADS * 64, HIDDEN),
              "blk.0.attn_v.weight": (KV_HEADS * 64, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
              "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
              "blk.0.ffn_down.weight": (HIDDEN, FFN)}
    tensors = {}
    for name, shape in shapes.items():
        stored = encode_as(rng.standard_normal(shape).astype(np.float32), qtype, rng)
        tensors[name] = (stored, None if qtype in (Q.F32, Q.F16) else qtype)
    for name, size in (("blk.0.attn_norm.weight", HIDDEN), ("blk.0.ffn_norm.weight", HIDDEN),
                       ("output_norm.weight", HIDDEN), ("blk.0.attn_q.bias", HIDDEN),
                       ("blk.0.attn_k.bias", KV_HEADS * 64), ("blk.0.attn_v.bias", KV_HEADS * 64)):
        tensors[name] = (rng.standard_normal(size).astype(np.float32), None)
    return tensors
