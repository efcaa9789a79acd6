"""Request lifecycles written out in cache calls, so tests read as what happened to the cache."""
from __future__ import annotations

from reprise.cache import CacheManager, SeqCache

BLOCK_SIZE = 4


def start(cache: CacheManager, prompt: list[int], salt: str | None = None) -> SeqCache:
    """Admit a request and give it blocks for its whole prompt (asserts it fits)."""
    acquired = cache.acquire(cache.match(prompt, salt), salt)
    assert acquired is not None
    seq, _copy = acquired
    assert cache.allocate(seq, len(prompt))
    return seq


def finish(cache: CacheManager, token_ids: list[int], salt: str | None = None) -> None:
    """A request whose KV for all of `token_ids` was computed, then released."""
    cache.release(start(cache, token_ids, salt), token_ids)


def check_invariants(cache: CacheManager) -> None:
    cache.check_invariants()
    stats = cache.stats
    assert stats.blocks_used + stats.blocks_cached + stats.blocks_free == stats.num_blocks
