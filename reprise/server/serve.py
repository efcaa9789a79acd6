"""`reprise serve`: load the engine, print one start-up summary, run uvicorn, shut down cleanly.

SIGTERM (or Ctrl-C) drains: uvicorn stops listening at once, so new connections are refused, and
running requests, open streams included, finish within --shutdown-timeout seconds before the rest
are cancelled. A SIGTERM drain then returns normally, so the process exits with status 0.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

import uvicorn

from reprise.config import EngineConfig, format_bytes
from reprise.engine.async_engine import AsyncEngine
from reprise.engine.engine import Engine
from reprise.server.app import create_app
from reprise.server.config import ServerConfig


def serve(config: EngineConfig, server: ServerConfig = ServerConfig()) -> None:
    """Blocks until the server stops (Ctrl-C or SIGTERM); the engine thread is shut down on the way out."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = Engine(config)
    async_engine = AsyncEngine(engine)
    try:
        app = create_app(async_engine, server)
        print(banner(engine, app.state.serving.model_name, server), file=sys.stderr, flush=True)
        _run_until_drained(uvicorn.Config(app, host=server.host, port=server.port, log_level="warning",
                                          timeout_graceful_shutdown=server.shutdown_timeout))
    finally:
        async_engine.shutdown(timeout=10)


def _run_until_drained(config: uvicorn.Config) -> None:
    """uvicorn drains on SIGTERM, then raises the signal again for the handler it found, which
    would kill the process with it. The handler it finds here ends nothing: the drain was the
    stop, and serve() returns."""
    if threading.current_thread() is not threading.main_thread():
        uvicorn.Server(config).run()
        return
    previous = signal.signal(signal.SIGTERM, _drained)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _drained(signum, frame) -> None:
    """The SIGTERM that uvicorn raises again after its drain: nothing left to do."""


def banner(engine: Engine, model_name: str, server: ServerConfig) -> str:
    """The start-up summary: what is served, how big the KV pool is, and where."""
    pool_tokens = engine.num_blocks * engine.block_size
    dtype = str(engine.dtype).removeprefix("torch.")
    keys = f", {len(server.api_keys)} API key(s)" if server.api_keys else ""
    salted = ", a cache namespace per key" if server.salt_per_key else ""
    drafter = engine.drafter
    speculative = (f", speculative decoding: ngram ({drafter.num_draft_tokens} draft tokens, n-grams "
                   f"{drafter.ngram_max}..{drafter.ngram_min})") if drafter else ""
    lines = [
        f"reprise serving {model_name} ({engine.model_path})",
        f"  dtype {dtype} on {engine.device}, context {engine.max_model_len} tokens{speculative}",
        f"  KV pool {engine.num_blocks} blocks x {engine.block_size} tokens = {pool_tokens} tokens "
        f"({format_bytes(engine.kv_cache_bytes)})",
        f"  prefix cache {'on' if engine.config.prefix_cache else 'off'}{keys}{salted}",
        f"  at most {server.max_waiting} requests waiting, {format_bytes(server.max_body_bytes)} per body"
        f"{', prompts logged' if server.log_prompts else ''}",
        f"  listening on http://{server.host}:{server.port}/v1",
    ]
    return "\n".join(lines)
