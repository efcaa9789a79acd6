"""`reprise bench serve`: the prefix-cache benchmark, against reprise or any OpenAI-compatible server.

It streams `/v1/completions` (word prompts of controlled length, workload.py) and
`/v1/chat/completions` (multiturn) with temperature 0 and `stream_options.include_usage`, records
every request (client.py), and reports per case p50/p90/p99 of TTFT, TPOT and end-to-end latency,
throughput and the token-weighted hit rate sum(cached_tokens) / sum(prompt_tokens). Where
/metrics has reprise's or vLLM's prefix-cache counters, the hit rate from their delta over each
scenario is reported beside it. Output: tables on stdout, JSON (`--out`), a PNG (`--plot`).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import time

from tqdm import tqdm

from reprise.bench.client import Client
from reprise.bench.report import environment, print_table, write_json
from reprise.bench.scenarios import SCENARIOS, Run
from reprise.bench.stats import counters_hit_rate, hit_rate
from reprise.bench.workload import Words

CASE_COLUMNS = ("requests", "failed", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "e2e_p50_s",
                "output_tokens_per_s", "hit_rate", "speedup")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--label", default=None, help="this server's name in the JSON and in comparisons, e.g. vllm-cpu")
    add("--scenario", type=scenario_list, default="all", help=f"comma-separated: {','.join(SCENARIOS)}; or all")
    add("--no-ignore-eos", action="store_true",
        help="let the model stop at EOS (default: ignore_eos and a -100 logit_bias on EOS: equal output lengths)")
    add("--tokenizer", default=None,
        help="GGUF file or HF directory whose tokenizer builds the prompts (default: the default model's)")
    add("--prompt-len", type=int, default=1500, help="repeat, nearest: prompt tokens")
    add("--nearest-tail", type=float, default=0.05, help="nearest: share of the prompt that differs")
    add("--output-len", type=int, default=16, help="tokens generated per request (all but decode)")
    add("--prefix-len", type=int, default=512, help="prefix-repetition: shared prefix tokens")
    add("--suffix-len", type=int, default=64, help="prefix-repetition: distinct suffix tokens")
    add("--num-prefixes", type=int, default=2, help="prefix-repetition: distinct prefixes")
    add("--num-prompts", type=int, default=8, help="prefix-repetition: prompts per pass")
    add("--concurrency", type=int, default=2, help="prefix-repetition: requests in flight")
    add("--conversations", type=int, default=4, help="multiturn: conversations, interleaved")
    add("--turns", type=int, default=4, help="multiturn: turns per conversation")
    add("--system-len", type=int, default=200, help="multiturn: system prompt tokens (shared)")
    add("--turn-len", type=int, default=200, help="multiturn: tokens per user message")
    add("--long-len", type=int, default=3000, help="long: prompt tokens")
    add("--long-prompts", type=int, default=4, help="long: prompts sent at once")
    add("--concurrencies", type=int_list, default="1,2,4,8", help="decode: concurrent streams to sweep")
    add("--decode-len", type=int, default=64, help="decode: tokens generated per stream")


def scenario_list(text: str) -> list[str]:
    names = list(SCENARIOS) if text == "all" else [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario {unknown[0]!r}: choose from {', '.join(SCENARIOS)}")
    return names


def int_list(text: str) -> list[int]:
    return [int(value) for value in text.split(",")]


def run_serve(args: argparse.Namespace) -> dict:
    """Runs the scenarios; prints the tables, writes --out and --plot; returns the result."""
    result = asyncio.run(measure(args))
    print_table(case_rows(result))
    print()
    print_table(scenario_rows(result))
    if args.out:
        write_json(result, args.out)
    if args.plot:
        from reprise.bench.charts import plot_results
        plot_results([result], args.plot)
    return result


async def measure(args: argparse.Namespace) -> dict:
    words = Words.load(args.tokenizer)
    api_key = args.api_key or os.environ.get("REPRISE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    client = Client(args.base_url, args.model, api_key, args.request_timeout,
                    None if args.no_ignore_eos else words.eos_ids)
    nonce = secrets.token_hex(8)            # seeds every prompt: a second run against the same server is cold
    try:
        server = await client.models()
        client.model = client.model or _first_model(server)
        with tqdm(total=0, unit="req", leave=False) as progress:
            run = Run(client, words, random.Random(nonce), progress)
            scenarios = {name: await _scenario(run, name, args) for name in args.scenario}
    finally:
        await client.close()
    flags = {key: value for key, value in vars(args).items() if key != "api_key" and not callable(value)}
    return {"benchmark": "serve", "label": args.label or args.base_url, "base_url": args.base_url,
            "model": client.model, "nonce": nonce, "server": server, "environment": environment(flags),
            "scenarios": scenarios}


async def _scenario(run: Run, name: str, args: argparse.Namespace) -> dict:
    before = await run.client.cache_counters()
    start = time.perf_counter()
    cases = await SCENARIOS[name](run, args)
    wall_s = time.perf_counter() - start
    after = await run.client.cache_counters()
    records = [record for case in cases for record in case["records"]]
    return {"wall_s": wall_s, "requests": len(records), "failed": sum(not r["ok"] for r in records),
            "hit_rate": hit_rate(records), "metrics_hit_rate": counters_hit_rate(before, after),
            "metrics": {"before": before, "after": after},
            "token_sources": sorted({r["token_source"] for r in records if r["ok"]}),
            "warnings": warnings(records), "cases": cases}


def warnings(records: list[dict]) -> list[str]:
    done = [r for r in records if r["ok"]]
    failed = [r for r in records if not r["ok"]]
    notes = [f"{len(failed)} failed, first: {failed[0]['error']}"] if failed else []
    if any(r["cached_tokens"] is None for r in done):
        notes.append("the server reports no cached_tokens: hit rate unknown (vLLM: --enable-prompt-tokens-details)")
    if any(r["token_source"] == "estimated" for r in done):
        notes.append("no usage in the stream: token counts estimated locally")
    return notes


def _first_model(server: dict | None) -> str | None:
    data = (server or {}).get("data") or []
    return data[0].get("id") if data else None


def case_rows(result: dict) -> list[dict]:
    return [{"scenario": name, "case": case["case"], **{column: case.get(column) for column in CASE_COLUMNS}}
            for name, scenario in result["scenarios"].items() for case in scenario["cases"]]


def scenario_rows(result: dict) -> list[dict]:
    return [{"scenario": name, "requests": s["requests"], "failed": s["failed"], "hit_rate": s["hit_rate"],
             "metrics_hit_rate": s["metrics_hit_rate"], "wall_s": s["wall_s"], "warnings": "; ".join(s["warnings"])}
            for name, s in result["scenarios"].items()]
