"""`reprise bench soak`: a mixed, unfriendly load against a running reprise server, then a health check.

The mix (seeded): chat and text completions, streamed or not, most behind one of a few long shared
system prompts; multi-turn chats that resend their history; tool calls (tool_choice required) and
structured output (response_format json_schema); Anthropic's /v1/messages and OpenAI's
/v1/responses; streams the client drops after a few chunks; requests cancelled before their answer;
bad requests; and, with several API keys (comma-separated --api-key: several tenants), requests
spread over the keys and salt-boundary probes: a key sends a fresh prompt, another key's
/v1/cache/lookup of it must find nothing. Each request ends as one outcome:
  completed     a 200 with a whole answer (a stream ended by `data: [DONE]`)
  error         a clean refusal: 4xx (429 included) in the API's error shape
  disconnected  the client went away on purpose (dropped stream, cancelled request)
  injected      a 5xx (or an error event in a stream) naming an injected fault (--inject-fault-every)
  server_error  any other 5xx or error event
  salt_breach   a probe whose other key saw the prompt cached
  hang          no answer within the per-request timeout
  broken        anything else: a transport failure, a malformed body, a stream cut short
Throughout the load, GET /v1/cache/check (with --admin-key where there are several keys) runs every
`check_every_s`; after it the server must settle (nothing running or waiting) with no KV block in
use, its block states summing to the pool, its invariants holding and /health 200.

Greedy requests' outputs are kept by body: `compare(reference, report)` checks them against a run of
the same plan on another server (`--reference-url`, run first: the fault-free one), request by
request, except those that failed on either side. Multi-turn turns depend on the replies before
them, so they are compared only where the whole history matches.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from reprise.bench.soak_requests import body_of, is_greedy, judge, send, words

KINDS = {"chat": 4, "chat_stream": 3, "completion": 2, "completion_stream": 2, "multi_turn": 3, "tools": 2,
         "json": 2, "messages": 2, "responses": 2, "disconnect": 2, "cancel": 1, "bad": 1, "probe": 1}
BAD_BODIES = [
    {"messages": "hello"}, {"messages": []}, {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    {"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
    {"prompt": [-1, 5]}, {"prompt": ""}, {"prompt": "x", "n": 3}, "not json at all", [1, 2, 3],
]
_SAMPLE = re.compile(r'^(reprise:kv_blocks)\{state="(\w+)"\} (\S+)$|^([\w:]+) (\S+)$', re.MULTILINE)
_MEMORY_TIER = re.compile(r'^(reprise:prefix_cache_\w+_total)\{tier="memory"\} (\S+)$', re.MULTILINE)


@dataclass
class Soak:
    """One run's settings and shared state: the system prompts and the multi-turn conversations."""

    base_url: str
    num_requests: int = 300
    concurrency: int = 16
    seed: int = 0
    api_key: str | None = None               # comma-separated: several tenants
    request_timeout_s: float = 120.0
    settle_timeout_s: float = 60.0
    max_tokens: int = 32                     # each request asks for 1 to this many
    system_words: tuple[int, int] = (150, 400)   # length range of the shared system prompts
    admin_key: str | None = None             # for /v1/cache/check when there are several keys
    check_every_s: float = 2.0
    rng: random.Random = field(init=False)
    systems: list[str] = field(init=False)
    conversations: list[list[dict]] = field(init=False)
    keys: list[str | None] = field(init=False)

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.systems = [words(self.rng, self.rng.randint(*self.system_words)) for _ in range(3)]
        self.conversations = [[{"role": "system", "content": self.rng.choice(self.systems)}] for _ in range(4)]
        self.keys = [key.strip() for key in (self.api_key or "").split(",") if key.strip()] or [None]

    def headers(self, tenant: int) -> dict:
        key = self.keys[tenant % len(self.keys)]
        return {"Authorization": f"Bearer {key}"} if key else {}

    def admin_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else self.headers(0)


