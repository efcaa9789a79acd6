"""GGUF files: the model config from metadata, and weights dequantized to float32 under Hugging Face names.

llama.cpp stores a tensor with its dimensions reversed (`ne`, fastest first); `GGUFReader` already
hands the data over in numpy order, so a weight comes out [out, in] as in a HF state dict.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator

import gguf
import numpy as np
import torch
from tqdm import tqdm

from reprise.loader.errors import LoadError
from reprise.models.config import ModelConfig
from reprise.loader.gguf_families import GGUF_ARCHITECTURES, TOP_LEVEL, family_fields, layer_name, restore_values
from reprise.models.layers.quant import NATIVE_TYPES, GGMLTensor

# llama.cpp writes Mistral models as "llama" (its converter has no mistral architecture, and
# no sliding window: it attends to the whole context, and so do we for these files)
SUPPORTED_ARCHITECTURES = tuple(GGUF_ARCHITECTURES)
_ROPE_FREQS = "rope_freqs.weight"      # Llama 3 rope scaling, folded into the config
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+?)(?:\.(weight|bias))?")
_MISSING = object()


class _Reader(gguf.GGUFReader):
    """gguf's reader over a plain ndarray view of its memory map, which still reads the file lazily and
    read-only. An np.memmap runs Python code on every slice (`__getitem__`, `__array_finalize__`) and
    the reader slices once per metadata value: for the default model's 98k vocabulary and merge
    strings that was 1.2M calls, half the time of every load."""

    @property
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, mapped: np.memmap) -> None:
        self._mapped = mapped.view(np.ndarray)


def open_gguf(path: str) -> gguf.GGUFReader:
    """The file's reader (memory-mapped: tensors are read when used); LoadError if it cannot be parsed."""
    try:
        return _Reader(path)
    except Exception as error:  # the reader fails with whatever numpy raises on a cut-off buffer
        raise LoadError(f"corrupt or truncated GGUF file {path}: {_one_line(error)}") from None


