"""ServerConfig: the HTTP side's start-up settings (the engine's are EngineConfig), built in cli.py."""
from __future__ import annotations

import argparse
import hashlib
import hmac
import os
from dataclasses import dataclass

from reprise.chat.reasoning import REASONING_PARSERS
from reprise.chat.tool_parsers import TOOL_FORMATS
from reprise.config import format_bytes, parse_bytes

DEFAULT_MAX_WAITING = 256
DEFAULT_MAX_BODY_BYTES = 2 * 2**20      # ~500K tokens of text: tokenizing more stalls the event loop
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServerConfig:
    """Where to listen, who may call, and how much load and input to accept."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()           # any of them is accepted; empty = no key needed
    salt_per_key: bool = False               # each key gets its own cache namespace (needs api_keys)
    served_model_name: str | None = None
    max_waiting: int = DEFAULT_MAX_WAITING   # accepted but not yet running; beyond it: 429
    max_prompt_tokens: int | None = None     # per request, summed over its prompts; None = the context
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    log_prompts: bool = False                # debugging only: prompts and full error texts in the log
    chat_template: str | None = None         # a Jinja file replacing the model's chat template
    tool_call_parser: str | None = None      # None = chosen from the template
    reasoning_parser: str | None = None      # None = chosen from the template
    allowed_origins: tuple[str, ...] = ()    # CORS: browser origins allowed to call ("*" = any)
    continuation_prefill: bool = True        # cache a chat reply as the next turn renders it, when that differs

    def __post_init__(self):
        if self.salt_per_key and not self.api_keys:
            raise ValueError("--salt-per-key needs at least one --api-key")
        if any(not key for key in self.api_keys):
            raise ValueError("an API key must not be empty")
        for name in ("max_waiting", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be at least 1")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """The HTTP flags of `reprise serve` (the engine's come from cli.py)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY'; repeat or comma-separate for several keys "
                             "(default: env REPRISE_API_KEY, also comma-separated)")
    parser.add_argument("--salt-per-key", action="store_true",
                        help="give each API key its own cache namespace (a request's cache_salt is combined with it)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                        help="requests accepted but not yet running; beyond it new ones get 429 with Retry-After")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="prompt tokens per request, else 413 (default: the model's context length)")
    parser.add_argument("--max-body-bytes", type=parse_bytes, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"request body size, else 413 (default: {format_bytes(DEFAULT_MAX_BODY_BYTES)})")
    parser.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                        help="seconds SIGTERM waits for running requests and streams before cancelling them")
    parser.add_argument("--log-prompts", action="store_true",
                        help="debugging only: write prompts and full error messages to the log")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template to use instead of the model's own")
    parser.add_argument("--tool-call-parser", default=None, choices=TOOL_FORMATS,
                        help="how the model writes tool calls (default: chosen from the chat template)")
    parser.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                        help="split <think> reasoning into reasoning_content (default: chosen from the template)")
    parser.add_argument("--no-continuation-prefill", action="store_true",
                        help="do not compute a chat reply into the cache the way the next turn renders it "
                             "(where the template changes it, e.g. drops <think> blocks)")
    parser.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGIN",
                        help="answer CORS preflights from these browser origins (repeat or comma-separate; * = any)")


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=args.host, port=args.port,
                        api_keys=parse_api_keys(args.api_key, os.environ.get("REPRISE_API_KEY")),
                        salt_per_key=args.salt_per_key, served_model_name=args.served_model_name,
                        max_waiting=args.max_waiting, max_prompt_tokens=args.max_prompt_tokens,
                        max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
                        log_prompts=args.log_prompts, chat_template=args.chat_template,
                        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                        allowed_origins=_split(args.allowed_origins or ()),
                        continuation_prefill=not args.no_continuation_prefill)


def parse_api_keys(values: list[str] | None, env_value: str | None) -> tuple[str, ...]:
    """Keys from repeated --api-key flags and/or the env value, each possibly comma-separated;
    the flags win over the env. Order kept, duplicates dropped."""
    return _split(values if values else ([env_value] if env_value else []))


def _split(values) -> tuple[str, ...]:
    """Repeated and/or comma-separated flag values, in order, without blanks and duplicates."""
    items = (item.strip() for value in values for item in value.split(","))
    return tuple(dict.fromkeys(item for item in items if item))


def key_salt(api_key: str) -> str:
    """The cache salt of one API key: an HMAC of the key, so the key itself is never kept in the
    cache index or shown anywhere. Fixed length, so `<key salt>:<client salt>` never collides."""
    return hmac.new(b"reprise cache salt", api_key.encode(), hashlib.sha256).hexdigest()


def tenant_cache_salt(key_derived: str | None, client_salt: str | None) -> str | None:
    """The salt a request runs with: the key's and the client's combined; either alone; or None."""
    if key_derived is None:
        return client_salt
    return key_derived if client_salt is None else f"{key_derived}:{client_salt}"
