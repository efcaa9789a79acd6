"""TierLink: the KV pool's side of the tiers. Write-through as blocks enter the index, loads as a
scheduling state, KV events to observers.

Write-through on commit, asynchronous: when a sequence commits whole blocks to the memory index
(`CacheManager.commit`/`release`, see `IndexListener`), their KV (every attention layer: one block
is [layers, 2, block_size, kv_heads, head_dim] in the compute dtype: the pool's layout before it
put heads outermost, kept by permuting on the way out and in, so `kv_layout_string` still says what
the bytes mean and entries written before still load) is gathered on the engine thread into one
CPU tensor and each (key, payload) queued to every tier that lacks it; a tier's
bounded queue drops (and counts) what it cannot take, so a step never waits on I/O. Eviction from
the pool then costs nothing, and a kill -9 loses at most the writes in flight.

A load is a scheduling state. At admission the memory match gives L tokens; the prompt's block
keys (computed once per request) and one `contains` per tier give D leading blocks in the best
tier. If D - L // block_size >= `min_load_blocks`, the request LOADS instead of starting: its
memory match is acquired and blocks [L // block_size, D) allocated in the pool (held, so nothing
evicts them), and the loader thread reads and verifies the entries into one CPU tensor. At the
start of a later step (`poll`) the engine thread copies it into those blocks and releases the
sequence with the loaded tokens, which puts them in the index under the request's salt; the
request goes back to the front of the queue and matches them from memory like any hit. Other
requests keep stepping meanwhile. A missing or corrupt entry ends the load at that block: the
blocks before it are used, the rest recomputed. A request loads at most once.

`min_load_blocks` = 1, measured (`reprise bench prefix --disk-cache-dir`, SmolLM2-135M bfloat16,
blocks of 16 tokens, 2 CPU cores): a disk-hot 8,000-token prompt loaded its 500 blocks in ~0.28 s,
0.6 ms a block (read and SHA-256 check 0.27 ms with two reader threads, then the copies into the
pool), while a cold prefill cost 35 ms a block at 2,000 tokens and 58 ms at 8,000 (attention grows
with the context). Loading is 50x cheaper than recomputing at any depth: one block is worth it.
"""
from __future__ import annotations

import atexit
import itertools
import queue
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from reprise.cache.manager import CacheManager
from reprise.cache.match import Match, MissReason, SeqCache
from reprise.cache.tiers import Tier
from reprise.cache.tiers.keys import block_keys, namespace, state_key
from reprise.engine.request import Request, RequestStatus

MIN_LOAD_BLOCKS = 1
LOAD_THREADS = 2          # tier.load calls at once (file reads, checksums and a store's round trip release the GIL)
LOAD_BATCH = 32           # keys per round, split over LOAD_THREADS calls; a bad entry stops the load within a round


@dataclass(eq=False)
class Load:
    request: Request
    seq: SeqCache
    tier: Tier
    keys: list[bytes]            # of blocks first .. first + len(keys)
    first: int                   # first block loaded
    memory_tokens: int           # the memory match when the load began
    payload: torch.Tensor | None = None     # [blocks, layers, 2, block_size, kv_heads, head_dim]
    state: tuple[int, bytearray] | None = None  # hybrid models: (k, the state after blocks [0, k)), k > first
    cancelled: bool = False


@dataclass
class TierCounts:
    queries: dict[str, int] = field(default_factory=lambda: defaultdict(int))   # prompt tokens looked up per tier
    hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))      # prompt tokens reused per tier


