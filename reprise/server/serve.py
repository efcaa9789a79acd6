"""`reprise serve`: load the engine, print one start-up summary, run uvicorn, shut down cleanly.

SIGTERM (or Ctrl-C) drains: uvicorn stops listening at once, so new connections are refused, and
running requests, open streams included, finish within --shutdown-timeout seconds before the rest
are cancelled. The drain then returns normally, so the process exits with status 0.
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
    """Blocks until the server stops (Ctrl-C or SIGTERM). The engine loop runs on this (the main)
    thread, where PyTorch's OpenMP workers stay warm between steps; uvicorn runs on another."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = Engine(config)
    async_engine = AsyncEngine(engine, start=False)
    app = create_app(async_engine, server)
    print(banner(engine, app.state.serving.model_name, server), file=sys.stderr, flush=True)
    http = uvicorn.Server(uvicorn.Config(app, host=server.host, port=server.port, log_level="warning",
                                         timeout_graceful_shutdown=server.shutdown_timeout))
    thread = threading.Thread(target=_serve_http, args=(http, async_engine), name="reprise-http")
    previous = {signum: signal.signal(signum, lambda *_: _stop(http)) for signum in (signal.SIGTERM, signal.SIGINT)}
    thread.start()
    try:
        async_engine.run()       # until the HTTP server has drained and stopped it
        thread.join()            # the engine failed: /health answers 503 until the server is stopped
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        http.should_exit = True
        thread.join(timeout=server.shutdown_timeout + 5)
        engine.close()           # the tiers' queued writes reach the disk
    if not http.started:
        raise SystemExit(f"reprise: error: could not serve on {server.host}:{server.port}")


def _serve_http(http: uvicorn.Server, async_engine: AsyncEngine) -> None:
    """uvicorn's loop; when it returns (drained, or it could not start), the engine loop stops."""
    try:
        http.run()
    finally:
        async_engine.shutdown()


def _stop(http: uvicorn.Server) -> None:
    """SIGTERM or Ctrl-C: drain (stop listening, let running requests and streams finish within
    --shutdown-timeout); a second one stops at once."""
    if http.should_exit:
        http.force_exit = True
    http.should_exit = True


def _tiers(engine: Engine) -> str:
    if engine.tiers is None or not engine.tiers.tiers:
        return ""
    parts = []
    for name, stats, _, _ in engine.tiers.stats():
        limit = f" of {format_bytes(stats.bytes_limit)}" if stats.bytes_limit else ""
        parts.append(f"{name} {stats.num_entries} blocks, {format_bytes(stats.bytes_used)}{limit}")
    return ", tiers: " + "; ".join(parts)


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
        f"  weights {format_bytes(engine.weights_bytes)} ({'GGUF quantized' if engine.native_weights else 'dense'}), "
        f"KV pool {format_bytes(engine.kv_pool_bytes)} reserved (RAM taken as blocks fill)",
        f"  KV pool {engine.num_blocks} blocks x {engine.block_size} tokens = {pool_tokens} tokens "
        f"({format_bytes(engine.kv_cache_bytes)})",
        f"  prefix cache {'on' if engine.config.prefix_cache else 'off'}{keys}{salted}{_tiers(engine)}",
        f"  at most {server.max_waiting} requests waiting, {format_bytes(server.max_body_bytes)} per body"
        f"{', prompts logged' if server.log_prompts else ''}",
        f"  listening on http://{server.host}:{server.port}/v1",
    ]
    return "\n".join(lines)
