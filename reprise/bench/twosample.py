"""Two-sample tests for `reprise bench audit`, in plain Python (no scipy): Kolmogorov-Smirnov and
Mann-Whitney U, both two-sided, with the effect sizes the audit reports.

- `ks_test(x, y)`: D = the largest gap between the two empirical CDFs; the p-value from Kolmogorov's
  limiting distribution with Stephens' small-sample correction (Numerical Recipes' `kstwo`):
  Q((sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) * D), ne = n*m / (n + m),
  Q(t) = 2 * sum_{j>=1} (-1)^(j-1) exp(-2 j^2 t^2). Conservative enough from ~8 values a side.
- `mann_whitney(x, y)`: U of x = the pairs (xi, yj) with xi > yj, ties counted one half (via
  midranks); the p-value from the normal approximation with the tie correction and a continuity
  correction of 1/2 (scipy's `method="asymptotic"`). Effect sizes: the probability of superiority
  P(x > y) + P(x = y)/2 = U / (n*m), and the rank-biserial correlation 2 * U / (n*m) - 1 (-1: every
  x below every y).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KSResult:
    statistic: float        # D, in [0, 1]
    p_value: float


@dataclass(frozen=True, slots=True)
class MannWhitneyResult:
    u: float                # U of the first sample
    p_value: float
    superiority: float      # U / (n*m): P(x > y), ties counted half
    rank_biserial: float    # 2 * superiority - 1


def ks_test(x: list[float], y: list[float]) -> KSResult:
    if not x or not y:
        raise ValueError("both samples need values")
    xs, ys = sorted(x), sorted(y)
    i = j = 0
    gap = 0.0
    while i < len(xs) and j < len(ys):
        value = min(xs[i], ys[j])
        while i < len(xs) and xs[i] == value:
            i += 1
        while j < len(ys) and ys[j] == value:
            j += 1
        gap = max(gap, abs(i / len(xs) - j / len(ys)))
    effective = math.sqrt(len(xs) * len(ys) / (len(xs) + len(ys)))
    return KSResult(gap, _kolmogorov_q((effective + 0.12 + 0.11 / effective) * gap))


def _kolmogorov_q(t: float) -> float:
    """P(K > t) for Kolmogorov's distribution; 1 for t near 0, where the series converges slowly."""
    if t < 0.2:
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = 2 * (-1) ** (j - 1) * math.exp(-2 * j * j * t * t)
        total += term
        if abs(term) < 1e-12 * max(total, 1e-300):
            break
    return min(1.0, max(0.0, total))


def mann_whitney(x: list[float], y: list[float]) -> MannWhitneyResult:
    if not x or not y:
        raise ValueError("both samples need values")
    n, m = len(x), len(y)
    ranks, tie_groups = _midranks(list(x) + list(y))
    u = sum(ranks[:n]) - n * (n + 1) / 2
    mean = n * m / 2
    total = n + m
    variance = n * m / 12 * ((total + 1) - sum(t ** 3 - t for t in tie_groups) / (total * (total - 1)))
    if variance <= 0:                       # every value equal: no evidence either way
        p_value = 1.0
    else:
        z = (abs(u - mean) - 0.5) / math.sqrt(variance)
        p_value = min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))
    superiority = u / (n * m)
    return MannWhitneyResult(u, p_value, superiority, 2 * superiority - 1)


def _midranks(values: list[float]) -> tuple[list[float], list[int]]:
    """1-based ranks with ties given their mean rank, and the sizes of the tie groups (> 1)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    groups = []
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        if end > start:
            groups.append(end - start + 1)
        start = end + 1
    return ranks, groups


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
