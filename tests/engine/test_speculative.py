"""Prompt-lookup speculative decoding on the default model: greedy tokens equal plain decoding's (alone,
batched, hot from the cache, mixed with plain decodes and prefill chunks), stop conditions hold inside
accepted runs, rejected drafts leave no block behind, sampling keeps its distribution."""
from __future__ import annotations

import logging

import pytest
import torch

from reprise import LLM, SamplingParams
from reprise.engine.request import FinishReason
from reprise.engine.distributions import accept_greedy, accept_or_resample
from reprise.engine.sampler import Sampler
from reprise.engine.speculative import NgramDrafter
from reprise.chat.continuity import ReplyMemory, chat_prompt_ids
from tests.conftest import prompt_ids

GREEDY = SamplingParams(temperature=0, max_tokens=40)
QUOTED = ["The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
          "step. All that glitters is not gold.",
          "Rivers carry stones to the sea, and the sea returns them as sand to the shore, year after year."]
CODE = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\nprint(add(3, 4))\n"


@pytest.fixture(scope="module")
def llm_spec() -> LLM:
    return LLM(dtype="float32", kv_cache_bytes="192MiB", speculative="ngram")


def quoting(llm: LLM, request: str) -> list[int]:
    return chat_prompt_ids(llm.tokenizer, [{"role": "user", "content": request}], ReplyMemory())


@pytest.fixture(scope="module")
def prompts(llm_spec) -> list[list[int]]:
    """Answers that quote the prompt (long accepted runs) and random words (mostly rejected drafts)."""
    return [quoting(llm_spec, f"Repeat the following text exactly: {QUOTED[0]}"),
            quoting(llm_spec, f"Rename the function add to plus in this code:\n{CODE}"),
            quoting(llm_spec, f"Repeat the following text exactly: {QUOTED[1]}"),
            prompt_ids(llm_spec, "spec-words", 60)]


@pytest.fixture(scope="module")
def plain(llm_cold, prompts) -> list[list[int]]:
    return [llm_cold.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_greedy_tokens_equal_plain_decoding_alone_batched_and_from_the_cache(llm_spec, prompts, plain):
    before = llm_spec.engine.stats()
    alone = [llm_spec.generate([p], GREEDY)[0] for p in prompts]
    batched = llm_spec.generate(prompts, GREEDY)                 # exact repeats: every prompt hits
    assert [o.token_ids for o in alone] == [o.token_ids for o in batched] == plain
    assert [o.cached_tokens for o in batched] == [len(p) - 1 for p in prompts]
    assert alone[0].finish_reason is FinishReason.STOP and alone[0].token_ids[-1] in llm_spec.tokenizer.eos_token_ids
    stats = llm_spec.engine.stats()
    accepted = stats.num_accepted_tokens - before.num_accepted_tokens
    assert 0 < accepted < stats.num_draft_tokens - before.num_draft_tokens    # some accepted, some rolled back
    llm_spec.engine.cache.check_invariants()


def test_mixed_step_of_verifies_plain_decodes_and_a_prefill(llm_spec, prompts, plain, monkeypatch):
    engine = llm_spec.engine
    steps = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        for verify in plan.verifies:           # the positions a verify writes lie in blocks it alone holds
            start, end = verify.start, verify.start + verify.num_tokens
            table = engine.scheduler.requests[verify.request_id].cache.block_table
            assert all(engine.cache.pool.ref_count(table[i // engine.block_size]) == 1 for i in range(start, end))
        steps.append((len(plan.prefills), {v.request_id for v in plan.verifies},
                      {r.request_id for r in plan.decodes}))
        return plan
    monkeypatch.setattr(engine.scheduler, "schedule", recording_schedule)
    opted_out = engine.add_request(prompts[1], SamplingParams(temperature=0, max_tokens=40, speculative=False))
    speculating = [engine.add_request(p, GREEDY) for p in (prompts[0], prompts[2])]
    for _ in range(3):
        engine.step()
    late = engine.add_request(prompt_ids(llm_spec, "spec-late", 700), SamplingParams(temperature=0, max_tokens=4))
    while engine.has_work:
        engine.step()
    assert [r.output_ids for r in (speculating[0], opted_out, speculating[1])] == plain[:3]
    assert any(num_prefills and verifies and decodes for num_prefills, verifies, decodes in steps)
    assert all(opted_out.request_id not in verifies for _, verifies, _ in steps)
    assert late.finish_reason is FinishReason.LENGTH


def test_stop_conditions_hold_inside_accepted_runs(llm_spec, llm_cold, prompts, plain):
    for max_tokens in (1, 6, 13):
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        output = llm_spec.generate([prompts[0]], params)[0]
        assert output.token_ids == plain[0][:max_tokens] and output.finish_reason is FinishReason.LENGTH
    text = llm_cold.tokenizer.decode(plain[0], skip_special_tokens=True)
    stop = text[30:36]
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
    stopped = llm_spec.generate([prompts[0]], params)[0]
    assert stopped.text == llm_cold.generate([prompts[0]], params)[0].text == text[:text.find(stop)]
    stop_id = plain[0][9]                        # the EOS path: a stop token ends the request at once
    by_id = llm_spec.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=(stop_id,)))[0]
    assert by_id.token_ids == plain[0][:plain[0].index(stop_id) + 1] and by_id.finish_reason is FinishReason.STOP
    messages = [{"role": "user", "content": f"Repeat the following text exactly: {QUOTED[1]}"}]
    pieces = list(llm_spec.stream_chat(messages, GREEDY))
    assert sum((o.delta_token_ids for o in pieces), []) == pieces[-1].token_ids == plain[2]
    assert "".join(o.delta_text for o in pieces) == pieces[-1].text
    assert any(len(o.delta_token_ids) > 1 for o in pieces)            # several tokens in one step


def test_rollback_leaves_no_block_and_the_cache_stays_exact(llm_spec, llm_cold):
    prompt = prompt_ids(llm_spec, "spec-rollback", 90)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    first = llm_spec.generate([prompt], params)[0]
    engine = llm_spec.engine
    engine.cache.check_invariants()
    assert engine.stats().cache.blocks_used == 0
    hot = llm_spec.generate([prompt], params)[0]
    follow = prompt + first.token_ids + prompt_ids(llm_spec, "spec-rollback-more", 20)
    next_turn = llm_spec.generate([follow], params)[0]
    assert hot.cached_tokens == len(prompt) - 1
    assert next_turn.cached_tokens == len(prompt) + len(first.token_ids) - 1
    assert first.token_ids == hot.token_ids == llm_cold.generate([prompt], params)[0].token_ids
    assert next_turn.token_ids == llm_cold.generate([follow], params)[0].token_ids
    engine.cache.check_invariants()
    assert engine.stats().cache.blocks_used == 0


def test_seeded_sampling_with_speculation_is_reproducible(llm_spec, prompts, plain):
    sampled = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=11)
    first, second = (llm_spec.generate([prompts[0]], sampled)[0].token_ids for _ in range(2))
    assert first == second
    top1 = SamplingParams(temperature=0.8, top_k=1, max_tokens=40, seed=3)     # a point mass: all drafts agree
    assert llm_spec.generate([prompts[0]], top1)[0].token_ids == plain[0]


def test_acceptance_rule_keeps_the_output_distribution():
    probs = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05, 0.0])
    num_trials = 20000
    for draft_id in (0, 1, 5):
        generator = torch.Generator().manual_seed(draft_id)
        counts = torch.zeros_like(probs)
        for _ in range(num_trials):
            counts[accept_or_resample(probs, draft_id, generator)] += 1
        assert (counts / num_trials - probs).abs().max() < 0.015, (draft_id, counts / num_trials)


