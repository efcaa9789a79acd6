"""Sampling controls, logprobs, n and echo through the official openai client, on the shared server."""
from __future__ import annotations

import math

from tests.server.helpers import metric, wait_idle

SAY = [{"role": "user", "content": "Name three colors."}]


def test_logit_bias_against_the_greedy_token_changes_it(client, http, fresh_prompt):
    prompt = fresh_prompt(12)
    first = client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=1, logprobs=1)
    greedy = first.choices[0].logprobs.tokens[0]
    token_ids = http.post("/tokenize", json={"prompt": greedy}).json()["tokens"]
    assert len(token_ids) == 1
    banned = client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=1, logprobs=1,
                                       logit_bias={str(token_ids[0]): -100})
    assert banned.choices[0].text != first.choices[0].text
    # the runner-up: logprobs are the model's own, before the bias
    assert banned.choices[0].logprobs.top_logprobs[0] == first.choices[0].logprobs.top_logprobs[0]


def test_top_logprobs_under_greedy(client):
    reply = client.chat.completions.create(model="default", messages=SAY, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=5)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert entry.logprob <= 0 and sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-4
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
    assert "".join(entry.token for entry in entries if entry.token != "<|im_end|>") == \
        reply.choices[0].message.content


def test_streamed_logprobs_add_up_to_the_whole(client):
    kwargs = dict(model="default", messages=SAY, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **kwargs) for choice in chunk.choices
                if choice.logprobs for entry in choice.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]


def test_n_choices_share_one_prefill(client, http, fresh_prompt):
    prompt = fresh_prompt(33)                          # 32 tokens before the last: two whole blocks
    before = metric(http, "reprise:prefix_cache_hits_total", tier="memory")
    reply = client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=4, n=4)
    wait_idle(http)
    assert [choice.index for choice in reply.choices] == [0, 1, 2, 3]
    assert len({choice.text for choice in reply.choices}) == 1          # greedy: the same four times
    assert reply.usage.prompt_tokens == 33                              # counted once, as OpenAI does
    assert reply.usage.completion_tokens == 4 * 4
    assert reply.usage.prompt_tokens_details.cached_tokens == 0         # the first choice computed it
    assert metric(http, "reprise:prefix_cache_hits_total", tier="memory") - before == 3 * 32   # the other three read it


def test_echo_with_logprobs_returns_the_prompt_tokens(client, fresh_prompt):
    prompt = fresh_prompt(8)
    client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=1)    # now cached
    reply = client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=3, echo=True,
                                      logprobs=2, extra_body={"cache_report": True})
    choice = reply.choices[0]
    assert choice.text.startswith(prompt)
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens[:8]) == prompt
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(value <= 0 for value in logprobs.token_logprobs[1:])
    assert len(logprobs.tokens) == 8 + reply.usage.completion_tokens
    assert logprobs.text_offset[:3] == [0, len(logprobs.tokens[0]), len(logprobs.tokens[0] + logprobs.tokens[1])]
    # the prompt's logprobs need its logits, which the cache does not keep: recomputed, and said so
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.model_extra["cache"]["miss_reason"] == "prompt_logprobs"


def test_min_tokens_holds_off_the_end_of_turn(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    short = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=40)
    assert short.choices[0].finish_reason == "stop"
    wanted = short.usage.completion_tokens + 5
    longer = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=40,
                                            extra_body={"min_tokens": wanted})
    assert longer.usage.completion_tokens >= wanted
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)


def test_penalties_change_a_repetitive_greedy_reply(client):
    messages = [{"role": "user", "content": "Repeat the word 'cat' twenty times."}]
    plain = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=30)
    penalized = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=30,
                                               frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized.choices[0].message.content != plain.choices[0].message.content
    assert penalized.choices[0].message.content.count("cat") < plain.choices[0].message.content.count("cat")


def test_prompt_logprobs_score_every_prompt_token(client, http, fresh_prompt):
    prompt = fresh_prompt(6)
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    reply = client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=1,
                                      extra_body={"prompt_logprobs": 2})
    scored = reply.choices[0].model_extra["prompt_logprobs"]
    assert len(scored) == 6 and scored[0] is None
    for token, entry in zip(ids[1:], scored[1:]):
        assert str(token) in entry and len(entry) in (2, 3)          # the token itself, then the top 2
        assert all(value["logprob"] <= 0 for value in entry.values())
    echoed = client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=1, echo=True,
                                       logprobs=2)
    assert echoed.choices[0].logprobs.token_logprobs[1:6] == [scored[i][str(ids[i])]["logprob"] for i in range(1, 6)]
