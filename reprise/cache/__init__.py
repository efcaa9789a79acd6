"""KV-cache bookkeeping: block pool, prefix index, and the manager the scheduler talks to.

Pure bookkeeping: no tensors, no model code, nothing imported from reprise.engine or models.
"""
from reprise.cache.block_pool import BlockPool
from reprise.cache.index import IndexMatch, Insertion, NullIndex, PrefixIndex, Stop
from reprise.cache.layout import CacheLayout, LayerKind
from reprise.cache.manager import CacheManager
from reprise.cache.match import CacheStats, Match, MissReason, PartialBlock, SeqCache
from reprise.cache.radix import Node, RadixIndex

__all__ = [
    "BlockPool", "CacheLayout", "CacheManager", "CacheStats", "IndexMatch", "Insertion", "LayerKind",
    "Match", "MissReason", "Node", "NullIndex", "PartialBlock", "PrefixIndex", "RadixIndex", "SeqCache",
    "Stop",
]
