"""`reprise route`: the router's HTTP app and its start-up.

    reprise route --replica http://10.0.0.1:8000 --replica http://10.0.0.2:8000 \
                  --kv-store redis://10.0.0.9:6379/0 [--model PATH] [--port 8080]

Proxies /v1/chat/completions, /v1/completions, /v1/messages and /v1/responses (streams too) to
the replica policy.py picks; /v1/models from any replica; /health (200 while a replica answers);
/metrics (metrics.py). Without --kv-store the router knows no prefixes and routes by affinity and
load only.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from reprise.router.index import KvEventSubscriber, KvIndex
from reprise.router.metrics import RouterMetrics
from reprise.router.prompts import PromptReader
from reprise.router.proxy import POLICIES, NoReplica, Router
from reprise.router.replicas import DEFAULT_INTERVAL_S, ReplicaTable

log = logging.getLogger("reprise.router")

PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses")


def create_app(router: Router, subscriber: KvEventSubscriber | None = None) -> FastAPI:
    table, metrics = router.table, router.metrics

    async def follow_replicas() -> None:
        while True:
            await table.check_all()
            if subscriber is not None:
                subscriber.follow(table.replica_ids())
            for url, replica in table.replicas.items():
                metrics.healthy.labels(url).set(1 if replica.healthy else 0)
            for url, num_blocks in router.index_sizes().items():
                metrics.indexed.labels(url).set(num_blocks)
            await asyncio.sleep(table.interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(follow_replicas())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await router.close()
            await table.close()
            if subscriber is not None:
                await asyncio.to_thread(subscriber.close)

    app = FastAPI(title="reprise router", lifespan=lifespan)

    async def proxy(request: Request) -> Response:
        body = await request.body()
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            upstream = await router.forward(request.url.path, body, headers)
        except NoReplica as error:
            return _error(503, str(error), "no_replica")
        return StreamingResponse(upstream.body, status_code=upstream.status, headers=upstream.headers)

    for path in PROXIED:
        app.add_api_route(path, proxy, methods=["POST"])

    @app.get("/health")
    async def health() -> Response:
        healthy = table.healthy()
        if not healthy:
            return _error(503, "no replica is answering", "no_replica")
        return JSONResponse({"status": "ok", "replicas": [replica.url for replica in healthy]})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        healthy = table.healthy()
        if not healthy:
            return _error(503, "no replica is answering", "no_replica")
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-api-key")}
        answer = await router.client.get(f"{healthy[0].url}/v1/models", headers=headers)
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    return app


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None, "code": code}},
                        status_code=status)


def add_route_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replica", action="append", required=True, metavar="URL",
                        help="a `reprise serve` replica (repeat for each)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--kv-store", default=None, metavar="redis://HOST:PORT/DB",
                        help="the Redis the replicas publish their KV events on (their --kv-store)")
    parser.add_argument("--model", default=None, help="the served model's file or directory, for its tokenizer "
                        "and chat template (default: the default model)")
    parser.add_argument("--chat-template", default=None, metavar="FILE", help="the replicas' --chat-template")
    parser.add_argument("--policy", choices=POLICIES, default="prefix",
                        help="prefix: longest cached prefix weighed against load (default); round-robin: for comparison")
    parser.add_argument("--health-interval", type=float, default=DEFAULT_INTERVAL_S, metavar="SECONDS")


def route(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # not a line per health check
    table = ReplicaTable(args.replica, args.health_interval)
    index = KvIndex()
    subscriber = KvEventSubscriber(args.kv_store, index).start() if args.kv_store else None
    prompts = PromptReader(args.model, table.per_key, args.chat_template) if args.policy == "prefix" else None
    router = Router(table, index, prompts, RouterMetrics(), args.policy)
    log.info("reprise route on %s:%d: %d replicas, policy %s, KV events %s", args.host, args.port,
             len(table.replicas), args.policy, "on" if subscriber else "off (no --kv-store)")
    uvicorn.run(create_app(router, subscriber), host=args.host, port=args.port, log_level="warning")
    return 0
