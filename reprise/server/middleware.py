"""ASGI middleware: API keys (and the tenant salt they imply) and the request body size limit.

Both answer in OpenAI's error shape before the app runs, so a refused request costs no parsing.
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reprise.server.config import key_salt
from reprise.server.errors import error_response

TENANT_SALT = "reprise.tenant_salt"      # key in scope["state"]: the key-derived cache salt


class BearerAuth:
    """/v1/* needs `Authorization: Bearer <one of api_keys>` or, as Anthropic's clients send it,
    `x-api-key: <one of api_keys>`; /health and /metrics stay open.

    Every key is compared in constant time, all of them every time, so timing reveals neither a
    key nor which one matched. With `salt_per_key`, the matched key's salt goes into
    `scope["state"][TENANT_SALT]`.
    """

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], salt_per_key: bool):
        self.app = app
        self._expected = [(f"Bearer {key}".encode(), key.encode(), key_salt(key) if salt_per_key else None)
                          for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        matched = self._match(headers.get(b"authorization", b""), headers.get(b"x-api-key", b""))
        if matched is None:
            response = error_response(401, "Missing or invalid API key: send 'Authorization: Bearer <key>' or "
                                      "'x-api-key: <key>'.", code="invalid_api_key", path=scope["path"])
            await response(scope, receive, send)
            return
        if matched[2] is not None:
            scope.setdefault("state", {})[TENANT_SALT] = matched[2]
        await self.app(scope, receive, send)

    def _match(self, bearer: bytes, api_key: bytes) -> tuple[bytes, bytes, str | None] | None:
        found = None
        for expected in self._expected:
            if hmac.compare_digest(bearer, expected[0]) | hmac.compare_digest(api_key, expected[1]):
                found = expected
        return found


class BodyLimit:
    """Refuses a body over `max_body_bytes` with 413: at once from Content-Length, else by counting
    the chunks of a chunked upload as they arrive. The body is read here and replayed to the app,
    which reads whole bodies anyway; later receives (disconnects) pass through."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return
        first = await self._read_body(receive)
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
