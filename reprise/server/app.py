"""The FastAPI app: OpenAI-compatible routes over one AsyncEngine.

Routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/cache/lookup (dry-run match),
GET /v1/models, GET /health, GET /metrics. With an API key, /v1/* needs
`Authorization: Bearer KEY`; /health and /metrics stay open. Every error has OpenAI's shape
(errors.py). A streaming client that disconnects cancels its stream, which aborts the requests;
a non-streaming one is watched for the same.
"""
from __future__ import annotations

import asyncio
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from reprise.engine.async_engine import AsyncEngine
from reprise.server.errors import APIError, error_response, install_error_handlers
from reprise.server.metrics import CONTENT_TYPE, ServerMetrics
from reprise.server.protocol import CacheLookupRequest, ChatCompletionRequest, CompletionRequest
from reprise.server.responses import event_stream, response_body
from reprise.server.serving import Job, Serving

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(async_engine: AsyncEngine, served_model_name: str | None = None,
               api_key: str | None = None) -> FastAPI:
    """The app for one running AsyncEngine; the caller starts and shuts down the engine."""
    engine = async_engine.engine
    metrics = ServerMetrics(lambda: async_engine.call(engine.stats))
    serving = Serving(async_engine, metrics, served_model_name)
    app = FastAPI(title="reprise", version="0.1.0")
    app.state.serving = serving
    install_error_handlers(app)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(await asyncio.to_thread(metrics.exposition), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": serving.model_name, "object": "model", "created": created, "owned_by": "reprise",
                "root": str(engine.model_path), "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _respond(serving, serving.chat_job(body), request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _respond(serving, serving.completion_job(body), request)

    @app.post("/v1/cache/lookup")
    async def cache_lookup(body: CacheLookupRequest) -> dict:
        return (await serving.lookup(body)).model_dump()

    return app


async def _respond(serving: Serving, job: Job, request: Request) -> Response:
    if job.stream:
        return StreamingResponse(event_stream(serving, job), media_type="text/event-stream", headers=_SSE_HEADERS)
    work = asyncio.ensure_future(serving.run(job))
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not work.done():
        work.cancel()               # aborts the requests; the answer would reach no one
        raise APIError(400, "the client disconnected")
    return JSONResponse(response_body(job, work.result()))


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only disconnects arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <api_key>`, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and not self._authorized(scope):
            response = error_response(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        return secrets.compare_digest(header, self._expected)
