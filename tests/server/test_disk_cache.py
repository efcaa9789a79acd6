"""The disk tier against real `reprise serve` processes on a tmp directory: a prompt evicted from a
small pool comes back from disk (cached_tokens == n - 1, greedy text equal to the cold run), after
SIGTERM and kill -9 too; another dtype or tenant never reads it; corrupt entries are misses.

Pools are sized in blocks of 16 tokens (float32: 737,280 bytes a block; bfloat16: half)."""
from __future__ import annotations

import random
import re
import threading
import time

import httpx
import pytest

from reprise.cache.tiers.disk import decode
from reprise.cache.tiers.keys import block_keys, namespace
from tests.server.helpers import launch, metric

BLOCK = 16
FP32_BLOCK_BYTES = 30 * 2 * BLOCK * 3 * 64 * 4
LONG = 992                        # 62 blocks, prefilled in two chunks of 512 tokens


def ids(seed: int, num_tokens: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(num_tokens)]


def flags(directory, num_blocks: int, dtype: str = "float32") -> list[str]:
    block_bytes = FP32_BLOCK_BYTES // (2 if dtype == "bfloat16" else 1)
    return ["--dtype", dtype, "--kv-cache-bytes", str(num_blocks * block_bytes), "--block-size", str(BLOCK),
            "--disk-cache-dir", str(directory)]


def complete(url: str, prompt: list[int], salt: str | None = None, max_tokens: int = 8) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "cache_report": True}
    if salt is not None:
        body["cache_salt"] = salt
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    reply = response.json()
    return {"text": reply["choices"][0]["text"], "cached": reply["usage"]["prompt_tokens_details"]["cached_tokens"],
            "tiers": reply["cache"].get("cached_tokens_by_tier")}


def disk(url: str, name: str) -> float:
    return metric(httpx.Client(base_url=url), f"reprise:tier_{name}", tier="disk")


def wait_entries(url: str, count: int) -> None:
    """Writes are asynchronous: wait until the disk holds `count` entries."""
    deadline = time.monotonic() + 60
    while disk(url, "entries") != count:
        assert time.monotonic() < deadline, f"the disk tier holds {disk(url, 'entries')} entries, not {count}"
        time.sleep(0.2)


def evict_all(url: str, seed: int, num_blocks: int) -> None:
    """Another tenant's prompts filling the pool twice over, so nothing older stays in memory."""
    for part in range(2):
        complete(url, ids(seed + part, num_blocks * BLOCK - 2 * BLOCK), salt="flood", max_tokens=1)


