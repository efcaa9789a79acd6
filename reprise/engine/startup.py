"""What an Engine decides before it loads anything: the compute dtype, whether GGUF weights stay
quantized, and the KV pool's bytes when --kv-cache-bytes is not given. Nothing here is per request.
"""
from __future__ import annotations

import torch

from reprise.engine.runner import default_dtype

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}
_DENSE_WEIGHTS = ("bfloat16", "float32")      # --weights choices that dequantize at load (into that compute dtype)
DEFAULT_KV_FRACTION = 0.2       # of available memory, when --kv-cache-bytes is not given
DEFAULT_KV_CAP = 4 * 2**30


def resolve_dtype(dtype: str | None, weights: str | None, device: torch.device) -> torch.dtype:
    """The compute dtype: --dtype, else that of a dense --weights choice, else the device's default."""
    name = dtype or (weights if weights in _DENSE_WEIGHTS else None)
    if name is None:
        return default_dtype(device)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (use one of bfloat16, float16, float32)")
    return _DTYPES[name]


def resolve_weights(weights: str | None, dtype: str | None, compute_dtype: torch.dtype, is_gguf: bool,
                    device: torch.device) -> bool:
    """Whether GGUF weights stay quantized. The default is yes when the compute dtype is bfloat16 (the
    kernels round activations to it); "native" asks for it in any dtype. The int4 kernels are CPU ones:
    elsewhere, and for model directories, "native" means the stored floats in the compute dtype. A dense
    choice is the compute dtype too, so it cannot contradict --dtype."""
    if weights not in (None, "native", *_DENSE_WEIGHTS):
        raise ValueError(f"unknown weights {weights!r} (use one of native, bfloat16, float32)")
    if weights in _DENSE_WEIGHTS and dtype is not None and _DTYPES.get(dtype) != _DTYPES[weights]:
        raise ValueError(f"weights={weights} with dtype={dtype}: dequantized weights are kept in the compute dtype")
    wanted = weights == "native" or (weights is None and compute_dtype == torch.bfloat16)
    return wanted and is_gguf and device.type == "cpu"


def default_kv_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = 8 * 2**30
    return min(int(available * DEFAULT_KV_FRACTION), DEFAULT_KV_CAP)