def run_soak_command(args) -> int:
    """`reprise bench soak`: prints the summary, writes the JSON with --out; 1 when a check failed.
    With --reference-url, the same plan runs there first and greedy outputs are compared."""
    api_key = args.api_key or os.environ.get("REPRISE_API_KEY")

    def soak(url: str) -> Soak:
        return Soak(url, args.requests, args.concurrency, args.seed, api_key, args.request_timeout,
                    admin_key=args.admin_key or os.environ.get("REPRISE_ADMIN_KEY"))
    reference = run_soak(soak(args.reference_url)) if args.reference_url else None
    report = run_soak(soak(args.base_url))
    if reference is not None:
        report["reference"] = compare(reference, report)
        report["held"]["matches_reference"] = report["reference"]["differ"] == 0
        report["ok"] = all(report["held"].values())
    print_summary(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["ok"] else 1


def run_soak(soak: Soak) -> dict:
    """Runs the load and the checks; the report (see `summary`), `ok` true when everything held."""
    return asyncio.run(_run(soak))


async def _run(soak: Soak) -> dict:
    limits = httpx.Limits(max_connections=soak.concurrency * 2)
    async with httpx.AsyncClient(base_url=soak.base_url.rstrip("/"), headers=soak.headers(0), limits=limits,
                                 timeout=soak.request_timeout_s) as client:
        before = await read_metrics(client)
        kinds = {kind: weight for kind, weight in KINDS.items() if kind != "probe" or len(soak.keys) > 1}
        plan = [soak.rng.choices(list(kinds), weights=list(kinds.values()))[0] for _ in range(soak.num_requests)]
        gate = asyncio.Semaphore(soak.concurrency)
        locks = [asyncio.Lock() for _ in soak.conversations]
        checks: list[dict | None] = []
        checking = asyncio.ensure_future(_check_throughout(client, soak, checks))
        start = time.monotonic()
        records = await asyncio.gather(*(_one(client, soak, kind, index, gate, locks)
                                         for index, kind in enumerate(plan)))
        duration = time.monotonic() - start
        checking.cancel()
        after = await _settle(client, soak.settle_timeout_s)
        check = await _cache_check(client, soak)
        healthy = (await client.get("/health")).status_code == 200
    return summary(soak, records, duration, before, after, check, checks, healthy)


async def _one(client: httpx.AsyncClient, soak: Soak, kind: str, index: int, gate: asyncio.Semaphore,
               locks: list[asyncio.Lock]) -> dict:
    rng = random.Random(f"{soak.seed}-{index}")
    tenant = rng.randrange(len(soak.keys))
    record = {"kind": kind, "tenant": tenant, "body": None}
    async with gate:
        try:
            if kind == "multi_turn":
                conversation = rng.randrange(len(soak.conversations))
                async with locks[conversation]:
                    outcome = await asyncio.wait_for(_turn(client, soak, conversation, rng, record),
                                                     soak.request_timeout_s)
            else:
                outcome = await asyncio.wait_for(_request(client, soak, kind, rng, tenant, record),
                                                 soak.request_timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            outcome = ("hang", None, "no answer in time", None)
        except Exception as error:      # noqa: BLE001 - a transport failure or a body we cannot read
            outcome = ("broken", None, f"{type(error).__name__}: {error}", None)
    name, status, detail, output = outcome
    if name == "server_error" and "injected fault" in str(detail):
        name = "injected"
    record.update(outcome=name, status=status, detail=detail)
    body = record.pop("body")
    if name == "completed" and is_greedy(body):
        record["key"] = hashlib.sha256(json.dumps([kind, body], sort_keys=True).encode()).hexdigest()[:16]
        record["output"] = output
    return record


async def _request(client: httpx.AsyncClient, soak: Soak, kind: str, rng: random.Random, tenant: int,
                   record: dict) -> tuple:
    headers = soak.headers(tenant)
    if kind == "bad":
        body = rng.choice(BAD_BODIES)
        path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
        content = body if isinstance(body, str) else json.dumps(body)
        return judge("chat", await client.post(path, content=content,
                                               headers={**headers, "Content-Type": "application/json"}))
    if kind == "probe":
        return await _probe(client, soak, rng, tenant)
    body = body_of("chat" if kind in ("disconnect", "cancel") else kind, rng, soak.systems, soak.max_tokens)
    record["body"] = body
    if kind == "cancel":
        try:
            return judge("chat", await asyncio.wait_for(client.post("/v1/chat/completions", json=body, headers=headers),
                                                        rng.uniform(0.05, 1.0)))
        except asyncio.TimeoutError:
            return ("disconnected", None, "cancelled", None)
    return await send(client, kind, body, headers, rng)


async def _probe(client: httpx.AsyncClient, soak: Soak, rng: random.Random, tenant: int) -> tuple:
    """The salt boundary: `tenant` caches a fresh prompt; another key's lookup of it, before and after,
    must not grow past what that key's own traffic explains (a few tokens of a common start, like
    "probe 0."): a leak would show the prompt's whole length."""
    prompt = f"probe {rng.random()} " + words(rng, 40)
    other = (tenant + 1 + rng.randrange(len(soak.keys) - 1)) % len(soak.keys)
    before = await client.post("/v1/cache/lookup", json={"prompt": prompt}, headers=soak.headers(other))
    sent = judge("completion", await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1},
                                                 headers=soak.headers(tenant)))
    after = await client.post("/v1/cache/lookup", json={"prompt": prompt}, headers=soak.headers(other))
    if sent[0] != "completed" or before.status_code != 200 or after.status_code != 200:
        return sent if sent[0] != "completed" else judge("completion", after if before.status_code == 200 else before)
    seen, prompt_tokens = after.json()["cached_tokens"], after.json()["prompt_tokens"]
    if seen > max(before.json()["cached_tokens"], prompt_tokens // 2):
        return ("salt_breach", 200, f"another key sees {seen} of {prompt_tokens} tokens", None)
    return sent


async def _turn(client: httpx.AsyncClient, soak: Soak, conversation: int, rng: random.Random, record: dict) -> tuple:
    """One more turn of a conversation: its whole history plus a new question; the reply joins it."""
    history = soak.conversations[conversation]
    if len(history) > 9:
        del history[1:]                 # keep the system prompt, start the conversation over
    history.append({"role": "user", "content": words(rng, rng.randint(5, 40))})
    body = {"messages": list(history), "max_tokens": rng.randint(1, soak.max_tokens), "temperature": 0}
    record["body"] = body
    outcome = judge("chat", await client.post("/v1/chat/completions", json=body,
                                              headers=soak.headers(conversation)))
    if outcome[0] == "completed":
        history.append({"role": "assistant", "content": outcome[3]})
    else:
        history.pop()
    return outcome


async def read_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """The samples of /metrics this report uses: unlabelled ones by name, kv_blocks by state."""
    text = (await client.get("/metrics")).text
    samples = {}
    for found in _SAMPLE.finditer(text):
        if found.group(1):
            samples[f"kv_blocks_{found.group(2)}"] = float(found.group(3))
        else:
            samples[found.group(4)] = float(found.group(5))
    for found in _MEMORY_TIER.finditer(text):      # the pool's own hits and every query
        samples[found.group(1)] = float(found.group(2))
    return samples


async def _settle(client: httpx.AsyncClient, timeout_s: float) -> dict[str, float]:
    """Waits until nothing runs, waits or holds a block (aborts land a step later); the last reading."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = await read_metrics(client)
        busy = sum(metrics.get(name, 0) for name in ("reprise:num_requests_running", "reprise:num_requests_waiting",
                                                       "kv_blocks_used"))
        if busy == 0 or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.2)


async def _cache_check(client: httpx.AsyncClient, soak: Soak) -> dict | None:
    response = await client.get("/v1/cache/check", headers=soak.admin_headers())
    return response.json() if response.status_code == 200 else None


async def _check_throughout(client: httpx.AsyncClient, soak: Soak, checks: list) -> None:
    """/v1/cache/check every `check_every_s` while the load runs (None: it did not answer 200)."""
    while True:
        await asyncio.sleep(soak.check_every_s)
        try:
            checks.append(await _cache_check(client, soak))
        except httpx.HTTPError:
            checks.append(None)


def compare(reference: dict, report: dict) -> dict:
    """Greedy outputs of the same requests in two runs: {compared, differ, examples}."""
    ours = {record["key"]: record["output"] for record in report["records"] if "key" in record}
    theirs = {record["key"]: record["output"] for record in reference["records"] if "key" in record}
    both = sorted(ours.keys() & theirs.keys())
    differ = [key for key in both if ours[key] != theirs[key]]
    return {"compared": len(both), "differ": len(differ),
            "examples": [{"key": key, "reference": theirs[key], "run": ours[key]} for key in differ[:5]]}


def summary(soak: Soak, records: list[dict], duration_s: float, before: dict, after: dict,
            check: dict | None, checks: list, healthy: bool) -> dict:
    outcomes = Counter(record["outcome"] for record in records)
    blocks = {state: after.get(f"kv_blocks_{state}") for state in ("used", "cached", "free")}
    pool = check["num_blocks"] if check else None
    delta = {name: after.get(f"reprise:{name}_total", 0) - before.get(f"reprise:{name}_total", 0)
             for name in ("prefix_cache_evictions", "num_preemptions", "prefix_cache_hits", "prefix_cache_queries")}
    held = {
        "no_server_errors": outcomes["server_error"] == 0, "no_hangs": outcomes["hang"] == 0,
        "nothing_broken": outcomes["broken"] == 0, "salt_boundary": outcomes["salt_breach"] == 0,
        "no_blocks_used": blocks["used"] == 0,
        "blocks_sum_to_pool": pool is not None and sum(v or 0 for v in blocks.values()) == pool,
        "cache_invariants": bool(check and check["ok"]),
        "invariants_throughout": all(c is not None and c["ok"] for c in checks), "healthy_at_end": healthy,
    }
    return {
        "requests": soak.num_requests, "concurrency": soak.concurrency, "seed": soak.seed, "tenants": len(soak.keys),
        "duration_s": round(duration_s, 2), "outcomes": {k: outcomes[k] for k in sorted(outcomes)},
        "errors_by_status": dict(sorted(Counter(str(r["status"]) for r in records if r["outcome"] == "error").items())),
        "by_kind": {kind: dict(Counter(r["outcome"] for r in records if r["kind"] == kind)) for kind in KINDS},
        "kv_blocks_after": blocks, "pool_blocks": pool, "cache_check": check, "checks_during_load": len(checks),
        "during_load": delta,
        "rss_bytes": {"before": before.get("process_resident_memory_bytes"),
                      "after": after.get("process_resident_memory_bytes")},
        "failures": [r for r in records if r["outcome"] in ("server_error", "hang", "broken", "salt_breach")][:10],
        "records": records, "held": held, "ok": all(held.values()),
    }


def print_summary(report: dict) -> None:
    print(f"soak: {report['requests']} requests from {report['tenants']} tenant(s) at concurrency "
          f"{report['concurrency']} in {report['duration_s']} s; {report['checks_during_load']} cache checks during it")
    print(f"  outcomes        {report['outcomes']}")
    print(f"  clean errors    {report['errors_by_status']}")
    print(f"  during the load {report['during_load']}")
    print(f"  kv blocks after {report['kv_blocks_after']} (pool {report['pool_blocks']})")
    rss = report["rss_bytes"]
    if rss["before"] and rss["after"]:
        print(f"  server RSS      {rss['before'] / 2**20:.0f} MiB -> {rss['after'] / 2**20:.0f} MiB")
    for name, held in report["held"].items():
        print(f"  {'ok  ' if held else 'FAIL'} {name}")
    if "reference" in report:
        reference = report["reference"]
        print(f"  greedy outputs  {reference['compared']} compared with the reference run, "
              f"{reference['differ']} differ")
    for failure in report["failures"]:
        print(f"  failure: {failure}")
