"""xgrammar against llguidance on this CPU, with the default model's tokenizer.

    .venv/bin/python bench/grammar_engines.py OUT.json

Per engine: the vocabulary build, then for five specs (a tool's arguments, a pydantic schema
with nested objects, arrays, enums and an Optional, json_object, a regex, a choice) the compile
time (spec -> a matcher ready for its first mask) and the per-token cost of a mask while walking
a valid output token by token: fill the bitmask, consume the token; then applying a bitmask to
[1, vocab] and [8, vocab] float32 logits (one torch unpack shared by both engines, and
xgrammar's own CPU kernel). Last, which of a handful of harder schema features each compiles
and enforces (takes a valid instance, refuses an invalid one). Times are medians in
milliseconds. Prints a table; writes everything as JSON to OUT.json.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from enum import Enum

import llguidance
import llguidance.torch
import tokenizers
import torch
import xgrammar
from pydantic import BaseModel, Field

from reprise.loader import load_model

COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL = {"type": "object", "properties": {"location": {"type": "string"},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"]}


class Status(str, Enum):
    active = "active"
    retired = "retired"


class Address(BaseModel):
    street: str
    city: str
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str
    age: int
    status: Status
    tags: list[str]
    addresses: list[Address]
    nickname: str | None = None


CASES = {   # name -> (kind, spec, a valid output)
    "tool_args": ("json", TOOL, json.dumps({"location": "Paris, France", "unit": "celsius"})),
    "pydantic": ("json", Person.model_json_schema(), json.dumps(
        {"name": "Ada Lovelace", "age": 36, "status": "retired", "tags": ["math", "poetry"],
         "addresses": [{"street": "12 St James's Square", "city": "London", "zip": "12345"}], "nickname": None})),
    "json_object": ("json", {"type": "object"}, json.dumps({"id": 7, "ok": True, "items": [1.5, "two", None]})),
    "regex": ("regex", r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}", "2024-05-17T09:30"),
    "choice": ("choice", ["positive", "negative", "neutral"], "neutral"),
}
FEATURES = {   # name -> (schema, a valid instance, an invalid one), both as json.dumps writes them
    "$ref/$defs": ({"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
                    "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}, "required": ["a"]},
                   {"a": {"x": 1}}, {"a": {"x": "1"}}),
    "recursive $ref": ({"$defs": {"n": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/n"},
                                                                                          {"type": "null"}]}},
                                        "required": ["next"]}}, "$ref": "#/$defs/n"},
                       {"next": {"next": None}}, {"next": {"next": 1}}),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"s": {"type": "string"}},
                                                  "required": ["s"]}]}, {"s": "x"}, "x"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, "x", True),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
              {"a": 1, "b": True}, {"a": 1}),
    "pattern": ({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "ABC-12", "ABC-1"),
    "minLength/maxLength": ({"type": "string", "minLength": 3, "maxLength": 5}, "abcd", "ab"),
    "additionalProperties false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                    "additionalProperties": False}, {"a": 1}, {"a": 1, "b": 2}),
    "format date-time": ({"type": "string", "format": "date-time"}, "2024-05-17T09:30:00Z", "yesterday"),
    "format email": ({"type": "string", "format": "email"}, "ada@example.com", "ada.example.com"),
    "minimum/maximum": ({"type": "integer", "minimum": 10, "maximum": 20}, 15, 25),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [1, 2], [1]),
    "const": ({"const": "fixed"}, "fixed", "other"),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
}


def median_ms(run, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def allowed_ids(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return (((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab_size]).nonzero()[:, 0]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The sampler's apply: bit j of word i allows token 32 * i + j; (bit - 1) * 2**23 read as
    float32 is 0.0 or -inf, added to the logits without a branch."""
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten(1)
    logits.add_(bits.sub_(1).mul_(2 ** 23).view(torch.float32)[:, :logits.shape[1]])


class Llg:
    name = "llguidance"

    def __init__(self, tokenizer):
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend_json(), eos_token=sorted(tokenizer.eos_token_ids))

    @staticmethod
    def grammar(kind, spec):
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps({**spec, "x-guidance": COMPACT}))
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))

    def matcher(self, kind, spec):
        matcher = llguidance.LLMatcher(self.tokenizer, self.grammar(kind, spec), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    @staticmethod
    def fill(matcher, bitmask, row):
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, row)

    @staticmethod
    def consume(matcher, token_id):
        assert matcher.consume_token(token_id), matcher.get_error()


class Xgr:
    name = "xgrammar"

    def __init__(self, tokenizer):
        backend_json = tokenizer.backend_json()
        vocab = tokenizers.Tokenizer.from_str(backend_json).get_vocab(with_added_tokens=True)
        encoded = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
        metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(backend_json)
        self.info = xgrammar.TokenizerInfo(encoded, metadata["vocab_type"], vocab_size=tokenizer.vocab_size,
                                           stop_token_ids=sorted(tokenizer.eos_token_ids),
                                           add_prefix_space=metadata["add_prefix_space"])
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)

    def matcher(self, kind, spec):
        if kind == "json":
            compiled = self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False,
                                                         separators=(", ", ": "))
        elif kind == "regex":
            compiled = self.compiler.compile_regex(spec)
        else:
            compiled = self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec))
        return xgrammar.GrammarMatcher(compiled)

    @staticmethod
    def fill(matcher, bitmask, row):
        matcher.fill_next_token_bitmask(bitmask, row)

    @staticmethod
    def consume(matcher, token_id):
        assert matcher.accept_token(token_id)


