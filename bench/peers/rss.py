"""Resident memory of a server: its process and every descendant (vLLM's engine core is a child),
summed from /proc: VmRSS now and the sum of each process's peak (VmHWM).

    python bench/peers/rss.py PID   ->  {"rss_bytes": ..., "peak_rss_bytes": ..., "processes": N}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def descendants(pid: int) -> list[int]:
    children = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        children.setdefault(int(fields["PPid"]), []).append(int(status.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    pids = descendants(int(sys.argv[1]))
    print(json.dumps({"rss_bytes": 1024 * sum(kib(p, "VmRSS") for p in pids),
                      "peak_rss_bytes": 1024 * sum(kib(p, "VmHWM") for p in pids), "processes": len(pids)}))
