"""`reprise bench compare a.json b.json ...`: results of `reprise bench serve` side by side.

A markdown table (rows: scenario, case and metric; columns: each result's `label`), notes with
each run's warnings and setup, and optionally the combined chart (charts.py).
"""
from __future__ import annotations

import json

from reprise.bench.scenarios import SCENARIOS

HEADLINES = {
    "repeat": ("ttft_p50_s", "speedup", "hit_rate"),
    "nearest": ("ttft_p50_s", "speedup", "hit_rate"),
    "prefix-repetition": ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "output_tokens_per_s", "hit_rate", "speedup"),
    "multiturn": ("ttft_p50_s", "hit_rate"),
    "long": ("ttft_p50_s", "ttft_p99_s"),
    "decode": ("output_tokens_per_s", "tpot_p50_s"),
}
_SCENARIO_METRICS = ("hit_rate", "metrics_hit_rate")


def run_compare(paths: list[str], out: str | None, plot: str | None) -> int:
    if not paths:
        raise ValueError("bench compare needs result files: reprise bench compare a.json b.json ...")
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    text = compare_markdown(results)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
        print(f"wrote {out}")
    if plot:
        from reprise.bench.charts import plot_results
        plot_results(results, plot)
    return 0


def compare_markdown(results: list[dict]) -> str:
    labels = [r["label"] for r in results]
    lines = ["| scenario | case | metric | " + " | ".join(labels) + " |",
             "|---|---|---|" + "---:|" * len(labels)]
    for scenario, case, metric, values in comparison_rows(results):
        lines.append(f"| {scenario} | {case} | {metric} | " + " | ".join(_format(metric, v) for v in values) + " |")
    return "\n".join(lines + [""] + _notes(results)) + "\n"


def comparison_rows(results: list[dict]) -> list[tuple[str, str, str, list]]:
    """(scenario, case, metric, one value per result); rows where no result has a value are left out."""
    rows = []
    for scenario in SCENARIOS:
        runs = [r["scenarios"].get(scenario) for r in results]
        if not any(runs):
            continue
        for metric in _SCENARIO_METRICS:
            rows.append((scenario, "all", metric, [run and run[metric] for run in runs]))
        for case in _case_names(runs):
            cases = [next((c for c in run["cases"] if c["case"] == case), None) if run else None for run in runs]
            for metric in HEADLINES[scenario]:
                rows.append((scenario, case, metric, [c and c.get(metric) for c in cases]))
    return [row for row in rows if any(v is not None for v in row[3])]


def _case_names(runs: list[dict | None]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for case in run["cases"] if run else ():
            if case["case"] not in names:
                names.append(case["case"])
    return names


def _format(metric: str, value) -> str:
    if value is None:
        return "n/a"
    if "hit_rate" in metric:
        return f"{value:.1%}"
    if metric == "speedup":
        return f"{value:.1f}x"
    return f"{value:.1f}" if metric.endswith("per_s") else f"{value:.3f}"


def _notes(results: list[dict]) -> list[str]:
    notes = []
    for r in results:
        env = r["environment"]
        notes.append(f"- {r['label']}: model {r['model']} at {r['base_url']}; client on {env['cpu']}, "
                     f"{env['cpus']} CPUs; reprise {env['reprise']}")
        for scenario, run in r["scenarios"].items():
            notes.extend(f"  - {scenario}: {warning}" for warning in run["warnings"])
    return notes
