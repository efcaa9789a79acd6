"""EngineConfig: every start-up choice in one frozen value, built by cli.py or LLM()."""
from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """'4GiB' -> 4294967296, '512MB' -> 512000000, '1024' -> 1024. Raises ValueError on anything else."""
    if isinstance(text, int):
        return text
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not found or found.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size: use a number with a unit like 512MiB or 4GiB")
    value = int(float(found.group(1)) * _UNITS[found.group(2).lower()])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def format_bytes(num_bytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes} B"


@dataclass(frozen=True)
class EngineConfig:
    """Start-up settings. None means: pick the default for this machine and model."""

    model: str | None = None                 # GGUF file or HF directory; None = SmolLM2-135M-Instruct
    dtype: str | None = None                 # "bfloat16" | "float16" | "float32"
    weights: str | None = None               # "native" (GGUF kept quantized) | "bfloat16" | "float32"; None = native
                                             # for GGUF on CPU in bfloat16, else the compute dtype
    device: str | None = None                # "cpu" | "cuda"; None = cuda when available
    kv_cache_bytes: int | None = None        # KV pool budget; None = a fraction of free memory
    block_size: int = 16                     # tokens per KV block
    prefix_cache: bool = True                # False = never reuse (A/B comparisons)
    max_num_seqs: int = 32                   # running requests at most
    max_num_batched_tokens: int = 512        # tokens per engine step (prefill chunk budget)
    max_model_len: int | None = None         # None = the model's context length
    seed: int = 0
    compile: bool = False                    # decode through torch.compile (docs/compile.md)
    checkpoint_interval: int = 1024          # hybrid models: tokens between recurrent-state checkpoints
    speculative: str | None = None           # "ngram" = prompt-lookup speculative decoding; None = off
    spec_tokens: int = 4                     # draft tokens verified per step at most
    spec_ngram_max: int = 3                  # longest suffix looked up earlier in the sequence
    spec_ngram_min: int = 1                  # shortest one tried before giving up on drafting
    max_pinned_fraction: float = 0.5         # of the KV pool, the blocks one tenant may pin (retention)
    disk_cache_dir: str | None = None        # the disk tier under the KV pool (docs/disk-cache.md); None = off
    disk_cache_bytes: int | None = None      # its budget; None = 10GiB
    kv_store: str | None = None              # redis://HOST:PORT/DB: the shared tier and KV events (docs/scale-out.md)
    kv_store_ttl: int = 24 * 3600            # seconds each block stays in the shared tier (Redis LRU may drop it sooner)
    inject_fault_every: int | None = None    # tests only: every Nth batch raises (fault containment)
