"""What each layer keeps between steps, as the model declares it, and what that means for reuse."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class LayerKind(Enum):
    FULL = "full"              # attention over the whole prefix: paged KV blocks
    SLIDING = "sliding"        # attention over the last `sliding_window` tokens
    RECURRENT = "recurrent"    # a fixed-size state (linear attention, SSM): restorable only at checkpoints


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """The cache kind of every layer.

    Reuse rules the CacheManager derives from it: FULL and SLIDING layers restore from KV blocks
    (the index keeps whole chains, so a sliding window's blocks are present wherever a match
    ends); RECURRENT layers restore only at a checkpoint taken exactly at the matched length.
    When every attention layer slides, blocks older than the window leave a running sequence.
    """

    layer_kinds: tuple[LayerKind, ...]
    sliding_window: int | None = None   # tokens a SLIDING layer's query sees, itself included

    @classmethod
    def full_attention(cls, num_layers: int) -> CacheLayout:
        return cls((LayerKind.FULL,) * num_layers)

    @property
    def has_recurrent(self) -> bool:
        return LayerKind.RECURRENT in self.layer_kinds

    @property
    def num_attention_layers(self) -> int:
        return sum(kind is not LayerKind.RECURRENT for kind in self.layer_kinds)

    @property
    def all_sliding(self) -> bool:
        """Every attention layer slides (Mistral): a running sequence needs only its window."""
        kinds = [kind for kind in self.layer_kinds if kind is not LayerKind.RECURRENT]
        return bool(kinds) and all(kind is LayerKind.SLIDING for kind in kinds)
