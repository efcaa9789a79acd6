"""The prefix cache on the default model: exact counts, and the same greedy tokens as without it."""
from __future__ import annotations

import random

from reprise import ChatSession, SamplingParams
from reprise.cache.match import MissReason
from reprise.engine.scheduler import common_prefix_length
from tests.conftest import GREEDY, prompt_ids, words

BLOCK = 16


def test_exact_repeat_matches_cold_run(llm, llm_cold):
    prompt = prompt_ids(llm, "exact", 300)
    cold = llm_cold.generate([prompt], GREEDY)[0]
    first = llm.generate([prompt], GREEDY)[0]
    hot = llm.generate([prompt], GREEDY)[0]
    assert first.cached_tokens == 0
    assert hot.cached_tokens == len(prompt) - 1
    assert hot.token_ids == first.token_ids == cold.token_ids
    assert cold.cached_tokens == 0 and cold.miss is MissReason.DISABLED


def test_nearest_prefix_reuses_exactly_the_shared_tokens(llm, llm_cold):
    base = prompt_ids(llm, "nearest", 260)
    shared = 203                                    # not a multiple of the block size
    assert shared % BLOCK
    llm.generate([base], GREEDY)
    other = base[:shared] + prompt_ids(llm, "nearest-tail", 40)
    assert other[shared] != base[shared]
    hot = llm.generate([other], GREEDY)[0]
    assert hot.cached_tokens == shared
    assert hot.miss is MissReason.DIVERGED and hot.diverged_at == shared
    assert hot.token_ids == llm_cold.generate([other], GREEDY)[0].token_ids


def test_generated_tokens_are_cached_for_the_next_turn(llm):
    prompt = prompt_ids(llm, "continue", 120)
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    follow = prompt + first.token_ids + prompt_ids(llm, "continue-more", 30)
    hot = llm.generate([follow], GREEDY)[0]
    # the last sampled token was never fed to the model, so it has no KV
    assert hot.cached_tokens == len(prompt) + len(first.token_ids) - 1


def test_four_turn_chat_session_matches_cold_and_reuses_history(llm, llm_cold):
    params = SamplingParams(temperature=0, max_tokens=12)
    hot = ChatSession(llm, system=words("system-prompt", 60))
    cold = ChatSession(llm_cold, system=words("system-prompt", 60))
    previous = None
    for turn in range(4):
        question = f"Question {turn}: tell me about the {words(f'q{turn}', 3)}."
        reply, reference = hot.send(question, params), cold.send(question, params)
        assert reply.token_ids == reference.token_ids
        if previous is not None:
            # everything of the previous turn but its final stop token (sampled, never fed) is reused
            fed = len(previous.prompt_token_ids) + len(previous.token_ids) - 1
            assert reply.cached_tokens >= fed
        previous = reply


def test_interleaved_conversations_keep_hitting(llm):
    sessions = [ChatSession(llm, system=words(f"interleave-{i}", 40)) for i in range(4)]
    last = {}
    params = SamplingParams(temperature=0, max_tokens=12)
    for turn in range(4):
        for i, session in enumerate(sessions):
            reply = session.send(f"Turn {turn} for chat {i}: {words(f'iq{i}{turn}', 4)}", params)
            if turn > 0:
                fed = len(last[i].prompt_token_ids) + len(last[i].token_ids) - 1
                assert reply.cached_tokens >= fed, (turn, i)
            last[i] = reply


def test_salts_never_share(llm):
    prompt = prompt_ids(llm, "salted", 90)
    a = llm.generate([prompt], GREEDY, salt="tenant-a")[0]
    b = llm.generate([prompt], GREEDY, salt="tenant-b")[0]
    shared = llm.generate([prompt], GREEDY)[0]
    again_a = llm.generate([prompt], GREEDY, salt="tenant-a")[0]
    assert (a.cached_tokens, b.cached_tokens, shared.cached_tokens) == (0, 0, 0)
    assert again_a.cached_tokens == len(prompt) - 1
    assert a.token_ids == b.token_ids == shared.token_ids


def test_cache_disabled_reports_zero(llm_cold):
    prompt = prompt_ids(llm_cold, "disabled", 50)
    llm_cold.generate([prompt], GREEDY)
    again = llm_cold.generate([prompt], GREEDY)[0]
    assert again.cached_tokens == 0 and again.miss is MissReason.DISABLED


def test_same_new_prefix_arriving_together_is_computed_once(llm):
    shared = prompt_ids(llm, "together", 600)
    prompts = [shared + prompt_ids(llm, f"together-{i}", 20) for i in range(2)]
    stats_before = llm.engine.stats().cache
    outputs = llm.generate(prompts, GREEDY)
    # the second waits for the first's prefix blocks (committed block by block) instead of computing them
    common = common_prefix_length(prompts[0], prompts[1])
    assert outputs[0].cached_tokens == 0
    assert outputs[1].cached_tokens == min(common, len(prompts[0]) // BLOCK * BLOCK) >= len(shared)
    stats = llm.engine.stats().cache
    assert stats.hits - stats_before.hits == outputs[1].cached_tokens


def test_no_blocks_leak_after_everything(llm):
    llm.engine.cache.check_invariants()
    assert llm.engine.stats().cache.blocks_used == 0


def test_exact_repeat_is_bit_identical_in_bfloat16():
    """bf16 rounds differently when a token runs as a decode (one row) than inside a prefill chunk:
    a cold run therefore also computes its last prompt token as a decode, as an exact hit does.
    These prompts diverged within 20 tokens when the cold run computed it in the chunk."""
    from reprise import LLM
    llm = LLM(dtype="bfloat16", kv_cache_bytes="64MiB")
    rng = random.Random(0)
    vocabulary = "the of and to in a is that for it as was with be by on not he I this are or his from at which"
    prompts = [" ".join(rng.choice(vocabulary.split()) for _ in range(rng.randrange(50, 400))) for _ in range(10)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for index in (3, 8, 9):
        cold = llm.generate(prompts[index], params)[0]
        hot = llm.generate(prompts[index], params)[0]
        assert cold.cached_tokens == 0 and hot.cached_tokens == len(hot.prompt_token_ids) - 1
        assert hot.token_ids == cold.token_ids
