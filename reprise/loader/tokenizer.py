"""Tokenizer: the model's own vocabulary (tokenizers, the Rust library) and chat template (jinja2).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache

import gguf
import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from reprise.loader.errors import LoadError
from reprise.loader.gguf import read_field
from reprise.loader.hf import hf_tokenizer_parts

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4     # llama.cpp's tokenizer.ggml.token_type values

# How text is split before BPE, by `tokenizer.ggml.pre`: the regex the vocabulary's merges were
# learned with (transformers' GGUF loader uses the same table). Anything else, "smollm"
# included, gets GPT-2's regex. llama.cpp also splits digits one by one for "smollm"; SmolLM's
# vocabulary has no multi-digit token and no merge with a digit, so that changes nothing.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
# llama.cpp (and Llama 3's tokenizer.json) take a pre-token that is itself in the vocabulary whole
_IGNORE_MERGES = frozenset(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"))


class Tokenizer:
    """Text <-> ids for one model, and its chat template rendered the way transformers renders it.

    `encode` never adds BOS/EOS unless `add_special_tokens` (then only what the model's own
    tokenizer adds); special tokens written in the text (`<|im_start|>`) become their single ids.
    """

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: dict[str, str],
                 eos_token_ids: Iterable[int] = (), chat_template: str | None = None):
        """`special_tokens` maps bos_token/eos_token/unk_token/pad_token to their text, as templates see them.

        `eos_token_ids` are the model's stop ids (generation config, end-of-turn tokens); the
        eos_token's id is always among them.
        """
        self._backend = backend
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.bos_token_id = self._id_of(self.special_tokens.get("bos_token"))
        eos_id = self._id_of(self.special_tokens.get("eos_token"))
        self.eos_token_ids = frozenset(eos_token_ids) | ({eos_id} if eos_id is not None else frozenset())
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader, path: str) -> Tokenizer:
        """From GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), as transformers builds it.

        `tokenizer.ggml.model` gpt2 is byte-level BPE; llama is SentencePiece BPE with byte fallback
        (Llama 2, Mistral v0.1, Gemma), which adds BOS unless the file says otherwise.
        """
        def field(name, default=None):
            return read_field(reader, f"tokenizer.{name}", path, default)

        kind = field("ggml.model")
        if kind not in ("gpt2", "llama"):
            raise LoadError(f"unsupported GGUF tokenizer model {kind!r} in {path} (supported: gpt2, llama)")
        tokens = field("ggml.tokens")
        token_types = field("ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        if kind == "gpt2":
            backend = byte_level_bpe(tokens, field("ggml.merges", []), token_types, field("ggml.pre", "default"))
        else:
            arch = read_field(reader, "general.architecture", path)
            unknown_id = field("ggml.unknown_token_id")
            backend = sentencepiece_bpe(tokens, field("ggml.scores") or [0.0] * len(tokens), token_types,
                                        arch.startswith("gemma"), field("ggml.add_space_prefix", True),
                                        tokens[unknown_id] if unknown_id is not None else None)
        ids = {name: field(f"ggml.{key}_token_id") for name, key in
               (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))}
        special_tokens = {name: tokens[i] for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}
        if field("ggml.add_bos_token", kind == "llama") and "bos_token" in special_tokens:
            bos = special_tokens["bos_token"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, ids["bos_token"])])
        eos_ids = [field(f"ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
        return cls(backend, special_tokens, [i for i in eos_ids if i is not None], field("chat_template"))

    @classmethod
    def from_hf_dir(cls, path: str, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """From `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` in a model directory."""
        backend, special_tokens, chat_template = hf_tokenizer_parts(path)
        return cls(backend, special_tokens, eos_token_ids, chat_template)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # encode_batch releases the GIL while it works, encode holds it (~3 us a token): a long prompt
        # tokenized in a server worker thread then stalls neither the event loop nor the engine thread
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def backend_json(self) -> str:
        """The Rust tokenizer as tokenizer.json text (what grammar engines build their vocabulary from)."""
        return self._backend.to_str()

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, template: str | None = None, **kwargs) -> str:
        """The prompt text for `messages`, as transformers' apply_chat_template(tokenize=False) renders it.

        `kwargs` reach the template (tools=[...], enable_thinking=False, ...) and override the
        special tokens. Keys whose value is None are dropped from messages first, as transformers
        does (OpenAI clients send content=None next to tool_calls). `continue_final_message` ends
        the text right after the last message's content, so the model continues it (assistant
        prefill). `template` replaces the model's own. ValueError without a template.
        """
        template = template or self.chat_template
        if template is None:
            raise ValueError("this model has no chat template; send a plain prompt to /v1/completions instead")
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        tools = kwargs.pop("tools", None)
        documents = kwargs.pop("documents", None)
        rendered = _compile(template).render(
            messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs})
        return _continued(rendered, messages[-1].get("content")) if continue_final_message else rendered

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)


def _continued(rendered: str, final: str | None) -> str:
    """`rendered` cut right after the final message's content, as transformers cuts it."""
    if not isinstance(final, str) or not final.strip() or final.strip() not in rendered:
        raise ValueError("continue_final_message needs a final message whose text the template renders")
    kept = final if final in rendered else final.strip()
    return rendered[:rendered.rindex(kept) + len(kept)]


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """The environment transformers gives chat templates: sandboxed, trimmed blocks, its tojson."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env.from_string(template)


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], pre: str) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer from llama.cpp's vocabulary arrays.

    Control tokens become special added tokens and user-defined ones (like `<think>`) plain added
    tokens, so both match whole in text. A token spelled outside the byte alphabet (raw text)
    is respelled in it; a control token spelled that way is a llama.cpp mislabel and is skipped.
    """
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    vocab = {token if set(token) <= letters else "".join(alphabet[b] for b in token.encode()): index
             for index, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(
        vocab, [tuple(merge.split(" ", 1)) for merge in merges], fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES))
    if pre in _PRE_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    kinds = list(zip(tokens, token_types))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, kind in kinds
                                if kind == TOKEN_CONTROL and set(t) <= letters])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in kinds
                        if kind == TOKEN_USER_DEFINED and t in vocab])
    return backend


