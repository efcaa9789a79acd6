"""A request's prompt ids and cache salt, as a replica computes them, for the router's lookup.

The router loads the served model's tokenizer and chat template (no weights) and renders bodies
through the replica's own code: `ChatTemplates.turn` for chat completions, Anthropic's and
Responses' conversions to a chat body for /v1/messages and /v1/responses, the tokenizer for text
completions. What it cannot know is a replica's reply memory (the generated ids it splices in
for earlier replies, chat/continuity.py): where a re-encoded reply differs from what the model
generated, the router's key chain stops matching at that reply, so it routes on the conversation
up to there. A Responses request that continues a stored response (`previous_response_id`) is
looked up on its new input only. A body the router cannot read is routed without a prefix (the
replica answers it with the proper error).

The salt is the replica's: the client's `cache_salt`, combined with the key's salt when the
replicas give each key its own namespace, as their /health says (server/config.py: key_salt,
tenant_cache_salt).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from reprise.chat.continuity import ReplyMemory
from reprise.loader import load_model
from reprise.server.anthropic import MessagesRequest, chat_request
from reprise.server.chat_turn import ChatTemplates
from reprise.server.config import ServerConfig, key_salt, tenant_cache_salt
from reprise.server.errors import APIError
from reprise.server.protocol import ChatCompletionRequest, CompletionRequest
from reprise.server.responses_api import ResponsesRequest, _chat_body, input_messages

log = logging.getLogger("reprise.router")


@dataclass(frozen=True, slots=True)
class Prompt:
    ids: list[int]
    salt: str | None


class PromptReader:
    def __init__(self, model: str | None, per_key: Callable[[], bool] = lambda: False,
                 chat_template: str | None = None):
        """`per_key()`: whether the replicas now give each API key its own namespace."""
        self.tokenizer = load_model(model).tokenizer
        self.chats = ChatTemplates(self.tokenizer, ServerConfig(chat_template=chat_template))
        self.per_key = per_key

    def read(self, path: str, body: dict, headers: dict[str, str]) -> Prompt | None:
        """The prompt of a body sent to `path` (/v1/chat/completions, ...), or None."""
        try:
            ids, client_salt = self._ids(path, body)
        except (APIError, ValidationError, ValueError, TypeError, KeyError) as error:
            log.debug("cannot read the prompt of a %s body: %s", path, type(error).__name__)
            return None
        return Prompt(ids, tenant_cache_salt(self._key_salt(headers), client_salt))

    def _ids(self, path: str, body: dict) -> tuple[list[int], str | None]:
        if path == "/v1/chat/completions":
            chat = ChatCompletionRequest.model_validate(body)
        elif path == "/v1/messages":
            chat = chat_request(MessagesRequest.model_validate(body))[0]
        elif path == "/v1/responses":
            request = ResponsesRequest.model_validate(body)
            system = [{"role": "system", "content": request.instructions}] if request.instructions else []
            chat = ChatCompletionRequest.model_validate(_chat_body(request, system + input_messages(request.input)))
        elif path == "/v1/completions":
            request = CompletionRequest.model_validate(body)
            prompt = request.prompts()[0]
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            return ids, request.cache_salt
        else:
            raise ValueError(path)
        return self.chats.turn(chat, ReplyMemory(), None).prompt.ids, chat.cache_salt

    def _key_salt(self, headers: dict[str, str]) -> str | None:
        if not self.per_key():
            return None
        bearer = headers.get("authorization", "")
        key = bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else headers.get("x-api-key")
        return key_salt(key) if key else None
