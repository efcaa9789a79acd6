"""The batched sampler on hand-built logits (no model): each control changes exactly the logits it
should, logprobs come from the raw logits, and a mixed batch gives each row what it gets alone."""
from __future__ import annotations

import math

import pytest
import torch

from reprise.chat.grammar import Grammars
from reprise.chat.spec import GuidedSpec
from reprise.engine.request import SamplingParams
from reprise.engine.distributions import filtered_probs, token_logprobs
from reprise.engine.sampler import Sampler

VOCAB, EOS = 8, 0
CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0, max_tokens=100)


def sampler(vocab: int = VOCAB, grammars: Grammars | None = None) -> Sampler:
    return Sampler(0, vocab, frozenset({EOS}), grammars, CPU)


def forcing(token_id: int, vocab: int = VOCAB) -> torch.Tensor:
    """One row whose argmax (and, at temperature 1, whose draw) is surely `token_id`."""
    logits = torch.full((1, vocab), -50.0)
    logits[0, token_id] = 50.0
    return logits


def run(s: Sampler, request_id: str, token_ids: list[int]) -> None:
    for token_id in token_ids:
        assert s.sample(forcing(token_id, s._vocab_size), [request_id], [()])[0].token_ids == [token_id]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


def allowed(grammars: Grammars, spec: GuidedSpec, text_ids: list[int] = ()) -> torch.Tensor:
    """The ids a fresh matcher for `spec` allows after `text_ids`."""
    matcher = grammars.matcher(spec)
    for token_id in text_ids:
        matcher.accept(token_id)
    bitmask = torch.zeros((1, (grammars.vocab_size + 31) // 32), dtype=torch.int32)
    matcher.fill(bitmask, 0)
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:grammars.vocab_size].nonzero()[:, 0]


def test_greedy_rows_without_controls_are_the_raw_argmax():
    s = sampler(1000)
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1))
    for i in range(6):
        s.add(f"r{i}", GREEDY, [1, 2])
    assert s.adjust(logits, [f"r{i}" for i in range(6)], [()] * 6) is logits
    sampled = s.sample(logits, [f"r{i}" for i in range(6)], [()] * 6)
    assert [x.token_ids for x in sampled] == [[t] for t in logits.argmax(-1).tolist()]
    assert all(x.logprobs is None for x in sampled)


def test_presence_and_frequency_penalties_subtract_exact_amounts():
    s = sampler()
    s.add("a", SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25), prompt_ids=[4, 6])
    run(s, "a", [3, 3, 5])
    adjusted = s.adjust(torch.ones(1, VOCAB), ["a"], [()])
    # token 3: 1 - 0.5 - 2 * 0.25; token 5: 1 - 0.5 - 0.25; prompt tokens 4 and 6 are not output: untouched
    assert adjusted[0].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 0.25, 1.0, 1.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    s = sampler()
    s.add("a", SamplingParams(temperature=0, repetition_penalty=2.0), prompt_ids=[1, 2])
    run(s, "a", [3])
    logits = torch.tensor([[1.0, 4.0, -3.0, 1.0, 4.0, -3.0, 0.0, 2.0]])
    assert s.adjust(logits, ["a"], [()])[0].tolist() == [1.0, 2.0, -6.0, 0.5, 4.0, -3.0, 0.0, 2.0]
    s.add("b", SamplingParams(temperature=0, repetition_penalty=0.5), prompt_ids=[1, 2, 3])    # < 1 rewards
    both = s.adjust(torch.cat([logits, logits]), ["a", "b"], [(), ()])
    assert both.tolist() == [[1.0, 2.0, -6.0, 0.5, 4.0, -3.0, 0.0, 2.0], [1.0, 8.0, -1.5, 2.0, 4.0, -3.0, 0.0, 2.0]]


def test_logit_bias_adds_and_minus_100_turns_greedy_to_the_runner_up():
    s = sampler()
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    s.add("a", SamplingParams(temperature=0, logit_bias={2: -100, 6: 0.5}), [])
    assert s.adjust(logits, ["a"], [()])[0].tolist() == [0.0, 1.0, -95.0, 4.0, 0.0, 0.0, 0.5, 0.0]
    assert s.sample(logits, ["a"], [()])[0].token_ids == [3]
    with pytest.raises(ValueError, match="logit_bias"):
        s.add("b", SamplingParams(logit_bias={VOCAB: 1.0}), [])


def test_logit_bias_applies_to_every_drafted_row():
    s = sampler()
    logits = torch.full((3, VOCAB), 0.0)
    logits[0, 2] = logits[1, 3] = logits[2, 4] = 10.0         # the model says 2, 3, 4
    s.add("a", SamplingParams(temperature=0, logit_bias={3: -100}), [])
    assert s.sample(logits, ["a"], [(2, 3)])[0].token_ids == [2, 0]      # row 1's 3 is banned: 0 wins the tie


def test_min_p_drops_exactly_the_tokens_below_the_threshold():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0]])
    logits = torch.log(probs)
    kept = filtered_probs(logits, SamplingParams(min_p=0.45))          # threshold 0.45 * 0.4 = 0.18
    torch.testing.assert_close(kept, torch.tensor([[4 / 9, 3 / 9, 2 / 9, 0.0, 0.0]]))
    kept = filtered_probs(logits, SamplingParams(min_p=0.6))           # threshold 0.24
    torch.testing.assert_close(kept, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0, 0.0]]))


