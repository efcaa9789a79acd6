"""Tool-call formats: whole-text parses, streams split at every boundary, tags, format choice."""
from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reprise.chat.spec import ToolTag
from reprise.chat.tool_parsers import TOOL_FORMATS, MistralFormat, choose_tool_format
from reprise.chat.tool_stream import Delta, ToolFormat, collect

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
            "hours": {"type": "array", "items": {"type": "integer"}}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}},
]
PARIS, ZURICH = '{"city": "Paris", "days": 2}', '{"city":"Zürich" , "note": "a } \\" { ]"}'

# format -> [(output, expected content, expected [(name, arguments)])]
CASES = {
    "hermes": [
        (f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>', None, [("get_weather", PARIS)]),
        (f'Let me look.\n\n<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>\n'
         f'<tool_call>\n{{"name":"get_weather","arguments":{ZURICH}}}\n</tool_call>\nDone.',
         "Let me look.Done.", [("get_weather", PARIS), ("get_weather", ZURICH)]),
        ('<tool_call>\n{"name": "now", "parameters": {}}\n</tool_call>', None, [("now", "{}")]),
        ('<tool_call>\nnot json\n</tool_call>', '<tool_call>\nnot json\n</tool_call>', []),
        ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
         []),
        ('<tool_call>{"arguments": {}, "name": "now"}', '<tool_call>{"arguments": {}, "name": "now"}', []),
        ('a <b> <tool_call', "a <b> <tool_call", []),
        ('x <tool_call>\n{"name": "get_weath', "x", []),          # cut inside a call's header: markup, dropped
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', None, [("get_weather", '{"city": "Par')]),
        ("Hello\n", "Hello\n", []),
    ],
    "generic": [
        (f'<tool_call>{{"name": "get_weather", "arguments": {PARIS}}}</tool_call>', None, [("get_weather", PARIS)]),
        (f'Checking.\n<tool_call>{{"name": "get_weather", "arguments": {PARIS}}}</tool_call>\n'
         f'<tool_call>{{"name": "now", "arguments": {{}}}}</tool_call>', "Checking.",
         [("get_weather", PARIS), ("now", "{}")]),
    ],
    "llama3_json": [
        (f'{{"name": "get_weather", "parameters": {PARIS}}}', None, [("get_weather", PARIS)]),
        (f'<|python_tag|>{{"name": "get_weather", "parameters": {PARIS}}}; {{"name": "now", "parameters": {{}}}}',
         None, [("get_weather", PARIS), ("now", "{}")]),
        (f'I will check. {{"name": "get_weather", "arguments": {ZURICH}}}', "I will check.", [("get_weather", ZURICH)]),
        ('{"name": "Alice", "age": 3} and {braces}', '{"name": "Alice", "age": 3} and {braces}', []),
        ('<|python_tag|>brave_search.call(query="x")', '<|python_tag|>brave_search.call(query="x")', []),
    ],
    "mistral": [
        (f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}, {{"name": "now", "arguments": {{}}}}]',
         None, [("get_weather", PARIS), ("now", "{}")]),
        (f'Sure. [TOOL_CALLS] [{{"name": "get_weather", "arguments": {ZURICH}, "id": "abcdefghi"}}]',
         "Sure.", [("get_weather", ZURICH)]),
        (f'[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS]now[ARGS]{{}}', None,
         [("get_weather", PARIS), ("now", "{}")]),
        ('[TOOL_CALLS] sorry, no', '[TOOL_CALLS] sorry, no', []),
    ],
    "qwen3_xml": [
        ('<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n'
         '</parameter>\n</function>\n</tool_call>', None, [("get_weather", PARIS)]),
        ('First.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork <b>\n</parameter>\n'
         '<parameter=metric>\nTrue\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n<parameter=unit>\nC\n'
         '</parameter>\n<parameter=days>\nsoon\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=now>\n'
         '</function>\n</tool_call>', "First.",
         [("get_weather", '{"city": "New\\nYork <b>", "metric": true, "hours": [1, 2], "unit": "C", "days": "soon"}'),
          ("now", "{}")]),
        ('<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</function>\n</tool_call>', None,
         [("get_weather", '{"city": "Rome"}')]),
        ('<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n3', None,
         [("get_weather", '{"city": "Rome"}')]),
        ('<tool_call>\nhello\n</tool_call>', '<tool_call>\nhello\n</tool_call>', []),
    ],
}
ALL_CASES = [(name, *case) for name, cases in CASES.items() for case in cases]


