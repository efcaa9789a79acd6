"""Prefix reuse on hybrid (Qwen3.5: Gated DeltaNet + attention) and sliding-window (Gemma 3, Mistral)
models, through the real engine: greedy tokens with the cache equal those without it, matches
stop exactly at checkpoints, and a sliding window bounds what a running sequence holds.

Tiny random-weight models built with transformers; token ids written out, no chat template.
"""
from __future__ import annotations

import random

import pytest
import transformers

from reprise import LLM, SamplingParams
from reprise.cache.match import MissReason
from reprise.engine.request import Request
from tests.models.test_hybrid_logits import CASES, tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
INTERVAL = 64          # checkpoint interval of the hybrid engine below: positions 64, 128, ...
VOCAB = 320


def build(tmp_path_factory, case: str) -> str:
    config_cls, model_cls, options, *_ = CASES[case]
    path = tmp_path_factory.mktemp(case)
    tiny_model(path, config_cls, model_cls, options)
    return str(path)


def engines(path: str) -> tuple[LLM, LLM]:
    options = dict(dtype="float32", kv_cache_bytes="8MiB", checkpoint_interval=INTERVAL)
    return LLM(path, **options), LLM(path, prefix_cache=False, **options)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    return request.param, *engines(build(tmp_path_factory, request.param))


def ids(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


def test_exact_repeat_and_nearest_prefix_match_the_cold_run(pair):
    _, llm, cold = pair
    prompt = ids(1, 200)
    near = prompt[:150] + ids(2, 30)
    first, hot = llm.generate([prompt], GREEDY)[0], llm.generate([prompt], GREEDY)[0]
    nearest = llm.generate([near], GREEDY)[0]
    assert first.cached_tokens == 0 and hot.cached_tokens == len(prompt) - 1
    assert hot.token_ids == first.token_ids == cold.generate([prompt], GREEDY)[0].token_ids
    assert nearest.token_ids == cold.generate([near], GREEDY)[0].token_ids
    assert nearest.cached_tokens == (128 if llm.engine.cache.recurrent else 150)
    llm.engine.cache.check_invariants()


def test_four_turn_conversation_resumes_where_each_turn_ended(pair):
    _, llm, cold = pair
    history: list[int] = []
    for turn in range(4):
        prompt = history + ids(10 + turn, 40)
        hot, reference = llm.generate([prompt], GREEDY)[0], cold.generate([prompt], GREEDY)[0]
        assert hot.token_ids == reference.token_ids
        # turn N+1 hits everything turn N computed: its prompt and all but its last sampled token
        assert hot.cached_tokens == max(len(history) - 1, 0)
        assert reference.cached_tokens == 0
        history = prompt + hot.token_ids
    llm.engine.cache.check_invariants()
    assert llm.engine.cache.stats.blocks_used == 0


def test_hybrid_fallback_is_the_nearest_checkpoint_below_the_shared_prefix(tmp_path_factory):
    llm, cold = engines(build(tmp_path_factory, "qwen3_5"))
    prompt = ids(20, 300)                       # checkpoints at 64, 128, 192, 256, 299 and its end
    llm.generate([prompt], GREEDY)
    hits_before = llm.engine.cache.stats.hits
    shared_200 = prompt[:200] + ids(21, 40)     # shares 200 tokens: nearest checkpoint at or below is 192
    output = llm.generate([shared_200], GREEDY)[0]
    assert output.cached_tokens == 192 and output.miss is MissReason.NO_CHECKPOINT
    assert llm.engine.cache.stats.hits - hits_before == 192
    assert output.token_ids == cold.generate([shared_200], GREEDY)[0].token_ids
    llm.engine.cache.check_invariants()


def test_sliding_window_generation_holds_a_bounded_number_of_blocks(tmp_path_factory):
    llm, _ = engines(build(tmp_path_factory, "mistral-sliding"))      # window 32, block size 16
    engine = llm.engine
    request = engine.add_request(ids(30, 40), SamplingParams(temperature=0, max_tokens=300, ignore_eos=True))
    most_held = 0
    while engine.has_work:
        engine.step()
        if request.cache is not None:
            most_held = max(most_held, sum(block is not None for block in request.cache.block_table))
    assert isinstance(request, Request) and len(request.output_ids) == 300
    # the window of the next query (32 keys) spans at most 3 blocks, plus the one being filled
    assert most_held <= 4 < (40 + 300) // 16
    engine.cache.check_invariants()
    assert engine.cache.stats.blocks_used == 0
