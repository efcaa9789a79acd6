"""The workloads of `reprise bench serve`. Each scenario returns its cases: a name, the case's
records and wall time, and `summarize`'s numbers (see stats.py).

  repeat              one long prompt cold, then the same prompt `repeats` times (exact hits)
  nearest             a base prompt to warm the cache; then `repeats` prompts that share all but
                      its last `nearest_tail` fraction; then as many cold prompts of that length
  prefix-repetition   vLLM's prefix_repetition shape: num_prompts = one of num_prefixes prefixes
                      + a fresh suffix, shuffled, sent at `concurrency`; a cold pass, then a warm one
  multiturn           conversations x turns, round-robin; each turn resends the whole history
                      (shared system prompt, user messages, the replies exactly as returned)
  long                `long_prompts` distinct cold prompts of `long_len` tokens, all sent at once
                      (cold, long prefill under load: the TTFT of each)
  decode              `c` concurrent short prompts for each c in `concurrencies`, decode_len tokens each;
                      output tokens/s = all tokens generated / the level's wall time (prefill included)
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from tqdm import tqdm

from reprise.bench.client import Client
from reprise.bench.stats import summarize
from reprise.bench.workload import Words

DECODE_PROMPT_LEN = 64


@dataclass
class Run:
    """What the scenarios share: the client, the prompt words, the run's seeded rng, the progress bar."""

    client: Client
    words: Words
    rng: random.Random
    progress: tqdm

    def begin(self, scenario: str, num_requests: int) -> None:
        self.progress.set_description(scenario)
        self.progress.reset(total=num_requests)

    def prompt(self, num_tokens: int) -> list[str]:
        return self.words.sample(self.rng, num_tokens)

    async def complete(self, prompt: list[str], max_tokens: int) -> dict:
        text = "".join(prompt)
        record, _ = await self.client.complete(text, max_tokens, lambda: self.words.count_text(text))
        self.progress.update()
        return record

    async def chat(self, messages: list[dict], max_tokens: int) -> tuple[dict, str]:
        result = await self.client.chat(messages, max_tokens, lambda: self.words.count_chat(messages))
        self.progress.update()
        return result

    async def sequence(self, name: str, prompts: list[list[str]], max_tokens: int, **extra) -> dict:
        """The prompts one after another."""
        start = time.perf_counter()
        records = [await self.complete(prompt, max_tokens) for prompt in prompts]
        return case(name, records, time.perf_counter() - start, **extra)

    async def concurrent(self, name: str, prompts: list[list[str]], max_tokens: int, concurrency: int,
                         **extra) -> dict:
        """The prompts in order, at most `concurrency` in flight."""
        limit = asyncio.Semaphore(concurrency)

        async def one(request: Awaitable[dict]) -> dict:
            async with limit:
                return await request
        start = time.perf_counter()
        records = await asyncio.gather(*(one(self.complete(prompt, max_tokens)) for prompt in prompts))
        return case(name, list(records), time.perf_counter() - start, concurrency=concurrency, **extra)


def case(name: str, records: list[dict], wall_s: float, **extra) -> dict:
    return {"case": name, **extra, **summarize(records, wall_s), "records": records}


def speedup(case_: dict, baseline: dict) -> dict:
    """Adds baseline TTFT p50 / this case's TTFT p50."""
    hot, cold = case_["ttft_p50_s"], baseline["ttft_p50_s"]
    case_["speedup"] = cold / hot if hot and cold else None
    return case_


async def repeat(run: Run, options: argparse.Namespace) -> list[dict]:
    run.begin("repeat", 1 + options.repeats)
    prompt = run.prompt(options.prompt_len)
    cold = await run.sequence("cold", [prompt], options.output_len)
    hot = await run.sequence("hot", [prompt] * options.repeats, options.output_len)
    return [cold, speedup(hot, cold)]


async def nearest(run: Run, options: argparse.Namespace) -> list[dict]:
    run.begin("nearest", 1 + 2 * options.repeats)
    length = options.prompt_len
    tail = min(max(1, round(length * options.nearest_tail)), length - 1)
    base = run.prompt(length)
    warm = await run.sequence("base", [base], options.output_len)
    near = await run.sequence("nearest", [base[:-tail] + run.prompt(tail) for _ in range(options.repeats)],
                              options.output_len, shared_tokens=length - tail)
    cold = await run.sequence("cold", [run.prompt(length) for _ in range(options.repeats)], options.output_len)
    return [warm, cold, speedup(near, cold)]           # cold ones last: they cannot evict the base first


async def prefix_repetition(run: Run, options: argparse.Namespace) -> list[dict]:
    run.begin("prefix-repetition", 2 * options.num_prompts)
    prefixes = [run.prompt(options.prefix_len) for _ in range(options.num_prefixes)]
    prompts = [prefixes[i % len(prefixes)] + run.prompt(options.suffix_len) for i in range(options.num_prompts)]
    run.rng.shuffle(prompts)
    cold = await run.concurrent("cold", prompts, options.output_len, options.concurrency)
    warm = await run.concurrent("warm", prompts, options.output_len, options.concurrency)
    return [cold, speedup(warm, cold)]


async def multiturn(run: Run, options: argparse.Namespace) -> list[dict]:
    run.begin("multiturn", options.conversations * options.turns)
    system = {"role": "system", "content": run.words.text(run.rng, options.system_len)}
    conversations = [[system] for _ in range(options.conversations)]
    cases = []
    for turn in range(1, options.turns + 1):
        start, records = time.perf_counter(), []
        for number, messages in enumerate(conversations):
            messages.append({"role": "user", "content": run.words.text(run.rng, options.turn_len)})
            record, reply = await run.chat(messages, options.output_len)
            messages.append({"role": "assistant", "content": reply})
            records.append({"conversation": number, **record})
        cases.append(case(f"turn {turn}", records, time.perf_counter() - start, turn=turn))
    return cases


async def long(run: Run, options: argparse.Namespace) -> list[dict]:
    run.begin("long", options.long_prompts)
    prompts = [run.prompt(options.long_len) for _ in range(options.long_prompts)]
    return [await run.concurrent("at once", prompts, options.output_len, options.long_prompts)]


async def decode(run: Run, options: argparse.Namespace) -> list[dict]:
    run.begin("decode", sum(options.concurrencies))
    cases = []
    for concurrency in options.concurrencies:
        prompts = [run.prompt(DECODE_PROMPT_LEN) for _ in range(concurrency)]
        cases.append(await run.concurrent(f"concurrency {concurrency}", prompts, options.decode_len, concurrency))
    return cases


SCENARIOS = {"repeat": repeat, "nearest": nearest, "prefix-repetition": prefix_repetition,
             "multiturn": multiturn, "long": long, "decode": decode}
