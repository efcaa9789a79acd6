"""PinTable: which radix nodes a client pinned, until when, and each namespace's pinned blocks.

A pin keeps a cached prefix through pressure for its TTL (Anthropic `cache_control` with a
`ttl`, OpenAI `prompt_cache_retention`): the index evicts pinned leaves only when no unpinned one
is left, and an ended pin makes its node ordinary again. Tenants stay apart: counts are kept per
namespace (salt) and bounded per namespace by the caller, so one tenant's pins never take
another's share; a pin is made only on the pinning request's own namespace.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reprise.cache.radix import Node


class PinTable:
    def __init__(self) -> None:
        self._expiries: list[tuple[float, int, Node]] = []      # (pin end, push order, node); stale ones skipped
        self._order = itertools.count()
        self.num_blocks: dict[str | None, int] = {}             # pinned blocks per namespace
        self.num_expired = 0                                    # pins that ended (ever)

    @property
    def total_blocks(self) -> int:
        return sum(self.num_blocks.values())

    def add(self, node: Node, until: float, max_blocks: int) -> bool:
        """Pin `node` until `until` (a pinned node keeps the later end). False, pinning nothing,
        when its blocks would take the namespace past `max_blocks`."""
        if node.pin_until is None:
            held = self.num_blocks.get(node.salt, 0)
            if held + len(node.blocks) > max_blocks:
                return False
            self.num_blocks[node.salt] = held + len(node.blocks)
            node.pin_until = until
        elif until > node.pin_until:
            node.pin_until = until
        else:
            return True
        heapq.heappush(self._expiries, (until, next(self._order), node))
        return True

    def split(self, lower: Node, upper: Node, straddled: bool) -> None:
        """`upper` was cut from pinned `lower`: it is pinned alike; a block in both halves counts twice."""
        upper.pin_until = lower.pin_until
        self.num_blocks[lower.salt] += straddled
        heapq.heappush(self._expiries, (upper.pin_until, next(self._order), upper))

    def remove(self, node: Node) -> None:
        """`node` leaves the tree or its pin ends."""
        if node.pin_until is None:
            return
        node.pin_until = None
        self.num_blocks[node.salt] -= len(node.blocks)
        if not self.num_blocks[node.salt]:
            del self.num_blocks[node.salt]

    def expire(self, now: float) -> list[Node]:
        """Unpin every node whose pin ended by `now`; returns them."""
        ended = []
        while self._expiries and self._expiries[0][0] <= now:
            until, _, node = heapq.heappop(self._expiries)
            if node.pin_until == until:
                self.remove(node)
                ended.append(node)
        self.num_expired += len(ended)
        return ended

    def check(self, nodes: Iterable[Node]) -> None:
        counts: dict[str | None, int] = {}
        for node in nodes:
            if node.pin_until is not None:
                counts[node.salt] = counts.get(node.salt, 0) + len(node.blocks)
        if counts != self.num_blocks:
            raise AssertionError(f"pinned blocks {self.num_blocks} != recount {counts}")
