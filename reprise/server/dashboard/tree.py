"""The radix tree, summarised for the icicle chart: the largest cached subtrees.

`summarise(cache, visible, max_nodes, clock)` runs on the engine thread (through
`AsyncEngine.call`): it walks `cache.index.nodes()` once, sums every node's subtree, and keeps the
`max_nodes` nodes with the most tokens below them. A parent holds more tokens than any child, so
the kept set is closed under ancestors: every kept node's parent is kept too, or is a namespace
root. Only namespaces whose salt passes `visible(salt)` are walked into the result.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from reprise.server.dashboard.ledger import namespace_label


@dataclass(frozen=True, slots=True)
class Prefix:
    """One kept node: path positions [start, start + num_tokens); `subtree_*` include descendants;
    `num_blocks` counts the blocks it holds that its parent does not (a straddling block once).
    `parent` is the kept parent's id, or None under the namespace root. `last_use` is the index's
    logical clock at its last match or insert (larger = more recent). `token_ids` are the node's
    own tokens, for the text shown with --log-prompts only."""

    id: int
    parent: int | None
    namespace: str
    start: int
    num_tokens: int
    num_blocks: int
    subtree_tokens: int
    subtree_blocks: int
    last_use: int
    pinned_for_s: float | None      # seconds its retention pin still runs; None = not pinned
    token_ids: tuple[int, ...]

    def as_dict(self, text: str | None) -> dict:
        fields = {name: getattr(self, name) for name in self.__slots__ if name != "token_ids"}
        fields["text"] = text
        return fields


@dataclass(frozen=True, slots=True)
class TreeSummary:
    namespaces: dict[str, int]      # label -> tokens cached in that namespace (its whole tree)
    num_nodes: int                  # nodes walked (in the visible namespaces)
    prefixes: list[Prefix]          # the kept nodes, largest subtree first


def summarise(cache, visible: Callable[[str | None], bool], max_nodes: int, now: float) -> TreeSummary:
    """The summary of the tree as it is between two engine steps; `now` is the time on the cache's
    pin clock (time.monotonic). Prefix ids are positions in the result."""
    nodes = [node for node in cache.index.nodes() if visible(node.salt)]
    tokens = {id(node): len(node.tokens) for node in nodes}
    blocks = {id(node): _own_blocks(node) for node in nodes}
    for node in reversed(nodes):            # children before parents
        if node.parent is not None and node.parent.parent is not None:
            tokens[id(node.parent)] += tokens[id(node)]
            blocks[id(node.parent)] += blocks[id(node)]
    namespaces: dict[str, int] = {}
    for node in nodes:
        if node.parent.parent is None:
            label = namespace_label(node.salt)
            namespaces[label] = namespaces.get(label, 0) + tokens[id(node)]
    kept = sorted(nodes, key=lambda node: (-tokens[id(node)], node.start))[:max_nodes]
    index = {id(node): position for position, node in enumerate(kept)}
    prefixes = [Prefix(position, index.get(id(node.parent)), namespace_label(node.salt), node.start,
                       len(node.tokens), _own_blocks(node), tokens[id(node)], blocks[id(node)], node.last_access,
                       _pinned_for(node, now), node.tokens)
                for position, node in enumerate(kept)]
    return TreeSummary(namespaces, len(nodes), prefixes)


def _own_blocks(node) -> int:
    """The node's blocks, less the one straddling the edge to its parent when both hold the same
    physical block: so a subtree's sum counts each block once."""
    shared = bool(node.blocks) and bool(node.parent.blocks) and node.blocks[0] == node.parent.blocks[-1]
    return len(node.blocks) - shared


def _pinned_for(node, now: float) -> float | None:
    return node.pin_until - now if node.pin_until is not None and node.pin_until > now else None
