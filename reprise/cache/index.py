"""The prefix-index interface the CacheManager talks to, its results, and NullIndex.

RadixIndex (radix.py) is the real index; NullIndex is what `--no-prefix-cache` swaps in, so the
manager never tests a flag. An index never touches the BlockPool: it reports the blocks it starts
referencing (`Insertion.adopted`) and stops referencing (`evict`), and the manager counts them.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from reprise.cache.pins import PinTable

if TYPE_CHECKING:
    from reprise.cache.radix import Node


class Stop(Enum):
    """Why a walk of the index stopped where it did."""

    EXHAUSTED = "exhausted"   # every query token matched
    ENDED = "ended"           # the cached path ended; nothing cached beyond it
    DIVERGED = "diverged"     # the cached path continues with a different token
    EVICTED = "evicted"       # the next query token began a path that was evicted
    DISABLED = "disabled"     # the index keeps nothing


@dataclass(frozen=True, slots=True)
class IndexMatch:
    """The longest cached prefix of a query, at token granularity.

    `blocks[i]` holds valid KV for all of block i, for i < length // block_size.
    `partial_block`, present iff length % block_size != 0, holds valid KV for the first
    length % block_size slots of block length // block_size (the caller copies it).
    `node` is the deepest node the match touched (None when length == 0); locking it keeps
    every block of the match in the index.
    """

    length: int
    blocks: tuple[int, ...]
    partial_block: int | None
    stop: Stop
    node: Node | None = field(default=None, compare=False, repr=False)
    checkpoints: tuple[tuple[int, int], ...] = ()   # (position, slot) on the matched path, ascending


@dataclass(frozen=True, slots=True)
class Evicted:
    """What an eviction dropped: one block id per dropped entry and the checkpoint slots of the
    dropped nodes (the caller frees each once)."""

    blocks: list[int]
    checkpoints: list[int]


@dataclass(frozen=True, slots=True)
class Insertion:
    """Result of an insert: the deepest node of the inserted sequence (None if nothing was
    inserted) and the blocks the index took a new reference on (the caller must `share` each
    one, once per appearance)."""

    node: Node | None
    adopted: tuple[int, ...]


class PrefixIndex(Protocol):
    """What the CacheManager needs from an index. See RadixIndex for the full contracts."""

    block_size: int
    num_nodes: int
    num_cached_tokens: int
    num_written_tokens: int
    pins: PinTable

    def match(self, token_ids: Sequence[int], salt: str | None) -> IndexMatch: ...

    def insert(self, token_ids: Sequence[int], block_table: Sequence[int], salt: str | None) -> Insertion: ...

    def lock(self, node: Node) -> None: ...

    def unlock(self, node: Node) -> None: ...

    def evict(self, num_blocks: int) -> Evicted: ...

    def add_checkpoint(self, node: Node, position: int, slot: int) -> bool: ...

    def drop_checkpoint(self) -> int | None: ...

    def pin(self, token_ids: Sequence[int], salt: str | None, until: float, max_blocks: int) -> Insertion: ...

    def expire_pins(self, now: float) -> int: ...

    def nodes(self) -> Iterator[Node]: ...

    def check_invariants(self) -> None: ...


class NullIndex:
    """An index that keeps nothing: never matches, adopts nothing, has nothing to evict."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.num_nodes = 0
        self.num_cached_tokens = 0
        self.num_written_tokens = 0
        self.pins = PinTable()

    def match(self, token_ids: Sequence[int], salt: str | None) -> IndexMatch:
        return IndexMatch(0, (), None, Stop.DISABLED if token_ids else Stop.EXHAUSTED)

    def insert(self, token_ids: Sequence[int], block_table: Sequence[int], salt: str | None) -> Insertion:
        return Insertion(None, ())

    def lock(self, node: Node) -> None:
        raise ValueError("NullIndex hands out no nodes to lock")

    def unlock(self, node: Node) -> None:
        raise ValueError("NullIndex hands out no nodes to unlock")

    def evict(self, num_blocks: int) -> Evicted:
        return Evicted([], [])

    def add_checkpoint(self, node: Node, position: int, slot: int) -> bool:
        raise ValueError("NullIndex hands out no nodes to checkpoint")

    def drop_checkpoint(self) -> int | None:
        return None

    def pin(self, token_ids: Sequence[int], salt: str | None, until: float, max_blocks: int) -> Insertion:
        return Insertion(None, ())

    def expire_pins(self, now: float) -> int:
        return 0

    def nodes(self) -> Iterator[Node]:
        return iter(())

    def check_invariants(self) -> None:
        return None


def require(condition: object, message: str) -> None:
    """Invariant checks (tests only) raise AssertionError, also under `python -O`."""
    if not condition:
        raise AssertionError(message)
