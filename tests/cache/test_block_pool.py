from __future__ import annotations

import pytest

from reprise.cache import BlockPool


def test_fresh_pool_allocates_ids_in_order_with_one_reference():
    pool = BlockPool(num_blocks=4, block_size=4)
    assert pool.allocate(3) == [0, 1, 2]
    assert [pool.ref_count(block) for block in range(4)] == [1, 1, 1, 0]
    assert pool.num_free == 1


def test_allocating_more_than_free_takes_nothing():
    pool = BlockPool(num_blocks=4, block_size=4)
    pool.allocate(3)
    assert pool.allocate(2) is None
    assert pool.num_free == 1 and pool.free_block_ids() == (3,)


def test_shared_block_is_free_only_after_its_last_reference():
    pool = BlockPool(num_blocks=2, block_size=4)
    [block] = pool.allocate(1)
    pool.share(block)
    assert pool.ref_count(block) == 2
    assert pool.free(block) is False and pool.num_free == 1
    assert pool.free(block) is True and pool.num_free == 2


def test_freed_blocks_are_reused_last():
    pool = BlockPool(num_blocks=4, block_size=4)
    pool.allocate(2)
    pool.free(0)
    assert pool.free_block_ids() == (2, 3, 0)
    assert pool.allocate(3) == [2, 3, 0]


def test_double_free_and_sharing_a_free_block_raise():
    pool = BlockPool(num_blocks=2, block_size=4)
    with pytest.raises(ValueError):
        pool.free(0)
    with pytest.raises(ValueError):
        pool.share(1)
    [block] = pool.allocate(1)
    pool.free(block)
    with pytest.raises(ValueError):
        pool.free(block)
