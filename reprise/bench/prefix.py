"""`reprise bench prefix`: cold vs exact-prefix hot vs nearest-prefix hot, in process (mlx-lm #1314's table).

Per prompt length: one cold run (a prompt never seen), `repeats` exact repeats of it, and
`repeats` nearest prompts (the same prefix, a different last NEAREST_TAIL tokens, new each time so
each one is a nearest hit, not an exact one). The cache's own cost is measured apart: lookup
(`match`) and attach (`acquire`: block references plus the copy of a partial block).

With `--disk-cache-dir`, a disk-hot case too: the prompt is evicted from the pool (every unused
block), the tier's writes flushed, then sent again, so its prefix is loaded from disk.
"""
from __future__ import annotations

import random
import statistics
import time

from tqdm import tqdm

from reprise.bench.decode import random_prompt
from reprise.engine.request import SamplingParams
from reprise.llm import LLM

NEAREST_TAIL = 25


def timed_request(llm: LLM, prompt: list[int], output_tokens: int) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
    start = time.perf_counter()
    request = engine.add_request(prompt, params)
    ttft, last = None, None
    while engine.has_work:
        for output in engine.step():
            if output.request_id == request.request_id:
                ttft = ttft or time.perf_counter() - start
                last = output
    return {"ttft_s": ttft, "total_s": time.perf_counter() - start, "cached_tokens": last.cached_tokens}


def cache_overhead(llm: LLM, prompt: list[int]) -> dict:
    """Lookup and attach cost of a hot prompt, without running the model."""
    engine = llm.engine
    start = time.perf_counter()
    match = engine.cache.match(prompt, None)
    lookup = time.perf_counter() - start
    start = time.perf_counter()
    seq, copy = engine.cache.acquire(match, None)
    engine.runner._copy_blocks([copy] if copy else [])
    attach = time.perf_counter() - start
    engine.cache.release(seq, [])
    return {"lookup_ms": lookup * 1e3, "attach_ms": attach * 1e3, "matched": match.cached_tokens}


def run_case(llm: LLM, length: int, output_tokens: int, repeats: int, rng: random.Random) -> list[dict]:
    prompt = random_prompt(llm, length, rng)
    cold = timed_request(llm, prompt, output_tokens)
    exact = [timed_request(llm, prompt, output_tokens) for _ in range(repeats)]
    nearest = [timed_request(llm, prompt[:-NEAREST_TAIL] + random_prompt(llm, NEAREST_TAIL, rng), output_tokens)
               for _ in range(repeats)]
    overhead = cache_overhead(llm, prompt)
    rows = [_row(length, "cold", [cold], cold)]
    rows.append(_row(length, "exact-hot", exact, cold, overhead))
    rows.append(_row(length, "nearest-hot", nearest, cold))
    if llm.engine.tiers is not None and llm.engine.tiers.tiers:
        rows.append(_row(length, "disk-hot", [disk_hot(llm, prompt, output_tokens) for _ in range(repeats)], cold))
    return rows


def disk_hot(llm: LLM, prompt: list[int], output_tokens: int) -> dict:
    """The prompt again after its blocks left the pool: its prefix comes back from the disk tier."""
    engine = llm.engine
    for tier in engine.tiers.tiers:
        tier.flush()
    engine.cache.evict(engine.num_blocks)
    return timed_request(llm, prompt, output_tokens)


def _row(length: int, case: str, runs: list[dict], cold: dict, overhead: dict | None = None) -> dict:
    ttft = statistics.median(r["ttft_s"] for r in runs)
    total = statistics.median(r["total_s"] for r in runs)
    row = {"prompt_tokens": length, "case": case, "cached_tokens": runs[0]["cached_tokens"],
           "ttft_s": ttft, "total_s": total, "ttft_speedup": cold["ttft_s"] / ttft,
           "total_speedup": cold["total_s"] / total, "lookup_ms": None, "attach_ms": None}
    if overhead:
        row.update(lookup_ms=overhead["lookup_ms"], attach_ms=overhead["attach_ms"])
    return row


def run_prefix(llm_kwargs: dict, lengths: list[int], output_tokens: int, repeats: int) -> dict:
    llm = LLM(**llm_kwargs)
    rng = random.Random(0)
    timed_request(llm, random_prompt(llm, 128, rng), 2)           # warm-up
    rows = []
    for length in tqdm(lengths, desc="prefix bench", leave=False):
        rows.extend(run_case(llm, min(length, llm.engine.max_model_len - output_tokens), output_tokens, repeats, rng))
    return {"benchmark": "prefix", "dtype": str(llm.engine.dtype).removeprefix("torch."),
            "output_tokens": output_tokens, "repeats": repeats, "rows": rows}


def plot_prefix(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = [case for case in ("cold", "exact-hot", "nearest-hot", "disk-hot")
             if any(r["case"] == case for r in result["rows"])]
    lengths = sorted({r["prompt_tokens"] for r in result["rows"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(cases)
    for i, case in enumerate(cases):
        values = [next(r["ttft_s"] for r in result["rows"] if r["prompt_tokens"] == n and r["case"] == case)
                  for n in lengths]
        ax.bar([x + (i - (len(cases) - 1) / 2) * width for x in range(len(lengths))], values, width, label=case)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (s)")
    ax.set_yscale("log")
    ax.set_title(f"reprise prefix cache, {result['dtype']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
