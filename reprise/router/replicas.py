"""The router's replica table: which replicas answer, what they call themselves, how busy they are.

Every `interval_s` the router asks each replica for `/health` (its replica id: the name of its KV
event stream) and `/metrics` (running and waiting requests). A replica that fails a check, or
that the proxy cannot connect to, is taken out at once; one that answers again is put back (with
whatever id it now reports: a restarted replica is a new, empty one).
"""
from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

import httpx

log = logging.getLogger("reprise.router")

DEFAULT_INTERVAL_S = 1.0
CHECK_TIMEOUT_S = 2.0
_GAUGE = re.compile(r"^reprise:num_requests_(running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)


@dataclass
class Replica:
    url: str
    healthy: bool = False
    replica_id: str | None = None     # from /health; None until a replica publishing KV events answers
    per_key: bool = False             # from /health: each API key is its own cache namespace there
    other_load: int = 0               # running + waiting at the last check, less this router's then
    in_flight: int = 0                # requests this router is proxying there now

    @property
    def load(self) -> int:
        """Requests ahead of a new one: this router's, exact, plus other clients' as last reported
        (this router's own requests leave the count the moment they end, not at the next check)."""
        return self.in_flight + self.other_load


class ReplicaTable:
    def __init__(self, urls: list[str], interval_s: float = DEFAULT_INTERVAL_S):
        if not urls:
            raise ValueError("the router needs at least one --replica")
        self.replicas = {url: Replica(url) for url in (url.rstrip("/") for url in urls)}
        self.interval_s = interval_s
        self._client = httpx.AsyncClient(timeout=CHECK_TIMEOUT_S)

    def healthy(self) -> list[Replica]:
        return [replica for replica in self.replicas.values() if replica.healthy]

    def per_key(self) -> bool:
        """Whether the replicas give each API key its own namespace (several keys and no
        --shared-cache there; replicas of one deployment run alike: any healthy one says)."""
        return any(replica.per_key for replica in self.healthy())

    def replica_ids(self) -> set[str]:
        return {r.replica_id for r in self.replicas.values() if r.replica_id is not None}

    def mark_down(self, url: str, why: str) -> None:
        replica = self.replicas[url]
        if replica.healthy:
            log.warning("replica %s taken out: %s", url, why)
        replica.healthy = False

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(replica) for replica in self.replicas.values()))

    async def run(self) -> None:
        """Checks forever (the app's background task)."""
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        await self._client.aclose()

    async def _check(self, replica: Replica) -> None:
        try:
            health = await self._client.get(f"{replica.url}/health")
            health.raise_for_status()
            in_flight = replica.in_flight
            metrics = await self._client.get(f"{replica.url}/metrics")
            # the replica may count a request of ours that ended while /metrics answered: subtract it
            in_flight = max(in_flight, replica.in_flight)
        except (httpx.HTTPError, OSError) as error:
            self.mark_down(replica.url, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
            return
        body = _json(health)
        replica.replica_id = body.get("replica_id") if isinstance(body.get("replica_id"), str) else None
        replica.per_key = body.get("per_key_namespaces") is True
        reported = int(sum(float(value) for _, value in _GAUGE.findall(metrics.text)))
        replica.other_load = max(0, reported - in_flight)
        if not replica.healthy:
            log.info("replica %s is in (replica id %s)", replica.url, replica.replica_id)
        replica.healthy = True


def _json(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
