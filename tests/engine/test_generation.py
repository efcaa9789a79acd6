"""The engine on the default model: greedy answers, batching invariance, preemption, sampling."""
from __future__ import annotations

from reprise import LLM, SamplingParams
from reprise.engine.request import FinishReason
from tests.conftest import GREEDY, prompt_ids, words


def test_capital_of_france_is_paris(llm):
    output = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0]
    assert "Paris" in output.text
    assert output.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert output.cached_tokens <= len(output.prompt_token_ids) - 1


def test_eight_prompts_together_match_each_alone(llm_cold):
    prompts = [prompt_ids(llm_cold, f"batch-{i}", 20 + 7 * i) for i in range(8)]
    alone = [llm_cold.generate([p], GREEDY)[0].token_ids for p in prompts]
    together = [o.token_ids for o in llm_cold.generate(prompts, GREEDY)]
    assert together == alone


def test_long_prompt_arriving_mid_decode_leaves_others_unchanged(llm_cold):
    engine = llm_cold.engine
    short = [prompt_ids(llm_cold, f"mid-{i}", 24) for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [llm_cold.generate([p], params)[0].token_ids for p in short]
    requests = [engine.add_request(p, params) for p in short]
    for _ in range(4):
        engine.step()
    late = engine.add_request(prompt_ids(llm_cold, "mid-long", 1500), params)
    chunks_seen = 0
    while engine.has_work:
        engine.step()
        if late.num_computed < len(late.prompt_ids):
            chunks_seen += 1
            assert all(r.output_ids for r in requests)
    assert chunks_seen >= 2            # the long prompt was chunked while the others kept decoding
    assert [r.output_ids for r in requests] == alone


def test_request_bigger_than_free_pool_is_preempted_and_completes_the_same():
    # 22 blocks of 16 tokens = 352 slots: three prompts of 100 tokens are admitted (3 x 7 blocks), then
    # 100 + 24 tokens need 3 x 8 blocks, so one is preempted after ~13 tokens and recomputed
    small = LLM(dtype="float32", kv_cache_bytes=22 * 16 * 30 * 2 * 3 * 64 * 4, prefix_cache=False, seed=1)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [prompt_ids(small, f"preempt-{i}", 100) for i in range(3)]
    alone = [small.generate([p], params)[0].token_ids for p in prompts]
    together = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in together] == alone
    small.engine.cache.check_invariants()
    assert small.engine.stats().cache.blocks_used == 0


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(llm_cold):
    prompt = prompt_ids(llm_cold, "sampling", 30)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7, ignore_eos=True)
    first, second = (llm_cold.generate([prompt], sampled)[0].token_ids for _ in range(2))
    assert first == second
    top1 = SamplingParams(temperature=0.8, top_k=1, max_tokens=12, seed=3, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert llm_cold.generate([prompt], top1)[0].token_ids == llm_cold.generate([prompt], greedy)[0].token_ids


def test_max_tokens_stop_strings_and_eos(llm_cold):
    prompt = words("stops", 40)
    out = llm_cold.generate(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason is FinishReason.LENGTH
    longer = llm_cold.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    stop = longer.text[8:11]
    stopped = llm_cold.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))[0]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.text == longer.text[:longer.text.find(stop)]
    chat = llm_cold.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=200))
    assert chat.finish_reason is FinishReason.STOP
    assert chat.token_ids[-1] in llm_cold.tokenizer.eos_token_ids


def test_streamed_pieces_are_valid_utf8_and_add_up(llm_cold):
    messages = [{"role": "user", "content": "Write three emoji and the word café in Chinese and Japanese."}]
    pieces = [o.delta_text for o in llm_cold.stream_chat(messages, SamplingParams(temperature=0, max_tokens=48))]
    final = llm_cold.chat(messages, SamplingParams(temperature=0, max_tokens=48)).text
    assert "".join(pieces) == final
    assert all("\ufffd" not in piece for piece in pieces)
