"""Faults stay contained: a batch that raises ends its own requests, frees their blocks, and the
engine goes on with the others, whose tokens are those of a fault-free run."""
from __future__ import annotations

import pytest

from reprise import LLM, SamplingParams
from reprise.engine.engine import BatchFailed
from tests.conftest import prompt_ids

PARAMS = SamplingParams(temperature=0, max_tokens=3)


@pytest.fixture(scope="module")
def faulty() -> LLM:
    return LLM(dtype="float32", kv_cache_bytes="64MiB", inject_fault_every=9)


def run_all(llm: LLM, prompts: list[list[int]]) -> tuple[dict[int, list[int]], set[int]]:
    """Steps the engine to the end; (token ids of each finished prompt, the prompts that failed)."""
    engine = llm.engine
    index = {engine.add_request(prompt, PARAMS).request_id: n for n, prompt in enumerate(prompts)}
    finished, failed = {}, set()
    while engine.has_work:
        try:
            outputs = engine.step()
        except BatchFailed as batch:
            failed |= {index[output.request_id] for output in batch.outputs}
            continue
        finished |= {index[o.request_id]: o.token_ids for o in outputs if o.finished}
    return finished, failed


def test_a_failed_batch_ends_only_its_requests(faulty, llm_cold):
    prompts = [prompt_ids(faulty, f"fault-{n}", 20 + 7 * n) for n in range(6)]
    expected = {n: output.token_ids for n, output in enumerate(llm_cold.generate(prompts, PARAMS))}
    engine = faulty.engine
    engine.scheduler.max_num_seqs = 2             # batches of two: the injected faults hit some, not all
    finished, failed = run_all(faulty, prompts)
    assert failed and finished                     # some failed, the others went on
    assert set(finished) | failed == set(range(6)) and not set(finished) & failed
    assert finished == {n: expected[n] for n in finished}
    stats = engine.cache.stats
    assert stats.blocks_used == 0 and stats.blocks_used + stats.blocks_cached + stats.blocks_free == stats.num_blocks
    engine.cache.check_invariants()
    assert not engine.has_work and not engine._requests          # nothing left behind
