"""reprise's own int4 matmul for decode rows (int4mm.cpp), loaded where the CPU can run it.

The op `reprise::int4_mm(x, packed, scales_zeros)` computes what `_weight_int4pack_mm_for_cpu` computes, over the same
operands, but unpacks each weight group once per call whatever the number of rows (aten's unpacks it again
for every 4 rows). Measured on the default model's shapes, 2 cores, in one process alternating the two
(ms, aten / ours): gate_up 3072 x 576 at 1 row 0.062 / 0.053, at 8 rows 0.199 / 0.125; the Q8_0 head
49152 x 1152 positions at 1 row 1.88 / 1.74, at 8 rows 6.56 / 3.97.

The kernel is C++ built with the compiler inductor uses, on first use, into ~/.cache/reprise/kernels (a
directory per source and torch version), and registered as the op `reprise::int4_mm` with a fake
implementation, so `--compile` graphs call it as they call aten's. It runs only where the CPU reports
AVX-512 F/BW/BF16 (read from /proc/cpuinfo before anything is built or loaded); it never uses AMX, which
some hosts advertise and fault on. Where it is not available, or does not build, QuantizedLinear calls
aten's: a layer picks its kernel once, at load, so a row's result never depends on the batch it is in.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

from reprise.models.layers.native import cpu_flags, load_kernel

_SOURCE = Path(__file__).with_name("int4mm.cpp")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def int4_kernel_loaded() -> bool:
    """Whether `reprise::int4_mm` is registered: the CPU has what it needs and it built (once per process)."""
    if not cpu_flags() >= _CPU_FLAGS:
        return False
    try:
        _build_and_load()
    except (OSError, RuntimeError, ImportError) as error:
        logger.warning("int4 kernel did not build (%s); using PyTorch's", error)
        return False
    return True


def _build_and_load() -> None:
    load_kernel("int4mm", _SOURCE, _FLAGS)
    torch.library.register_fake("reprise::int4_mm")(_int4_mm_shape)


def _int4_mm_shape(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales_zeros.shape[1])