def walk_ms(engine, kind, spec, token_ids, eos_id, batch: int, check: bool = False) -> float:
    """Per token: fill `batch` matchers' rows of one bitmask, consume the token in each; `check`
    (untimed use) asserts that every mask allows the token walked."""
    matchers = [engine.matcher(kind, spec) for _ in range(batch)]
    bitmask = torch.zeros((batch, (engine_vocab(engine) + 31) // 32), dtype=torch.int32)
    steps = [*token_ids, eos_id]
    start = time.perf_counter()
    for token_id in steps:
        for row, matcher in enumerate(matchers):
            engine.fill(matcher, bitmask, row)
            assert not check or token_id in allowed_ids(bitmask[row:row + 1], engine_vocab(engine)).tolist()
            engine.consume(matcher, token_id)
    return (time.perf_counter() - start) * 1e3 / len(steps)


def engine_vocab(engine) -> int:
    return engine.tokenizer.vocab_size if isinstance(engine, Llg) else engine.info.vocab_size


def measure_case(engine, tokenizer, kind, spec, sample) -> dict:
    token_ids = tokenizer.encode(sample)
    eos_id = min(tokenizer.eos_token_ids)
    walk_ms(engine, kind, spec, token_ids, eos_id, 1, check=True)
    return {"compile_ms": median_ms(lambda: engine.matcher(kind, spec)),
            "mask_ms_b1": statistics.median(walk_ms(engine, kind, spec, token_ids, eos_id, 1) for _ in range(3)),
            "mask_ms_b8": statistics.median(walk_ms(engine, kind, spec, token_ids, eos_id, 8) for _ in range(3)),
            "num_tokens": len(token_ids) + 1}


def apply_costs(vocab_size: int) -> dict:
    costs = {}
    for rows in (1, 8):
        logits = torch.randn(rows, vocab_size)
        bitmask = torch.randint(-2**31, 2**31 - 1, (rows, (vocab_size + 31) // 32), dtype=torch.int32)
        costs[f"torch_apply_ms_b{rows}"] = median_ms(lambda: apply_bitmask(logits.clone(), bitmask), 50)
        costs[f"xgrammar_apply_ms_b{rows}"] = median_ms(
            lambda: xgrammar.apply_token_bitmask_inplace(logits.clone(), bitmask, backend="cpu"), 50)
        costs[f"clone_ms_b{rows}"] = median_ms(lambda: logits.clone(), 50)
    return costs


def accepts(engine, kind, spec, text: str, tokenizer) -> bool:
    """Whether the matcher takes `text`'s tokens and then EOS."""
    matcher = engine.matcher(kind, spec)
    token_ids = [*tokenizer.encode(text), min(tokenizer.eos_token_ids)]
    accept = matcher.consume_token if isinstance(engine, Llg) else matcher.accept_token
    return all(accept(token_id) for token_id in token_ids)


def coverage(engine, tokenizer) -> dict:
    """Per feature: ok (valid instance taken, invalid one refused), or what went wrong."""
    results = {}
    for feature, (schema, valid, invalid) in FEATURES.items():
        try:
            takes_valid = accepts(engine, "json", schema, json.dumps(valid), tokenizer)
            takes_invalid = accepts(engine, "json", schema, json.dumps(invalid), tokenizer)
        except Exception as error:                                   # the engine's refusal is the result
            results[feature] = f"error: {str(error).splitlines()[0][:60]}"
            continue
        results[feature] = ("ok" if takes_valid and not takes_invalid else
                            "refuses a valid instance" if not takes_valid else "not enforced")
    return results


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    tokenizer = load_model(None).tokenizer
    report = {"vocab_size": tokenizer.vocab_size, "engines": {}, "apply": apply_costs(tokenizer.vocab_size)}
    for engine_cls in (Llg, Xgr):
        start = time.perf_counter()
        engine = engine_cls(tokenizer)
        entry = {"tokenizer_build_ms": (time.perf_counter() - start) * 1e3, "cases": {}}
        for name, (kind, spec, sample) in CASES.items():
            entry["cases"][name] = measure_case(engine, tokenizer, kind, spec, sample)
        entry["coverage"] = coverage(engine, tokenizer)
        report["engines"][engine.name] = entry
    print_table(report)
    with open(out_path, "w") as out:
        json.dump(report, out, indent=2)


def print_table(report: dict) -> None:
    engines = report["engines"]
    print(f"vocab {report['vocab_size']}; times in ms (median); token bN = fill N rows' masks + consume, per token")
    print("tokenizer build: " + ", ".join(f"{n} {e['tokenizer_build_ms']:.0f}" for n, e in engines.items()))
    print(f"{'case':<12}" + "".join(f"{n + ' ' + c:>24}" for n in engines for c in ("compile", "token b1", "token b8")))
    for case in CASES:
        print(f"{case:<12}" + "".join(f"{engines[n]['cases'][case][c]:>24.3f}"
                                      for n in engines for c in ("compile_ms", "mask_ms_b1", "mask_ms_b8")))
    print("apply: " + ", ".join(f"{k} {v:.3f}" for k, v in report["apply"].items()))
    for feature in FEATURES:
        print(f"{feature:<28}" + "".join(f"  {n}: {engines[n]['coverage'][feature]:<40}" for n in engines))


if __name__ == "__main__":
    main(sys.argv[1])
