"""PNG charts of `reprise bench serve` results: one panel per scenario, one series per server.

repeat, nearest and prefix-repetition: TTFT p50 bars per case; multiturn: TTFT p50 per turn;
decode: output tokens/s against concurrency. One result makes a run's chart; several (each
with its `label`) make the comparison chart of `reprise bench compare`.
"""
from __future__ import annotations

from reprise.bench.scenarios import SCENARIOS

_BAR_CASES = {"repeat": ("cold", "hot"), "nearest": ("cold", "nearest"), "prefix-repetition": ("cold", "warm"),
              "long": ("at once",)}
_LINES = {"multiturn": ("turn", "ttft_p50_s", "turn", "TTFT p50 (s)"),
          "decode": ("concurrency", "output_tokens_per_s", "concurrent streams", "output tokens/s")}


def plot_results(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [name for name in SCENARIOS if any(name in r["scenarios"] for r in results)]
    columns = min(max(len(names), 1), 3)
    rows = -(-max(len(names), 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        series = [(r["label"], r["scenarios"][name]["cases"]) for r in results if name in r["scenarios"]]
        if name in _BAR_CASES:
            _bars(ax, series, _BAR_CASES[name])
        else:
            _lines(ax, series, *_LINES[name])
        ax.set_title(name)
        ax.legend(fontsize="small")
    fig.suptitle(f"reprise bench serve: {', '.join(r['label'] for r in results)}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def _bars(ax, series: list[tuple[str, list[dict]]], cases: tuple[str, ...]) -> None:
    width = 0.8 / len(series)
    for i, (label, run_cases) in enumerate(series):
        by_name = {case["case"]: case for case in run_cases}
        values = [by_name[c]["ttft_p50_s"] if c in by_name and by_name[c]["ttft_p50_s"] else 0 for c in cases]
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(cases))], values, width, label=label)
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("TTFT p50 (s)")


def _lines(ax, series: list[tuple[str, list[dict]]], x_key: str, y_key: str, x_label: str, y_label: str) -> None:
    for label, run_cases in series:
        points = [(case[x_key], case[y_key]) for case in run_cases if case.get(y_key) is not None]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        ax.set_xticks([x for x, _ in points])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
