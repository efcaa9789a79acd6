"""Constrained decoding with the default model's tokenizer and no weights: a deterministic "model"
walks each grammar's masks to EOS, and the text it writes parses, validates and is compact JSON."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from reprise.chat.grammar import Grammars, GrammarError
from reprise.chat.spec import GuidedSpec, ToolTag

WEATHER = {"type": "object", "properties": {"location": {"type": "string"},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["location", "unit"]}
PERSON = {  # as pydantic writes it: $defs, $ref, an enum, nested arrays, an Optional (anyOf with null)
    "$defs": {"Address": {"properties": {"street": {"type": "string"},
                                         "zip": {"pattern": "^[0-9]{5}$", "type": "string"}},
                          "required": ["street", "zip"], "type": "object"},
              "Status": {"enum": ["active", "retired"], "type": "string"}},
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                   "status": {"$ref": "#/$defs/Status"}, "tags": {"items": {"type": "string"}, "type": "array"},
                   "addresses": {"items": {"$ref": "#/$defs/Address"}, "type": "array"},
                   "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}},
    "required": ["name", "age", "status", "tags", "addresses"], "type": "object"}
HERMES = "<tool_call>"


def hermes(name: str, schema: dict) -> ToolTag:
    return ToolTag(HERMES, f'{HERMES}\n{{"name": "{name}", "arguments": ', json.dumps(schema), "}\n</tool_call>")


TOOLS = (hermes("get_weather", WEATHER),
         hermes("get_time", {"type": "object", "properties": {"zone": {"type": "string"}}}))


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


def allowed_ids(grammars: Grammars, matcher) -> list[int]:
    bitmask = torch.zeros((1, (grammars.vocab_size + 31) // 32), dtype=torch.int32)
    matcher.fill(bitmask, 0)
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:grammars.vocab_size].nonzero()[:, 0].tolist()


def generate(grammars, tokenizer, spec: GuidedSpec, script: str = "", seed: int | None = None,
             max_tokens: int = 400) -> str:
    """A deterministic model: the script's next token while the mask allows it; then EOS as soon as
    it is allowed; else (seeded) a random allowed token, or the first allowed of `"` `]` `}` `,`
    `1` `a`, else the lowest allowed id. Asserts the walk ends with EOS as the only choice."""
    matcher, rng = grammars.matcher(spec), random.Random(seed)
    scripted = tokenizer.encode(script)
    preferred = [tokenizer.encode(text)[0] for text in ('"', "]", "}", ",", "1", "a")]
    eos, token_ids = tokenizer.eos_token_ids, []
    for _ in range(max_tokens):
        allowed = allowed_ids(grammars, matcher)
        if scripted and scripted[0] in allowed:
            token_id = scripted.pop(0)
        elif set(allowed) & eos:
            eos_id = min(set(allowed) & eos)
            matcher.accept(eos_id)
            assert matcher.is_finished and allowed_ids(grammars, matcher) == sorted(eos)
            return tokenizer.decode(token_ids)
        elif seed is not None and rng.random() > 0.3:
            token_id = rng.choice(allowed)
        else:
            token_id = next((p for p in preferred if p in allowed), allowed[0])
        matcher.accept(token_id)
        token_ids.append(token_id)
    raise AssertionError(f"no EOS after {max_tokens} tokens: {tokenizer.decode(token_ids)!r}")


def assert_compact(text: str) -> None:
    assert json.dumps(json.loads(text), ensure_ascii=False) == text


@pytest.mark.parametrize("schema", [WEATHER, PERSON], ids=["tool_arguments", "pydantic"])
def test_json_schema_output_validates_and_is_compact(grammars, tokenizer, schema):
    text = generate(grammars, tokenizer, GuidedSpec(json_schema=json.dumps(schema)))
    jsonschema.validate(json.loads(text), schema)
    assert_compact(text)


def test_json_follows_a_written_output_in_compact_form_only(grammars, tokenizer):
    person = {"name": "Ada", "age": 36, "status": "retired", "tags": ["math"],
              "addresses": [{"street": "St James's Square", "zip": "12345"}], "nickname": None}
    spec = GuidedSpec(json_schema=json.dumps(PERSON))
    assert generate(grammars, tokenizer, spec, script=json.dumps(person)) == json.dumps(person)
    spaced = generate(grammars, tokenizer, spec, script=json.dumps(person, indent=1))
    assert spaced != json.dumps(person, indent=1)          # the newline after "{" is refused
    jsonschema.validate(json.loads(spaced), PERSON)


def test_strings_are_written_as_json_dumps_writes_them(grammars, tokenizer):
    spec = GuidedSpec(json_schema='{"type": "object", "properties": {"s": {"type": "string"}}}')
    plain = '{"s": "café \\n \\" \\\\ x/y"}'
    assert generate(grammars, tokenizer, spec, script=plain) == plain
    assert_compact(plain)
    for escaped in ('{"s": "caf\\u00e9"}', '{"s": "a\\/b"}'):      # valid JSON, but not json.dumps's
        with pytest.raises(GrammarError, match="not allowed"):
            matcher = grammars.matcher(spec)
            for token_id in tokenizer.encode(escaped):
                matcher.accept(token_id)


def test_objects_with_named_properties_take_no_other_keys(grammars, tokenizer):
    extra = '{"location": "Paris", "unit": "celsius", "extra": 1}'
    assert generate(grammars, tokenizer, GuidedSpec(json_schema=json.dumps(WEATHER)), script=extra) == extra[:-13] + "}"
    opened = {**WEATHER, "additionalProperties": True}
    assert generate(grammars, tokenizer, GuidedSpec(json_schema=json.dumps(opened)), script=extra) == extra
    anything = '{"a": [1, {"b": null}], "properties": {"c": "d"}}'
    assert generate(grammars, tokenizer, GuidedSpec(json_schema='{"type": "object"}'), script=anything) == anything
    named = {"type": "object", "properties": {"properties": {"type": "object"}}}       # a key named "properties"
    nested = '{"properties": {"c": "d"}}'
    assert generate(grammars, tokenizer, GuidedSpec(json_schema=json.dumps(named)), script=nested) == nested
    both = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                      {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]}
    assert generate(grammars, tokenizer, GuidedSpec(json_schema=json.dumps(both)), script='{"a": 1, "b": true}') \
        == '{"a": 1, "b": true}'


@pytest.mark.parametrize("seed", range(4))
def test_random_walks_validate(grammars, tokenizer, seed):
    for schema in (PERSON, {"type": "object"}):
        text = generate(grammars, tokenizer, GuidedSpec(json_schema=json.dumps(schema)), seed=seed)
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert isinstance(value, dict)


def test_regex_output_fullmatches(grammars, tokenizer):
    regex = r"[0-9]{4}-(0[1-9]|1[0-2])-[0-9]{2}( [A-Z][a-z]+)?"
    for seed in (None, 0, 1, 2):
        assert re.fullmatch(regex, generate(grammars, tokenizer, GuidedSpec(regex=regex), seed=seed))
    assert generate(grammars, tokenizer, GuidedSpec(regex=regex), script="2024-05-17 Friday") == "2024-05-17 Friday"


def test_choice_output_is_one_of_the_choices(grammars, tokenizer):
    choices = ("positive", "negative", "neutral", 'say "hi"\n')
    spec = GuidedSpec(choice=choices)
    for seed in (None, 0, 1, 2, 3):
        assert generate(grammars, tokenizer, spec, seed=seed) in choices
    assert [generate(grammars, tokenizer, spec, script=c) for c in choices] == list(choices)


def test_lark_and_gbnf_grammars(grammars, tokenizer):
    lark = 'start: "Answer: " NUMBER " " UNIT\nNUMBER: /[1-9][0-9]{0,2}/\nUNIT: "kg" | "lb" | "::="'
    gbnf = 'root ::= "Answer: " number " " unit\nnumber ::= [1-9] [0-9]?\nunit ::= "kg" | "lb"'
    for grammar, pattern in ((lark, r"Answer: [1-9][0-9]{0,2} (kg|lb|::=)"), (gbnf, r"Answer: [1-9][0-9]? (kg|lb)")):
        for seed in (None, 0, 1):
            assert re.fullmatch(pattern, generate(grammars, tokenizer, GuidedSpec(grammar=grammar), seed=seed))


CALL = re.compile(r'<tool_call>\n\{"name": "(\w+)", "arguments": (.*?)\}\n</tool_call>')


def parse_hermes(text: str) -> list[tuple[str, str]]:
    """(name, arguments text) of each call, asserting the text holds nothing else but newlines."""
    assert CALL.sub("", text).strip("\n") == ""
    return CALL.findall(text)


def test_required_single_call_is_begin_json_end(grammars, tokenizer):
    spec = GuidedSpec(tool_calls=TOOLS, tool_calls_required=True, parallel_tool_calls=False)
    for seed in (None, 0, 1, 2):
        text = generate(grammars, tokenizer, spec, seed=seed)
        tag = next(t for t in TOOLS if text.startswith(t.begin))
        arguments = text[len(tag.begin):len(text) - len(tag.end)]
        assert text == tag.begin + arguments + tag.end
        jsonschema.validate(json.loads(arguments), json.loads(tag.grammar))
        assert_compact(arguments)
    two = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n<tool_call>'
    assert generate(grammars, tokenizer, spec, script=two) == two[:-len("\n<tool_call>")]    # exactly one


def test_required_parallel_calls_are_separated_by_a_newline_or_nothing(grammars, tokenizer):
    spec = GuidedSpec(tool_calls=TOOLS, tool_calls_required=True)
    first = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    second = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}\n</tool_call>'
    for separator in ("\n", ""):
        text = generate(grammars, tokenizer, spec, script=first + separator + second)
        assert text == first + separator + second
        assert [name for name, _ in parse_hermes(text)] == ["get_time", "get_weather"]
    assert generate(grammars, tokenizer, spec, script=first + " " + second) == first     # a space is no separator
    matcher = grammars.matcher(spec)
    first_ids = allowed_ids(grammars, matcher)                    # no text before the first call
    assert all(TOOLS[0].begin.startswith(tokenizer.decode([i])) for i in first_ids)


def test_free_text_trigger_opens_a_call_that_must_complete(grammars, tokenizer):
    spec = GuidedSpec(tool_calls=TOOLS)
    prose = "I will look that up. "
    text = generate(grammars, tokenizer, spec, script=prose + '<tool_call>\n{"name": "get_weather", "arguments": {"loc')
    assert text.startswith(prose)
    [(name, arguments)] = parse_hermes(text[len(prose):])
    jsonschema.validate(json.loads(arguments), WEATHER)
    assert name == "get_weather"
    prose = "No tools needed < tool_call >."
    assert generate(grammars, tokenizer, spec, script=prose) == prose
    with pytest.raises(GrammarError, match="not allowed"):        # a call opened must be one of the tools
        matcher = grammars.matcher(spec)
        for token_id in tokenizer.encode('Hi <tool_call>\n{"name": "rm_rf"'):
            matcher.accept(token_id)


def test_free_text_parallel_calls_and_text_between(grammars, tokenizer):
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    script = f"First {call} then {call} done."
    assert generate(grammars, tokenizer, GuidedSpec(tool_calls=TOOLS), script=script) == script
    single = generate(grammars, tokenizer, GuidedSpec(tool_calls=TOOLS, parallel_tool_calls=False), script=script)
    assert single.startswith(f"First {call} then ") and single.count("<tool_call>") == 1    # no second trigger


def test_special_token_trigger_is_the_token_itself(grammars, tokenizer):
    special = "<file_sep>"                 # a special token of this vocabulary (id 5)
    [special_id] = tokenizer.encode(special)
    tag = ToolTag(special, special + '{"name": "f", "arguments": ', json.dumps(WEATHER), "}")
    required = grammars.matcher(GuidedSpec(tool_calls=(tag,), tool_calls_required=True))
    assert allowed_ids(grammars, required) == [special_id]
    free = grammars.matcher(GuidedSpec(tool_calls=(tag,)))
    assert special_id in allowed_ids(grammars, free)
    text = generate(grammars, tokenizer, GuidedSpec(tool_calls=(tag,)), script="Calling " + special)
    assert text.startswith('Calling <file_sep>{"name": "f", "arguments": {"location": ') and text.endswith("}}")
    jsonschema.validate(json.loads(text[len('Calling <file_sep>{"name": "f", "arguments": '):-1]), WEATHER)


def test_lark_tool_arguments(grammars, tokenizer):
    tag = ToolTag("<function", "<function=add>", 'start: NUM "," NUM\nNUM: /[0-9]{1,3}/', "</function>")
    text = generate(grammars, tokenizer, GuidedSpec(tool_calls=(tag,), tool_calls_required=True), seed=0)
    assert re.fullmatch(r"<function=add>[0-9]{1,3},[0-9]{1,3}</function>", text)


@pytest.mark.parametrize("spec, message", [
    (GuidedSpec(json_schema='{"type": "object",'), "json_schema: not JSON"),
    (GuidedSpec(json_schema='[1]'), "a schema is a JSON object"),
    (GuidedSpec(json_schema='{"properties": {"a": {"$ref": "#/$defs/missing"}}}'), "missing"),
    (GuidedSpec(json_schema='{"type": "array", "uniqueItems": true}'), "uniqueItems"),
    (GuidedSpec(regex="(a|b"), "unclosed group"),
    (GuidedSpec(regex="(?=a)a"), "invalid regex"),
    (GuidedSpec(choice=()), "empty"),
    (GuidedSpec(grammar="start: foo"), "unknown name"),
    (GuidedSpec(grammar='root ::= ("a" | "b"'), "invalid grammar"),
    (GuidedSpec(tool_calls=(ToolTag("<x>", "<y>", "{}", ""),)), "does not start with trigger"),
    (GuidedSpec(tool_calls=(hermes("f", {"properties": {"a": {"$ref": "#/nowhere"}}}),)), "nowhere"),
])
def test_bad_spec_raises_grammar_error_naming_the_problem(grammars, spec, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        grammars.check(spec)
    with pytest.raises(GrammarError, match=re.escape(message)):        # remembered, still refused
        grammars.matcher(spec)


def test_rollback_restores_the_mask(grammars, tokenizer):
    matcher = grammars.matcher(GuidedSpec(json_schema=json.dumps(WEATHER)))
    start = allowed_ids(grammars, matcher)
    token_ids = tokenizer.encode('{"location": "Paris", "unit": "celsius"}')
    for token_id in token_ids:
        matcher.accept(token_id)
    assert allowed_ids(grammars, matcher) == sorted(tokenizer.eos_token_ids) and matcher.is_finished
    matcher.rollback(len(token_ids))
    assert allowed_ids(grammars, matcher) == start and not matcher.is_finished


def test_disallowed_token_raises(grammars, tokenizer):
    matcher = grammars.matcher(GuidedSpec(regex="[0-9]+"))
    with pytest.raises(GrammarError, match="not allowed"):
        matcher.accept(tokenizer.encode("x")[0])


def test_batched_fill_equals_one_row_at_a_time(grammars, tokenizer):
    specs = [GuidedSpec(json_schema=json.dumps(WEATHER)), GuidedSpec(regex="[a-z]+"), GuidedSpec(choice=("yes", "no"))]
    matchers = [grammars.matcher(spec) for spec in specs]
    matchers[0].accept(tokenizer.encode("{")[0])
    words = (grammars.vocab_size + 31) // 32
    together, alone = torch.zeros((3, words), dtype=torch.int32), torch.zeros((3, words), dtype=torch.int32)
    grammars.fill(matchers, together)
    for row, matcher in enumerate(matchers):
        matcher.fill(alone, row)
    assert torch.equal(together, alone) and together.any(dim=1).all()


def test_compiled_grammars_are_kept_least_recently_used_first_out(tokenizer):
    grammars = Grammars(tokenizer, cache_size=2)
    a, b, c = (GuidedSpec(regex=r) for r in ("a+", "b+", "c+"))
    for spec in (a, b, a, c):
        grammars.check(spec)
    assert list(grammars._compiled) == [a, c]
