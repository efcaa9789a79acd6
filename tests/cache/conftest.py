from __future__ import annotations

import pytest

from reprise.cache import CacheManager
from tests.cache.helpers import BLOCK_SIZE


@pytest.fixture
def cache() -> CacheManager:
    """16 blocks of 4 tokens; a fresh pool hands out block ids 0, 1, 2, ... in order."""
    return CacheManager(num_blocks=16, block_size=BLOCK_SIZE)
