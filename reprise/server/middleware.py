"""ASGI middleware: API keys (and the tenant salt they imply) and the request body size limit.

Both answer in OpenAI's error shape before the app runs, so a refused request costs no parsing.
"""
from __future__ import annotations

import asyncio
import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reprise.server.config import key_salt
from reprise.server.errors import error_response

TENANT_SALT = "reprise.tenant_salt"      # key in scope["state"]: the key-derived cache salt


ADMIN_PATHS = frozenset({"/v1/cache/check"})     # across tenants: the admin key's alone
_ADMIN_ALSO = frozenset({"/v1/models", "/v1/dashboard/state"})   # what else the admin key may call


class BearerAuth:
    """/v1/* needs `Authorization: Bearer <key>` or, as Anthropic's clients send it, `x-api-key: <key>`;
    /health and /metrics stay open.

    Keys are the API keys (tenants) and the admin key. Every key is compared in constant time, all
    of them every time, so timing reveals neither a key nor which one matched. Who may call what:
    - an API key: every /v1 route but ADMIN_PATHS; under isolation (several keys, no
      --shared-cache) its salt goes into `scope["state"][TENANT_SALT]`, so everything it touches
      lies in its own namespace;
    - the admin key: ADMIN_PATHS, /v1/models and the dashboard's state (every namespace); anything
      else is 403: it is not an inference key, so it never sits in a client's configuration;
    - ADMIN_PATHS without an admin key configured: open to the key holder when there is at most
      one key (one tenant: nothing to see across), else 403 for everyone;
    - no API key configured (only an admin key): inference is open, ADMIN_PATHS need the admin key.
    Missing or wrong key: 401; a valid key on a route it may not call: 403.
    """

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], isolated: bool, admin_key: str | None = None):
        self.app = app
        self._open = not api_keys
        self._admin_paths_open = admin_key is None and len(api_keys) <= 1
        self._expected = [(f"Bearer {key}".encode(), key.encode(), key_salt(key) if isolated else None)
                          for key in api_keys]
        self._admin = (f"Bearer {admin_key}".encode(), admin_key.encode(), None) if admin_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = dict(scope["headers"])
        matched = self._match(headers.get(b"authorization", b""), headers.get(b"x-api-key", b""))
        refusal = self._refusal(matched, path)
        if refusal is not None:
            await error_response(*refusal, path=path)(scope, receive, send)
            return
        if matched is not None and matched[2] is not None:
            scope.setdefault("state", {})[TENANT_SALT] = matched[2]
        await self.app(scope, receive, send)

    def _refusal(self, matched, path: str) -> tuple | None:
        """(status, message, param, code) when the caller may not call `path`, else None."""
        admin = matched is not None and matched is self._admin
        if matched is None and not (self._open and path not in ADMIN_PATHS):
            return (401, "Missing or invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                    None, "invalid_api_key")
        if admin and path not in ADMIN_PATHS and path not in _ADMIN_ALSO:
            return (403, "The admin key is for administration only (/v1/cache/check, the dashboard); send an "
                    "API key for this route.", None, "admin_key_not_allowed")
        if not admin and path in ADMIN_PATHS and not self._admin_paths_open:
            return (403, f"{path} sees across tenants: it needs the admin key (--admin-key).", None,
                    "admin_key_required")
        return None

    def _match(self, bearer: bytes, api_key: bytes) -> tuple[bytes, bytes, str | None] | None:
        found = None
        for expected in self._expected + ([self._admin] if self._admin is not None else []):
            if hmac.compare_digest(bearer, expected[0]) | hmac.compare_digest(api_key, expected[1]):
                found = expected
        return found


class BodyLimit:
    """Refuses a body over `max_body_bytes` with 413: at once from Content-Length, else by counting
    the chunks of a chunked upload as they arrive; and a body that takes longer than
    `read_timeout_s` to arrive (a slow or stalled upload) with 408 and `Connection: close`, which
    ends the connection. The body is read here and replayed to the app, which reads whole bodies
    anyway; later receives (disconnects) pass through."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, read_timeout_s: float | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.read_timeout_s):
                first = await self._read_body(receive)
        except TimeoutError:
            response = error_response(408, f"The request body did not arrive within {self.read_timeout_s:g} s "
                                      "(--read-timeout).", code="request_timeout", headers={"Connection": "close"},
                                      path=scope["path"])
            await response(scope, receive, send)
            return
        if first is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, _replay(first, receive), send)

    async def _read_body(self, receive: Receive) -> Message | None:
        """The whole body as one message (or the disconnect that cut it short); None past the limit."""
        chunks: list[bytes] = []
        num_bytes = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunks.append(message.get("body", b""))
            num_bytes += len(chunks[-1])
            if num_bytes > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"The request body is larger than this server's limit of "
                                  f"{self.max_body_bytes} bytes (--max-body-bytes).", code="body_too_large",
                                  path=scope["path"])
        await response(scope, receive, send)


def _replay(first: Message, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return first
    return replay
