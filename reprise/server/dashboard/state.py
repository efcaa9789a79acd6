"""The JSON behind the dashboard (`GET /v1/dashboard/state`), built for one caller's scope.

Engine-wide numbers (the pool, the cache's query and hit counters, evictions, preemptions) are the
ones /metrics exposes to anyone, so every caller sees them. Everything keyed by namespace (the
tree, the recent requests, per-namespace hit rates, TTFT by hit and miss) passes `visible(salt)`.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from reprise.engine.async_engine import AsyncEngine
from reprise.server.dashboard.history import PoolHistory
from reprise.server.dashboard.ledger import FinishedRequest, RequestLedger, namespace_label
from reprise.server.dashboard.tree import summarise

MAX_TREE_NODES = 60
MAX_TEXT_TOKENS = 64        # of each node, decoded for the tree (--log-prompts only)

Visible = Callable[[str | None], bool]


def caller_scope(tenant_salt: str | None, keyed: bool) -> tuple[Visible, list[str] | None]:
    """(visible(salt), the caller's own namespace labels or None for all). Without API keys, with
    keys that share one namespace (one key, or --shared-cache), or for the admin key (which has no
    salt), every namespace; with a key's own salt (several keys, the default), the
    key's namespace and the ones its clients' `cache_salt`s make under it (`<key salt>:<salt>`)."""
    if not keyed or tenant_salt is None:
        return (lambda salt: True), None
    own = tenant_salt + ":"
    return (lambda salt: salt is not None and (salt == tenant_salt or salt.startswith(own))), \
        [namespace_label(tenant_salt)]


async def build_state(async_engine: AsyncEngine, history: PoolHistory, ledger: RequestLedger, visible: Visible,
                      own: list[str] | None, log_prompts: bool) -> dict:
    """The whole state for one caller: off the event loop, the tree walked between engine steps.
    Keys: time, scope ("all" | "own"), own_namespaces, log_prompts, pool (blocks by state, evictions,
    preemptions), cache (queries, hits, hit_rate: the /metrics counters), history (samples, oldest
    first), namespaces (per label: tokens of finished requests), ttft (hit / miss), tree (namespaces'
    token counts, the largest prefixes; text of each node's first MAX_TEXT_TOKENS with --log-prompts
    only), requests (newest first)."""
    engine = async_engine.engine
    now = await asyncio.to_thread(history.read)
    tree = await asyncio.to_thread(async_engine.call, summarise, engine.cache, visible, MAX_TREE_NODES,
                                   time.monotonic())
    recent = ledger.recent(visible)
    cache = {"queries": now.queries, "hits": now.hits, "hit_rate": now.hits / now.queries if now.queries else None}
    pool = {"num_blocks": now.used + now.cached + now.free, "block_size": engine.block_size, "used": now.used,
            "cached": now.cached, "free": now.free, "pinned": now.pinned, "evictions": now.evictions,
            "preemptions": now.preemptions}
    prefixes = [prefix.as_dict(engine.tokenizer.decode(prefix.token_ids[:MAX_TEXT_TOKENS]) if log_prompts else None)
                for prefix in tree.prefixes]
    return {"time": now.t, "scope": "all" if own is None else "own", "own_namespaces": own,
            "log_prompts": log_prompts, "pool": pool, "cache": cache,
            "history": [sample.as_dict(visible) for sample in history.samples()],
            "namespaces": _namespaces(now.namespaces, visible, tree.namespaces),
            "ttft": _ttft_split(recent),
            "tree": {"num_nodes": tree.num_nodes, "namespaces": tree.namespaces, "prefixes": prefixes},
            "requests": [entry.as_dict() for entry in recent]}


def _namespaces(totals: dict[str | None, tuple[int, int]], visible: Visible, cached: dict[str, int]) -> list[dict]:
    """Per namespace: finished requests' prompt and cached tokens, their ratio, tokens in the tree."""
    rows = []
    for salt, (prompt_tokens, cached_tokens) in totals.items():
        if visible(salt):
            label = namespace_label(salt)
            rows.append({"label": label, "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens,
                         "hit_rate": cached_tokens / prompt_tokens if prompt_tokens else None,
                         "tree_tokens": cached.get(label, 0)})
    return sorted(rows, key=lambda row: -row["prompt_tokens"])


def _ttft_split(recent: list[FinishedRequest]) -> dict:
    """Mean and count of TTFT over the remembered requests, for hits (cached_tokens > 0) and misses."""
    split = {}
    for name, hit in (("hit", True), ("miss", False)):
        times = [entry.ttft_s for entry in recent if (entry.cached_tokens > 0) == hit and entry.ttft_s is not None]
        split[name] = {"count": len(times), "mean_s": sum(times) / len(times) if times else None}
    return split
