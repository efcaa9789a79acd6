"""Convert the default GGUF into a bf16 safetensors directory, for peers that cannot read GGUF (vLLM).

    PYTHON bench/peers/gguf_to_hf.py GGUF_FILE OUT_DIR

PYTHON needs transformers, gguf and accelerate (the vLLM virtualenv of docs/benchmarks.md).

transformers dequantizes the GGUF (GgufConfig(dequantize=True)); the quantization config is
cleared before saving so the directory reads as a plain bf16 checkpoint.
"""
from __future__ import annotations

import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig



def main(path: str, out_dir: str) -> None:
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