def sentencepiece_bpe(tokens: list[str], scores: list[float], token_types: list[int], gemma: bool,
                      add_space_prefix: bool, unknown: str | None) -> tokenizers.Tokenizer:
    """SentencePiece BPE with byte fallback from llama.cpp's arrays, as transformers rebuilds it.

    The file has no merges: they are recovered from the vocabulary (every split of a token into two
    tokens), ranked by the token's score, or for Gemma by its position (Gemma's scores do not follow
    its merge order). Llama marks spaces with Metaspace ("▁", a prefix on the first piece only);
    Gemma replaces spaces and adds no prefix, and spells its runs of spaces as real spaces in GGUF.
    """
    if gemma:
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    ranks = {t: -i for i, t in enumerate(tokens)} if gemma else dict(zip(tokens, scores))
    backend = tokenizers.Tokenizer(models.BPE(vocab, _recovered_merges(vocab, ranks), fuse_unk=True,
                                              byte_fallback=True, unk_token=unknown if gemma else None))
    space = decoders.Replace("\u2581", " ")
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([space, decoders.ByteFallback(), decoders.Fuse()])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
        strip = [decoders.Strip(content=" ", left=1)] if add_space_prefix else []
        backend.decoder = decoders.Sequence([space, decoders.ByteFallback(), decoders.Fuse(), *strip])
    kinds = list(zip(tokens, token_types))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, kind in kinds
                                if kind == TOKEN_CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in kinds
                        if kind == TOKEN_USER_DEFINED])
    return backend


def _recovered_merges(vocab: dict[str, int], ranks: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary: each split of a token into two tokens, best-ranked token first,
    ties broken by the pieces' lengths (transformers' generate_merges)."""
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(pairs, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    merges.sort(key=lambda pair: (pair[2], len(pair[0]), len(pair[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in mapping]
    mapping.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return mapping


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)
