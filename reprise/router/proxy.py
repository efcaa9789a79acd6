"""The router's core: choose a replica for a request (policy.py) and pass the request through.

Bodies and responses pass unchanged, streams chunk by chunk as they come. A replica that cannot be
connected to is taken out and the request goes to the next best one (nothing was sent, so it is
safe to resend); a replica that fails after answering has the request, which then fails as it
would have without the router.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from reprise.cache.tiers.events import namespace_id
from reprise.cache.tiers.keys import block_keys, namespace
from reprise.router.index import KvIndex
from reprise.router.metrics import RouterMetrics, UsageReader
from reprise.router.policy import Candidate, Decision, choose
from reprise.router.prompts import Prompt, PromptReader
from reprise.router.replicas import Replica, ReplicaTable

log = logging.getLogger("reprise.router")

POLICIES = ("prefix", "round-robin")
AFFINITY_TOKENS = 64
ROUTE_HEADER = "x-reprise-route"     # on every answer: "<replica url> <reason> <estimated cached tokens>"
# the last event of an OpenAI, Anthropic and Responses stream
_STREAM_ENDS = (b"data: [DONE]", b"event: message_stop", b"event: response.completed", b"event: response.failed")
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "accept-encoding"}


@dataclass(frozen=True)
class Upstream:
    """An answer on its way back: status, headers, and the body as it arrives."""

    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]


class NoReplica(Exception):
    pass


class Router:
    def __init__(self, table: ReplicaTable, index: KvIndex, prompts: PromptReader | None, metrics: RouterMetrics,
                 policy: str = "prefix"):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}")
        self.table, self.index, self.prompts, self.metrics, self.policy = table, index, prompts, metrics, policy
        self._turns = itertools.count()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=2.0))

    async def close(self) -> None:
        await self.client.aclose()

    def decide(self, prompt: Prompt | None, excluded: set[str] = frozenset()) -> Decision:
        healthy = [replica for replica in self.table.healthy() if replica.url not in excluded]
        if not healthy:
            raise NoReplica("no replica is answering")
        if self.policy == "round-robin":
            replica = healthy[next(self._turns) % len(healthy)]
            return Decision(replica.url, None, 0)
        candidates = [Candidate(replica.url, self._cached_tokens(replica, prompt), replica.load) for replica in healthy]
        return choose(candidates, _affinity(prompt))

    async def forward(self, path: str, body: bytes, headers: dict[str, str]) -> Upstream:
        """Sends the request to the chosen replica, or to the next one when it cannot be reached."""
        parsed = _json(body)
        prompt = self.prompts.read(path, parsed, headers) if self.prompts and parsed is not None else None
        streaming = bool(parsed and parsed.get("stream"))
        sent_headers = {name: value for name, value in headers.items() if name.lower() not in _HOP_HEADERS}
        excluded: set[str] = set()
        while True:
            decision = self.decide(prompt, excluded)
            replica = self.table.replicas[decision.url]
            request = self.client.build_request("POST", f"{replica.url}{path}", content=body, headers=sent_headers)
            try:
                response = await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                self.metrics.failures.labels(replica.url).inc()
                self.table.mark_down(replica.url, f"{type(error).__name__}: {error}")
                excluded.add(replica.url)
                continue
            self._count(decision)
            replica.in_flight += 1
            headers_out = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS | {"content-encoding"}}
            headers_out[ROUTE_HEADER] = _describe(decision)
            return Upstream(response.status_code, headers_out, self._relay(response, replica, streaming))

    def _count(self, decision: Decision) -> None:
        self.metrics.requests.labels(decision.url).inc()
        self.metrics.decisions.labels(decision.reason.value if decision.reason else "round_robin").inc()
        self.metrics.estimated.labels(decision.url).inc(decision.cached_tokens)

    async def _relay(self, response: httpx.Response, replica: Replica, streaming: bool) -> AsyncIterator[bytes]:
        """The answer's bytes as they come. The request leaves the replica's load before its last
        bytes go out (the body's length reached, or a stream's final event seen), so a client that
        sends its next request at once never finds its previous one still counted."""
        usage = UsageReader(streaming)
        length = int(response.headers.get("content-length", 0)) or None
        received, counted = 0, True
        try:
            async for chunk in response.aiter_bytes():
                usage.feed(chunk)
                received += len(chunk)
                if counted and (received == length or any(end in chunk for end in _STREAM_ENDS)):
                    counted = self._done(replica, usage)
                yield chunk
        finally:
            if counted:
                self._done(replica, usage)
            await response.aclose()

    def _done(self, replica: Replica, usage: UsageReader) -> bool:
        replica.in_flight -= 1
        reported = usage.finish()
        if reported is not None:
            self.metrics.reported.labels(replica.url).inc(reported)
        return False

    def _cached_tokens(self, replica: Replica, prompt: Prompt | None) -> int:
        """Prompt tokens the replica's memory index holds, in the caller's namespace (policy.py)."""
        model = self.index.model(replica.replica_id) if replica.replica_id else None
        if prompt is None or model is None or len(prompt.ids) < 2:
            return 0
        fingerprint, block_size = model
        root = namespace(fingerprint, prompt.salt)
        keys = block_keys(root, prompt.ids, block_size)
        matched = self.index.matched_blocks(replica.replica_id, namespace_id(root), keys)
        return min(matched * block_size, len(prompt.ids) - 1)

    def index_sizes(self) -> dict[str, int]:
        return {r.url: self.index.num_blocks(r.replica_id) if r.replica_id else 0 for r in self.table.replicas.values()}


def _describe(decision: Decision) -> str:
    return f"{decision.url} {decision.reason.value if decision.reason else 'round_robin'} {decision.cached_tokens}"


def _affinity(prompt: Prompt | None) -> bytes:
    """Where a prompt goes when no replica holds any of it: a digest of its tenant and first tokens."""
    if prompt is None:
        return b""
    salt = b"\x00" if prompt.salt is None else b"\x01" + prompt.salt.encode("utf-8", "surrogatepass")
    head = ",".join(map(str, prompt.ids[:AFFINITY_TOKENS])).encode()
    return hashlib.blake2b(salt + b"|" + head, digest_size=16).digest()


def _json(body: bytes) -> dict | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None
