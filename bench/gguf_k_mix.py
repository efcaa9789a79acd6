"""Held bytes of llama.cpp's mixed K-quant files (Q4_K_M, Q5_K_M) with `--weights native`, against the file.

    .venv/bin/python bench/gguf_k_mix.py OUT_DIR

Writes the default model (SmolLM2-135M-Instruct) as llama.cpp's quantizer would type it in Q4_K_M and
Q5_K_M (`type_for`), loads each with native weights and prints `LLM.weights_bytes` over the file's size.
The weights are the default file's, dequantized and quantized again by gguf where it has a quantizer
(Q5_0, Q5_1, Q8_0); K-quant blocks are random (gguf-py has no K-quant quantizer), which changes no byte
count, only what the model says. `estimate` counts the same ratio from types and shapes alone, for
shapes whose rows K-quants fit (the default model's 576-wide rows do not: llama.cpp falls back).
"""
from __future__ import annotations

import os
import sys

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from reprise import LLM
from reprise.loader.default import default_model_path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.loader.loader_testing import encode_as  # noqa: E402  (the tests' writer of random K-quant blocks)

QK_K = 256
# what llama.cpp's quantizer writes where a row is not a multiple of 256 (llama-quant.cpp)
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
MIXES = {"Q4_K_M": Q.Q4_K, "Q5_K_M": Q.Q5_K}
# bits a weight as QuantizedLinear holds it: one 4-bit kernel position + a bfloat16 scale and zero per 32
# positions for the 4-bit types, two positions for the others
HELD_BITS = {Q.Q4_0: 5, Q.Q4_1: 5, Q.Q4_K: 5}


def type_for(name: str, base: Q, num_layers: int, cols: int, tied: bool) -> Q:
    """llama_tensor_get_type for Q4_K_M / Q5_K_M: the head (the embedding when tied) Q6_K; attn_v and
    ffn_down Q6_K in the layers `use_more_bits` picks (the first and last eighth, every third between);
    the rest the base type; a K type falls back where the row is not a multiple of 256."""
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    eighth = num_layers // 8
    more_bits = layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        qtype = Q.Q6_K
    elif name.endswith((".attn_v.weight", ".ffn_down.weight")) and more_bits:
        qtype = Q.Q6_K
    else:
        qtype = base
    return FALLBACK[qtype] if cols % QK_K else qtype


def write_mix(source: str, path: str, base: Q) -> dict[Q, int]:
    """The default model re-typed as llama.cpp's mix over `base`; returns weights per type written."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(path, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    names = {t.name for t in reader.tensors}
    num_layers = reader.fields["llama.block_count"].contents()
    rng, counts = np.random.default_rng(0), {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if values.ndim == 1:
            writer.add_tensor(tensor.name, values)
            continue
        qtype = type_for(tensor.name, base, num_layers, values.shape[1], "output.weight" not in names)
        counts[qtype] = counts.get(qtype, 0) + values.size
        writer.add_tensor(tensor.name, encode_as(values, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def estimate(counts: dict[Q, int]) -> tuple[float, float]:
    """(held bytes, file bytes) of the 2-D weights, from how many weights each type holds."""
    held = sum(n * HELD_BITS.get(qtype, 10) / 8 for qtype, n in counts.items())
    stored = sum(n * gguf.GGML_QUANT_SIZES[qtype][1] * 8 / gguf.GGML_QUANT_SIZES[qtype][0] / 8
                 for qtype, n in counts.items())
    return held, stored


def k_counts(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, base: Q) -> dict[Q, int]:
    """Weights per type of a tied llama-shaped model under `type_for`."""
    head_dim, counts = hidden // heads, {}
    shapes = {"attn_q": heads * head_dim, "attn_k": kv_heads * head_dim, "attn_v": kv_heads * head_dim,
              "attn_output": hidden, "ffn_gate": ffn, "ffn_up": ffn}
    for layer in range(layers):
        for part, rows in [*shapes.items(), ("ffn_down", hidden)]:
            cols = ffn if part == "ffn_down" else hidden
            qtype = type_for(f"blk.{layer}.{part}.weight", base, layers, cols, True)
            counts[qtype] = counts.get(qtype, 0) + rows * cols
    embedding = type_for("token_embd.weight", base, layers, hidden, True)
    counts[embedding] = counts.get(embedding, 0) + vocab * hidden
    return counts


def main(out_dir: str) -> None:
    for mix, base in MIXES.items():
        path = os.path.join(out_dir, f"SmolLM2-135M-Instruct.{mix}.gguf")
        counts = write_mix(default_model_path(), path, base)
        held = LLM(model=path, kv_cache_bytes="16MiB").weights_bytes
        size = os.path.getsize(path)
        estimated, stored = estimate(counts)
        types = ", ".join(f"{qtype.name} {n / 1e6:.1f}M" for qtype, n in sorted(counts.items()))
        print(f"{mix} (default model, {types}): weights_bytes {held} / file {size} = {held / size:.3f}; "
              f"2-D weights alone, from types: {estimated / stored:.3f}")
        estimated, stored = estimate(k_counts(2048, 8192, 16, 32, 8, 128256, base))
        print(f"{mix} (Llama-3.2-1B shapes, from types): {estimated / stored:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
