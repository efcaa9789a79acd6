"""StatePool: recurrent-state slots (hybrid models), counted like KV blocks.

A slot holds every recurrent layer's state of one sequence at one position (the runner owns the
tensors; this pool only counts). A running sequence holds its working slot; a checkpoint in the
prefix index holds one; a checkpoint waiting to be restored into a working slot holds one more
reference until the runner has copied it.
"""
from __future__ import annotations

from reprise.cache.block_pool import BlockPool


class StatePool(BlockPool):
    """`num_slots` slot ids 0..num_slots-1 with reference counts and a free list."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots, block_size=1)

    @property
    def num_slots(self) -> int:
        return self.num_blocks
