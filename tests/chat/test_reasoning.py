"""Reasoning parser: `<think>` split from content, whole and streamed at every boundary."""
from __future__ import annotations

import pytest

from reprise.chat.reasoning import ReasoningDelta, ReasoningOutput, ReasoningParser, choose_reasoning_parser

# (output, the prompt left it inside reasoning, expected reasoning, expected content)
CASES = [
    ("<think>\nThe user greets me.\n</think>\n\nHello!", False, "The user greets me.", "Hello!"),
    ("  <think>a\n\nb\n\n</think>Hi\n", False, "a\n\nb", "Hi\n"),
    ("<think>\n\n</think>\n\nJust content.", False, None, "Just content."),
    ("Plain answer, no <think> here </think>", False, None, "Plain answer, no <think> here </think>"),
    ("\n\nPlain", False, None, "\n\nPlain"),
    ("<thinking>not a tag", False, None, "<thinking>not a tag"),
    ("<thin", False, None, "<thin"),
    ("Opened by the prompt.\n</think>\n\nAnswer <think>x</think>", True, "Opened by the prompt.",
     "Answer <think>x</think>"),
    ("Still thinking when cut off </thi", True, "Still thinking when cut off </thi", None),
    ("<think>\nunfinished\n\n", False, "unfinished", None),
    ("<think>x</think>\n\n", False, "x", None),
]


def streamed(pieces: list[str], in_reasoning: bool) -> list[ReasoningDelta]:
    stream = ReasoningParser().stream(in_reasoning)
    return [delta for piece in pieces for delta in stream.feed(piece)] + stream.finish()


def joined(deltas: list[ReasoningDelta]) -> ReasoningOutput:
    reasoning = "".join(d.reasoning for d in deltas if d.reasoning is not None)
    content = "".join(d.content for d in deltas if d.content is not None)
    return ReasoningOutput(reasoning or None, content or None)


@pytest.mark.parametrize("output, in_reasoning, reasoning, content", CASES)
def test_parse(output, in_reasoning, reasoning, content):
    assert ReasoningParser().parse(output, in_reasoning) == ReasoningOutput(reasoning, content)


@pytest.mark.parametrize("output, in_reasoning, reasoning, content", CASES)
def test_stream_split_anywhere_equals_parse(output, in_reasoning, reasoning, content):
    expected = ReasoningOutput(reasoning, content)
    deltas = streamed(list(output), in_reasoning)
    assert joined(deltas) == expected
    for delta in deltas:             # tags never leak: every piece is part of its final text
        assert (delta.reasoning is None) != (delta.content is None)
        assert delta.reasoning is None or delta.reasoning in (reasoning or "")
        assert delta.content is None or delta.content in (content or "")
    for cut in range(len(output) + 1):
        assert joined(streamed([output[:cut], output[cut:]], in_reasoning)) == expected


def test_stream_sends_reasoning_before_the_end_tag_arrives():
    stream = ReasoningParser().stream()
    assert stream.feed("<think>\nstep one") == [ReasoningDelta(reasoning="step one")]
    assert stream.feed("\n</th") == []
    assert stream.feed("ink>\n\nDone") == [ReasoningDelta(content="Done")]
    assert stream.finish() == []


def test_prompt_that_opens_reasoning():
    parser = ReasoningParser()
    assert parser.opens_in_reasoning("<|im_start|>assistant\n<think>\n")
    assert not parser.opens_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not parser.opens_in_reasoning("<|im_start|>user\nWhat is <think>?<|im_end|>\n<|im_start|>assistant\n")


def test_parser_chosen_from_template_or_name():
    assert choose_reasoning_parser("{{ '<think>\\n' }}") is not None
    assert choose_reasoning_parser("<|im_start|>{{ m.content }}") is None
    assert choose_reasoning_parser(None) is None
    assert choose_reasoning_parser(None, "deepseek_r1").parse("a</think>b", True) == ReasoningOutput("a", "b")
    with pytest.raises(ValueError, match="unknown reasoning parser 'o1'; known: qwen3, deepseek_r1"):
        choose_reasoning_parser(None, "o1")
