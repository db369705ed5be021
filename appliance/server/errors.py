"""API errors: OpenAI's `{"error": {...}}` shape, or Anthropic's under /v1/messages; never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

# Starlette's own classes (FastAPI's are these): `tokenspeed up` imports this module before it
# starts the engine ranks, and FastAPI's import is a quarter second more.
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

log = logging.getLogger(__name__)

ANTHROPIC_PREFIX = "/v1/messages"

OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                   503: "overloaded_error", 529: "overloaded_error"}


# Seconds a client is told to wait while the engine starts or restarts.
RETRY_AFTER_S = 5


class ApiError(Exception):
    """An error to report to the client with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s  # a Retry-After header: the SDKs wait that long


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def openai_error_body(status: int, message: str, param: str | None = None,
                      code: str | None = None) -> dict[str, Any]:
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def is_anthropic(request: Request) -> bool:
    return request.url.path.startswith(ANTHROPIC_PREFIX)


def error_response(request: Request, error: ApiError) -> JSONResponse:
    if is_anthropic(request):
        body = anthropic_error_body(error.status, error.message)
    else:
        body = openai_error_body(error.status, error.message, error.param, error.code)
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    return JSONResponse(body, status_code=error.status, headers=headers or None)


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A readable message naming the offending field(s), and the first field as `param`.

    A value that fits no member of a union fails once per member; per top-level field the error
    shown is one that failed a constraint (a range, a length) rather than a type, else the one
    that got deepest into the value: they say most about what is wrong."""
    chosen: dict[str, tuple[str, Any]] = {}  # top-level field -> (dotted path, error)
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", err.get("msg", ""))
            return f"The request body is not valid JSON: {detail}", None
        path = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_union_tag(p)]
        field = ".".join(path)
        key = path[0] if path else ""
        if key not in chosen or _rank(path, err) > _rank(chosen[key][0].split("."), chosen[key][1]):
            chosen[key] = (field, err)
    if not chosen:
        return "Invalid request body", None
    shown = list(chosen.values())[:3]
    parts = [f"{field}: {err.get('msg', 'invalid')}" if field else str(err.get("msg")) for field, err in shown]
    return "Invalid request: " + "; ".join(parts), shown[0][0] or None


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union member in `loc` ("str", "list[constrained-int]", "function-after[...]",
    and a discriminated union's tag: named "kind[...]" in the request models for this)."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_NAMES)


def _rank(path: list[str], err: Any) -> tuple[bool, int]:
    return not str(err.get("type", "")).endswith("_type"), len(path)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-str",
               "constrained-int", "constrained-float"}


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(request, exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc.errors())
    return error_response(request, ApiError(400, message, param=param))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    response = error_response(request, ApiError(exc.status_code, str(exc.detail)))
    if exc.status_code in (408, 413):  # refused mid-body: the rest must not be read as a request
        response.headers["connection"] = "close"
    return response


class CatchAllMiddleware:
    """A bug becomes a logged 500 in the API's error shape. Unlike an `Exception` handler (which
    Starlette re-raises, making uvicorn drop the keep-alive connection) nothing escapes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        send_error: Exception | None = None

        async def tracking_send(message: Message) -> None:
            nonlocal started, send_error
            started = started or message["type"] == "http.response.start"
            try:
                await send(message)
            except Exception as e:
                send_error = e
                raise

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            request = Request(scope)
            if e is send_error:  # the connection's failure, not the app's (e.g. a client that
                # pipelined requests and closed): one line, and nothing more can be sent
                log.warning("could not send the response to %s %s: %s", request.method,
                            request.url.path, e)
                return
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            if started:  # nothing sensible left to send; the client sees the stream end
                return
            await error_response(request, ApiError(500, "Internal server error"))(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(CatchAllMiddleware)