def test_sampler_keeps_the_agreeing_run_and_one_own_token():
    assert accept_greedy([5, 6, 7], (5, 9)) == [5, 6]
    assert accept_greedy([5, 6, 7], (5, 6)) == [5, 6, 7]
    assert accept_greedy([4, 6, 7], (5, 6)) == [4]
    logits = torch.full((3, 8), -30.0)
    logits[0, 2] = logits[1, 3] = logits[2, 4] = 30.0      # the model surely says 2, 3, 4
    params = SamplingParams(temperature=1.0, seed=0)
    for draft, expected in (((2, 3), [2, 3, 4]), ((2, 7), [2, 3])):
        sampler = Sampler(0, 8, frozenset({0}), None, torch.device("cpu"))
        sampler.add("a", params, [])
        assert sampler.sample(logits, ["a"], [draft])[0].token_ids == expected


def test_ngram_drafter_copies_the_latest_earlier_continuation():
    drafter = NgramDrafter(num_draft_tokens=4, ngram_max=3, ngram_min=1)
    assert drafter.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 10) == (7, 8, 1, 2)
    assert drafter.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2) == (7, 8)
    assert drafter.propose([5, 6, 1, 2, 3, 4, 6], 10) == (1, 2, 3, 4)      # only the 1-gram [6] recurs
    assert drafter.propose([1, 2, 3, 4], 10) == () and drafter.propose([1, 2, 1], 0) == ()
    with pytest.raises(ValueError):
        NgramDrafter(num_draft_tokens=4, ngram_max=1, ngram_min=2)


def test_recurrent_model_falls_back_to_plain_decoding(tmp_path_factory, caplog):
    from tests.engine.test_hybrid_cache import build, ids
    path = build(tmp_path_factory, "qwen3_5")
    options = dict(dtype="float32", kv_cache_bytes="8MiB", checkpoint_interval=64)
    with caplog.at_level(logging.WARNING, logger="reprise"):
        speculative = LLM(path, speculative="ngram", **options)
    assert speculative.engine.drafter is None
    assert len([r for r in caplog.records if "speculative decoding is off" in r.getMessage()]) == 1
    prompt = ids(40, 12) * 4                     # repeats: a drafter would find n-grams everywhere
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reference = LLM(path, **options).generate([prompt], params)[0].token_ids
    assert speculative.generate([prompt], params)[0].token_ids == reference
    assert speculative.engine.stats().num_draft_tokens == 0
