"""Write a random-weight model directory for timing runs of architectures with no small release.

    .venv/bin/python bench/random_model.py qwen3_5 OUT_DIR   # then: reprise bench prefix --model OUT_DIR

The shape is Qwen3.5-0.8B's text model cut down (hidden 1024, 12 layers: three Gated DeltaNet
layers to one full-attention layer, as Qwen3.5 interleaves them). The tokenizer is the default
model's (SmolLM2), so `reprise bench` builds its prompts as usual. Random weights change no
timing; the outputs are noise.
"""
from __future__ import annotations

import sys

import torch
import transformers

from reprise.loader import load_model

QWEN3_5 = dict(vocab_size=49152, hidden_size=1024, intermediate_size=3584, num_hidden_layers=12,
               num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
               linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
               max_position_embeddings=32768, tie_word_embeddings=True,
               layer_types=["linear_attention"] * 3 + ["full_attention"] * 1 + ["linear_attention"] * 3
               + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"])
ARCHITECTURES = {"qwen3_5": (transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM, QWEN3_5)}


def main(architecture: str, out_dir: str) -> None:
    config_cls, model_cls, options = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    model = model_cls(config_cls(**options, eos_token_id=2, bos_token_id=1)).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    load_model(None).tokenizer._backend.save(f"{out_dir}/tokenizer.json")
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
