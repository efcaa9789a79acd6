"""TenantLRU: what the server keeps between requests (replies, diagnostics records, stored
conversations), keyed by (tenant salt, key), bounded, least recently used first out.

Tenants stay apart by construction: every entry is filed under the salt of the request that
made it, and a lookup names its own salt, so one tenant never reads another's entries (nor learns
whether they exist). Safe to share between threads.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class TenantLRU(Generic[V]):
    def __init__(self, capacity: int):
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str | None, str], V] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, salt: str | None, key: str, value: V) -> None:
        with self._lock:
            self._entries[salt, key] = value
            self._entries.move_to_end((salt, key))
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def get(self, salt: str | None, key: str) -> V | None:
        """The value under this salt and key (a use: it moves to the back of the queue), or None."""
        with self._lock:
            value = self._entries.get((salt, key))
            if value is not None:
                self._entries.move_to_end((salt, key))
            return value

    def __len__(self) -> int:
        return len(self._entries)
