"""Aggregates over request records (client.py): percentiles, throughput, token-weighted hit rates."""
from __future__ import annotations

import math

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def hit_rate(records: list[dict]) -> float | None:
    """sum(cached_tokens) / sum(prompt_tokens) over successful requests; None if any lacks cached_tokens."""
    done = [r for r in records if r["ok"]]
    prompt = sum(r["prompt_tokens"] for r in done)
    if not done or not prompt or any(r["cached_tokens"] is None for r in done):
        return None
    return sum(r["cached_tokens"] for r in done) / prompt


def counters_hit_rate(before: dict | None, after: dict | None) -> float | None:
    """hits / queries between two /metrics readings; None without both or without new queries."""
    if before is None or after is None or after["queries"] <= before["queries"]:
        return None
    return (after["hits"] - before["hits"]) / (after["queries"] - before["queries"])


def summarize(records: list[dict], wall_s: float) -> dict:
    """One case's numbers: counts, p50/p90/p99 of TTFT, TPOT and e2e, throughput, hit rate."""
    done = [r for r in records if r["ok"]]
    summary: dict = {"requests": len(records), "failed": len(records) - len(done)}
    for metric in ("ttft", "tpot", "e2e"):
        values = [r[f"{metric}_s"] for r in done if r[f"{metric}_s"] is not None]
        for q in PERCENTILES:
            summary[f"{metric}_p{q}_s"] = percentile(values, q)
    completion = sum(r["completion_tokens"] for r in done)
    summary.update(wall_s=wall_s, requests_per_s=len(done) / wall_s if wall_s > 0 else None,
                   output_tokens_per_s=completion / wall_s if wall_s > 0 else None,
                   prompt_tokens=sum(r["prompt_tokens"] for r in done), completion_tokens=completion,
                   cached_tokens=_sum_known(r["cached_tokens"] for r in done), hit_rate=hit_rate(records),
                   estimated=any(r["token_source"] == "estimated" for r in done))
    return summary


def _sum_known(values) -> int | None:
    values = list(values)
    return None if not values or any(v is None for v in values) else sum(values)
