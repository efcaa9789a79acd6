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
DEFAULT_KEEP_ALIVE_S = 5.0              # an idle keep-alive connection is closed after this
DEFAULT_READ_TIMEOUT_S = 30.0           # a request's head, and then its body, must arrive within this
DEFAULT_MAX_CONNECTIONS = 512           # open connections at once; past it new requests get 503


@dataclass(frozen=True)
class ServerConfig:
    """Where to listen, who may call, and how much load and input to accept."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()           # any of them is accepted; empty = no key needed
    shared_cache: bool = False               # several keys share one cache namespace (else one each)
    admin_key: str | None = None             # the only key that sees across tenants (/v1/cache/check)
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
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self):
        if any(not key for key in self.api_keys) or self.admin_key == "":
            raise ValueError("an API key must not be empty")
        if self.admin_key is not None and self.admin_key in self.api_keys:
            raise ValueError("the admin key must differ from every --api-key")
        for name in ("max_waiting", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be at least 1")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
        if self.keep_alive_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("--keep-alive-timeout and --read-timeout must be > 0")

    @property
    def isolated(self) -> bool:
        """Each API key is a tenant with its own cache namespace: several keys, not --shared-cache.
        (One key is one tenant, and needs no salt: it shares the namespace with nobody.)"""
        return len(self.api_keys) > 1 and not self.shared_cache


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """The HTTP flags of `reprise serve` (the engine's come from cli.py)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY'; repeat or comma-separate for several keys "
                             "(default: env REPRISE_API_KEY, also comma-separated)")
    parser.add_argument("--shared-cache", action="store_true",
                        help="let several API keys share one cache namespace; any key can then learn, by "
                             "timing or /v1/cache/lookup, whether another key sent a prompt (default: a "
                             "namespace per key, and a request's cache_salt is combined with it)")
    parser.add_argument("--salt-per-key", action="store_true", help=argparse.SUPPRESS)   # the default now
    parser.add_argument("--admin-key", default=None, metavar="KEY",
                        help="the key that sees across tenants: /v1/cache/check, the dashboard's every "
                             "namespace; not an inference key (default: env REPRISE_ADMIN_KEY)")
    parser.add_argument("--keep-alive-timeout", type=float, default=DEFAULT_KEEP_ALIVE_S, metavar="S",
                        help=f"close an idle keep-alive connection after S seconds (default: {DEFAULT_KEEP_ALIVE_S:g})")
    parser.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S, metavar="S",
                        help="a request's headers, then its body, must arrive within S seconds each, else the "
                             f"connection is closed (body: 408) (default: {DEFAULT_READ_TIMEOUT_S:g})")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help=f"open connections at once; past it new requests get 503 (default: {DEFAULT_MAX_CONNECTIONS})")
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
                        shared_cache=_shared_cache(args), admin_key=args.admin_key or os.environ.get("REPRISE_ADMIN_KEY"),
                        served_model_name=args.served_model_name,
                        max_waiting=args.max_waiting, max_prompt_tokens=args.max_prompt_tokens,
                        max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
                        log_prompts=args.log_prompts, chat_template=args.chat_template,
                        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                        allowed_origins=_split(args.allowed_origins or ()),
                        continuation_prefill=not args.no_continuation_prefill,
                        keep_alive_s=args.keep_alive_timeout, read_timeout_s=args.read_timeout,
                        max_connections=args.max_connections)


def _shared_cache(args: argparse.Namespace) -> bool:
    """--salt-per-key (a namespace per key) is the default now: still accepted, it only contradicts
    --shared-cache."""
    if args.salt_per_key and args.shared_cache:
        raise ValueError("--salt-per-key and --shared-cache contradict each other (a namespace per key is the "
                         "default; drop --salt-per-key)")
    return args.shared_cache


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