def test_evicted_prompt_comes_back_from_disk_across_restart_and_not_for_another_dtype_or_tenant(tmp_path):
    prompt = ids(1, LONG)
    num_blocks = LONG // BLOCK + 14                    # P and 14 blocks: another P-sized prompt evicts most of P
    with launch(flags(tmp_path, num_blocks)) as server:
        cold = complete(server.url, prompt)
        assert cold["cached"] == 0 and cold["tiers"] == {"memory": 0, "disk": 0}
        wait_entries(server.url, LONG // BLOCK)
        other = complete(server.url, prompt, salt="tenant-b", max_tokens=1)   # P is in memory and on disk
        assert other["cached"] == 0
        complete(server.url, ids(2, 300), salt="tenant-b", max_tokens=1)     # with the line above: P leaves memory
        hot = complete(server.url, prompt)
        assert hot == {"text": cold["text"], "cached": LONG - 1, "tiers": {"memory": 0, "disk": LONG - 1}}
        assert metric(httpx.Client(base_url=server.url), "reprise:prefix_cache_hits_total", tier="disk") == LONG - 1
    with launch(flags(tmp_path, num_blocks)) as restarted:   # the previous one got SIGTERM
        first = complete(restarted.url, prompt)
        assert first == {"text": cold["text"], "cached": LONG - 1, "tiers": {"memory": 0, "disk": LONG - 1}}
    with launch(flags(tmp_path, num_blocks, "bfloat16")) as bf16:
        bf16_cold = complete(bf16.url, prompt)
        assert bf16_cold["cached"] == 0                        # float32 blocks are not this model's
        other = complete(bf16.url, prompt, salt="tenant-b", max_tokens=1)
        assert other["cached"] == 0
        complete(bf16.url, ids(2, 300), salt="tenant-b", max_tokens=1)
        hot = complete(bf16.url, prompt)
        assert hot == {"text": bf16_cold["text"], "cached": LONG - 1, "tiers": {"memory": 0, "disk": LONG - 1}}


def test_truncated_and_flipped_entries_are_recomputed_and_counted(tmp_path):
    first, second = ids(3, 320), ids(4, 320)
    with launch(flags(tmp_path, 48)) as server:
        colds = [complete(server.url, prompt) for prompt in (first, second)]
        wait_entries(server.url, 40)
        evict_all(server.url, 5, 48)
        truncated, flipped = _entry(server, tmp_path, first, 5), _entry(server, tmp_path, second, 12)
        truncated.write_bytes(truncated.read_bytes()[:1000])
        data = bytearray(flipped.read_bytes())
        data[5000] ^= 0x01
        flipped.write_bytes(bytes(data))
        hots = [complete(server.url, prompt) for prompt in (first, second)]
        assert [hot["text"] for hot in hots] == [cold["text"] for cold in colds]
        assert [hot["tiers"]["disk"] for hot in hots] == [5 * BLOCK, 12 * BLOCK]   # up to the bad block
        assert disk(server.url, "corrupt_entries_total") == 2
        for path in (truncated, flipped):        # deleted, then written again from the recomputed block
            assert not path.exists() or decode(path.read_bytes()) is not None


def _entry(server, directory, prompt: list[int], block: int):
    """The file of `prompt`'s block `block`, from the fingerprint the server logs at start-up."""
    fingerprint = re.search(r"model fingerprint (\w+)", server.log()).group(1)
    key = block_keys(namespace(fingerprint, None), prompt, BLOCK)[block].hex()
    return directory / key[:2] / f"{key}.kv"


def test_kill_9_during_a_flood_then_restart_serves_correct_tokens(tmp_path):
    prompt = ids(6, 480)
    with launch(flags(tmp_path, 96)) as server:
        cold = complete(server.url, prompt)
        wait_entries(server.url, 30)
        flood = threading.Thread(target=_flood, args=(server.url,), daemon=True)
        flood.start()
        deadline = time.monotonic() + 60
        while disk(server.url, "stores_total") < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.process.kill()
        server.process.wait()
        flood.join(timeout=30)
    with launch(flags(tmp_path, 96)) as restarted:
        assert "Traceback" not in restarted.log()
        hot = complete(restarted.url, prompt)
        assert hot == {"text": cold["text"], "cached": 479, "tiers": {"memory": 0, "disk": 479}}
        for seed in range(10, 13):                 # what reached the disk before the kill, or nothing
            flooded = ids(seed, 600)
            assert complete(restarted.url, flooded)["text"] == complete(restarted.url, flooded, salt="cold")["text"]


def _flood(url: str) -> None:
    for seed in range(10, 13):
        try:
            complete(url, ids(seed, 600), max_tokens=2)
        except (httpx.HTTPError, AssertionError):
            return


def test_an_unwritable_directory_serves_from_memory_with_one_warning(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with launch(flags(blocker / "cache", 48)) as server:
        prompt = ids(7, 100)
        cold = complete(server.url, prompt)
        hot = complete(server.url, prompt)
        assert (cold["cached"], hot["cached"], hot["text"]) == (0, 99, cold["text"])
        assert disk(server.url, "dropped_writes_total") == 6       # the 6 full blocks of 107 tokens, each once
        assert server.log().count("cannot write") == 1
