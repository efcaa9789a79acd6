"""`reprise bench audit`: does a server share its prompt cache across API keys? The timing audit of
Gu et al., "Auditing Prompt Caching in Language Model APIs" (ICML 2025), for any OpenAI-compatible
server, run with two keys of your own (a victim and an attacker).

Method, once per test (docs/security.md says more):
1. plant: the victim sends `--probes` random prompts (max_tokens 1), so a shared cache holds them;
2. probe: the prober sends each planted prompt once, and as many fresh random prompts of the same
   length, interleaved in a random order, one at a time, streaming with max_tokens 1, and times the
   first content chunk (TTFT). Each prompt is probed once: a second probe would hit the prober's own
   cache;
3. test: two-sample Kolmogorov-Smirnov and Mann-Whitney U on planted vs fresh TTFTs (twosample.py).
   The verdict is "detected" when both p-values are below `--alpha` and the planted prompts are the
   faster (median ratio below 1): a cache hit can only make a prompt faster.
Two tests: "across keys" (the attacker probes: the question) and "within one key" (the victim probes
its own plants: the control, which shows the audit can see a cache at all on this server, with
these prompts and this noise). When the control is not detected, the audit is inconclusive.

Where the server reports `usage.prompt_tokens_details.cached_tokens`, the probes' mean cached
tokens are shown too; the verdict never uses them (a server need not tell the truth).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import httpx

from reprise.bench.twosample import ks_test, mann_whitney, median

WORDS = ("alpha river stone light number garden window paper music signal harbor engine forest winter yellow "
         "silver morning castle bridge ocean mountain letter story market doctor planet cable orange seven "
         "quiet moment travel button candle rocket velvet shadow ticket marble copper island meadow thunder "
         "lantern pepper saddle violin basket cotton desert feather galaxy hammer jungle kettle ladder mirror "
         "needle oyster pillow puzzle rabbit sugar tiger umbrella valley wagon zipper anchor blossom canyon "
         "dragon falcon glacier honey ivory jacket lemon magnet nectar orbit pebble quartz ribbon spider "
         "tunnel").split()
DEFAULT_ALPHA = 0.01


@dataclass(frozen=True)
class TestResult:
    name: str                   # "across keys" or "within one key"
    num_probes: int             # per group: planted and fresh each
    planted_median_s: float
    fresh_median_s: float
    median_ratio: float         # planted / fresh: below 1 when planted prompts are faster
    ks_statistic: float
    ks_p_value: float
    mw_u: float
    mw_p_value: float
    rank_biserial: float        # -1: every planted probe faster than every fresh one
    detected: bool
    planted_cached_tokens: float | None     # mean reported cached tokens, where the server reports them
    fresh_cached_tokens: float | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The audit's flags; ones the parser already has (--base-url, --model, --seed, --out,
    --request-timeout in `reprise bench`) are shared, not added twice."""
    def add(name: str, **kwargs) -> None:
        if name not in parser._option_string_actions:
            parser.add_argument(name, **kwargs)
    add("--base-url", default="http://127.0.0.1:8000", help="the server to audit")
    add("--model", default=None, help="the model name to request (default: the first in /v1/models)")
    add("--seed", type=int, default=0)
    add("--out", default=None, help="write the results as JSON here")
    add("--request-timeout", type=float, default=600.0, help="seconds per request at most")
    add("--victim-key", default=None, help="audit: the key that plants prompts (default: env REPRISE_AUDIT_VICTIM_KEY)")
    add("--attacker-key", default=None,
        help="audit: the key that probes them (default: env REPRISE_AUDIT_ATTACKER_KEY)")
    add("--probes", type=int, default=40, help="audit: planted prompts per test (as many fresh ones are probed)")
    add("--prompt-words", type=int, default=1000, help="audit: words per random prompt (about as many tokens)")
    add("--alpha", type=float, default=DEFAULT_ALPHA, help="audit: significance level of the verdict")
    add("--endpoint", default="chat", choices=["chat", "completions"], help="audit: the API to probe")


