"""One chat completion turn: its prompt (template, tools, remembered replies), the reading of its
output (reasoning, tool calls), and what the next turn needs in the cache.

The next turn of a conversation resends this one's reply, rendered by the template as history.
Where that rendering is what the model generated (plain replies; tool calls written in the
canonical form the grammar enforces), the reply memory splices the generated ids back and the
next turn hits everything up to the end of this reply. Where it is not (templates that drop
earlier turns' `<think>` blocks; a call the template re-formats; a reply cut by a stop string),
`ChatTurn.finish` returns the ids of the conversation as the next turn will render it, and the
server computes them into the cache in the background (a continuation prefill): the next turn
then hits past the point where the history diverged from what was generated.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from reprise.chat.continuity import ChatPrompt, ReplyMemory, prompt_ids, reply_ids, suffix_ids
from reprise.chat.messages import template_messages
from reprise.chat.reasoning import choose_reasoning_parser
from reprise.chat.spec import GuidedSpec
from reprise.chat.tool_parsers import choose_tool_format
from reprise.engine.request import RequestOutput
from reprise.engine.scheduler import common_prefix_length
from reprise.loader import Tokenizer
from reprise.server.config import ServerConfig
from reprise.server.errors import APIError
from reprise.server.guided import NamedToolChoice, tool_call_spec
from reprise.server.reply import ParsedReply, ReplyReader

TEMPLATE_ERRORS = (jinja2.TemplateError, ValueError, TypeError, KeyError)


class ChatTemplates:
    """The server's chat template (the model's, or --chat-template), its tool-call format and its
    reasoning parser (chosen from the template unless --tool-call-parser / --reasoning-parser say)."""

    def __init__(self, tokenizer: Tokenizer, config: ServerConfig):
        self.tokenizer = tokenizer
        self.template = _read_template(config.chat_template) if config.chat_template else tokenizer.chat_template
        self.tool_format = choose_tool_format(self.template, config.tool_call_parser)
        self.reasoning = choose_reasoning_parser(self.template, config.reasoning_parser)
        # a call marker that is a special token (Mistral's [TOOL_CALLS]) must survive detokenizing
        self.special_marker = any(_is_special(tokenizer, opener) for opener in self.tool_format.openers)

    def turn(self, body, memory: ReplyMemory, salt: str | None) -> ChatTurn:
        """The turn of a chat body (a ChatCompletionRequest, or a cache lookup with messages)."""
        messages = [message.as_template_message() for message in body.messages]
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        tool_choice = body.tool_choice or ("auto" if tools else "none")
        if tool_choice not in ("auto", "none") and not tools:
            raise APIError(400, "tool_choice required or a named function needs tools", "tool_choice")
        if isinstance(tool_choice, NamedToolChoice):
            _check_named(tools, tool_choice.function.name)
        rendered = self.render(messages, tools, body.add_generation_prompt, body.continue_final_message,
                               body.chat_template_kwargs)
        try:
            prompt = prompt_ids(self.tokenizer, rendered, messages, memory, salt)
        except (ValueError, TypeError) as error:     # e.g. a lone surrogate, which UTF-8 cannot hold
            raise APIError(400, f"cannot tokenize the messages: {type(error).__name__}", "messages") from error
        return ChatTurn(self, messages, tools, tool_choice, body.parallel_tool_calls, prompt,
                        body.chat_template_kwargs)

    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True,
               continue_final_message: bool = False, template_kwargs: dict | None = None) -> str:
        if continue_final_message and (add_generation_prompt or messages[-1]["role"] != "assistant"):
            raise APIError(400, "continue_final_message needs add_generation_prompt false and a final assistant "
                           "message", "continue_final_message")
        shaped, kwargs = template_messages(messages, tools, self.tool_format, self.template)
        try:
            return self.tokenizer.render_chat(shaped, add_generation_prompt and not continue_final_message,
                                              continue_final_message, self.template,
                                              **{**kwargs, **(template_kwargs or {})})
        except TEMPLATE_ERRORS as error:
            raise APIError(400, f"cannot apply the chat template to these messages: {error}", "messages") from error


@dataclass(frozen=True)
class ChatTurn:
    templates: ChatTemplates
    messages: list[dict]
    tools: list[dict] | None
    tool_choice: str | NamedToolChoice
    parallel_tool_calls: bool | None
    prompt: ChatPrompt
    template_kwargs: dict | None

    @property
    def parses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the output text must keep special tokens (a tool format whose marker is one)."""
        return self.parses_tools and self.templates.special_marker

    def tool_spec(self) -> GuidedSpec | None:
        """Constrained decoding for tool_choice: `required` / named always call (validly), `auto` lets
        the model choose, and a call it opens must be valid."""
        if not self.parses_tools:
            return None
        tools = self.tools
        if isinstance(self.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t["function"]["name"] == self.tool_choice.function.name]
        return tool_call_spec(self.templates.tool_format.tags(tools), self.tool_choice, self.parallel_tool_calls)

    def reader(self, request_id: str) -> ReplyReader:
        """A streaming reader of the output text of one choice (its engine request)."""
        reasoning = self.templates.reasoning
        in_reasoning = reasoning is not None and reasoning.opens_in_reasoning(self.prompt.rendered)
        return ReplyReader(reasoning, self.templates.tool_format if self.parses_tools else None, self.tools,
                           in_reasoning, request_id)

    def parse(self, output: RequestOutput) -> ParsedReply:
        return self.reader(output.request_id).read_all(output.text)

    def finish(self, output: RequestOutput, stop_ids: frozenset[int], memory: ReplyMemory,
               salt: str | None) -> list[int] | None:
        """Files the reply in the memory under what the client will send back, and returns the ids
        the next turn will start with when the cache does not already hold them (else None)."""
        reply = self.parse(output)
        message = reply.as_history_message()
        generated = reply_ids(output.token_ids, output.finish_reason, stop_ids)
        text = reply.visible_text if reply.tool_calls else reply.content
        if generated is not None and reply.memory_key is not None and text:
            spelled = suffix_ids(self.templates.tokenizer, generated, text)
            if spelled is not None:
                memory.remember(salt, reply.memory_key, text, spelled)
        history = [*self.messages, message]
        try:
            rendered = self.templates.render(history, self.tools, add_generation_prompt=False,
                                             template_kwargs=self.template_kwargs)
        except APIError:
            return None
        following = prompt_ids(self.templates.tokenizer, rendered, history, memory, salt).ids
        computed = output.prompt_token_ids + output.token_ids[:-1]     # the last token has no KV
        diverges = common_prefix_length(following, computed) < min(len(following), len(computed))
        return following if diverges else None


def _read_template(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read --chat-template {path}: {error}") from error


def _is_special(tokenizer: Tokenizer, text: str) -> bool:
    ids = tokenizer.encode(text)
    return len(ids) == 1 and tokenizer.is_special(ids[0])


def _check_named(tools: list[dict] | None, name: str) -> None:
    if not any(tool["function"]["name"] == name for tool in tools or ()):
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
