"""reprise's own C++ kernels (quant/int4mm.cpp, decode_attention.cpp), built on first use with the
compiler inductor uses (torch.utils.cpp_extension) into ~/.cache/reprise/kernels, a directory per
source, flags and torch version, and loaded into the process, where they register their torch ops.

They hold no state between calls: nothing of one request (or tenant) outlives the call that reads it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def load_kernel(name: str, source: Path, flags: list[str]) -> None:
    """Builds `source` (once per source, flags and torch version) and loads it. Raises OSError,
    RuntimeError or ImportError where it cannot (no compiler, say)."""
    from torch.utils.cpp_extension import load        # imports setuptools machinery: only when building

    digest = hashlib.sha256(source.read_bytes() + torch.__version__.encode() + " ".join(flags).encode()).hexdigest()[:16]
    directory = Path.home() / ".cache" / "reprise" / "kernels" / f"{name}-{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    load(name=f"reprise_{name}", sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
         build_directory=str(directory), is_python_module=False)