class TierLink:
    """Implements the CacheManager's `IndexListener`; the Scheduler calls `begin`, `admitted` and
    `cancel`, the Engine `poll` before each step and `close` at shutdown."""

    def __init__(self, tiers: list[Tier], observers: list, cache: CacheManager, fingerprint: str,
                 block_size: int, min_load_blocks: int = MIN_LOAD_BLOCKS) -> None:
        self.tiers, self.observers, self.cache = tiers, observers, cache
        self.fingerprint, self.block_size, self.min_load_blocks = fingerprint, block_size, min_load_blocks
        self.kv: torch.Tensor | None = None          # the runner's pool, set once it exists
        self.states: list[torch.Tensor] = []         # hybrid models: the runner's state tensors, likewise
        self.counts = TierCounts()
        self._roots: dict[str | None, bytes] = {}
        self._block_keys: dict[int, bytes] = {}     # block id -> key, for blocks the index holds
        self._loads: dict[str, Load] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._pool = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="reprise-tier-read")
        self._loader = threading.Thread(target=self._load_loop, name="reprise-tier-loader", daemon=True)
        self._loader.start()
        self._closed = False
        atexit.register(self.close)

    def root(self, salt: str | None) -> bytes:
        if salt not in self._roots:
            self._roots[salt] = namespace(self.fingerprint, salt)
        return self._roots[salt]

    def keys(self, salt: str | None, token_ids: Sequence[int], end: int) -> list[bytes]:
        """Keys of blocks [0, end) of token_ids."""
        return block_keys(self.root(salt), token_ids[:end * self.block_size], self.block_size)

    # ---- IndexListener: write-through and KV events ---------------------------------------

    def _keys_on(self, salt: str | None, token_ids: Sequence[int], block_table, first: int, end: int) -> list[bytes]:
        """Keys of blocks [0, end), of which only [first, end) are computed here: chained on from
        block first - 1's key where the index holds that block (every chunk after a sequence's first
        commit), so a long prefill hashes each block once, not its whole prefix at every chunk."""
        parent = self._block_keys.get(block_table[first - 1]) if first else None
        if parent is None:
            return self.keys(salt, token_ids, end)
        tail = block_keys(self.root(salt), token_ids[:end * self.block_size], self.block_size, first, parent)
        return [b""] * first + tail

    def inserted(self, salt, token_ids, block_table, first, end, adopted) -> None:
        keys = self._keys_on(salt, token_ids, block_table, first, end)
        adopted = set(adopted)
        new = [(i, block_table[i]) for i in range(first, end) if block_table[i] in adopted]
        for i, block in new:
            self._block_keys[block] = keys[i]
        if self.observers and new:
            for observer in self.observers:
                observer.stored([keys[i] for i, _ in new], self.root(salt))
        new_keys = [keys[i] for i, _ in new]
        # one `contains` a tier (a round trip for a shared store): it holds a leading run of these
        # blocks (all of them, after a load from it; none, after a cold prefill); it gets the rest
        held = {tier.name: tier.contains(new_keys) for tier in self.tiers}
        first = min(held.values(), default=len(new))
        if first < len(new) and self.kv is not None:
            self._write(held, new_keys[first:], [block for _, block in new[first:]], first)

    def _write(self, held: dict[str, int], keys: list[bytes], blocks: list[int], first: int) -> None:
        ids = torch.tensor(blocks, device=self.kv.device)
        # pool [layers, 2, kv_heads, blocks, block_size, dim] -> the payload's own byte format,
        # [blocks, layers, 2, block_size, kv_heads, dim] (module docstring)
        payload = self.kv[:, :, :, ids].permute(3, 0, 1, 4, 2, 5).contiguous().cpu()
        rows = payload.reshape(len(blocks), -1).view(torch.uint8).numpy()
        entries = [(key, memoryview(rows[j])) for j, key in enumerate(keys)]
        for tier in self.tiers:
            if held[tier.name] < first + len(entries):
                tier.store(entries[held[tier.name] - first:])

    def checkpointed(self, salt, token_ids, slot) -> None:
        """Write-through of a checkpoint filed at a whole number of blocks (see the module docstring)."""
        num_blocks, rest = divmod(len(token_ids), self.block_size)
        if rest or not num_blocks or not self.states:
            return
        key = state_key(self.keys(salt, token_ids, num_blocks)[-1])
        missing = [tier for tier in self.tiers if not tier.contains([key])]
        if missing:
            payload = torch.cat([states[:, slot].reshape(-1).view(torch.uint8) for states in self.states])
            entry = [(key, memoryview(payload.cpu().numpy()))]
            for tier in missing:
                tier.store(entry)

    @property
    def state_bytes(self) -> int:
        """Bytes of one state slot across the recurrent layers (0 without any)."""
        return sum(states[:, 0].numel() * states.element_size() for states in self.states)

    def evicted(self, blocks) -> None:
        keys = [self._block_keys.pop(block) for block in blocks if block in self._block_keys]
        for observer in self.observers:
            if keys:
                observer.removed(keys)

    # ---- loads (scheduler side) -------------------------------------------------------------

    @property
    def num_loading(self) -> int:
        return len(self._loads)

    def begin(self, request: Request, match: Match) -> bool:
        """Starts loading the part of the prompt a tier holds beyond `match`, if worth it; True if
        the request is now LOADING (the caller has already taken it off the waiting queue)."""
        if not self.tiers or request.tier_load is not None or request.cached_tokens is not None \
                or match.miss is MissReason.PROMPT_LOGPROBS:      # it recomputes every prompt position
            return False
        prompt, size = request.prompt_ids, self.block_size
        first, num_full = match.cached_tokens // size, len(prompt) // size
        request.tier_load = ("", match.cached_tokens, match.cached_tokens)     # looked up: never again
        for tier in self.tiers:
            self.counts.queries[tier.name] += len(prompt) - match.cached_tokens
        if num_full - first < self.min_load_blocks:
            return False
        keys = self.keys(request.salt, prompt, num_full)
        tier, held = max(((tier, self._usable_blocks(tier, keys, first, len(prompt))) for tier in self.tiers),
                         key=lambda pair: pair[1])
        if held - first < self.min_load_blocks:
            return False
        acquired = self.cache.acquire(match, request.salt)
        if acquired is None:
            return False
        seq, _ = acquired                      # the partial copy is moot: the block is loaded whole
        if not self.cache.allocate(seq, held * size):
            self.cache.release(seq, [])
            return False
        load = Load(request, seq, tier, keys[first:held], first, match.cached_tokens)
        request.status = RequestStatus.LOADING
        self._loads[request.request_id] = load
        self._jobs.put(load)
        return True

    def _usable_blocks(self, tier: Tier, keys: list[bytes], first: int, num_prompt: int) -> int:
        """How many leading blocks of the prompt a load from `tier` could use: those it holds, or for
        a hybrid model the most k > first such that it holds blocks [0, k) and the state after them,
        with k * block_size before the prompt's last token (else 0). One `contains` per block
        boundary tried, from the end of the held blocks down."""
        if not self.states:
            return tier.contains(keys)
        last = min(tier.contains(keys), (num_prompt - 1) // self.block_size)
        return next((k for k in range(last, first, -1) if tier.contains([state_key(keys[k - 1])])), 0)

    def cancel(self, request: Request) -> None:
        """The request ended while loading: give its blocks back (the loader's result is dropped)."""
        load = self._loads.pop(request.request_id)
        load.cancelled = True
        self.cache.release(load.seq, request.prompt_ids[:load.memory_tokens])

    def admitted(self, request: Request, cached_tokens: int) -> None:
        """First admission: split `cached_tokens` by tier and count the hits."""
        name, start, end = request.tier_load or ("", 0, 0)
        from_tier = max(0, min(cached_tokens, end) - start) if name else 0
        request.cached_tokens_by_tier = {"memory": cached_tokens - from_tier}
        for tier in self.tiers:
            request.cached_tokens_by_tier[tier.name] = from_tier if tier.name == name else 0
            self.counts.hits[tier.name] += request.cached_tokens_by_tier[tier.name]

    # ---- loads (engine thread, between steps) -----------------------------------------------

    def poll(self, timeout: float = 0.0) -> list[Request]:
        """Finishes the loads the loader is done with: copies their KV into the pool and indexes
        it; returns their requests, WAITING again (the caller queues them first). Waits up to
        `timeout` seconds for one when none is done."""
        finished = []
        try:
            load = self._done.get(timeout=timeout) if timeout else self._done.get_nowait()
            while True:
                if not load.cancelled:
                    finished.append(self._finish(load))
                load = self._done.get_nowait()
        except queue.Empty:
            return finished

    def _finish(self, load: Load) -> Request:
        request, size = load.request, self.block_size
        del self._loads[request.request_id]
        num_loaded = 0 if load.payload is None else load.payload.shape[0]
        if self.states:       # hybrid: blocks are usable only up to the loaded state, none without one
            num_loaded = 0 if load.state is None else load.state[0] - load.first
        if num_loaded:
            ids = torch.tensor(load.seq.block_table[load.first:load.first + num_loaded], device=self.kv.device)
            # back from the payload's format into the heads-outermost pool
            self.kv[:, :, :, ids] = load.payload[:num_loaded].permute(1, 2, 4, 0, 3, 5).to(self.kv.device)
        if num_loaded and self.states:
            self._restore_state(load.seq, load.state[1])
        end = max(load.memory_tokens, (load.first + num_loaded) * size)
        self.cache.release(load.seq, request.prompt_ids[:end])
        request.tier_load = (load.tier.name, load.memory_tokens, end)
        request.cache, request.status = None, RequestStatus.WAITING
        return request

    def _restore_state(self, seq: SeqCache, data: bytearray) -> None:
        """Copies a loaded state into `seq`'s working slot, which `release` then files as the
        checkpoint at the end of the loaded tokens (the memory checkpoint it held is let go first)."""
        self.cache.restored(seq)
        offset = 0
        for states in self.states:
            part = torch.frombuffer(data, dtype=states.dtype, count=states[:, 0].numel(), offset=offset)
            states[:, seq.state_slot] = part.view(states[:, 0].shape).to(states.device)
            offset += part.nbytes

    def _load_loop(self) -> None:
        while True:
            load = self._jobs.get()
            if load is None:
                return
            try:
                load.payload = self._read(load)
                if self.states and load.payload is not None:
                    load.state = self._read_state(load, load.payload.shape[0])
            except Exception:                 # noqa: BLE001 - a failed read is a miss: recompute
                load.payload, load.state = None, None
            self._done.put(load)

    def _read_state(self, load: Load, num_loaded: int) -> tuple[int, bytearray] | None:
        """Hybrid models: (k, payload) of the deepest sound state the tier holds after blocks [0, k),
        first < k <= first + num_loaded; None if there is none (a missing or corrupt one is skipped)."""
        for k in range(load.first + num_loaded, load.first, -1):
            key = state_key(load.keys[k - load.first - 1])
            if load.cancelled:
                return None
            if load.tier.contains([key]):
                data = load.tier.load([key])[0]
                if data is not None and len(data) == self.state_bytes:
                    return k, bytearray(data)
        return None

    def _read(self, load: Load) -> torch.Tensor | None:
        """The leading run of `load.keys` whose entries are present and sound, as one tensor. Reads
        LOAD_BATCH keys a round, split over LOAD_THREADS `tier.load` calls at once (one MGET each
        for a shared store)."""
        layers, _, kv_heads, _, block_size, head_dim = self.kv.shape
        shape = (layers, 2, block_size, kv_heads, head_dim)
        payload = torch.empty((len(load.keys), *shape), dtype=self.kv.dtype)
        rows = payload.view(len(load.keys), -1).view(torch.uint8).numpy()
        num_loaded = 0
        for start in range(0, len(load.keys), LOAD_BATCH):
            batch = load.keys[start:start + LOAD_BATCH]
            step = -(-len(batch) // LOAD_THREADS)
            parts = self._pool.map(load.tier.load, [batch[i:i + step] for i in range(0, len(batch), step)])
            for data in itertools.chain.from_iterable(parts):
                if load.cancelled or data is None or len(data) != rows.shape[1]:
                    return payload[:num_loaded] if num_loaded else None
                rows[num_loaded] = np.frombuffer(data, dtype=np.uint8)
                num_loaded += 1
        return payload

    # ---- stats and shutdown -----------------------------------------------------------------

    def stats(self) -> tuple:
        """(name, TierStats, queries, hits) per tier."""
        return tuple((tier.name, tier.stats(), self.counts.queries[tier.name], self.counts.hits[tier.name])
                     for tier in self.tiers)

    def close(self) -> None:
        """Flushes every tier's writes and stops the threads (graceful shutdown; idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._jobs.put(None)
        self._loader.join()
        self._pool.shutdown()
        for tier in self.tiers:
            tier.close()
        for observer in self.observers:
            observer.close()
