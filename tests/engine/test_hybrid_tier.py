"""A hybrid model (Qwen3.5: Gated DeltaNet + attention) on the disk tier: its state checkpoints at whole
blocks are stored beside the blocks, a prompt evicted from the pool comes back from disk up to its last
stored checkpoint (the longest SAFE prefix), across a restart too, and a corrupt state is a miss that
falls back to the checkpoint below it. Greedy tokens always equal a cold run's.

The tiny random-weight model of tests/engine/test_hybrid_cache.py, float32, blocks of 16 tokens,
checkpoints every 64 tokens.
"""
from __future__ import annotations

import pytest
import torch

from reprise import LLM
from reprise.cache.layout import CacheLayout, LayerKind
from reprise.cache.tiers.keys import block_keys, namespace, state_key
from reprise.engine.request import RequestStatus
from reprise.engine.tiers import kv_layout_string
from tests.engine.test_hybrid_cache import GREEDY, INTERVAL, build, ids

BLOCK = 16
NUM_BLOCKS = 48                 # 768 tokens: 2.4 prompts of 300 tokens (20 blocks with their output)
# 34 state slots (max_num_seqs 32 + 2) of 16,896 bytes (3 recurrent layers: conv 3x128 + S 4x16x16,
# float32), then 48 KV blocks of 8,192 bytes (1 attention layer x 2 x 16 x 2 heads x 32, float32)
KV_BYTES = 34 * 16896 + NUM_BLOCKS * 8192
PROMPT = 300                    # checkpoints at 64, 128, 192, 256 (stored), 299 and 307 (not: inside a block)
STORED = (64, 128, 192, 256)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build(tmp_path_factory, "qwen3_5")
    cold = LLM(path, dtype="float32", prefix_cache=False, checkpoint_interval=INTERVAL)
    return path, cold


def tiered(path: str, directory) -> LLM:
    llm = LLM(path, dtype="float32", kv_cache_bytes=KV_BYTES, checkpoint_interval=INTERVAL, disk_cache_dir=directory)
    assert llm.engine.num_blocks == NUM_BLOCKS
    return llm


def flood(llm: LLM, prompt: list[int], seed: int) -> None:
    """Three other prompts (20 blocks each) push `prompt` out of the pool; then every write is on disk."""
    for other in range(seed, seed + 3):
        llm.generate([ids(other, PROMPT)], GREEDY)
    assert llm.engine.lookup(prompt, None).cached_tokens == 0
    disk(llm).flush()


def disk(llm: LLM):
    return llm.engine.tiers.tiers[0]


def stored_states(llm: LLM, prompt: list[int]) -> list[int]:
    """The positions of `prompt` whose state checkpoint the disk tier holds."""
    keys = block_keys(namespace(llm.engine.tiers.fingerprint, None), prompt, BLOCK)
    return [(k + 1) * BLOCK for k, key in enumerate(keys) if disk(llm).contains([state_key(key)])]


def test_a_prompt_evicted_from_the_pool_loads_from_disk_up_to_its_last_stored_checkpoint(model, tmp_path):
    path, cold = model
    llm = tiered(path, tmp_path)
    prompt = ids(40, PROMPT)
    reference = cold.generate([prompt], GREEDY)[0]
    first = llm.generate([prompt], GREEDY)[0]
    flood(llm, prompt, 41)
    assert stored_states(llm, prompt) == list(STORED)
    hot = llm.generate([prompt], GREEDY)[0]
    assert (hot.cached_tokens, hot.cached_tokens_by_tier) == (256, {"memory": 0, "disk": 256})
    assert hot.token_ids == first.token_ids == reference.token_ids
    again = llm.generate([prompt], GREEDY)[0]      # now from memory: the prompt's end checkpoint at 299
    assert (again.cached_tokens, again.token_ids) == (299, reference.token_ids)
    llm.engine.cache.check_invariants()
    assert llm.engine.cache.stats.blocks_used == 0
    llm.close()


def computed(path, tmp_path, seed: int):
    """A tiered LLM that has computed (and written to disk) the prompt of `seed`."""
    llm = tiered(path, tmp_path)
    prompt = ids(seed, PROMPT)
    llm.generate([prompt], GREEDY)
    disk(llm).flush()
    return llm, llm.engine, prompt