def read_field(reader: gguf.GGUFReader, key: str, path: str, default=_MISSING):
    """A metadata value as a Python value (str, int, float, list); LoadError when a required key is absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise LoadError(f"GGUF metadata key {key} is missing in {path}")
        return default
    return field.contents()


def gguf_config(reader: gguf.GGUFReader, path: str) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata; tied embeddings when there is no `output.weight` tensor."""
    arch = read_field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LoadError(f"unsupported architecture {arch!r} in {path} "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if read_field(reader, "split.count", path, 1) > 1:
        raise LoadError(f"{path} is one part of a split GGUF; merge the parts first (llama-gguf-split --merge)")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise LoadError(f"GGUF file {path} has no token_embd.weight tensor")

    def key(name, default=_MISSING):
        return read_field(reader, f"{arch}.{name}", path, default)

    family = GGUF_ARCHITECTURES[arch]

    hidden_size, num_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or hidden_size // num_heads
    rope_theta = float(key("rope.freq_base", 10000.0))
    eos_ids = [read_field(reader, f"tokenizer.ggml.{name}_token_id", path, None) for name in ("eos", "eot", "eom")]
    return ModelConfig(
        architecture=family,
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden_size,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=key("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(reader, tensors, arch, head_dim, rope_theta, path),
        max_position_embeddings=key("context_length", 4096),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=read_field(reader, "tokenizer.ggml.bos_token_id", path, None),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        name=os.path.basename(path).removesuffix(".gguf"),
        **family_fields(family, key, hidden_size, num_heads, head_dim),
    )


def gguf_weights(reader: gguf.GGUFReader, config: ModelConfig,
                 path: str) -> Callable[..., Iterator[tuple[str, torch.Tensor | GGMLTensor]]]:
    """A function yielding (HF name, float32 tensor), dequantizing one tensor at a time; called with
    `native=True`, 2-D weights of a type in NATIVE_TYPES come as GGMLTensor (their blocks, rows in HF
    order) instead.

    Names and quantization types are checked here, before any weight is read, so a bad file
    fails at load time rather than halfway through the weights.
    """
    named = [(t, _hf_name(t.name, config.architecture, path)) for t in reader.tensors if t.name != _ROPE_FREQS]
    _check_quant_types(t for t, _ in named)

    def weights(native: bool = False) -> Iterator[tuple[str, torch.Tensor | GGMLTensor]]:
        for tensor, name in tqdm(named, desc="loading weights", unit="tensor"):
            if native and tensor.tensor_type in NATIVE_TYPES and len(tensor.shape) == 2:
                yield name, _blocks(tensor, config)
            else:
                yield name, _dequantize(tensor, config)
    return weights


def _hf_name(gguf_name: str, arch: str, path: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; LoadError for names we do not know."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in TOP_LEVEL and suffix == "weight":
        return f"{TOP_LEVEL[stem]}.weight"
    found = _LAYER_NAME.fullmatch(gguf_name)
    name = found and layer_name(arch, found.group(2), found.group(3))
    if name is None:
        raise LoadError(f"unexpected tensor {gguf_name} in GGUF file {path}")
    return f"model.layers.{found.group(1)}.{name}"


def _dequantize(tensor, config: ModelConfig) -> torch.Tensor:
    shape = tuple(int(d) for d in reversed(tensor.shape))
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # F32 tensors come back as a read-only view of the memory-mapped file
    values = torch.from_numpy(array if array.flags.writeable else array.copy()).reshape(shape).float()
    if config.architecture == "llama" and tensor.name.endswith((".attn_q.weight", ".attn_q.bias")):
        return _unpermute(values, config.num_attention_heads)
    if config.architecture == "llama" and tensor.name.endswith((".attn_k.weight", ".attn_k.bias")):
        return _unpermute(values, config.num_key_value_heads)
    return restore_values(config.architecture, tensor.name, values)


def _blocks(tensor, config: ModelConfig) -> GGMLTensor:
    """The stored blocks of a quantized 2-D weight, rows un-permuted like `_dequantize`'s values."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    blocks = torch.from_numpy(np.array(tensor.data, dtype=np.uint8).reshape(shape[0], -1))
    if config.architecture == "llama" and tensor.name.endswith(".attn_q.weight"):
        blocks = _unpermute(blocks, config.num_attention_heads)
    if config.architecture == "llama" and tensor.name.endswith(".attn_k.weight"):
        blocks = _unpermute(blocks, config.num_key_value_heads)
    return GGMLTensor(blocks.numpy(), tensor.tensor_type, shape)


def _unpermute(values: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's q/k row order for llama.

    HF rotates the two halves of each head (rows [0, d/2) pair with [d/2, d)); llama.cpp's llama
    rope rotates adjacent rows (2i, 2i+1), so the converter interleaves the halves per head:
    rows (head, half, i) -> (head, i, half). This is the inverse.
    """
    half_dim = values.shape[0] // num_heads // 2
    stored = values.reshape(num_heads, half_dim, 2, *values.shape[1:])
    return stored.transpose(1, 2).reshape(values.shape).contiguous()


def _check_quant_types(tensors) -> None:
    """LoadError naming the first tensor whose type the gguf package cannot dequantize."""
    first_of_type = {}
    for tensor in tensors:
        first_of_type.setdefault(tensor.tensor_type, tensor.name)
    for qtype, name in first_of_type.items():
        _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
        except NotImplementedError:
            raise LoadError(f"unsupported GGUF quantization type {qtype.name} for tensor {name}") from None


def _rope_scaling(reader, tensors, arch: str, head_dim: int, theta: float, path: str) -> dict | None:
    """HF's rope_scaling dict from `{arch}.rope.scaling.*` metadata or a `rope_freqs` tensor."""
    if _ROPE_FREQS in tensors:
        factors = gguf.quants.dequantize(tensors[_ROPE_FREQS].data, tensors[_ROPE_FREQS].tensor_type)
        return _llama3_scaling(np.asarray(factors, dtype=np.float64).reshape(-1), head_dim, theta, path)
    kind = read_field(reader, f"{arch}.rope.scaling.type", path, "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(read_field(reader, f"{arch}.rope.scaling.factor", path))}
    raise LoadError(f"unsupported rope scaling {kind!r} in {path} (supported: linear, llama3)")


def _llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, path: str) -> dict | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency divisors.

    llama.cpp's converter writes factor_i = 1 / ((1 - s_i) / factor + s_i), where
    s_i = clip((orig / wavelen_i - low) / (high - low), 0, 1) is linear in inv_freq_i. Only that
    line is determined by the file, so low_freq_factor is fixed at 1 (Llama 3.x's value) and
    high and orig are solved from it; any such triple gives the same frequencies. The result is
    checked by recomputing the divisors. All divisors 1 means no scaling.
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
    middle = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    if len(factors) != len(inv_freq) or middle.sum() < 2:
        raise LoadError(f"cannot read rope_freqs in {path} as llama3 rope scaling")
    slope, offset = np.polyfit(inv_freq[middle], smooth[middle], 1)
    high = 1 - 1 / offset
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": round(float(high), 4),
               "original_max_position_embeddings": round(float(slope * 2 * math.pi * (high - 1)))}
    if not np.allclose(_llama3_rope_factors(scaling, inv_freq), factors, rtol=1e-3):
        raise LoadError(f"cannot read rope_freqs in {path} as llama3 rope scaling")
    return scaling


def _llama3_rope_factors(scaling: dict, inv_freq: np.ndarray) -> np.ndarray:
    """The divisors llama.cpp's converter writes as `rope_freqs` for a llama3 rope_scaling dict."""
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    ratio = scaling["original_max_position_embeddings"] * inv_freq / (2 * math.pi)
    smooth = np.clip((ratio - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - smooth) / scaling["factor"] + smooth)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]