def summary(parsed) -> tuple:
    return parsed.content, [(call.name, call.arguments) for call in parsed.tool_calls]


def streamed(tool_format: ToolFormat, pieces: list[str]) -> list[Delta]:
    stream = tool_format.stream(TOOLS)
    deltas = [delta for piece in pieces for delta in stream.feed(piece)]
    return deltas + stream.finish()


@pytest.mark.parametrize("name, output, content, calls", ALL_CASES)
def test_parse(name, output, content, calls):
    parsed = TOOL_FORMATS[name]().parse(output, TOOLS)
    assert summary(parsed) == (content, calls)
    id_pattern = r"[A-Za-z0-9]{9}" if name == "mistral" else r"call_[A-Za-z0-9]{24}"
    assert all(re.fullmatch(id_pattern, call.id) for call in parsed.tool_calls)
    assert len({call.id for call in parsed.tool_calls}) == len(calls)


@pytest.mark.parametrize("name, output, content, calls", ALL_CASES)
def test_stream_one_character_at_a_time_equals_parse(name, output, content, calls):
    deltas = streamed(TOOL_FORMATS[name](), list(output))
    assert summary(collect(deltas)) == (content, calls)
    for delta in deltas:          # markup never reaches content: each piece is part of the content
        assert (delta.content is None) != (delta.tool_call is None)
        assert delta.content is None or delta.content in (content or "")


@pytest.mark.parametrize("name, output, content, calls", ALL_CASES)
def test_stream_split_anywhere_equals_parse(name, output, content, calls):
    for cut in range(len(output) + 1):
        for pieces in ([output[:cut], output[cut:]], [output[:cut], "", output[cut:cut + 3], output[cut + 3:]]):
            assert summary(collect(streamed(TOOL_FORMATS[name](), pieces))) == (content, calls)


def test_stream_deltas_have_openai_shape():
    output = f'Hi <tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>'
    stream = TOOL_FORMATS["hermes"]().stream(TOOLS)
    deltas = stream.feed(output[:30]) + stream.feed(output[30:60]) + stream.feed(output[60:]) + stream.finish()
    assert deltas[0] == Delta(content="Hi")
    first, *rest = [delta.tool_call.openai() for delta in deltas[1:]]
    assert first == {"index": 0, "id": first["id"], "type": "function",
                     "function": {"name": "get_weather", "arguments": first["function"]["arguments"]}}
    assert all(set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"} for piece in rest)
    assert first["function"]["arguments"] + "".join(piece["function"]["arguments"] for piece in rest) == PARIS


def test_held_text_is_released_when_it_turns_out_to_be_content():
    stream = TOOL_FORMATS["hermes"]().stream(TOOLS)
    assert stream.feed("Use <tool") == [Delta(content="Use")]
    assert stream.feed("_call>\n") == []              # an opener, its header undecided
    assert stream.feed("tags ") == [Delta(content=" <tool_call>\ntags")]
    assert stream.feed("") == []
    assert stream.finish() == [Delta(content=" ")]


@pytest.mark.parametrize("name", TOOL_FORMATS)
def test_tags_write_calls_the_format_parses(name):
    tool_format = choose_tool_format(None, name)
    tags = tool_format.tags(TOOLS)
    assert [tag.trigger for tag in tags] == [tool_format.trigger] * 2
    assert all(tag.begin.startswith(tag.trigger) for tag in tags)
    if name == "qwen3_xml":
        arguments, expected = "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n", PARIS
        assert tags[1].grammar == '%llguidance {}\nstart: ""\n' + 'text_value[suffix="\\n</parameter>\\n"]: /(?s:.*)/\n'
    else:
        arguments = expected = PARIS
        assert json.loads(tags[0].grammar) == TOOLS[0]["function"]["parameters"]
        assert tags[1].grammar == '{"type": "object"}'
    parsed = tool_format.parse(tags[0].begin + arguments + tags[0].end, TOOLS)
    assert summary(parsed) == (None, [("get_weather", expected)])


def test_hermes_tag_is_qwen25s_markup():
    assert TOOL_FORMATS["hermes"]().tags(TOOLS[1:]) == (ToolTag(
        "<tool_call>", '<tool_call>\n{"name": "now", "arguments": ', '{"type": "object"}', "}\n</tool_call>"),)


def test_mistral_tags_follow_the_template():
    assert MistralFormat(named=True).tags(TOOLS[1:])[0] == ToolTag(
        "[TOOL_CALLS]", "[TOOL_CALLS]now[ARGS]", '{"type": "object"}', "")
    assert MistralFormat().tags(TOOLS[1:])[0] == ToolTag(
        "[TOOL_CALLS]", '[TOOL_CALLS][{"name": "now", "arguments": ', '{"type": "object"}', "}]")


def test_qwen3_xml_tag_accepts_the_calls_it_describes():
    llguidance = pytest.importorskip("llguidance")
    from reprise.loader import load_model
    tokenizer = load_model(None).tokenizer
    vocabulary = llguidance.LLTokenizer(tokenizer.backend_json(), eos_token=sorted(tokenizer.eos_token_ids)[0])
    grammar = TOOL_FORMATS["qwen3_xml"]().tags(TOOLS)[0].grammar
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        return all(matcher.consume_token(t) for t in tokenizer.encode(text)) and matcher.is_accepting()

    assert accepts("<parameter=city>\nNew\nYork </b>\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
                   "<parameter=unit>\nF\n</parameter>\n")
    assert accepts("<parameter=city>\nParis\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n")
    assert not accepts("<parameter=days>\n3\n</parameter>\n")                                   # city is required
    assert not accepts("<parameter=city>\nParis\n</parameter>\n<parameter=days>\nsoon\n</parameter>\n")
    assert not accepts("<parameter=city>\nParis\n</parameter>\n<parameter=unit>\nK\n</parameter>\n")


QWEN25_TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "loader", "qwen25_template.jinja")


