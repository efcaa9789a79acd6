"""Benchmark output: a fixed-width table on stdout, JSON with the environment."""
from __future__ import annotations

import json
import os
import platform

import torch


def environment(options: dict) -> dict:
    from reprise import __version__
    return {"reprise": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": _cpu_model(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "options": {k: v for k, v in options.items() if v is not None}}


def _cpu_model() -> str:
    """The "model name" line of /proc/cpuinfo where there is one (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))     # every row's keys, first seen first
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
