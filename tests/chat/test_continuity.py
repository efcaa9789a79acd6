"""Token continuity: a resent reply keeps the ids the model generated for it."""
from __future__ import annotations

import pytest

from reprise.chat.continuity import Reply, ReplyMemory, chat_prompt_ids, prompt_ids, reply_ids, suffix_ids
from reprise.engine.request import FinishReason

CANDIDATES = [["Hel", "lo world"], ["The answer", " is 42."], ["Sure", "! Here you go."], ["a", "b", "c"]]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="module")
def reply(tokenizer) -> tuple[str, list[int]]:
    """A reply whose generated ids (pieces encoded one by one) differ from encoding its text."""
    for pieces in CANDIDATES:
        text = "".join(pieces)
        generated = [i for piece in pieces for i in tokenizer.encode(piece)]
        if generated != tokenizer.encode(text):
            assert tokenizer.decode(generated) == text
            return text, generated
    pytest.fail("no candidate reply tokenizes differently piecewise")


def history(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"},
            {"role": "assistant", "content": text}, {"role": "user", "content": "Again"}]


def test_remembered_reply_keeps_its_ids(tokenizer, reply):
    text, generated = reply
    memory = ReplyMemory()
    memory.remember(None, text, text, generated)
    rendered = tokenizer.render_chat(history(text))
    start = rendered.index(text)
    before, after = rendered[:start], rendered[start + len(text):]
    ids = chat_prompt_ids(tokenizer, history(text), memory)
    assert ids == tokenizer.encode(before) + generated + tokenizer.encode(after)
    # elsewhere the plain encoding: it splits at the same places for this template
    assert tokenizer.encode(before) + tokenizer.encode(text) + tokenizer.encode(after) == tokenizer.encode(rendered)
    assert ids != tokenizer.encode(rendered)
    assert tokenizer.decode(ids) == rendered


def test_without_memory_or_recall_it_is_plain_encoding(tokenizer, reply):
    text, _ = reply
    plain = tokenizer.encode(tokenizer.render_chat(history(text)))
    assert chat_prompt_ids(tokenizer, history(text), None) == plain
    assert chat_prompt_ids(tokenizer, history(text), ReplyMemory()) == plain


def test_next_turn_extends_previous_prompt_and_reply(tokenizer, reply):
    """Turn N+1's ids start with turn N's prompt ids followed by the ids generated in turn N."""
    text, generated = reply
    memory = ReplyMemory()
    messages = [{"role": "user", "content": "Say hello"}]
    first = chat_prompt_ids(tokenizer, messages, memory)
    memory.remember(None, text, text, generated)
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Again"}]
    second = chat_prompt_ids(tokenizer, messages, memory)
    assert second[:len(first) + len(generated)] == first + generated
    second_reply = [i for piece in (" Hel", "lo", " again") for i in tokenizer.encode(piece)]
    memory.remember(None, " Hello again", " Hello again", second_reply)
    messages += [{"role": "assistant", "content": " Hello again"}, {"role": "user", "content": "Bye"}]
    third = chat_prompt_ids(tokenizer, messages, memory)
    assert third[:len(second) + len(second_reply)] == second + second_reply


def test_reply_text_also_in_an_earlier_message(tokenizer, reply):
    """The user said the same words first: the splice lands on the assistant's copy, not the user's."""
    text, generated = reply
    memory = ReplyMemory()
    memory.remember(None, text, text, generated)
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text},
                {"role": "user", "content": "ok"}]
    rendered = tokenizer.render_chat(messages)
    start = rendered.index(text, rendered.index(text) + 1)
    expected = tokenizer.encode(rendered[:start]) + generated + tokenizer.encode(rendered[start + len(text):])
    assert chat_prompt_ids(tokenizer, messages, memory) == expected


def test_reply_memory_is_a_bounded_lru():
    memory = ReplyMemory(capacity=2)
    memory.remember(None, "a", "a", [1])
    memory.remember(None, "b", "b", [2, 3])
    assert memory.recall(None, "a") == Reply("a", (1,))          # touches "a": "b" is now the oldest
    memory.remember(None, "c", "c", [4])
    assert (memory.recall(None, "b"), memory.recall(None, "c"), len(memory)) == (None, Reply("c", (4,)), 2)
    memory.remember(None, "e", "", [5])
    memory.remember(None, "d", "d", [])
    assert (memory.recall(None, "e"), memory.recall(None, "d"), len(memory)) == (None, None, 2)


def test_replies_are_kept_per_tenant(tokenizer, reply):
    """Tenant B sending back tenant A's reply text gets B's own tokenization of it."""
    text, generated = reply
    memory = ReplyMemory()
    memory.remember("tenant-a", text, text, generated)
    plain = tokenizer.encode(tokenizer.render_chat(history(text)))
    assert chat_prompt_ids(tokenizer, history(text), memory, "tenant-b") == plain
    assert chat_prompt_ids(tokenizer, history(text), memory, None) == plain
    assert chat_prompt_ids(tokenizer, history(text), memory, "tenant-a") != plain


def test_a_tool_call_reply_is_recalled_by_its_call_id(tokenizer):
    """The client sends a tool call back parsed; the memory finds the markup the model wrote."""
    markup = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    generated = [i for piece in ("<tool", "_call>", '{"name": "f", "arguments": {}}', "</tool_call>")
                 for i in tokenizer.encode(piece)]
    memory = ReplyMemory()
    memory.remember(None, "tool_call:call_1", markup, generated)
    sent = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "function": {"name": "f"}}]}
    rendered = f"<|im_start|>user\nGo<|im_end|>\n<|im_start|>assistant\n{markup}<|im_end|>\n"
    prompt = prompt_ids(tokenizer, rendered, [{"role": "user", "content": "Go"}, sent], memory)
    start = rendered.index(markup)
    assert prompt.ids == (tokenizer.encode(rendered[:start]) + generated
                          + tokenizer.encode(rendered[start + len(markup):]))


def test_reply_ids_drop_the_stop_token_and_refuse_stop_strings():
    assert reply_ids([5, 6, 2], FinishReason.STOP, frozenset({2})) == [5, 6]
    assert reply_ids([5, 6], FinishReason.LENGTH, frozenset({2})) == [5, 6]
    assert reply_ids([5, 6], FinishReason.STOP, frozenset({2})) is None      # a stop string cut the text


def test_suffix_ids_find_the_tail_that_spells_a_text(tokenizer):
    ids = tokenizer.encode("<think>\nhmm\n</think>\n\nThe answer is 42.")
    assert tokenizer.decode(suffix_ids(tokenizer, ids, "The answer is 42.")) == "The answer is 42."
    assert suffix_ids(tokenizer, ids, "he answer is 42.") is None            # starts inside a token
