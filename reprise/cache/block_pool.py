"""BlockPool: KV block ids, their reference counts and the free list. It never sees a token."""
from __future__ import annotations

from collections import deque


class BlockPool:
    """`num_blocks` blocks of `block_size` token slots, ids 0..num_blocks-1.

    A block is free exactly when its reference count is 0. Every holder (a running sequence's
    block table entry, a prefix-index node entry) owns one reference and gives it back with
    `free`. The pool never decides who holds what; it only counts.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        # FIFO reuse: a freed block goes to the back, so recently freed ids are reused last,
        # which makes block ids in tests predictable (0, 1, 2, ... on a fresh pool).
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def free_block_ids(self) -> tuple[int, ...]:
        """The free list in reuse order (for invariant checks)."""
        return tuple(self._free)

    def allocate(self, num: int) -> list[int] | None:
        """`num` free blocks, each with reference count 1; None (and nothing taken) if fewer are free."""
        if num < 0:
            raise ValueError(f"cannot allocate {num} blocks")
        if num > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(num)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def share(self, block: int) -> None:
        """One more reference on a held block. Sharing a free block is a bookkeeping bug: raises."""
        if self._ref_counts[block] <= 0:
            raise ValueError(f"block {block} is free; only a held block can be shared")
        self._ref_counts[block] += 1

    def free(self, block: int) -> bool:
        """Drop one reference. True if it was the last one and the block went back to the free list.

        Freeing a free block is a double free: raises ValueError.
        """
        if self._ref_counts[block] <= 0:
            raise ValueError(f"block {block} is already free (double free)")
        self._ref_counts[block] -= 1
        if self._ref_counts[block] > 0:
            return False
        self._free.append(block)
        return True
