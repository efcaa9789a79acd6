"""Block keys for the tiers: a chained digest of each full block's tokens and its parent's key,
under a namespace of (tenant salt, model fingerprint).

    namespace = H("reprise-ns" | fingerprint | salt tag)
    key[0]    = H(namespace | tokens of block 0)
    key[i]    = H(key[i-1]  | tokens of block i)
    state key = H(key[i]    | "|state")            hybrid models: the recurrent state after block i

So a key names a whole prefix (every token before the block's end), two tenants never share a key
(the salt is in the namespace, and "no salt" is its own namespace, distinct from an empty salt), and a
different model file, quantization, compute dtype, block size or KV layout never reads another's
blocks, whatever its name: the fingerprint is a digest of the weights as loaded and of those settings.
A state key hangs off the key of the block it follows, so it is in the same namespace and names the
same prefix (every token before the checkpoint position), and it never equals a block key.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

KEY_BYTES = 16


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in parts:
        h.update(part)
    return h.digest()


def model_fingerprint(tensors: Iterable[tuple[str, bytes | memoryview]], *, dtype: str, block_size: int,
                      kv_layout: str) -> str:
    """Hex digest of the weights as loaded (each tensor's name and raw bytes, in the given order)
    and of the compute dtype, block size and KV layout (e.g. "30x2x3x64 full")."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for name, data in tensors:
        h.update(name.encode())
        h.update(b"\0")
        h.update(data)
    h.update(f"|{dtype}|{block_size}|{kv_layout}".encode())
    return h.hexdigest()


def namespace(fingerprint: str, salt: str | None) -> bytes:
    """The root of a tenant's key chain for one model."""
    tag = b"\x00" if salt is None else b"\x01" + salt.encode("utf-8", "surrogatepass")
    return _digest(b"reprise-ns|", fingerprint.encode(), b"|", tag)


def block_keys(root: bytes, token_ids: Sequence[int], block_size: int, start: int = 0,
               parent: bytes | None = None) -> list[bytes]:
    """Keys of the full blocks of `token_ids` from block `start` on. `parent` is the key of block
    start - 1 (None when start == 0: the chain begins at `root`)."""
    if start and parent is None:
        raise ValueError("a chain that does not start at block 0 needs its parent key")
    num_full = len(token_ids) // block_size
    ids = np.asarray(token_ids[start * block_size:num_full * block_size], dtype="<i4")
    keys, previous = [], root if start == 0 else parent
    for i in range(num_full - start):
        previous = _digest(previous, ids[i * block_size:(i + 1) * block_size].tobytes())
        keys.append(previous)
    return keys


def state_key(block_key: bytes) -> bytes:
    """The key of the recurrent-state checkpoint at the end of the block whose key is `block_key`
    (a checkpoint at position p = (i + 1) * block_size hangs off key[i])."""
    return _digest(block_key, b"|state")
