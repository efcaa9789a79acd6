"""Messages for templates: an agent's history renders as transformers renders it, and the generic format."""
from __future__ import annotations

import os

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models

from reprise.chat.messages import generic_tools_prompt, template_messages
from reprise.chat.tool_parsers import choose_tool_format
from reprise.loader import Tokenizer, load_model

with open(os.path.join(os.path.dirname(__file__), "..", "loader", "qwen25_template.jinja")) as file:
    QWEN25_TEMPLATE = file.read()

# In the style of Llama 3.1/3.2: tools in the first user message, JSON calls, results as `ipython`.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- if tools %}
    {%- set first_user_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
    {{- "<|start_header_id|>user<|end_header_id|>\\n\\n" }}
    {{- "Given the following functions, respond with a JSON for a function call.\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) + "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {%- for tool_call in message.tool_calls %}
            {{- '{"name": "' + tool_call.function.name + '", "parameters": ' }}
            {{- tool_call.function.arguments | tojson + '}' }}
            {%- if not loop.last %}{{- '; ' }}{%- endif %}
        {%- endfor %}
        {{- "<|eot_id|>" }}
    {%- elif message.role == 'tool' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

# In the style of Mistral v0.3: tools before the last user message, ids of exactly 9 characters.
MISTRAL_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(last_user=0) %}
{%- for message in loop_messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message.role == 'user' %}
        {%- if tools and loop.index0 == ns.last_user %}
            {{- '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {{- '[INST]' }}
        {%- if system_message is defined and loop.index0 == ns.last_user %}
            {{- system_message + '\\n\\n' }}
        {%- endif %}
        {{- message.content + '[/INST]' }}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '[TOOL_CALLS][' }}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.id | length != 9 %}
                {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
            {%- endif %}
            {{- '{"name": "' + tool_call.function.name + '", "arguments": ' + tool_call.function.arguments | tojson }}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ', ' }}{%- endif %}
        {%- endfor %}
        {{- ']' + eos_token }}
    {%- elif message.role == 'tool' %}
        {{- '[TOOL_RESULTS]{"content": ' + message.content | tojson }}
        {{- ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- message.content + eos_token }}
    {%- endif %}
{%- endfor %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather — °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]

# What an OpenAI client sends: arguments as JSON text (keys not sorted), content None next to calls.
HISTORY = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris and Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call1Abcd", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"days": 2, "city": "Paris"}'}},
        {"id": "call2Abcd", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}]},
    {"role": "tool", "tool_call_id": "call1Abcd", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call2Abcd", "content": '{"temp": 18}'},
    {"role": "assistant", "content": "Paris: 21 °C. Zürich: 18 °C."},
    {"role": "user", "content": "And tomorrow?"},
]
# The same history as transformers users write it: arguments as dicts.
TRANSFORMERS_HISTORY = [
    HISTORY[0], HISTORY[1],
    {"role": "assistant", "tool_calls": [
        {"id": "call1Abcd", "type": "function",
         "function": {"name": "get_weather", "arguments": {"days": 2, "city": "Paris"}}},
        {"id": "call2Abcd", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    *HISTORY[3:],
]
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.fixture(scope="module")
def backend() -> RustTokenizer:
    return RustTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def render(backend, template: str, messages: list[dict], tools, tool_format_name: str | None = None) -> str:
    tool_format = choose_tool_format(template, tool_format_name)
    ours = Tokenizer(backend, SPECIAL_TOKENS, chat_template=template)
    chat, kwargs = template_messages(messages, tools, tool_format, template)
    return ours.render_chat(chat, **kwargs)


@pytest.mark.parametrize("template, name", [
    (QWEN25_TEMPLATE, "hermes"), (LLAMA3_TEMPLATE, "llama3_json"), (MISTRAL_TEMPLATE, "mistral")])
def test_agent_history_renders_as_transformers_renders_it(backend, template, name):
    from transformers import PreTrainedTokenizerFast
    reference = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    expected = reference.apply_chat_template(TRANSFORMERS_HISTORY, tools=TOOLS, tokenize=False,
                                             add_generation_prompt=True, chat_template=template)
    assert choose_tool_format(template).name == name
    assert render(backend, template, HISTORY, TOOLS) == expected
    assert '"days": 2, "city": "Paris"' in expected and "Current weather — °C" in expected


def test_mistral_ids_become_nine_characters_the_same_way_every_time(backend):
    history = [{**message} for message in HISTORY]
    history[2] = {**HISTORY[2], "tool_calls": [{**call, "id": f"call_{index}" * 4}
                                               for index, call in enumerate(HISTORY[2]["tool_calls"])]}
    history[3], history[4] = {**HISTORY[3], "tool_call_id": "call_0" * 4}, {**HISTORY[4], "tool_call_id": "call_1" * 4}
    chat, _ = template_messages(history, TOOLS, choose_tool_format(MISTRAL_TEMPLATE), MISTRAL_TEMPLATE)
    ids = [call["id"] for call in chat[2]["tool_calls"]]
    assert [len(i) for i in ids] == [9, 9] and ids[0] != ids[1] and all(i.isalnum() for i in ids)
    assert [chat[3]["tool_call_id"], chat[4]["tool_call_id"]] == ids
    assert render(backend, MISTRAL_TEMPLATE, history, TOOLS) == render(backend, MISTRAL_TEMPLATE, history, TOOLS)


def test_input_messages_are_not_modified():
    before = repr(HISTORY)
    template_messages(HISTORY, TOOLS, choose_tool_format(QWEN25_TEMPLATE), QWEN25_TEMPLATE)
    template_messages(HISTORY, TOOLS, choose_tool_format(None), None)
    assert repr(HISTORY) == before


def test_developer_becomes_system_unless_the_template_knows_it():
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    generic = choose_tool_format(None)
    assert template_messages(messages, None, generic, "{{ messages }}")[0][0]["role"] == "system"
    assert template_messages(messages, None, generic, "{% if m.role == 'developer' %}")[0][0]["role"] == "developer"


def test_arguments_that_are_no_json_object_stay_text():
    messages = [{"role": "assistant", "content": None, "reasoning_content": "hm", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]
    chat, kwargs = template_messages(messages, None, choose_tool_format(QWEN25_TEMPLATE), QWEN25_TEMPLATE)
    assert chat[0]["tool_calls"][0]["function"]["arguments"] == "not json" and kwargs == {}
    assert chat[0]["reasoning_content"] == "hm"


GENERIC_SYSTEM = (
    "<|im_start|>system\n# Tools\n\n"
    "You may call one or more tools to help with the user's request. The tools, as JSON schemas:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather — °C", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, '
    '"required": ["city"]}}}\n'
    "</tools>\n\n"
    "To call tools, reply with nothing but one <tool_call></tool_call> block per call:\n"
    '<tool_call>{"name": <tool-name>, "arguments": <args-json-object>}</tool_call>\n'
    "Each result comes back to you in a <tool_response></tool_response> block.")


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return load_model(None).tokenizer


def test_generic_format_with_the_default_models_template(smollm2):
    chat, kwargs = template_messages(HISTORY, TOOLS, choose_tool_format(smollm2.chat_template), smollm2.chat_template)
    assert kwargs == {}
    assert smollm2.render_chat(chat) == (
        GENERIC_SYSTEM + "\n\nYou are a weather bot.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Zürich?<|im_end|>\n"
        '<|im_start|>assistant\n'
        '<tool_call>{"name": "get_weather", "arguments": {"days": 2, "city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n'
        '<tool_response>\n{"temp": 18}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nParis: 21 °C. Zürich: 18 °C.<|im_end|>\n"
        "<|im_start|>user\nAnd tomorrow?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_generic_format_without_a_system_message_and_with_content_before_calls(smollm2):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Let me see.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}]
    chat, _ = template_messages(messages, TOOLS, choose_tool_format(None), smollm2.chat_template)
    assert smollm2.render_chat(chat, add_generation_prompt=False) == (
        GENERIC_SYSTEM + "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nLet me see.\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call><|im_end|>\n')
    assert generic_tools_prompt(TOOLS) == GENERIC_SYSTEM.removeprefix("<|im_start|>system\n")


def test_generic_calls_in_history_are_what_the_parser_reads(smollm2):
    """The generated text parses to the calls, and the calls render back to the same text."""
    generic = choose_tool_format(None)
    output = ('On it.\n<tool_call>{"name": "get_weather", "arguments": {"city":"Paris" }}</tool_call>\n'
              '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}</tool_call>')
    parsed = generic.parse(output, TOOLS)
    assistant = {"role": "assistant", "content": parsed.content, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in parsed.tool_calls]}
    chat, _ = template_messages([{"role": "user", "content": "Hi"}, assistant], TOOLS, generic, smollm2.chat_template)
    assert chat[-1] == {"role": "assistant", "content": output}
