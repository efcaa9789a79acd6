"""Which tiers sit below the KV pool, and the model fingerprint their keys are namespaced by.

`build_tiers(config, fingerprint)` is the ONE place that turns EngineConfig into an ordered list of
tiers (disk first, then a shared store): a new tier is one more line there. `build_observers(config)`
is the same for KV-event observers (`stored(keys, root)` / `removed(keys)` as blocks enter and leave
the memory index): the engine computes block keys only when a tier or an observer exists.

`--kv-store redis://...` adds both: the shared tier (cache/tiers/store.py) after the disk, and the
publisher of this replica's KV events (cache/tiers/events.py) that `reprise route` reads.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Protocol, Sequence

import torch

from reprise.cache.layout import CacheLayout
from reprise.cache.tiers import Tier
from reprise.cache.tiers.disk import DiskTier
from reprise.cache.tiers.events import KvEventPublisher
from reprise.cache.tiers.keys import model_fingerprint
from reprise.cache.tiers.store import RedisTier
from reprise.config import EngineConfig

log = logging.getLogger("reprise")

DEFAULT_DISK_CACHE_BYTES = 10 * 2**30


class KVEventObserver(Protocol):
    """Hears the block keys that enter the memory index (`stored`) and leave it (`removed`), on the
    engine thread: return quickly (queue, do not block)."""

    def stored(self, keys: Sequence[bytes], root: bytes) -> None:
        """`keys` entered the index, all under the namespace whose key root is `root`."""

    def removed(self, keys: Sequence[bytes]) -> None: ...

    def close(self) -> None:
        """Sends what is queued and stops (graceful shutdown)."""


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
    if config.kv_store is not None:
        tiers.append(RedisTier(config.kv_store, ttl_s=config.kv_store_ttl))
        log.info("shared KV tier on %s (TTL %d s)", _without_password(config.kv_store), config.kv_store_ttl)
    return tiers


def build_observers(config: EngineConfig, fingerprint: str, block_size: int) -> list[KVEventObserver]:
    """KV-event observers from the configuration: with --kv-store, the publisher `reprise route`
    reads, under a replica id new to this process (a restarted replica starts empty)."""
    if config.kv_store is None:
        return []
    return [KvEventPublisher(config.kv_store, uuid.uuid4().hex, fingerprint, block_size)]


def replica_id(observers: Sequence[KVEventObserver]) -> str | None:
    """The id this replica publishes its KV events under (its /health says it), if it does."""
    return next((observer.replica_id for observer in observers if isinstance(observer, KvEventPublisher)), None)


def wants_keys(config: EngineConfig) -> bool:
    """Whether any tier or observer is configured (the fingerprint is computed only then)."""
    return config.disk_cache_dir is not None or config.kv_store is not None


def _without_password(url: str) -> str:
    return url if "@" not in url else url.split("://", 1)[0] + "://***@" + url.rsplit("@", 1)[1]


def kv_layout_string(layout: CacheLayout, num_kv_heads: int, head_dim: int,
                     states: Sequence[tuple[tuple[int, ...], torch.dtype]] = ()) -> str:
    """What a block's and a state checkpoint's bytes mean: "<attention layers>x2x<kv heads>x<head dim>
    <kinds>[ window N][ states <shape>:<dtype>,...]", `states` being the shape and dtype of each state
    tensor of one recurrent layer, in the runner's order (hybrid models; a checkpoint holds them for
    every recurrent layer, in layer order)."""
    kinds = ",".join(kind.value for kind in layout.layer_kinds)
    window = f" window {layout.sliding_window}" if layout.sliding_window is not None else ""
    state = ",".join(f"{'x'.join(map(str, shape))}:{str(dtype).removeprefix('torch.')}" for shape, dtype in states)
    state = f" states {state}" if state else ""
    return f"{layout.num_attention_layers}x2x{num_kv_heads}x{head_dim} {kinds}{window}{state}"


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
