"""Reading /metrics in server tests."""
from __future__ import annotations

import re
import time

import httpx


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """One sample of /metrics by its exact name and labels (the Prometheus text format)."""
    text = http.get("/metrics").text
    label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    wanted = f"{name}{{{label_text}}}" if labels else name
    for line in text.splitlines():
        if line.split(" ")[0] == wanted:
            return float(line.split(" ")[1])
    raise AssertionError(f"{wanted} is not in /metrics")


def kv_blocks(http: httpx.Client) -> dict[str, float]:
    text = http.get("/metrics").text
    return {state: float(value) for state, value in re.findall(r'^reprise:kv_blocks\{state="(\w+)"\} (\S+)$',
                                                                   text, re.MULTILINE)}


def wait_idle(http: httpx.Client, timeout: float = 15.0) -> dict[str, float]:
    """Polls /metrics until no KV block is used; returns the last kv_blocks reading."""
    deadline = time.monotonic() + timeout
    blocks = kv_blocks(http)
    while blocks["used"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        blocks = kv_blocks(http)
    return blocks
