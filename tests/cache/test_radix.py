"""RadixIndex on its own: block ids are arbitrary labels here (100s, 200s), no pool involved."""
from __future__ import annotations

from reprise.cache import RadixIndex, Stop

BS = 4


def test_match_takes_each_full_block_from_the_node_holding_its_last_position():
    index = RadixIndex(BS)
    index.insert([1, 2, 3, 4, 5, 6], [100, 101], None)
    second = index.insert([1, 2, 3, 4, 5, 90, 91, 92], [200, 201], None)
    # split at 5 (inside block 1): [0,5) keeps 100, 101; [5,6) keeps 101 (shared); new leaf [5,8) -> 201
    assert second.adopted == (101, 201)
    assert index.num_nodes == 3 and index.num_cached_tokens == 9

    along_second = index.match([1, 2, 3, 4, 5, 90, 91, 92, 7], None)
    assert (along_second.length, along_second.blocks, along_second.partial_block) == (8, (100, 201), None)
    along_first = index.match([1, 2, 3, 4, 5, 6], None)
    assert (along_first.length, along_first.blocks, along_first.partial_block) == (6, (100,), 101)
    at_split = index.match([1, 2, 3, 4, 5, 7], None)
    assert (at_split.length, at_split.partial_block, at_split.stop) == (5, 101, Stop.DIVERGED)
    index.check_invariants()


def test_split_keeps_the_lock_on_the_lower_half():
    index = RadixIndex(BS)
    first = index.insert([1, 2, 3, 4, 5, 6], [100, 101], None).node
    index.lock(first)
    index.insert([1, 2, 3, 4, 5, 90], [200, 201], None)
    assert (first.start, first.tokens, first.lock_ref, first.blocks) == (5, (6,), 1, [101])
    assert first.parent.lock_ref == 0 and first.parent.tokens == (1, 2, 3, 4, 5)
    assert index.evict(10).blocks == [201]  # only the unlocked new leaf; the upper half is internal
    assert index.match([1, 2, 3, 4, 5, 6], None).length == 6
    index.check_invariants()


def test_inserting_a_cached_prefix_adopts_nothing_and_splits_nothing():
    index = RadixIndex(BS)
    index.insert([1, 2, 3, 4, 5, 6, 7], [100, 101], None)
    again = index.insert([1, 2, 3, 4, 5], [200, 201], None)
    assert again.adopted == () and index.num_nodes == 1
    assert again.node.tokens == (1, 2, 3, 4, 5, 6, 7)


def test_match_stops_say_why():
    index = RadixIndex(BS)
    assert index.match([1, 2], None).stop is Stop.ENDED
    assert index.match([], None).stop is Stop.EXHAUSTED
    index.insert([1, 2, 3], [100], None)
    assert index.match([1, 2], None).stop is Stop.EXHAUSTED
    assert index.match([1, 2, 3, 4], None).stop is Stop.ENDED
    assert index.match([1, 9], None).stop is Stop.DIVERGED
    assert index.match([5], None).stop is Stop.DIVERGED
    index.insert([1, 2, 3, 4, 5], [100, 101], None)     # leaf [3,5) touches blocks 0 and 1
    assert index.evict(1).blocks == [100, 101]
    evicted = index.match([1, 2, 3, 4, 5], None)
    assert (evicted.length, evicted.stop) == (3, Stop.EVICTED)


def test_eviction_is_least_recently_used_and_match_does_not_touch():
    index = RadixIndex(BS)
    index.insert([1, 1, 1, 1], [100], None)
    index.insert([2, 2, 2, 2], [200], None)
    index.insert([3, 3, 3, 3], [300], None)
    index.match([1, 1, 1, 1], None)              # a dry run is not a use
    index.insert([2, 2], [999], None)            # re-inserting a cached prefix is a use
    assert index.evict(1).blocks == [100]
    assert index.evict(1).blocks == [300]
    assert index.evict(5).blocks == [200]
    assert index.num_nodes == 0 and index.evict(1).blocks == []


def test_parent_left_a_leaf_is_evicted_by_its_own_last_access():
    index = RadixIndex(BS)
    index.insert([1, 2, 3, 4, 5, 6], [100, 101], None)
    index.insert([1, 2, 3, 4, 7, 8], [100, 201], None)   # split at 4: [0,4) -> 100
    index.insert([9, 9, 9, 9], [300], None)
    # LRU order: leaf [4,6)->101, leaf [4,6)->201, then their parent [0,4)->100 (touched with
    # the second insert, before [9,9,9,9]), then 300.
    assert index.evict(3).blocks == [101, 201, 100]
    assert index.evict(1).blocks == [300]


def test_salts_are_separate_trees():
    index = RadixIndex(BS)
    index.insert([1, 2, 3, 4, 5], [100, 101], "a")
    assert index.match([1, 2, 3, 4, 5], "a").length == 5
    assert index.match([1, 2, 3, 4, 5], "b").length == 0
    assert index.match([1, 2, 3, 4, 5], None).length == 0
    assert index.evict(2).blocks == [100, 101]
    assert index.match([1, 2, 3, 4, 5], "a").stop is Stop.ENDED   # the empty namespace is gone
    index.check_invariants()


class CountedToken(int):
    """A token id that counts every comparison and hash made with it."""

    operations = 0

    def __eq__(self, other: object) -> bool:
        CountedToken.operations += 1
        return int.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        CountedToken.operations += 1
        return int.__ne__(self, other)

    def __hash__(self) -> int:
        CountedToken.operations += 1
        return int.__hash__(self)


def _operations_for_one_match(num_sequences: int) -> int:
    index = RadixIndex(BS)
    prefix = list(range(1, 17))
    for suffix in range(num_sequences):
        tokens = [CountedToken(t) for t in prefix + [1000 + suffix, 7, 7, 7]]
        index.insert(tokens, list(range(5)), None)
    query = [CountedToken(t) for t in prefix + [1000 + 5, 7, 7]]
    CountedToken.operations = 0
    assert index.match(query, None).length == 19
    return CountedToken.operations


def test_lookup_cost_does_not_grow_with_the_number_of_cached_sequences():
    few, many = _operations_for_one_match(20), _operations_for_one_match(2000)
    assert few == many
    assert many <= 3 * 19   # a hash or comparison or two per query token
