"""Which replica gets a request: the longest cached prefix, weighed against load.

For each healthy replica r:

    score(r) = cached_tokens(r) - LOAD_TOKENS * load(r)

    cached_tokens(r)  prompt tokens r's memory index holds for this prompt, in the caller's
                      namespace: leading blocks of the prompt's key chain x block size, at most
                      prompt length - 1 (the last prompt token is always computed)
    load(r)           requests ahead of this one on r: those this router has in flight there
                      (exact), plus the running + waiting that r's /metrics reported at the last
                      health check beyond this router's own (other clients of r)
    LOAD_TOKENS       256: one request ahead costs about as much as prefilling 256 tokens more
                      (on the default model a replica decodes a short reply in the time it
                      prefills a few hundred tokens); a 2,000-token hit outweighs ~8 requests queued

The highest score wins; ties go to rendezvous hashing of (namespace id, first block key) with each
replica's URL, so a conversation whose prefix no replica holds yet (or whose events have not
arrived) still lands where its first turn did, and its tenant's traffic spreads over replicas.

The reason recorded in the metrics: `prefix` when the winner holds the longest prefix (> 0
tokens); `load` when load moved the request away from where the prefix (or, with no prefix, the
rendezvous hash) would have put it; `affinity` when no replica holds any of it and the hash chose.

Only the caller's namespace is ever looked up, so one tenant's entries never move another's
requests. Load is the one signal shared by all tenants (the replicas are), and it says how busy a
replica is, never what it holds.
"""
from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

LOAD_TOKENS = 256


class Reason(enum.Enum):
    PREFIX = "prefix"
    LOAD = "load"
    AFFINITY = "affinity"


@dataclass(frozen=True, slots=True)
class Candidate:
    url: str
    cached_tokens: int      # estimated, from the KV events
    load: int               # requests ahead


@dataclass(frozen=True, slots=True)
class Decision:
    url: str
    reason: Reason
    cached_tokens: int      # the estimate for the chosen replica


def rendezvous(affinity: bytes, url: str) -> bytes:
    return hashlib.blake2b(affinity + b"|" + url.encode(), digest_size=8).digest()


def choose(candidates: Sequence[Candidate], affinity: bytes, load_tokens: int = LOAD_TOKENS) -> Decision:
    """The replica for one request (see the module docstring); `candidates` must not be empty."""
    if not candidates:
        raise ValueError("no replica to choose from")
    by_prefix = max(candidates, key=lambda c: (c.cached_tokens, rendezvous(affinity, c.url)))
    chosen = max(candidates, key=lambda c: (c.cached_tokens - load_tokens * c.load, rendezvous(affinity, c.url)))
    if chosen.url != by_prefix.url:
        reason = Reason.LOAD
    elif chosen.cached_tokens > 0:
        reason = Reason.PREFIX
    else:
        reason = Reason.AFFINITY
    return Decision(chosen.url, reason, chosen.cached_tokens)
