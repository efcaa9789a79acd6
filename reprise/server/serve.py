"""`reprise serve`: load the engine, print one start-up summary, run uvicorn, shut down cleanly."""
from __future__ import annotations

import logging
import sys

import uvicorn

from reprise.config import EngineConfig, format_bytes
from reprise.engine.async_engine import AsyncEngine
from reprise.engine.engine import Engine
from reprise.server.app import create_app


def serve(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None) -> None:
    """Blocks until the server stops (Ctrl-C or SIGTERM); the engine thread is shut down on the way out."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = Engine(config)
    async_engine = AsyncEngine(engine)
    try:
        app = create_app(async_engine, served_model_name, api_key)
        print(banner(engine, app.state.serving.model_name, host, port, api_key is not None), file=sys.stderr,
              flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        async_engine.shutdown(timeout=10)


def banner(engine: Engine, model_name: str, host: str, port: int, has_api_key: bool) -> str:
    """The start-up summary: what is served, how big the KV pool is, and where."""
    pool_tokens = engine.num_blocks * engine.block_size
    dtype = str(engine.dtype).removeprefix("torch.")
    lines = [
        f"reprise serving {model_name} ({engine.model_path})",
        f"  dtype {dtype} on {engine.device}, context {engine.max_model_len} tokens",
        f"  KV pool {engine.num_blocks} blocks x {engine.block_size} tokens = {pool_tokens} tokens "
        f"({format_bytes(engine.kv_cache_bytes)})",
        f"  prefix cache {'on' if engine.config.prefix_cache else 'off'}"
        f"{', API key required' if has_api_key else ''}",
        f"  listening on http://{host}:{port}/v1",
    ]
    return "\n".join(lines)