def test_top_k_top_p_and_temperature_per_row():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3))
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.75), SamplingParams(temperature=0.5)]
    expected = torch.tensor([[4 / 7, 3 / 7, 0, 0], [4 / 9, 3 / 9, 2 / 9, 0], [16 / 30, 9 / 30, 4 / 30, 1 / 30]])
    torch.testing.assert_close(filtered_probs(logits, params), expected)


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    s = sampler()
    logits = torch.tensor([[9.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 8.0]])      # EOS first, stop token 7 second
    s.add("a", SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(7,)), [])
    assert [s.sample(logits, ["a"], [()])[0].token_ids for _ in range(3)] == [[3], [3], [EOS]]


def test_grammar_restricts_argmax_to_allowed_tokens_and_padding(grammars, tokenizer):
    vocab = grammars.vocab_size + 64                      # the model's logits are wider than the vocabulary
    s = sampler(vocab, grammars)
    spec = GuidedSpec(regex="[0-9]{2}")
    s.add("a", SamplingParams(temperature=0, max_tokens=5), [])
    s.add("g", SamplingParams(temperature=0, max_tokens=5, guided=spec), [])
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    logits[0, -1] = 100.0                                 # a padding column the grammar must refuse
    digits = allowed(grammars, spec)
    first = int(digits[logits[0, digits].argmax()])
    assert s.sample(logits, ["a"], [()])[0].token_ids == [vocab - 1]
    assert s.sample(logits, ["g"], [()])[0].token_ids == [first]
    second = s.sample(logits, ["g"], [()])[0].token_ids[0]
    assert second in allowed(grammars, spec, [first]).tolist()
    eos = s.sample(logits, ["g"], [()])[0].token_ids               # complete: only EOS remains
    assert eos == [min(tokenizer.eos_token_ids)]


def test_sampled_tokens_always_follow_the_grammar(grammars, tokenizer):
    s = sampler(grammars.vocab_size, grammars)
    spec = GuidedSpec(json_schema='{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}')
    s.add("a", SamplingParams(temperature=1.5, seed=3, min_tokens=3, guided=spec), [])
    generator, token_ids = torch.Generator().manual_seed(0), []
    for _ in range(12):
        logits = torch.randn(1, grammars.vocab_size, generator=generator)
        token_ids += s.sample(logits, ["a"], [()])[0].token_ids           # a disallowed token would raise
    assert tokenizer.decode(token_ids[:3]).startswith('{"n')


def test_logprobs_come_from_the_raw_logits():
    s = sampler()
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, -1.0, 0.0, 0.25, 1.5]])
    s.add("a", SamplingParams(temperature=0, logprobs=3, logit_bias={1: -100}, presence_penalty=1.0), [])
    [sampled] = s.sample(logits, ["a"], [()])
    raw = torch.log_softmax(logits[0], -1)
    [entry] = sampled.logprobs
    assert sampled.token_ids == [3] and entry.token_id == 3 and entry.logprob == pytest.approx(float(raw[3]))
    assert [t for t, _ in entry.top] == [1, 3, 7]
    assert [v for _, v in entry.top] == pytest.approx(raw[[1, 3, 7]].tolist())
    s.add("g", SamplingParams(temperature=0, logprobs=2), [])
    [greedy] = s.sample(logits, ["g"], [()])
    assert greedy.logprobs[0].top[0][0] == greedy.token_ids[0] == 1 and len(greedy.logprobs[0].top) == 2


def test_token_logprobs_per_row():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
    first, second = token_logprobs(logits, [0, 0], 0)
    assert first.logprob == pytest.approx(-math.log(1 + math.e + math.e ** 2)) and first.top == ()
    assert second.logprob == pytest.approx(2 - math.log(math.e ** 2 + 2))


def test_a_mixed_batch_gives_each_row_what_it_gets_alone(grammars):
    vocab = grammars.vocab_size
    spec = GuidedSpec(regex="[a-z]{3,6}")
    requests = {"greedy": GREEDY,
                "penalized": SamplingParams(temperature=0, frequency_penalty=1.5, repetition_penalty=1.3),
                "constrained": SamplingParams(temperature=0, guided=spec),
                "sampled": SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05, seed=7, logprobs=1),
                "drafted": SamplingParams(temperature=0, logit_bias={5: 3.0})}
    batch, alone = sampler(vocab, grammars), {name: sampler(vocab, grammars) for name in requests}
    for name, params in requests.items():
        batch.add(name, params, [10, 11, 12])
        alone[name].add(name, params, [10, 11, 12])
    generator = torch.Generator().manual_seed(5)
    for _ in range(6):
        rows = {name: torch.randn(2 if name == "drafted" else 1, vocab, generator=generator) for name in requests}
        draft = (int(rows["drafted"][0].argmax()),)               # accepted: 2 tokens a step
        drafts = [draft if name == "drafted" else () for name in requests]
        together = batch.sample(torch.cat(list(rows.values())), list(requests), drafts)
        for (name, logits), d, got in zip(rows.items(), drafts, together):
            assert alone[name].sample(logits, [name], [d])[0] == got, name


def test_requests_with_history_dependent_controls_never_take_drafts():
    s = sampler()
    s.add("a", SamplingParams(temperature=0, presence_penalty=0.5), [])
    with pytest.raises(AssertionError):
        s.sample(torch.zeros(2, VOCAB), ["a"], [(1,)])
