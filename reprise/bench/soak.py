"""`reprise bench soak`: a mixed, unfriendly load against a running reprise server, then a health check.

The mix (seeded): chat and text completions, streamed or not, most behind one of a few long shared
system prompts; multi-turn chats that resend their history; streams the client drops after a few
chunks; requests cancelled before their answer; bad requests. Each request ends as one outcome:
  completed     a 200 with a whole answer (a stream ended by `data: [DONE]`)
  error         a clean refusal: 4xx (429 included) in OpenAI's error shape
  disconnected  the client went away on purpose (dropped stream, cancelled request)
  server_error  a 5xx, or an error event inside a stream
  hang          no answer within the per-request timeout
  broken        anything else: a transport failure, a malformed body, a stream cut short
After the load the server must settle (nothing running or waiting) with no KV block in use, its
block states summing to the pool and its cache invariants holding (GET /v1/cache/check).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

WORDS = ("alpha river stone light number garden window paper music signal harbor engine forest winter yellow "
         "silver morning castle bridge ocean mountain letter story market doctor planet cable orange seven "
         "quiet moment travel button candle rocket velvet shadow ticket marble").split()
KINDS = {"chat": 4, "chat_stream": 4, "completion": 2, "completion_stream": 2, "multi_turn": 4,
         "disconnect": 2, "cancel": 1, "bad": 1}
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
    api_key: str | None = None
    request_timeout_s: float = 120.0
    settle_timeout_s: float = 60.0
    max_tokens: int = 32                     # each request asks for 1 to this many
    system_words: tuple[int, int] = (150, 400)   # length range of the shared system prompts
    rng: random.Random = field(init=False)
    systems: list[str] = field(init=False)
    conversations: list[list[dict]] = field(init=False)

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.systems = [words(self.rng, self.rng.randint(*self.system_words)) for _ in range(3)]
        self.conversations = [[{"role": "system", "content": self.rng.choice(self.systems)}] for _ in range(4)]


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def run_soak_command(args) -> int:
    """`reprise bench soak`: prints the summary, writes the JSON with --out; 1 when a check failed."""
    api_key = args.api_key or os.environ.get("REPRISE_API_KEY")
    soak = Soak(args.base_url, args.requests, args.concurrency, args.seed, api_key, args.request_timeout)
    report = run_soak(soak)
    print_summary(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["ok"] else 1


def run_soak(soak: Soak) -> dict:
    """Runs the load and the checks; the report (see `summary`), `ok` true when everything held."""
    return asyncio.run(_run(soak))


async def _run(soak: Soak) -> dict:
    headers = {"Authorization": f"Bearer {soak.api_key}"} if soak.api_key else {}
    limits = httpx.Limits(max_connections=soak.concurrency * 2)
    async with httpx.AsyncClient(base_url=soak.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=soak.request_timeout_s) as client:
        before = await read_metrics(client)
        plan = [_pick_kind(soak.rng) for _ in range(soak.num_requests)]
        gate = asyncio.Semaphore(soak.concurrency)
        locks = [asyncio.Lock() for _ in soak.conversations]
        start = time.monotonic()
        records = await asyncio.gather(*(_one(client, soak, kind, index, gate, locks)
                                         for index, kind in enumerate(plan)))
        duration = time.monotonic() - start
        after = await _settle(client, soak.settle_timeout_s)
        check = await _cache_check(client)
    return summary(soak, records, duration, before, after, check)


def _pick_kind(rng: random.Random) -> str:
    return rng.choices(list(KINDS), weights=list(KINDS.values()))[0]


async def _one(client: httpx.AsyncClient, soak: Soak, kind: str, index: int, gate: asyncio.Semaphore,
               locks: list[asyncio.Lock]) -> dict:
    rng = random.Random(f"{soak.seed}-{index}")
    async with gate:
        try:
            if kind == "multi_turn":
                conversation = rng.randrange(len(soak.conversations))
                async with locks[conversation]:
                    outcome = await asyncio.wait_for(_turn(client, soak, conversation, rng), soak.request_timeout_s)
            else:
                outcome = await asyncio.wait_for(_request(client, soak, kind, rng), soak.request_timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            outcome = ("hang", None, "no answer in time")
        except Exception as error:      # noqa: BLE001 - a transport failure or a body we cannot read
            outcome = ("broken", None, f"{type(error).__name__}: {error}")
    return {"kind": kind, "outcome": outcome[0], "status": outcome[1], "detail": outcome[2]}


async def _request(client: httpx.AsyncClient, soak: Soak, kind: str, rng: random.Random) -> tuple:
    if kind == "bad":
        body = rng.choice(BAD_BODIES)
        path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
        content = body if isinstance(body, str) else json.dumps(body)
        return _judge(await client.post(path, content=content, headers={"Content-Type": "application/json"}))
    chat = kind.startswith(("chat", "disconnect", "cancel"))
    body = _chat_body(soak, rng) if chat else _completion_body(soak, rng)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if kind == "cancel":
        try:
            return _judge(await asyncio.wait_for(client.post(path, json=body), rng.uniform(0.05, 1.0)))
        except asyncio.TimeoutError:
            return ("disconnected", None, "cancelled")
    if kind.endswith("stream") or kind == "disconnect":
        drop_after = rng.randint(1, 6) if kind == "disconnect" else None
        return await _stream(client, path, {**body, "stream": True}, drop_after)
    return _judge(await client.post(path, json=body))


def _chat_body(soak: Soak, rng: random.Random) -> dict:
    messages = [{"role": "user", "content": words(rng, rng.randint(5, 60))}]
    if rng.random() < 0.8:
        messages.insert(0, {"role": "system", "content": rng.choice(soak.systems)})
    return {"messages": messages, **_sampling(soak, rng)}


def _completion_body(soak: Soak, rng: random.Random) -> dict:
    prefix = rng.choice(soak.systems) + " " if rng.random() < 0.7 else ""
    return {"prompt": prefix + words(rng, rng.randint(5, 60)), **_sampling(soak, rng)}


def _sampling(soak: Soak, rng: random.Random) -> dict:
    return {"max_tokens": rng.randint(1, soak.max_tokens), "temperature": rng.choice([0, 0.7, 1.0]),
            "stream_options": {"include_usage": True}, "seed": rng.randint(0, 1000)}


async def _turn(client: httpx.AsyncClient, soak: Soak, conversation: int, rng: random.Random) -> tuple:
    """One more turn of a conversation: its whole history plus a new question; the reply joins it."""
    history = soak.conversations[conversation]
    if len(history) > 9:
        del history[1:]                 # keep the system prompt, start the conversation over
    history.append({"role": "user", "content": words(rng, rng.randint(5, 40))})
    response = await client.post("/v1/chat/completions", json={"messages": history, **_sampling(soak, rng)})
    outcome = _judge(response)
    if outcome[0] == "completed":
        history.append(response.json()["choices"][0]["message"])
    else:
        history.pop()
    return outcome


async def _stream(client: httpx.AsyncClient, path: str, body: dict, drop_after: int | None) -> tuple:
    """Reads an SSE answer to [DONE], or leaves after `drop_after` events (closing the connection)."""
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return _judge(response)
        num_events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return ("completed", 200, None)
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return ("server_error", event["error"].get("code") or 500, event["error"].get("message"))
            num_events += 1
            if drop_after is not None and num_events >= drop_after:
                return ("disconnected", 200, f"left after {num_events} events")
    return ("broken", 200, "the stream ended without [DONE]")


def _judge(response: httpx.Response) -> tuple:
    status = response.status_code
    if status >= 500:
        return ("server_error", status, response.text[:200])
    try:
        body = response.json()
    except ValueError:
        return ("broken", status, "the body is not JSON")
    if status == 200:
        return ("completed", status, None) if "choices" in body and "usage" in body else ("broken", status, "no usage")
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error):
        return ("error", status, error["message"][:200])
    return ("broken", status, "not OpenAI's error shape")


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


async def _cache_check(client: httpx.AsyncClient) -> dict | None:
    response = await client.get("/v1/cache/check")
    return response.json() if response.status_code == 200 else None


def summary(soak: Soak, records: list[dict], duration_s: float, before: dict, after: dict,
            check: dict | None) -> dict:
    outcomes = Counter(record["outcome"] for record in records)
    blocks = {state: after.get(f"kv_blocks_{state}") for state in ("used", "cached", "free")}
    pool = check["num_blocks"] if check else None
    delta = {name: after.get(f"reprise:{name}_total", 0) - before.get(f"reprise:{name}_total", 0)
             for name in ("prefix_cache_evictions", "num_preemptions", "prefix_cache_hits", "prefix_cache_queries")}
    held = {
        "no_server_errors": outcomes["server_error"] == 0, "no_hangs": outcomes["hang"] == 0,
        "nothing_broken": outcomes["broken"] == 0, "no_blocks_used": blocks["used"] == 0,
        "blocks_sum_to_pool": pool is not None and sum(v or 0 for v in blocks.values()) == pool,
        "cache_invariants": bool(check and check["ok"]),
    }
    return {
        "requests": soak.num_requests, "concurrency": soak.concurrency, "seed": soak.seed,
        "duration_s": round(duration_s, 2), "outcomes": {k: outcomes[k] for k in sorted(outcomes)},
        "errors_by_status": dict(sorted(Counter(str(r["status"]) for r in records if r["outcome"] == "error").items())),
        "by_kind": {kind: dict(Counter(r["outcome"] for r in records if r["kind"] == kind)) for kind in KINDS},
        "kv_blocks_after": blocks, "pool_blocks": pool, "cache_check": check, "during_load": delta,
        "rss_bytes": {"before": before.get("process_resident_memory_bytes"),
                      "after": after.get("process_resident_memory_bytes")},
        "failures": [r for r in records if r["outcome"] in ("server_error", "hang", "broken")][:10],
        "held": held, "ok": all(held.values()),
    }


def print_summary(report: dict) -> None:
    print(f"soak: {report['requests']} requests at concurrency {report['concurrency']} in {report['duration_s']} s")
    print(f"  outcomes        {report['outcomes']}")
    print(f"  clean errors    {report['errors_by_status']}")
    print(f"  during the load {report['during_load']}")
    print(f"  kv blocks after {report['kv_blocks_after']} (pool {report['pool_blocks']})")
    rss = report["rss_bytes"]
    if rss["before"] and rss["after"]:
        print(f"  server RSS      {rss['before'] / 2**20:.0f} MiB -> {rss['after'] / 2**20:.0f} MiB")
    for name, held in report["held"].items():
        print(f"  {'ok  ' if held else 'FAIL'} {name}")
    for failure in report["failures"]:
        print(f"  failure: {failure}")
