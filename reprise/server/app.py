"""The FastAPI app: OpenAI-compatible routes over one AsyncEngine.

Routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/messages and
/v1/messages/count_tokens (Anthropic's Messages API, anthropic.py), POST /v1/responses (OpenAI's
Responses API, responses_api.py), POST /v1/cache/lookup (dry-run match),
GET /v1/cache/check (the cache's invariants, recounted), GET /v1/models, POST /tokenize and
/detokenize (vLLM's shapes), GET /version, GET and HEAD /health (503 once the engine thread is
gone; with --kv-store its `replica_id` names this replica's KV event stream), GET /metrics. With API
keys, /v1/* needs `Authorization: Bearer KEY` (or `x-api-key: KEY`), and several keys are several
tenants, each in its own cache namespace unless --shared-cache; /v1/cache/check sees across tenants
and needs --admin-key where there is more than one key (middleware.BearerAuth); /health, /version and
/metrics stay open (so do /tokenize and /detokenize, as in vLLM: they touch no cache). With
--allowed-origins, browsers' CORS preflights are answered. Bodies past --max-body-bytes get 413 before any parsing. Every
error has OpenAI's shape (errors.py). A request is admitted (or refused with 429) before its
response starts, so a streaming client sees the status too. A streaming client that disconnects
cancels its stream, which aborts the requests; a non-streaming one is watched for the same.
Template rendering and tokenization run in worker threads (`asyncio.to_thread`), never on the
event loop: a long prompt does not hold up the other streams' chunks (Tokenizer.encode releases
the GIL while the Rust tokenizer works, so neither does it hold up the engine thread).
"""
from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from reprise.engine.async_engine import AsyncEngine, RequestStream
from reprise.server.anthropic import MessagesPrompt, MessagesRequest
from reprise.server.anthropic_reply import AnthropicAPI
from reprise.server.config import ServerConfig
from reprise.server.dashboard import install_dashboard
from reprise.server.errors import APIError, install_error_handlers
from reprise.server.metrics import CONTENT_TYPE, ServerMetrics
from reprise.server.middleware import TENANT_SALT, BearerAuth, BodyLimit
from reprise import __version__
from reprise.server.protocol import (CacheLookupRequest, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                     TokenizeRequest)
from reprise.server.responses import event_stream, response_body
from reprise.server.responses_api import ResponsesRequest
from reprise.server.responses_api_reply import ResponsesAPI
from reprise.server.serving import Job, Serving

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(async_engine: AsyncEngine, config: ServerConfig = ServerConfig()) -> FastAPI:
    """The app for one running AsyncEngine; the caller starts and shuts down the engine."""
    engine = async_engine.engine
    metrics = ServerMetrics(lambda: async_engine.call(engine.stats))
    serving = Serving(async_engine, metrics, config)
    anthropic = AnthropicAPI(serving)
    responses_api = ResponsesAPI(serving)
    app = FastAPI(title="reprise", version="0.1.0")
    app.state.serving = serving
    install_error_handlers(app, config.log_prompts)
    _install_middleware(app, config)
    created = int(time.time())
    health_body = {"status": "ok", "per_key_namespaces": config.isolated}    # the router looks up as the replica does
    if engine.replica_id is not None:
        health_body["replica_id"] = engine.replica_id

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict:
        if not async_engine.is_alive:
            raise APIError(503, "the engine thread is not running", code="engine_dead")
        return health_body

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(await asyncio.to_thread(metrics.exposition), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    install_dashboard(app, async_engine, serving.ledger, config)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        return await asyncio.to_thread(serving.tokenize, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        return await asyncio.to_thread(serving.detokenize, body)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": serving.model_name, "object": "model", "created": created, "owned_by": "reprise",
                "root": str(engine.model_path), "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        job = await asyncio.to_thread(serving.chat_job, body, _tenant_salt(request))
        return await _respond(serving, job, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        job = await asyncio.to_thread(serving.completion_job, body, _tenant_salt(request))
        return await _respond(serving, job, request)

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Response:
        exchange = await asyncio.to_thread(anthropic.exchange, body, _tenant_salt(request))
        return await _respond(serving, exchange.job, request, exchange)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: MessagesPrompt, request: Request) -> dict:
        return await asyncio.to_thread(anthropic.count_tokens, body, _tenant_salt(request))

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        exchange = await asyncio.to_thread(responses_api.exchange, body, _tenant_salt(request))
        return await _respond(serving, exchange.job, request, exchange)

    @app.post("/v1/cache/lookup")
    async def cache_lookup(body: CacheLookupRequest, request: Request) -> dict:
        return (await serving.lookup(body, _tenant_salt(request))).model_dump()

    @app.get("/v1/cache/check")
    async def cache_check() -> dict:
        return await asyncio.to_thread(async_engine.call, _check_cache, engine)

    return app


def _install_middleware(app: FastAPI, config: ServerConfig) -> None:
    app.add_middleware(BodyLimit, max_body_bytes=config.max_body_bytes, read_timeout_s=config.read_timeout_s)
    if config.api_keys or config.admin_key:     # added after the limit, so it runs first: a refused caller sends no body
        app.add_middleware(BearerAuth, api_keys=config.api_keys, isolated=config.isolated, admin_key=config.admin_key)
    if config.allowed_origins:      # outermost: a preflight carries no key, and errors need CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in config.allowed_origins)


def _tenant_salt(request: Request) -> str | None:
    return request.scope.get("state", {}).get(TENANT_SALT)


def _check_cache(engine) -> dict:
    """{ok, violation, num_blocks, blocks}: the recounted invariants (DESIGN.md section 3) and the
    block states; run between engine steps. Walks the whole pool: for tests and soak runs."""
    stats, violation = engine.check_cache()
    blocks = {"used": stats.blocks_used, "cached": stats.blocks_cached, "free": stats.blocks_free}
    ok = violation is None and sum(blocks.values()) == stats.num_blocks
    return {"ok": ok, "violation": violation, "num_blocks": stats.num_blocks, "blocks": blocks}


async def _respond(serving: Serving, job: Job, request: Request, wire=None) -> Response:
    """Runs the job; answers in OpenAI's chat or text completion shapes, or in those of `wire` (an
    object with `body(outputs) -> dict` and `events(streams)`: the Anthropic and Responses APIs)."""
    streams = serving.start(job)
    if job.stream:
        events = wire.events(streams) if wire is not None else event_stream(serving, job, streams)
        return _ClosingStreamingResponse(streams, events, media_type="text/event-stream", headers=_SSE_HEADERS)
    work = asyncio.ensure_future(serving.run(job, streams))
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not work.done():
        work.cancel()               # aborts the requests; the answer would reach no one
        raise APIError(400, "the client disconnected")
    return JSONResponse(wire.body(work.result()) if wire is not None else response_body(serving, job, work.result()))


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only disconnects arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _ClosingStreamingResponse(StreamingResponse):
    """Closes the job's streams however the response ends: even a body generator that never
    started (the client left first) leaves no request running."""

    def __init__(self, streams: list[RequestStream], content, **kwargs):
        super().__init__(content, **kwargs)
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self._streams:
                stream.close()
