"""Request bodies larger than `server.max_body_bytes` are refused with a 413 in the API's shape,
and bodies that do not arrive within BODY_TIMEOUT_S of the request with a 408.

A declared `Content-Length` over the limit is answered before a byte of the body is read; a
body without one (chunked) is counted as it arrives and refused once it passes the limit, so
the frontend never holds more than the limit for one request. The deadline covers the body
only (the headers have their own, connection.py): a client trickling a body a byte at a time
would otherwise hold its connection and buffer forever.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.server.errors import ApiError, error_response


def too_large_message(limit: int) -> str:
    return f"The request body is larger than this server's limit of {limit} bytes (server.max_body_bytes)"


class BodyTooLarge(HTTPException):
    """Raised from `receive` while the app reads the body; FastAPI passes HTTPExceptions on
    (anything else raised while parsing becomes a generic 400) and the app's handler writes it."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=too_large_message(limit))


BODY_TIMEOUT_S = 60.0  # loopback delivers 32 MiB in well under a second


class BodyTooSlow(HTTPException):
    def __init__(self) -> None:
        super().__init__(status_code=408, detail=f"The request body did not arrive within "
                                                 f"{BODY_TIMEOUT_S:.0f} s")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(request, ApiError(413, too_large_message(self.max_bytes)))
            response.headers["connection"] = "close"  # the unread body must not be parsed as a request
            await response(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        received, complete = 0, False
        deadline = time.monotonic() + BODY_TIMEOUT_S

        async def counted() -> Message:
            nonlocal received, complete
            if complete:  # after the body, receive() waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise BodyTooSlow() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                complete = not message.get("more_body", False)
            return message

        return counted
