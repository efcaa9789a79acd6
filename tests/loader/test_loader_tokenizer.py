"""Tokenizer: ids, text and chat prompts equal transformers' for the same model files."""
from __future__ import annotations

import json
import os

import jinja2
import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as Q

from reprise.loader import Tokenizer, load_model
from tests.loader.loader_testing import tiny_qwen2_tensors, write_gguf

TEXTS = [
    "Hello world",
    "  leading spaces, trailing  ",
    "The year 2024 had 366 days; π ≈ 3.14159 and 1,000,000 > 999.",
    "Ünïcödé façade naïve — “quotes” and ‘apostrophes’",
    "日本語のテキストと한국어 그리고 中文",
    "emoji 🎉🚀👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n\treturn x ** 2  # square\n\n\nprint(f(3))",
    "I'm sure they'll say we'd've DON'T it's",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<file_sep>x<|im_end|>",
    "line\r\nbreaks\n\n\n  and   tabs\t\tend",
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in °C for a city — any city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATIONS = {
    "with_system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
                    {"role": "assistant", "content": "Hello. 👋"}, {"role": "user", "content": "2+2?"}],
    "without_system": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                       {"role": "user", "content": "Tell me a joke"}],
}
QWEN_TEMPLATE = os.path.join(os.path.dirname(__file__), "qwen25_template.jinja")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_transformers(default_model, reference_tokenizer, text):
    ours = default_model.tokenizer
    assert ours.encode(text) == reference_tokenizer.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=True) == reference_tokenizer.encode(text, add_special_tokens=True)
    assert ours.decode(ours.encode(text)) == text
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == \
        reference_tokenizer.decode(reference_tokenizer.encode(text), skip_special_tokens=True)


# Worked out by hand from the tiny vocabulary: t=83 he=257 Ġ=220 1..5=16..20 12=258 a,n,d=64,77,67.
# Its merges "1 2" then "Ġ 1" show how each regex cuts digit runs: llama3 in threes,
# qwen2 one by one, GPT-2 (used for "smollm") whole and with the space before.
PRE_TOKENIZER_TEXTS = {
    "llama-bpe": ("the 12345 and 1212", [83, 257, 220, 258, 18, 19, 20, 220, 64, 77, 67, 220, 258, 16, 17]),
    "qwen2": ("the 12345 and 1212", [83, 257, 220, 16, 17, 18, 19, 20, 220, 64, 77, 67, 220, 16, 17, 16, 17]),
    "smollm": ("the 12345 and 1212", [83, 257, 220, 258, 18, 19, 20, 220, 64, 77, 67, 220, 258, 258]),
}


@pytest.mark.parametrize("pre", PRE_TOKENIZER_TEXTS)
@pytest.mark.parametrize("add_bos", [True, False])
def test_gguf_pre_tokenizer_and_bos_equal_transformers(tmp_path, pre, add_bos):
    """A tiny GGUF vocabulary read by us and by transformers: same ids for each `tokenizer.ggml.pre`."""
    from transformers import AutoTokenizer
    tensors = tiny_qwen2_tensors(Q.F32, np.random.default_rng(0))
    path = write_gguf(str(tmp_path / "tiny.gguf"), "qwen2", tensors, num_layers=1, hidden=256, heads=4, kv_heads=2,
                      ffn=256, pre=pre, metadata={"tokenizer.ggml.add_bos_token": add_bos})
    ours = load_model(path).tokenizer
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    text, expected = PRE_TOKENIZER_TEXTS[pre]
    for sample in (text, "<|im_start|>the\n\n 12 12<|im_end|>", "  \t x 99 1 2 3 1234567"):
        assert ours.encode(sample) == reference.encode(sample, add_special_tokens=False)
        assert ours.encode(sample, add_special_tokens=True) == reference.encode(sample, add_special_tokens=True)
    assert ours.encode(text) == expected
    assert ours.encode("x", add_special_tokens=True) == ([260] if add_bos else []) + [87]


def test_special_tokens_of_default_model(default_model):
    tokenizer = default_model.tokenizer
    assert tokenizer.encode("<|im_start|><|im_end|>") == [1, 2]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.vocab_size) == (1, frozenset({2}), 49152)
    assert [i for i in range(100) if tokenizer.is_special(i)] == list(range(17))
    assert tokenizer.decode([1, 4093, 198, 2], skip_special_tokens=True) == "user\n"


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_template_equals_transformers(default_model, reference_tokenizer, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = default_model.tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ours == reference_tokenizer.apply_chat_template(messages, tokenize=False,
                                                           add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module")
def qwen_style_dir(tmp_path_factory, reference_tokenizer):
    """SmolLM2's tokenizer saved by transformers, with a Qwen2.5-style tools template in tokenizer_config.json."""
    path = tmp_path_factory.mktemp("qwen_style")
    reference_tokenizer.save_pretrained(str(path))
    os.remove(path / "chat_template.jinja")
    with open(path / "tokenizer_config.json") as file:
        config = json.load(file)
    with open(QWEN_TEMPLATE) as file:
        config["chat_template"] = file.read()
    with open(path / "tokenizer_config.json", "w") as file:
        json.dump(config, file)
    return str(path)


@pytest.fixture(scope="module")
def qwen_style(qwen_style_dir):
    from transformers import AutoTokenizer
    return Tokenizer.from_hf_dir(qwen_style_dir), AutoTokenizer.from_pretrained(qwen_style_dir)


TOOL_TURNS = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "tool", "content": "{\"wind\": 3}"},
]


