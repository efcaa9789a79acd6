"""Which tiers sit below the KV pool, and the model fingerprint their keys are namespaced by.

`build_tiers(config, fingerprint)` is the ONE place that turns EngineConfig into an ordered list of
tiers (disk first, then a shared store): a new tier is one more line there. `build_observers(config)`
is the same for KV-event observers (`stored(keys)` / `removed(keys)` as blocks enter and leave the
memory index): the engine computes block keys only when a tier or an observer exists.
"""
from __future__ import annotations

import logging
import time
from typing import Protocol, Sequence

import torch

from reprise.cache.layout import CacheLayout
from reprise.cache.tiers import Tier
from reprise.cache.tiers.disk import DiskTier
from reprise.cache.tiers.keys import model_fingerprint
from reprise.config import EngineConfig

log = logging.getLogger("reprise")

DEFAULT_DISK_CACHE_BYTES = 10 * 2**30


class KVEventObserver(Protocol):
    """Hears the block keys that enter the memory index (`stored`) and leave it (`removed`), on the
    engine thread: return quickly (queue, do not block)."""

    def stored(self, keys: Sequence[bytes]) -> None: ...

    def removed(self, keys: Sequence[bytes]) -> None: ...


def build_tiers(config: EngineConfig, fingerprint: str) -> list[Tier]:
    """The tiers below the pool, in lookup order. `fingerprint` names the model as loaded (a tier
    that shares storage between models can prefix its keys with it; the keys already depend on it)."""
    tiers: list[Tier] = []
    if config.disk_cache_dir is not None:
        disk = DiskTier(config.disk_cache_dir, config.disk_cache_bytes or DEFAULT_DISK_CACHE_BYTES)
        stats = disk.stats()
        log.info("disk cache %s: %d blocks (%d bytes) indexed in %.3f s", config.disk_cache_dir,
                 stats.num_entries, stats.bytes_used, disk.rebuild_seconds)
        tiers.append(disk)
    return tiers


def build_observers(config: EngineConfig) -> list[KVEventObserver]:
    """KV-event observers from the configuration (none yet: the router's publisher adds one here)."""
    return []


def wants_keys(config: EngineConfig) -> bool:
    """Whether any tier or observer is configured (the fingerprint is computed only then)."""
    return config.disk_cache_dir is not None


def kv_layout_string(layout: CacheLayout, num_kv_heads: int, head_dim: int) -> str:
    """What a block's bytes mean: "<attention layers>x2x<kv heads>x<head dim> <kinds>[ window N]"."""
    kinds = ",".join(kind.value for kind in layout.layer_kinds)
    window = f" window {layout.sliding_window}" if layout.sliding_window is not None else ""
    return f"{layout.num_attention_layers}x2x{num_kv_heads}x{head_dim} {kinds}{window}"


def fingerprint(model: torch.nn.Module, dtype: torch.dtype, block_size: int, layout: str) -> str:
    """`model_fingerprint` over every parameter and buffer as loaded (raw bytes: native quantized
    blocks and scales included), the compute dtype, block size and KV layout. Logs its time."""
    start = time.perf_counter()
    tensors = ((name, _raw(tensor)) for name, tensor in (*model.named_parameters(), *model.named_buffers()))
    digest = model_fingerprint(tensors, dtype=str(dtype).removeprefix("torch."), block_size=block_size,
                               kv_layout=layout)
    log.info("model fingerprint %s computed in %.2f s", digest, time.perf_counter() - start)
    return digest


def _raw(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
