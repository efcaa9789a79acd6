"""Constrained decoding with llguidance: a GuidedSpec becomes a grammar; each request gets a
Matcher that writes its row of a token bitmask and follows the tokens sampled.

JSON comes out in the form `json.dumps(value, ensure_ascii=False)` writes (`", "` and `": "`,
one line, properties in schema order, characters unescaped), so a tool call's arguments
re-rendered by the next turn's template are the very text generated, and the prefix cache hits.
Numbers are the exception: `1.50`, `1e5` or `-0` are valid JSON that json.dumps writes otherwise.
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark, is_lark_syntax

from reprise.chat.spec import GuidedSpec, ToolTag
from reprise.loader.tokenizer import Tokenizer

# json.dumps(value, ensure_ascii=False), as the chat layer writes JSON back: one line, its two
# separators, and strings with no \u escape (a character is written as itself; a control
# character json.dumps would escape as \u00XX cannot be written at all)
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                "json_allowed_escapes": 'nrbtf\\"'}
# a tool's schema often carries keywords no grammar enforces (uniqueItems, unknown formats):
# they are dropped rather than refused, the arguments are still JSON of the declared shape
TOOL_JSON = {**COMPACT_JSON, "lenient": True}


class GrammarError(ValueError):
    """A spec that cannot compile, or a token its grammar does not allow; the message says which."""


class Grammars:
    """Compiles GuidedSpecs for one tokenizer. Safe to share between threads: the server checks
    specs on its own, the engine builds matchers on its own.

    The vocabulary is built from tokenizer.json on first use (~0.2 s for 49k tokens). Compiled
    grammars are kept by spec, least recently used first out, so a spec checked at request time
    costs nothing more when the engine admits it; a refused spec is remembered too.
    """

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 256):
        self._tokenizer = tokenizer
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._vocabulary: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._compiled: OrderedDict[GuidedSpec, llguidance.LLMatcher | GrammarError] = OrderedDict()

    @property
    def vocab_size(self) -> int:
        """Tokens a mask covers: a bitmask row holds ceil(vocab_size / 32) int32 words."""
        return self._build().vocab_size

    def check(self, spec: GuidedSpec) -> None:
        """Raises GrammarError when `spec` cannot compile."""
        self._pristine(spec)

    def matcher(self, spec: GuidedSpec) -> Matcher:
        """A new Matcher at the start of `spec`'s grammar. Raises GrammarError as `check` does."""
        pristine = self._pristine(spec)
        with self._lock:
            return Matcher(pristine.deep_copy())

    def fill(self, matchers: Sequence[Matcher], bitmask: torch.Tensor) -> None:
        """Row i of `bitmask` (int32, CPU, contiguous, [len(matchers), words]) gets matchers[i]'s
        mask, the rows computed in parallel when there are several."""
        if len(matchers) == 1:
            matchers[0].fill(bitmask, 0)
            return
        assert bitmask.is_contiguous() and bitmask.dtype == torch.int32 and bitmask.shape[0] == len(matchers)
        self._build()
        self._executor.unsafe_compute_mask_ptr([(m._matcher, row) for row, m in enumerate(matchers)],
                                               bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])

    def _build(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._vocabulary is None:
                self._vocabulary = llguidance.LLTokenizer(self._tokenizer.backend_json(),
                                                          eos_token=sorted(self._tokenizer.eos_token_ids))
                self._executor = llguidance.LLExecutor(max(1, min(8, os.cpu_count() or 1)))
            return self._vocabulary

    def _pristine(self, spec: GuidedSpec) -> llguidance.LLMatcher:
        """The compiled grammar at its start, never advanced: matchers are copies of it."""
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is not None:
                self._compiled.move_to_end(spec)
        if compiled is None:       # compiled outside the lock: a large grammar takes a while
            compiled = self._compile(spec)
            with self._lock:
                self._compiled[spec] = compiled
                if len(self._compiled) > self._cache_size:
                    self._compiled.popitem(last=False)
        if isinstance(compiled, GrammarError):
            raise compiled
        return compiled

    def _compile(self, spec: GuidedSpec) -> llguidance.LLMatcher | GrammarError:
        vocabulary = self._build()
        try:
            grammar = to_llguidance(spec, self._tokenizer)
        except GrammarError as error:
            return error
        except ValueError as error:            # llguidance's own refusal of a malformed input
            return GrammarError(f"invalid {_kind(spec)}: {_first_line(str(error))}")
        matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        if matcher.is_error():
            return GrammarError(f"invalid {_kind(spec)}: {_compile_message(matcher.get_error())}")
        return matcher


class Matcher:
    """One request's position in its grammar. Used by one thread at a time (the engine's).

    Once the grammar is complete (`is_finished`) the mask allows only the EOS tokens, and
    accepting one of them keeps it finished.
    """

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into `bitmask[row]` (int32 CPU words, bit j of word i =
        token 32 * i + j allowed)."""
        target = bitmask[row]
        assert target.is_contiguous() and target.dtype == torch.int32 and not target.is_cuda
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def accept(self, token_id: int) -> None:
        """Advances past `token_id`; GrammarError if the grammar does not allow it."""
        if not self._matcher.consume_token(token_id) or self._matcher.is_error():
            raise GrammarError(f"token {token_id} not allowed: {_first_line(self._matcher.get_error())}")

    def rollback(self, num_tokens: int) -> None:
        """Forgets the last `num_tokens` accepted tokens."""
        if num_tokens and not self._matcher.rollback(num_tokens):
            raise GrammarError(f"cannot roll back {num_tokens} tokens: {_first_line(self._matcher.get_error())}")

    @property
    def is_finished(self) -> bool:
        """The grammar is complete: only EOS may follow."""
        return self._matcher.is_stopped()


def to_llguidance(spec: GuidedSpec, tokenizer: Tokenizer) -> str:
    """The llguidance grammar (JSON text) for `spec`; GrammarError for what is malformed up front."""
    if spec.json_schema is not None:
        return llguidance.LLMatcher.grammar_from_json_schema(_schema(spec.json_schema), overrides=COMPACT_JSON)
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        if not spec.choice:
            raise GrammarError("invalid choice: the list is empty")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(map(_quote, spec.choice)))
    if spec.grammar is not None:
        return llguidance.LLMatcher.grammar_from_lark(_lark(spec.grammar))
    return _tool_calls(spec, tokenizer)


def _schema(text: str, options: dict | None = None) -> dict:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise GrammarError(f"invalid json_schema: not JSON ({error})") from None
    if not isinstance(schema, dict):
        raise GrammarError("invalid json_schema: a schema is a JSON object")
    schema = _closed(schema)
    return {**schema, "x-guidance": options} if options else schema


_SCHEMA_KEYS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LIST_KEYS = ("anyOf", "oneOf", "prefixItems")


def _closed(schema):
    """`schema` with `additionalProperties: false` on each object that names its properties and
    says nothing of others (OpenAI's strict mode spells it out): the model then writes no key the
    schema does not name, and the output still validates. allOf members stay open: closed, they
    would refuse each other's properties."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SCHEMA_KEYS:
        if key in schema:
            closed[key] = [_closed(s) for s in schema[key]] if isinstance(schema[key], list) else _closed(schema[key])
    for key in _SCHEMA_MAP_KEYS:
        if isinstance(schema.get(key), dict):
            closed[key] = {name: _closed(s) for name, s in schema[key].items()}
    for key in _SCHEMA_LIST_KEYS:
        if isinstance(schema.get(key), list):
            closed[key] = [_closed(s) for s in schema[key]]
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def _lark(grammar: str) -> str:
    """Lark text as is; GBNF (llama.cpp's: rules written `::=`, no Lark `start:` rule) converted."""
    if "::=" not in grammar or is_lark_syntax(grammar):
        return grammar
    try:
        return gbnf_to_lark(grammar)
    except Exception as error:                 # the converter raises its own and plain exceptions
        raise GrammarError(f"invalid grammar (GBNF): {error}") from None


def _tool_calls(spec: GuidedSpec, tokenizer: Tokenizer) -> str:
    """Lark for tool calls. Required: one call (or several, each after a "\\n" or nothing) and
    nothing else. Otherwise free text in which a trigger opens a call that must complete (a lazy
    lexeme, or the special token itself when the trigger is one); without parallel calls at
    most one, after which the text may not hold a trigger again."""
    tags = spec.tool_calls
    if not tags:
        raise GrammarError("invalid tool_calls: no tools")
    side: list[dict] = []
    bodies = [_tag_body(tag, index, tokenizer, side) for index, tag in enumerate(tags)]
    lines = ["%llguidance {}"]
    if spec.tool_calls_required:
        lines.append("call: " + " | ".join(f"{_literal(tag.begin, tokenizer)} {body}"
                                            for tag, body in zip(tags, bodies)))
        lines.append('start: call ("\\n"? call)*' if spec.parallel_tool_calls else "start: call")
    else:
        triggers = list(dict.fromkeys(tag.trigger for tag in tags))
        for index, trigger in enumerate(triggers):
            opened = [f"{_literal(tag.begin[len(trigger):], tokenizer)} {body}"
                      for tag, body in zip(tags, bodies) if tag.trigger == trigger]
            special = _special_id(trigger, tokenizer)
            head = f"TEXT <[{special}]>" if special is not None else f"trigger_{index}"
            if special is None:
                lines.append(f"trigger_{index}[lazy]: TEXT {_quote(trigger)}")
            lines.append(f"call_{index}: {head} ({' | '.join(opened)})")
        calls = " | ".join(f"call_{index}" for index in range(len(triggers)))
        lines.append("TEXT: /(.|\\n)*/")
        if spec.parallel_tool_calls:
            lines.append(f"start: ({calls})* TEXT")
        else:
            forbidden = "|".join(_regex_escape(t) for t in triggers if _special_id(t, tokenizer) is None)
            lines.append(f"REST: /(.|\\n)*/ & ~/(?s:.*)({forbidden})(?s:.*)/" if forbidden else "REST: TEXT")
            lines.append(f"start: TEXT | ({calls}) REST")
    lark = "\n".join(lines) + "\n"
    return json.dumps({"grammars": [{"lark_grammar": lark}, *side]})


def _tag_body(tag: ToolTag, index: int, tokenizer: Tokenizer, side: list[dict]) -> str:
    """The arguments and the end of one tag, in Lark; a Lark argument grammar goes to `side`."""
    if not tag.begin.startswith(tag.trigger) or not tag.trigger:
        raise GrammarError(f"invalid tool_calls: begin {tag.begin!r} does not start with trigger {tag.trigger!r}")
    if tag.grammar.lstrip().startswith("{"):
        arguments = "%json " + json.dumps(_schema(tag.grammar, TOOL_JSON))
    else:
        side.append({"name": f"arguments_{index}", "lark_grammar": _lark(tag.grammar)})
        arguments = f"@arguments_{index}"
    return f"{arguments} {_literal(tag.end, tokenizer)}"


def _literal(text: str, tokenizer: Tokenizer) -> str:
    """`text` in Lark: quoted strings, with its special tokens (`<|python_tag|>`) as token references."""
    parts, start = [], 0
    for token_id in tokenizer.encode(text):
        if tokenizer.is_special(token_id):
            content = tokenizer.decode([token_id])
            at = text.index(content, start)
            if at > start:
                parts.append(_quote(text[start:at]))
            parts.append(f"<[{token_id}]>")
            start = at + len(content)
    if start < len(text):
        parts.append(_quote(text[start:]))
    return " ".join(parts)


def _special_id(text: str, tokenizer: Tokenizer) -> int | None:
    ids = tokenizer.encode(text)
    return ids[0] if len(ids) == 1 and tokenizer.is_special(ids[0]) else None


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _regex_escape(text: str) -> str:
    """`text` as a literal in llguidance's (Rust) regex syntax, inside /.../."""
    return "".join(f"\\{c}" if c in "\\.+*?()|[]{}^$#&-~/" else c for c in text)


def _kind(spec: GuidedSpec) -> str:
    for name in ("json_schema", "regex", "choice", "grammar"):
        if getattr(spec, name) is not None:
            return name
    return "tool_calls"


def _compile_message(message: str) -> str:
    """llguidance's compile error on one line, without its source excerpts and caret lines."""
    lines = [line.strip() for line in message.splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("^") and not re.match(r"\d+ \|", line))


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"
