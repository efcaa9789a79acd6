"""OpenAI-shaped errors: every failure leaves as `{"error": {"message", "type", "param", "code"}}`
(on the Anthropic routes, /v1/messages*, as Anthropic's `{"type": "error", "error": {"type", "message"}}`).

Bad input is 400 (validation is never FastAPI's 422, and a prompt past the model's context is 400
`context_length_exceeded`, as OpenAI answers), a missing or wrong key 401, an unknown model or route
404, a request past a limit this server sets (body bytes, prompt tokens, the KV pool, prompts per
request) 413, a full waiting queue 429 with `Retry-After`, a dead engine 503. Unexpected failures
are logged and answered 503 with the same shape, so no client ever sees a bare 500 or an HTML page.
Bodies are rendered as ASCII JSON, so a message quoting input with a lone surrogate still encodes.

Logs never quote a request: exception messages can (pydantic, KeyError, tokenizer errors), so they
are logged as their type and stack only, unless the server runs with --log-prompts.
"""
from __future__ import annotations

import json
import logging
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from reprise.engine.async_engine import EngineDead, RequestFailed

log = logging.getLogger("reprise")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "server_error"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "api_error"}


class APIError(Exception):
    """Raised anywhere in a handler; becomes an OpenAI error response with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


class _ASCIIJSONResponse(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_body(status: int, message: str, param: str | None = None, code: str | None = None, path: str = "") -> dict:
    """OpenAI's shape; Anthropic's (`{"type": "error", "error": {"type", "message"}}`) on its routes."""
    if is_anthropic_path(path):
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "invalid_request_error"),
                                           "message": message}}
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def is_anthropic_path(path: str) -> bool:
    """The Anthropic Messages API's routes (/v1/messages and /v1/messages/count_tokens)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    return _ASCIIJSONResponse(error_body(status, message, param, code, path), status_code=status, headers=headers)


def stream_failure(job_id: str, error: BaseException, log_prompts: bool) -> APIError:
    """A failure inside a stream whose headers are sent: logged (our own errors, which quote no
    input, by message; others as log_failure does), and returned as the APIError to report in it."""
    if isinstance(error, (APIError, EngineDead, RequestFailed)):
        log.error("stream %s failed: %s", job_id, error)
    else:
        log_failure(f"stream {job_id} failed", error, log_prompts)
    return error if isinstance(error, APIError) else APIError(503, f"generation failed: {error}")


def log_failure(what: str, error: BaseException, log_prompts: bool) -> None:
    """Logs an unexpected failure: with its message only under --log-prompts (messages can quote input)."""
    if log_prompts:
        log.error("%s", what, exc_info=error)
        return
    stack = "".join(traceback.format_tb(error.__traceback__))
    log.error("%s: %s (message withheld: it may quote the request; --log-prompts shows it)\n%s",
              what, type(error).__name__, stack.rstrip())


def sse_error(error: APIError) -> str:
    """An error that happens after a stream started: one SSE event in the same shape."""
    return f"data: {json.dumps(error_body(error.status, error.message, error.param, error.code))}\n\n"


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic errors. `param` is the dotted path of the first bad field, cut
    where the errors about that field part ways (a union reports one error per member type)."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    loc = _field_path(first)
    if not loc and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    for other in errors[1:]:
        other_loc = _field_path(other)
        if loc and other_loc[:1] == loc[:1]:
            shared = next((i for i, (a, b) in enumerate(zip(loc, other_loc)) if a != b), min(len(loc), len(other_loc)))
            loc = loc[:shared]
    param = ".".join(loc) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


def _field_path(error: dict) -> list[str]:
    loc = [str(part) for part in error.get("loc", ())]
    return loc[1:] if loc[:1] == ["body"] else loc


async def _on_api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(error.status, error.message, error.param, error.code, error.headers, request.url.path)


async def _on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(error.errors()))
    return error_response(400, message, param, path=request.url.path)


async def _on_http_error(request: Request, error: HTTPException) -> JSONResponse:
    status = error.status_code if error.status_code < 500 else 503
    return error_response(status, str(error.detail), code="not_found" if status == 404 else None,
                          path=request.url.path)


def install_error_handlers(app: FastAPI, log_prompts: bool = False) -> None:
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        log_failure(f"unhandled error on {request.method} {request.url.path}", error, log_prompts)
        return error_response(503, f"internal error: {type(error).__name__}: {error}", path=request.url.path)

    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
