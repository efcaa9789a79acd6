"""What each layer keeps between steps, as the model declares it (hybrid models come later)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class LayerKind(Enum):
    FULL = "full"              # attention over the whole prefix: paged KV blocks
    SLIDING = "sliding"        # attention over the last `sliding_window` tokens
    RECURRENT = "recurrent"    # a fixed-size state (linear attention, SSM): restorable only at checkpoints


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """The cache kind of every layer. Until hybrid models land, the CacheManager assumes FULL."""

    layer_kinds: tuple[LayerKind, ...]
    sliding_window: int | None = None   # tokens, for SLIDING layers

    @classmethod
    def full_attention(cls, num_layers: int) -> CacheLayout:
        return cls((LayerKind.FULL,) * num_layers)
