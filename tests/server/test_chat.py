"""/v1/chat/completions against a real server: multi-turn reuse, streaming shape, content parts.

The exact multi-turn rule, from the template (`...<|im_start|>assistant\\n` REPLY `<|im_end|>\\n`):
turn k generated completion_k tokens; all but the last have KV (the last one, `<|im_end|>` or the
max_tokens-th token, was sampled and never run). Turn k+1 resends the history, whose ids start
with turn k's prompt and reply ids (the server reuses the exact ids it generated), so
cached_tokens(k+1) = prompt_tokens(k) + completion_tokens(k) - 1.
"""
from __future__ import annotations

MODEL = "default"


def _turns(client, fresh_prompt, stream: bool) -> list:
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": fresh_prompt(30)}]
    usages = []
    for _ in range(3):
        if stream:
            chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                         stream=True, stream_options={"include_usage": True}))
            reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
            reply, usage = response.choices[0].message.content, response.usage
        usages.append(usage)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": fresh_prompt(10)}]
    return usages


def _assert_turns_reuse_history(usages) -> None:
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]
    assert cached[0] < cached[1] < cached[2]
    for before, after in zip(usages, usages[1:]):
        assert after.prompt_tokens_details.cached_tokens == before.prompt_tokens + before.completion_tokens - 1
        assert after.prompt_tokens > before.prompt_tokens + before.completion_tokens


def test_three_turn_chat_reuses_each_previous_turn(client, fresh_prompt):
    _assert_turns_reuse_history(_turns(client, fresh_prompt, stream=False))


def test_three_turn_streamed_chat_reuses_each_previous_turn(client, fresh_prompt):
    _assert_turns_reuse_history(_turns(client, fresh_prompt, stream=True))


def test_chat_stream_shape(client, fresh_prompt):
    messages = [{"role": "user", "content": fresh_prompt(12)}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert all(chunk.usage is None for chunk in chunks)
    reasons = [chunk.choices[0].finish_reason for chunk in chunks]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == streamed
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    assert whole.usage.completion_tokens == 5


def test_text_parts_render_like_the_joined_string(client, fresh_prompt):
    first, second = fresh_prompt(6), fresh_prompt(6)
    parts = [{"type": "text", "text": first}, {"type": "text", "text": second}]
    by_parts = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                              max_tokens=1, temperature=0)
    joined = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"{first}\n{second}"}],
                                            max_tokens=1, temperature=0)
    assert by_parts.usage.prompt_tokens == joined.usage.prompt_tokens
    assert joined.usage.prompt_tokens_details.cached_tokens == joined.usage.prompt_tokens - 1


def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].id == "SmolLM2-135M-Instruct.Q4_1" and models[0].owned_by == "reprise"
    response = client.chat.completions.create(model=models[0].id, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=1)
    assert response.model == models[0].id
