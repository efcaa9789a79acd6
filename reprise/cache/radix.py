"""RadixIndex: a token-level radix tree over KV block chains, one tree per salt, LRU eviction.

Block arithmetic, block size bs, for a node covering path positions [start, end):

    block index i          positions [i*bs, (i+1)*bs)
    node.blocks[j]         block index start//bs + j, for j in 0 .. (end-1)//bs - start//bs
    valid KV in blocks[j]  every path position of that block below min(end, (i+1)*bs),
                           including positions before `start` (the block straddles the edge
                           to the parent and came from one sequence that had the whole path)

A parent and child may name different physical blocks (or the same one) for the block index
that straddles their edge; the tree owns one pool reference per (node, entry).

Recurrent-state checkpoints (hybrid models) are node payloads: `node.checkpoints[p] = slot` is
the state after path positions [0, p), for start < p <= end. A split gives each half the ones
in its range; evicting a node drops its checkpoints with its blocks.

Pins (retention a client asked for): `node.pin_until` is the time its pin ends. Eviction takes
unpinned leaves first (LRU among them), pinned ones only when nothing else is evictable, and a
pin that has ended is an ordinary entry again (`expire_pins`, called before every eviction).
Pins are per namespace (salt) and each namespace's pinned blocks are bounded by the caller.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence

from reprise.cache.index import Evicted, IndexMatch, Insertion, Stop, require
from reprise.cache.pins import PinTable

_MAX_EVICTED_FIRSTS = 16  # per node: enough to explain misses, bounded so memory stays flat


class Node:
    """One edge of the tree: the tokens at path positions [start, end) and their blocks.

    `lock_ref` counts running requests protecting this node; `last_access` is the index clock
    at its last use. A node is evictable iff it is a leaf, not a root, and lock_ref == 0.
    """

    __slots__ = ("tokens", "start", "salt", "parent", "children", "blocks", "lock_ref",
                 "last_access", "evicted_firsts", "heap_entry", "checkpoints", "pin_until")

    def __init__(self, tokens: tuple[int, ...], start: int, salt: str | None, parent: Node | None,
                 blocks: list[int], last_access: int) -> None:
        self.tokens = tokens
        self.start = start
        self.salt = salt
        self.parent = parent
        self.children: dict[int, Node] = {}        # keyed by the child's first token
        self.blocks = blocks
        self.lock_ref = 0
        self.last_access = last_access
        self.evicted_firsts: dict[int, None] = {}  # ordered set, oldest first
        self.heap_entry: tuple[int, int, Node] | None = None  # its live LRU heap entry
        self.checkpoints: dict[int, int] = {}      # path position -> state slot, start < position <= end
        self.pin_until: float | None = None        # when its pin ends (a clock time); None = not pinned

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def __repr__(self) -> str:
        return f"Node([{self.start}, {self.end}), blocks={self.blocks}, lock_ref={self.lock_ref})"


def _common_prefix(tokens: tuple[int, ...], query: tuple[int, ...], pos: int) -> int:
    """Length of the common prefix of `tokens` and `query[pos:]`."""
    num = min(len(tokens), len(query) - pos)
    if tokens[:num] == query[pos:pos + num]:
        return num
    return next(i for i in range(num) if tokens[i] != query[pos + i])


class RadixIndex:
    """Token sequences -> KV blocks, one tree per salt (None = the shared namespace).

    Lookups cost O(len(query)) whatever the number of cached sequences: children are found by
    first token in a dict, and a node's tokens are compared as tuple slices. Eviction is exact
    LRU over evictable leaves, through a heap of (last_access, push order, node) entries whose
    stale entries are skipped on pop and dropped when the heap outgrows twice the node count.
    The index never touches the BlockPool: see `Insertion.adopted` and `evict`.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._roots: dict[str | None, Node] = {None: Node((), 0, None, None, [], 0)}
        self._clock = 0
        self._push_order = itertools.count()
        self._heap: list[tuple[int, int, int, Node]] = []
        self.num_nodes = 0           # non-root nodes
        self.num_cached_tokens = 0   # tokens over all non-root nodes
        self.num_written_tokens = 0  # tokens ever added (cache writes), a counter
        self.pins = PinTable()

    # ---- lookup -------------------------------------------------------------------------

    def match(self, token_ids: Sequence[int], salt: str | None) -> IndexMatch:
        """The longest prefix of `token_ids` cached under `salt`. No side effects."""
        query = tuple(token_ids)
        node = self._roots.get(salt)
        if node is None:
            return IndexMatch(0, (), None, Stop.ENDED if query else Stop.EXHAUSTED)
        blocks: list[int] = []
        checkpoints: list[tuple[int, int]] = []
        deepest: Node | None = None
        pos = 0
        while pos < len(query):
            child = node.children.get(query[pos])
            if child is None:
                return self._matched(pos, blocks, deepest, self._stop_at_edge(node, query[pos]), checkpoints)
            num = _common_prefix(child.tokens, query, pos)
            # full blocks whose last position lies in this node: indices start//bs .. (pos+num)//bs - 1
            blocks.extend(child.blocks[:(pos + num) // self.block_size - child.start // self.block_size])
            checkpoints.extend(sorted(item for item in child.checkpoints.items() if item[0] <= pos + num))
            pos += num
            deepest = child
            if num < len(child.tokens):
                stop = Stop.EXHAUSTED if pos == len(query) else Stop.DIVERGED
                return self._matched(pos, blocks, deepest, stop, checkpoints)
            node = child
        return self._matched(pos, blocks, deepest, Stop.EXHAUSTED, checkpoints)

    @staticmethod
    def _stop_at_edge(node: Node, next_token: int) -> Stop:
        if next_token in node.evicted_firsts:
            return Stop.EVICTED
        return Stop.DIVERGED if node.children else Stop.ENDED

    def _matched(self, length: int, blocks: list[int], deepest: Node | None, stop: Stop,
                 checkpoints: list[tuple[int, int]]) -> IndexMatch:
        partial = None
        if length % self.block_size:
            # `deepest` contains position length-1, so its entry is valid up to `length`.
            partial = deepest.blocks[(length - 1) // self.block_size - deepest.start // self.block_size]
        return IndexMatch(length, tuple(blocks), partial, stop, deepest, tuple(checkpoints))

    # ---- insertion ----------------------------------------------------------------------

    def insert(self, token_ids: Sequence[int], block_table: Sequence[int], salt: str | None) -> Insertion:
        """Cache positions 0..len(token_ids)-1 of a sequence whose KV is in `block_table`.

        `block_table[i]` must hold valid KV for every position of block i below len(token_ids).
        Tokens already cached adopt nothing; a node is split where the sequence diverges inside
        it (the original node object becomes the lower half and keeps its lock_ref); a new leaf
        takes `block_table` entries for the block indices it touches. Touches the whole path.
        """
        tokens = tuple(token_ids)
        if not tokens:
            return Insertion(None, ())
        if len(block_table) * self.block_size < len(tokens):
            raise ValueError(f"{len(block_table)} blocks cannot hold {len(tokens)} tokens")
        self._clock += 1
        node = self._roots.get(salt)
        if node is None:
            node = self._roots[salt] = Node((), 0, salt, None, [], self._clock)
        adopted: list[int] = []
        pos = 0
        while pos < len(tokens):
            node.last_access = self._clock
            child = node.children.get(tokens[pos])
            if child is None:
                node = self._add_leaf(node, tokens[pos:], pos, block_table, adopted)
                break
            num = _common_prefix(child.tokens, tokens, pos)
            if num < len(child.tokens) and pos + num < len(tokens):
                child = self._split(child, pos + num, adopted)
            pos += num
            node = child
        node.last_access = self._clock
        self._refresh(node)
        return Insertion(node, tuple(adopted))

    def _add_leaf(self, parent: Node, tokens: tuple[int, ...], start: int,
                  block_table: Sequence[int], adopted: list[int]) -> Node:
        first, last = start // self.block_size, (start + len(tokens) - 1) // self.block_size
        leaf = Node(tokens, start, parent.salt, parent, list(block_table[first:last + 1]), self._clock)
        parent.children[tokens[0]] = leaf
        parent.evicted_firsts.pop(tokens[0], None)
        adopted.extend(leaf.blocks)
        self.num_nodes += 1
        self.num_cached_tokens += len(tokens)
        self.num_written_tokens += len(tokens)
        self._refresh(parent)
        return leaf

    def _split(self, node: Node, at: int, adopted: list[int]) -> Node:
        """Cut `node` at path position `at`; returns the new upper half [start, at).

        The node object keeps [at, end), its lock_ref, children, evicted_firsts and heap entry,
        so lock handles stay valid: the upper half is its parent, internal, never evictable.
        """
        bs, cut = self.block_size, at - node.start
        upper = Node(node.tokens[:cut], node.start, node.salt, node.parent,
                     node.blocks[:(at - 1) // bs - node.start // bs + 1], node.last_access)
        node.parent.children[node.tokens[0]] = upper
        upper.children[node.tokens[cut]] = node
        node.blocks = node.blocks[at // bs - node.start // bs:]
        if at % bs:
            adopted.append(node.blocks[0])  # the straddling block is now in both halves
        upper.checkpoints = {p: slot for p, slot in node.checkpoints.items() if p <= at}
        node.checkpoints = {p: slot for p, slot in node.checkpoints.items() if p > at}
        node.tokens, node.start, node.parent = node.tokens[cut:], at, upper
        self.num_nodes += 1
        if node.pin_until is not None:
            self.pins.split(node, upper, straddled=bool(at % bs))
        return upper

    # ---- locks and LRU ------------------------------------------------------------------

    def lock(self, node: Node) -> None:
        """Protect `node` from eviction; a lock counts as a use (touches the path).

        Its ancestors need no count: they have a child (this node), so they are never
        evictable, and splits keep this object as the lower half (see `_split`).
        """
        node.lock_ref += 1
        self._clock += 1
        walk: Node | None = node
        while walk is not None:
            walk.last_access = self._clock
            walk = walk.parent
        self._refresh(node)

    def unlock(self, node: Node) -> None:
        if node.lock_ref <= 0:
            raise ValueError(f"{node} is not locked")
        node.lock_ref -= 1
        self._refresh(node)

    def evict(self, num_blocks: int) -> Evicted:
        """Remove least-recently-used evictable leaves until the dropped entries number at least
        `num_blocks` or nothing is evictable. Returns the block id of every dropped entry (a
        block may still be held elsewhere) and the dropped nodes' checkpoint slots; the caller
        frees each one once."""
        dropped = Evicted([], [])
        while len(dropped.blocks) < num_blocks and self._heap:
            entry = heapq.heappop(self._heap)
            if entry[3].heap_entry is entry:
                dropped.checkpoints.extend(entry[3].checkpoints.values())
                dropped.blocks.extend(self._remove_leaf(entry[3]))
        return dropped

    # ---- pins ---------------------------------------------------------------------------

    def pin(self, token_ids: Sequence[int], salt: str | None, until: float, max_blocks: int) -> Insertion:
        """Pin the cached path of `token_ids` (which must all be cached) until `until`, root side
        first, while the namespace's pinned blocks stay within `max_blocks`. The node holding the
        last token is split there, so nothing past it is pinned; the straddling block a split
        shares is in `adopted` (the caller takes a pool reference for it)."""
        tokens, adopted = tuple(token_ids), []
        node, pos = self._roots.get(salt), 0
        while node is not None and pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None or _common_prefix(child.tokens, tokens, pos) < min(len(child.tokens), len(tokens) - pos):
                raise ValueError("pin: the tokens are not all cached")
            if child.end > len(tokens):
                child = self._split(child, len(tokens), adopted)
            if not self.pins.add(child, until, max_blocks):
                break
            self._refresh(child)
            node, pos = child, child.end
        return Insertion(node, tuple(adopted))

    def expire_pins(self, now: float) -> int:
        """Unpin every node whose pin has ended by `now`; returns how many pins ended."""
        ended = self.pins.expire(now)
        for node in ended:
            self._refresh(node)
        return len(ended)

    # ---- checkpoints --------------------------------------------------------------------

    def add_checkpoint(self, node: Node, position: int, slot: int) -> bool:
        """Attach `slot`, the state after positions [0, position), to `node` (which must cover
        `position`). False, attaching nothing, if that position already has a checkpoint."""
        if not node.start < position <= node.end:
            raise ValueError(f"{node} does not cover position {position}")
        if position in node.checkpoints:
            return False
        node.checkpoints[position] = slot
        return True

    def drop_checkpoint(self) -> int | None:
        """Detach the shallowest checkpoint of the least recently used node that has one and
        return its slot (None if there is none). Its blocks stay. Scans every node: called only
        when state slots run out, which eviction of leaves did not cure."""
        oldest = min((node for node in self.nodes() if node.checkpoints),
                     key=lambda node: node.last_access, default=None)
        if oldest is None:
            return None
        return oldest.checkpoints.pop(min(oldest.checkpoints))

    def _remove_leaf(self, node: Node) -> list[int]:
        node.heap_entry = None
        parent = node.parent
        del parent.children[node.tokens[0]]
        parent.evicted_firsts[node.tokens[0]] = None
        if len(parent.evicted_firsts) > _MAX_EVICTED_FIRSTS:
            del parent.evicted_firsts[next(iter(parent.evicted_firsts))]
        self.num_nodes -= 1
        self.num_cached_tokens -= len(node.tokens)
        self.pins.remove(node)
        if parent.parent is None and parent.salt is not None and not parent.children:
            del self._roots[parent.salt]  # an empty tenant namespace costs nothing to drop
        self._refresh(parent)
        return node.blocks

    def _refresh(self, node: Node) -> None:
        """Keep exactly one live heap entry, keyed by (pinned, last_access), on each evictable node."""
        if node.parent is None or node.lock_ref or node.children:
            node.heap_entry = None
            return
        key = (node.pin_until is not None, node.last_access)
        if node.heap_entry is not None and node.heap_entry[:2] == key:
            return
        node.heap_entry = (*key, next(self._push_order), node)
        heapq.heappush(self._heap, node.heap_entry)
        if len(self._heap) > 2 * self.num_nodes + 64:
            self._heap = [entry for entry in self._heap if entry[3].heap_entry is entry]
            heapq.heapify(self._heap)

    # ---- inspection (stats and tests) ---------------------------------------------------

    def nodes(self) -> Iterator[Node]:
        """Every non-root node, parents before children."""
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            if node.parent is not None:
                yield node
            stack.extend(node.children.values())

    def check_invariants(self) -> None:
        """Walk the whole tree and raise AssertionError on any broken structure. Tests only."""
        live = {id(entry) for entry in self._heap if entry[3].heap_entry is entry}
        num_nodes = num_tokens = 0
        for salt, root in self._roots.items():
            require(salt is None or root.children, f"empty namespace {salt!r} kept")
        for node in self.nodes():
            num_nodes, num_tokens = num_nodes + 1, num_tokens + len(node.tokens)
            self._check_node(node, live)
        require(num_nodes == self.num_nodes, f"num_nodes {self.num_nodes} != {num_nodes}")
        self.pins.check(self.nodes())
        require(num_tokens == self.num_cached_tokens, "num_cached_tokens out of date")

    def _check_node(self, node: Node, live: set[int]) -> None:
        bs, parent = self.block_size, node.parent
        require(bool(node.tokens) and parent.children.get(node.tokens[0]) is node, f"{node} badly linked")
        require(node.start == parent.end and node.salt == parent.salt, f"{node} not contiguous")
        require(len(node.blocks) == (node.end - 1) // bs - node.start // bs + 1, f"{node} block count")
        require(node.lock_ref >= 0 and parent.last_access >= node.last_access, f"{node} lock/clock")
        require(all(node.start < p <= node.end for p in node.checkpoints), f"{node} checkpoint out of range")
        evictable = node.lock_ref == 0 and not node.children
        entry = node.heap_entry
        on_heap = entry is not None and id(entry) in live and entry[:2] == (node.pin_until is not None,
                                                                             node.last_access)
        require(evictable == on_heap, f"{node} evictable={evictable} but on LRU heap={on_heap}")

