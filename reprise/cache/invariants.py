"""The CacheManager's bookkeeping, recounted from scratch: every reference has its holder.

Walks every node, block and slot, so it runs in tests and on demand, never per step.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from reprise.cache.index import require

if TYPE_CHECKING:
    from reprise.cache.manager import CacheManager


def check_manager(cache: CacheManager) -> None:
    """Raise AssertionError on any mismatch between counts and holders."""
    cache.index.check_invariants()
    nodes = list(cache.index.nodes())
    live = list(cache._live)
    index_refs = Counter(block for node in nodes for block in node.blocks)
    holders = Counter(block for seq in live for block in seq.block_table if block is not None)
    locks = Counter(id(seq._lock) for seq in live if seq._lock is not None)
    node_ids = {id(node) for node in nodes}
    require(all(key in node_ids for key in locks), "a running request locks a node not in the index")
    for node in nodes:
        require(node.lock_ref == locks[id(node)], f"{node} lock_ref != {locks[id(node)]} lockers")
    for seq in live:
        held = [block for block in seq.block_table if block is not None]
        require(len(set(held)) == len(held), f"duplicate blocks in {seq}")
    for block in range(cache.num_blocks):
        refs = cache.pool.ref_count(block)
        require(refs == index_refs[block] + holders[block],
                f"block {block}: {refs} refs, {index_refs[block]} index + {holders[block]} running")
        require(cache._holders[block] == holders[block], f"block {block}: holder count out of date")
    _check_free_list(cache.pool)
    require(cache._num_used == len(holders), "blocks_used out of date")
    if cache.states is not None:
        _check_slots(cache, nodes, live)


def _check_slots(cache: CacheManager, nodes, live) -> None:
    """Slot refs = checkpoints in the index + working slots + pending restores."""
    refs = Counter(slot for node in nodes for slot in node.checkpoints.values())
    refs.update(seq.state_slot for seq in live if seq.state_slot is not None)
    refs.update(seq.restore_from for seq in live if seq.restore_from is not None)
    for slot in range(cache.states.num_slots):
        require(cache.states.ref_count(slot) == refs[slot],
                f"state slot {slot}: {cache.states.ref_count(slot)} refs, {refs[slot]} holders")
    require(all(seq.state_slot is not None for seq in live), "a running sequence has no working slot")
    _check_free_list(cache.states)


def _check_free_list(pool) -> None:
    free = pool.free_block_ids()
    require(len(set(free)) == len(free), "duplicate ids in the free list")
    require(set(free) == {i for i in range(pool.num_blocks) if pool.ref_count(i) == 0},
            "free list != ids with no reference")