def test_a_load_continues_a_memory_match_from_its_checkpoint(model, tmp_path):
    path, cold = model
    llm, engine, prompt = computed(path, tmp_path, 45)
    while engine.lookup(prompt, None).cached_tokens > 128:       # LRU leaves first: the prompt's tail
        engine.cache.evict(1)
    assert engine.lookup(prompt, None).cached_tokens == 128
    hot = llm.generate([prompt], GREEDY)[0]
    assert (hot.cached_tokens, hot.cached_tokens_by_tier) == (256, {"memory": 128, "disk": 128})
    assert hot.token_ids == cold.generate([prompt], GREEDY)[0].token_ids
    engine.cache.check_invariants()
    assert engine.cache.stats.blocks_used == 0
    llm.close()


def test_an_abort_while_loading_leaks_no_block_and_no_state_slot(model, tmp_path):
    path, _ = model
    llm, engine, prompt = computed(path, tmp_path, 47)
    engine.cache.evict(NUM_BLOCKS)
    loading = engine.add_request(prompt, GREEDY)
    engine.step()
    assert loading.status is RequestStatus.LOADING
    engine.abort(loading.request_id)
    while engine.has_work or engine.tiers.num_loading:
        engine.step()
    engine.cache.check_invariants()           # recounts state slots too
    assert engine.cache.stats.blocks_used == 0 and engine.cache.states.num_free == engine.cache.states.num_slots
    llm.close()


def test_a_restart_on_the_same_directory_hits_the_stored_checkpoints(model, tmp_path):
    path, cold = model
    prompt = ids(50, PROMPT)
    before = tiered(path, tmp_path)
    before.generate([prompt], GREEDY)
    before.close()
    # 307 tokens computed (300 + 8 sampled - the last): 19 whole blocks and 4 states
    after = tiered(path, tmp_path)
    assert disk(after).stats().num_entries == 19 + len(STORED)
    hot = after.generate([prompt], GREEDY)[0]
    assert (hot.cached_tokens, hot.cached_tokens_by_tier) == (256, {"memory": 0, "disk": 256})
    assert hot.token_ids == cold.generate([prompt], GREEDY)[0].token_ids
    after.close()


def test_a_corrupt_state_is_a_miss_that_falls_back_to_the_checkpoint_below(model, tmp_path):
    path, cold = model
    llm = tiered(path, tmp_path)
    prompt = ids(60, PROMPT)
    llm.generate([prompt], GREEDY)
    flood(llm, prompt, 61)
    keys = block_keys(namespace(llm.engine.tiers.fingerprint, None), prompt, BLOCK)
    entry = disk(llm).path(state_key(keys[256 // BLOCK - 1]))
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0xFF
    entry.write_bytes(bytes(data))
    corrupt = disk(llm).stats().corrupt
    hot = llm.generate([prompt], GREEDY)[0]
    assert (hot.cached_tokens, hot.cached_tokens_by_tier) == (192, {"memory": 0, "disk": 192})
    assert hot.token_ids == cold.generate([prompt], GREEDY)[0].token_ids
    assert disk(llm).stats().corrupt - corrupt == 1
    disk(llm).flush()
    assert stored_states(llm, prompt) == list(STORED)       # deleted, then written again by the recompute
    llm.engine.cache.check_invariants()
    llm.close()


def test_a_second_replica_loads_the_checkpoints_from_the_shared_store(model, redis_url):
    path, cold = model
    prompt = ids(70, PROMPT)
    options = dict(dtype="float32", kv_cache_bytes=KV_BYTES, checkpoint_interval=INTERVAL, kv_store=redis_url)
    writer = LLM(path, **options)
    writer.generate([prompt], GREEDY)
    writer.close()
    reader = LLM(path, **options)
    hot = reader.generate([prompt], GREEDY)[0]
    assert (hot.cached_tokens, hot.cached_tokens_by_tier) == (256, {"memory": 0, "store": 256})
    assert hot.token_ids == cold.generate([prompt], GREEDY)[0].token_ids
    reader.close()


def test_the_layout_in_the_fingerprint_names_the_state_tensors():
    kinds = (LayerKind.RECURRENT, LayerKind.RECURRENT, LayerKind.FULL, LayerKind.RECURRENT)
    states = [((3, 128), torch.float32), ((4, 16, 16), torch.float32)]
    layout = CacheLayout(kinds)
    assert kv_layout_string(layout, 2, 32, states) == \
        "1x2x2x32 recurrent,recurrent,full,recurrent states 3x128:float32,4x16x16:float32"
    assert kv_layout_string(layout, 2, 32) == "1x2x2x32 recurrent,recurrent,full,recurrent"