@pytest.mark.parametrize("template, name", [
    (open(QWEN25_TEMPLATE).read(), "hermes"),
    ("{% for m in messages %}<tool_call>\n<function={{ m.name }}>{% endfor %}{{ tools }}", "qwen3_xml"),
    ("<|start_header_id|>{% if tools %}Environment: ipython{% endif %}", "llama3_json"),
    ("{{ '<|python_tag|>' }}", "llama3_json"),
    ("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS][", "mistral"),
    ("<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>", "generic"),
    ("{{ tools }} in some format nobody knows", "generic"),
    (None, "generic"),
])
def test_format_chosen_from_template(template, name):
    assert choose_tool_format(template).name == name


def test_override_wins_and_mistral_form_comes_from_template():
    assert choose_tool_format("<tool_call>", "llama3_json").name == "llama3_json"
    assert choose_tool_format("[TOOL_CALLS]{{ name }}[ARGS]", None).named
    assert not choose_tool_format(None, "mistral").named
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'; known: hermes, llama3_json"):
        choose_tool_format(None, "nope")


FRAGMENTS = ["<tool_call>", "</tool_call>", "<function=now>", "</function>", "<parameter=city>", "</parameter>",
             "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", '{"name": "get_weather", ', '"arguments": ', '"parameters": ',
             "{", "}", "[", "]", '"', "\\", ",", ";", ":", " ", "\n", "Paris", "<", "now",
             *(output for cases in CASES.values() for output, _, _ in cases[:3])]


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(TOOL_FORMATS)), parts=st.lists(st.sampled_from(FRAGMENTS), max_size=24),
       cuts=st.lists(st.integers(0, 200), max_size=6))
def test_any_split_of_any_output_streams_to_its_parse(name, parts, cuts):
    output = "".join(parts)
    cuts = sorted({cut % (len(output) + 1) for cut in cuts})
    pieces = [output[start:end] for start, end in zip([0, *cuts], [*cuts, len(output)])]
    tool_format = TOOL_FORMATS[name]()
    assert summary(collect(streamed(tool_format, pieces))) == summary(tool_format.parse(output, TOOLS))
