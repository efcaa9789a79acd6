"""The disk tier inside the engine (LLM, no server): loads are a scheduling state other requests
step past, an abort while loading leaks nothing, and KV-event observers hear the block keys."""
from __future__ import annotations

import pytest

from reprise import LLM, SamplingParams
from reprise.cache.tiers.keys import block_keys, namespace
from reprise.engine.request import RequestStatus
from tests.conftest import prompt_ids

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
BLOCK = 16


class Events:
    """A KV-event observer that records what it hears."""

    def __init__(self):
        self.stored_keys: list[bytes] = []
        self.removed_keys: list[bytes] = []

    def stored(self, keys, root):
        self.stored_keys.extend(keys)

    def removed(self, keys):
        self.removed_keys.extend(keys)

    def close(self):
        pass


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    """float32, 48 blocks of 16 tokens, a disk tier and an event observer."""
    events = Events()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("reprise.engine.engine.build_observers", lambda config, fingerprint, block_size: [events])
        llm = LLM(dtype="float32", kv_cache_bytes=48 * 737280, disk_cache_dir=tmp_path_factory.mktemp("disk"))
    yield llm, events
    llm.close()


def evicted(llm: LLM) -> None:
    """Everything written, nothing left in the pool but what running requests hold."""
    for tier in llm.engine.tiers.tiers:
        tier.flush()
    llm.engine.cache.evict(llm.engine.num_blocks)


def test_observers_hear_the_keys_of_blocks_entering_and_leaving_the_pool(tiered):
    llm, events = tiered
    prompt = prompt_ids(llm, "events", 160)                         # 10 blocks, + 3 computed output tokens
    llm.generate([prompt], GREEDY)
    keys = block_keys(namespace(llm.engine.tiers.fingerprint, None), prompt, BLOCK)
    assert events.stored_keys[-10:] == keys
    events.removed_keys.clear()
    llm.engine.cache.evict(llm.engine.num_blocks)
    assert set(keys) <= set(events.removed_keys)


def test_a_load_lets_other_requests_step_and_its_abort_leaks_nothing(tiered):
    llm, _ = tiered
    engine = llm.engine
    stored, fresh = prompt_ids(llm, "loaded", 320), prompt_ids(llm, "fresh", 64)
    cold = llm.generate([stored], GREEDY)[0]
    evicted(llm)
    loading = engine.add_request(stored, GREEDY)
    other = engine.add_request(fresh, GREEDY)
    engine.step()
    assert (loading.status, other.status) == (RequestStatus.LOADING, RequestStatus.RUNNING)
    engine.abort(loading.request_id)
    while engine.has_work:
        engine.step()
    engine.cache.check_invariants()
    assert engine.cache.stats.blocks_used == 0
    hot = llm.generate([stored], GREEDY)[0]
    assert (hot.cached_tokens, hot.token_ids) == (319, cold.token_ids)
    assert hot.cached_tokens_by_tier == {"memory": 0, "disk": 319}


def test_another_salt_gets_nothing_from_disk(tiered):
    llm, _ = tiered
    prompt = prompt_ids(llm, "tenant", 160)
    llm.generate([prompt], GREEDY, salt="a")
    evicted(llm)
    other = llm.generate([prompt], GREEDY, salt="b")[0]
    assert other.cached_tokens_by_tier == {"memory": 0, "disk": 0}
    evicted(llm)
    same = llm.generate([prompt], GREEDY, salt="a")[0]
    assert same.cached_tokens_by_tier == {"memory": 0, "disk": 159}

