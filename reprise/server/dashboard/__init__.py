"""The dashboard: `GET /dashboard` (the cache, live), `GET /chat` (try the model), and the JSON
behind them, `GET /v1/dashboard/state`. The pages are static files of this package (HTML, plain
JavaScript drawing SVG, no CDN); they poll the state every 1.5 s.

How tenants are kept apart:
- Without API keys, there are no tenants to tell apart: every namespace is shown.
- With API keys, all three routes need one of them. /v1/dashboard/state sits behind the server's
  Bearer check like every /v1 route; the pages accept `Authorization: Bearer KEY` or HTTP Basic
  with the key as password (so a browser prompts for it), compared in constant time with every key.
  The pages hold no data: their scripts ask for the key once more to call /v1 themselves.
- With several keys (each its own namespace, the default), a caller sees only its own key's
  namespaces (the key's salt and the `<key salt>:<cache_salt>` ones under it) in everything keyed
  by namespace: the tree, the recent requests, per-namespace hit rates, TTFT by hit and miss. One
  key, or keys with --shared-cache, share one namespace, so their holders see it all. The admin
  key (--admin-key) sees every namespace. Engine-wide numbers (pool blocks, the cache's hit and query counters, evictions,
  preemptions) are shown to every caller: /metrics already publishes them without a key.
- Namespaces are named by a short digest of their salt ("shared" without one), never by the salt;
  token text appears in the tree only when the server runs with --log-prompts.
"""
from __future__ import annotations

import base64
import hmac
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response

from reprise.engine.async_engine import AsyncEngine
from reprise.server.config import ServerConfig
from reprise.server.dashboard.history import PoolHistory
from reprise.server.dashboard.ledger import RequestLedger
from reprise.server.dashboard.state import build_state, caller_scope
from reprise.server.errors import APIError
from reprise.server.middleware import TENANT_SALT

_ASSETS = {"dashboard.js": "text/javascript", "chat.js": "text/javascript", "common.js": "text/javascript",
           "style.css": "text/css"}
_PAGE_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": "default-src 'self'; style-src 'self'",
                 "X-Content-Type-Options": "nosniff"}


def install_dashboard(app: FastAPI, async_engine: AsyncEngine, ledger: RequestLedger, config: ServerConfig) -> None:
    """Adds the routes and starts sampling the pool; `ledger` is the one Serving records into."""
    history = PoolHistory(async_engine, ledger)
    history.start()
    keyed = bool(config.api_keys)
    page_keys = config.api_keys + ((config.admin_key,) if config.admin_key is not None and keyed else ())

    @app.get("/dashboard")
    async def dashboard(request: Request) -> Response:
        return _page(request, page_keys, "dashboard.html")

    @app.get("/chat")
    async def chat(request: Request) -> Response:
        return _page(request, page_keys, "chat.html")

    @app.get("/dashboard/assets/{name}")
    async def asset(name: str, request: Request) -> Response:
        if name not in _ASSETS:
            raise APIError(404, f"no dashboard asset {name!r}", code="not_found")
        return _page(request, page_keys, name, _ASSETS[name])

    @app.get("/v1/dashboard/state")
    async def state(request: Request) -> dict:
        visible, own = caller_scope(request.scope.get("state", {}).get(TENANT_SALT), keyed)
        return await build_state(async_engine, history, ledger, visible, own, config.log_prompts)


def _page(request: Request, keys: tuple[str, ...], name: str, media_type: str = "text/html") -> Response:
    if keys and not _has_key(request.headers.get("authorization", ""), keys):
        raise APIError(401, "The dashboard needs an API key: send 'Authorization: Bearer <key>', or sign in with "
                       "the key as password.", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Basic realm="reprise", charset="UTF-8"'})
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return Response(body, media_type=media_type, headers=_PAGE_HEADERS)


def _has_key(authorization: str, api_keys: tuple[str, ...]) -> bool:
    """Whether the header carries one of the keys, as a Bearer token or a Basic password; every
    key is compared, in constant time."""
    scheme, _, credentials = authorization.partition(" ")
    offered = credentials.strip()
    if scheme.lower() == "basic":
        try:
            offered = base64.b64decode(offered, validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    found = False
    for key in api_keys:
        found |= hmac.compare_digest(offered.encode(), key.encode())
    return found