def run(args: argparse.Namespace) -> int:
    """Runs the audit; prints the table, writes --out; 0 whatever the verdict (1 on bad flags)."""
    victim = args.victim_key or os.environ.get("REPRISE_AUDIT_VICTIM_KEY")
    attacker = args.attacker_key or os.environ.get("REPRISE_AUDIT_ATTACKER_KEY")
    if not victim or not attacker or victim == attacker:
        raise ValueError("bench audit needs two different keys: --victim-key and --attacker-key")
    if args.probes < 5:
        raise ValueError("bench audit needs --probes 5 or more")
    result = audit(args.base_url, victim, attacker, model=args.model, num_probes=args.probes,
                   prompt_words=args.prompt_words, alpha=args.alpha, seed=args.seed, endpoint=args.endpoint,
                   timeout_s=args.request_timeout)
    print_report(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def audit(base_url: str, victim_key: str, attacker_key: str, *, model: str | None = None, num_probes: int = 40,
          prompt_words: int = 1000, alpha: float = DEFAULT_ALPHA, seed: int = 0, endpoint: str = "chat",
          timeout_s: float = 600.0) -> dict:
    """Both tests against one server; the result as plain data (see `print_report`)."""
    rng = random.Random(seed)
    with _Prober(base_url, victim_key, endpoint, timeout_s) as victim, \
            _Prober(base_url, attacker_key, endpoint, timeout_s) as attacker:
        model = model or victim.first_model()
        victim.model = attacker.model = model
        for prober in (victim, attacker):          # connections open, the template's prefix warm
            for _ in range(2):
                prober.ttft(_prompt(rng, prompt_words))
        across = _one_test("across keys", victim, attacker, rng, num_probes, prompt_words, alpha)
        within = _one_test("within one key", victim, victim, rng, num_probes, prompt_words, alpha)
    verdict = ("inconclusive" if not within.detected else "detected" if across.detected else "not detected")
    return {"base_url": base_url, "model": model, "endpoint": endpoint, "alpha": alpha, "seed": seed,
            "prompt_words": prompt_words, "probes_per_group": num_probes,
            "tests": {"across_keys": asdict(across), "within_one_key": asdict(within)},
            "cache_shared_across_keys": verdict}


def _one_test(name: str, planter: "_Prober", prober: "_Prober", rng: random.Random, num_probes: int,
              prompt_words: int, alpha: float) -> TestResult:
    planted = [_prompt(rng, prompt_words) for _ in range(num_probes)]
    for prompt in planted:
        planter.plant(prompt)
    probes = [("planted", prompt) for prompt in planted] + [("fresh", _prompt(rng, prompt_words))
                                                             for _ in range(num_probes)]
    rng.shuffle(probes)
    timings: dict[str, list[float]] = {"planted": [], "fresh": []}
    cached: dict[str, list[int | None]] = {"planted": [], "fresh": []}
    for group, prompt in probes:
        ttft_s, cached_tokens = prober.ttft(prompt)
        timings[group].append(ttft_s)
        cached[group].append(cached_tokens)
    return _judge(name, timings["planted"], timings["fresh"], cached, alpha)


def _judge(name: str, planted: list[float], fresh: list[float], cached: dict, alpha: float) -> TestResult:
    ks, mw = ks_test(planted, fresh), mann_whitney(planted, fresh)
    ratio = median(planted) / median(fresh)
    return TestResult(name, len(planted), median(planted), median(fresh), ratio, ks.statistic, ks.p_value, mw.u,
                      mw.p_value, mw.rank_biserial, ks.p_value < alpha and mw.p_value < alpha and ratio < 1,
                      _mean(cached["planted"]), _mean(cached["fresh"]))


def _mean(values: list[int | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def _prompt(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


class _Prober:
    """One key's requests: plain ones to plant, streamed ones to time. One at a time, never concurrent."""

    def __init__(self, base_url: str, api_key: str, endpoint: str, timeout_s: float):
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"},
                                 timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.endpoint = endpoint
        self.model: str | None = None

    def __enter__(self) -> "_Prober":
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def first_model(self) -> str:
        response = self.http.get("/v1/models")
        _raise_for(response)
        return response.json()["data"][0]["id"]

    def _body(self, prompt: str, stream: bool) -> tuple[str, dict]:
        body = {"model": self.model, "max_tokens": 1, "temperature": 0}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if self.endpoint == "chat":
            return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
        return "/v1/completions", {**body, "prompt": prompt}

    def plant(self, prompt: str) -> None:
        path, body = self._body(prompt, False)
        _raise_for(self.http.post(path, json=body))

    def ttft(self, prompt: str) -> tuple[float, int | None]:
        """(seconds to the first chunk with content, or to the finishing chunk if none has any;
        the cached tokens the server reports, or None)."""
        path, body = self._body(prompt, True)
        first = cached = None
        start = time.perf_counter()
        with self.http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                response.read()
                _raise_for(response)
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if first is None and _has_content(chunk):
                    first = time.perf_counter() - start
                usage = chunk.get("usage") or {}
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", cached)
        return (first if first is not None else time.perf_counter() - start), cached


def _has_content(chunk: dict) -> bool:
    for choice in chunk.get("choices") or ():
        if (choice.get("delta") or {}).get("content") or choice.get("text") or choice.get("finish_reason"):
            return True
    return False


def _raise_for(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise ValueError(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                         f"{response.text[:300]}")


def print_report(result: dict) -> None:
    print(f"audit of {result['base_url']} ({result['model']}, /{result['endpoint']}): {result['probes_per_group']} "
          f"planted + {result['probes_per_group']} fresh probes per test, ~{result['prompt_words']} words each, "
          f"alpha {result['alpha']}")
    print(f"  {'test':<16} {'planted p50':>12} {'fresh p50':>10} {'ratio':>6} {'KS D':>6} {'KS p':>9} "
          f"{'MW p':>9} {'r_rb':>6} {'cached (pl/fr)':>15}  verdict")
    for test in result["tests"].values():
        cached = (f"{test['planted_cached_tokens']:.0f}/{test['fresh_cached_tokens']:.0f}"
                  if test["planted_cached_tokens"] is not None and test["fresh_cached_tokens"] is not None else "-")
        planted_ms, fresh_ms = test["planted_median_s"] * 1000, test["fresh_median_s"] * 1000
        print(f"  {test['name']:<16} {planted_ms:>10.1f}ms {fresh_ms:>8.1f}ms "
              f"{test['median_ratio']:>6.2f} {test['ks_statistic']:>6.2f} {test['ks_p_value']:>9.2e} "
              f"{test['mw_p_value']:>9.2e} {test['rank_biserial']:>6.2f} {cached:>15}  "
              f"{'detected' if test['detected'] else 'not detected'}")
    print(f"  cache shared across keys: {result['cache_shared_across_keys']}")