@pytest.mark.parametrize("messages, tools", [
    (CONVERSATIONS["with_system"], None),
    (CONVERSATIONS["without_system"], None),
    (CONVERSATIONS["without_system"], TOOLS),
    (TOOL_TURNS, TOOLS),
], ids=["system", "no-system", "tools", "tool-calls"])
def test_qwen_style_template_equals_transformers(qwen_style, messages, tools):
    ours, reference = qwen_style
    expected = reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(messages, tools=tools) == expected
    assert ours.encode(expected) == reference.encode(expected, add_special_tokens=False)
    if tools:
        assert '"description": "Current weather in °C for a city — any city"' in expected


def test_hf_dir_tokenizer_from_chat_template_jinja(tmp_path, default_model, reference_tokenizer):
    """transformers 5 saves the template to chat_template.jinja; it is found there."""
    reference_tokenizer.save_pretrained(str(tmp_path))
    tokenizer = Tokenizer.from_hf_dir(str(tmp_path), eos_token_ids=[0])
    assert tokenizer.chat_template == default_model.tokenizer.chat_template
    assert tokenizer.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    assert tokenizer.eos_token_ids == frozenset({0, 2}) and tokenizer.bos_token_id == 1
    assert tokenizer.encode(TEXTS[8]) == default_model.tokenizer.encode(TEXTS[8])


WHITESPACE_TEMPLATE = """{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message.role == 'user' %}
        {% set ns.count = ns.count + 1 %}
<|im_start|>user {{ ns.count }}
{{ message.content }}<|im_end|>
    {% else %}
<|im_start|>{{ message.role }}
{{ message.content | trim }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def test_block_whitespace_handled_like_transformers(default_model, reference_tokenizer):
    """trim_blocks and lstrip_blocks: a template written with plain, indented block tags."""
    messages = CONVERSATIONS["with_system"]
    tokenizer = Tokenizer(reference_tokenizer.backend_tokenizer, {}, chat_template=WHITESPACE_TEMPLATE)
    assert tokenizer.render_chat(messages) == reference_tokenizer.apply_chat_template(
        messages, chat_template=WHITESPACE_TEMPLATE, tokenize=False, add_generation_prompt=True)


def test_template_helpers_behave_like_transformers(reference_tokenizer):
    tokenizer = Tokenizer(reference_tokenizer.backend_tokenizer, {"eos_token": "<|im_end|>"}, chat_template=(
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson }}\n{% endfor %}{{ eos_token }}"
        "{{ strftime_now('%Y') | length }}{{ extra }}"))
    messages = [{"role": "user", "content": "é"}, {"role": "user", "content": "<b>"}, {"role": "user", "content": "x"}]
    assert tokenizer.render_chat(messages, extra="!") == \
        '{"role": "user", "content": "é"}\n{"role": "user", "content": "<b>"}\n<|im_end|>4!'
    with pytest.raises(jinja2.TemplateError, match="no bad roles"):
        tokenizer.render_chat([{"role": "bad", "content": ""}])


def test_no_template_is_a_clear_error(reference_tokenizer):
    tokenizer = Tokenizer(reference_tokenizer.backend_tokenizer, {})
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.render_chat([{"role": "user", "content": "hi"}])


SPM_TEXTS = ("the thing", " the  in", "an ant\nin a tin", "héllo 日本", "<start_of_turn>the<think>", "", "   ")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_gguf_tokenizer_matches_transformers(arch, tmp_path):
    from transformers import AutoTokenizer
    path = write_gguf(str(tmp_path / f"{arch}.gguf"), arch, {}, num_layers=1, hidden=64, heads=4, kv_heads=4,
                      ffn=64, spm=True)
    ours = Tokenizer.from_gguf(gguf.GGUFReader(path), path)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    for text in SPM_TEXTS:
        expected = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text) == expected, text
        assert ours.encode(text, add_special_tokens=True) == reference.encode(text), text
        assert ours.decode(expected) == reference.decode(expected), text
