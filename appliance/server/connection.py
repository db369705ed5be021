"""HTTP connection limits: a deadline for each request's headers and an idle keep-alive timeout.

uvicorn closes a keep-alive connection that stays idle `timeout_keep_alive` seconds after a
response, but sets no deadline before a request's headers are complete: a client that connects
and sends nothing, or trickles its headers a byte at a time, would hold a connection for ever.
`HeaderTimeoutProtocol` closes such a connection HEADER_TIMEOUT_S after it opened (or after the
first byte of a later request on it). Bodies are bounded in size by `server.max_body_bytes`.
A request uvicorn cannot parse gets the API's JSON error shape (OpenAI's, or Anthropic's under
/v1/messages), not uvicorn's plain-text 400 (QA).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from appliance.server.errors import ANTHROPIC_PREFIX, anthropic_error_body, openai_error_body

HEADER_TIMEOUT_S = 10.0
# Longer than clients keep an idle connection (httpx, so the openai/anthropic SDKs: 5 s; Node:
# 4-5 s), so that the client, not the server, closes it: a server that closes first races a
# client reusing the connection, whose request then fails with no response at all.
KEEP_ALIVE_TIMEOUT_S = 20


class HeaderTimeoutProtocol(HttpToolsProtocol):
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request that does not parse as HTTP: 400 in the API's error shape, then close (as
        uvicorn's own, which answers in plain text)."""
        path = bytes(getattr(self, "url", b"") or b"").decode("latin-1")
        body = (anthropic_error_body(400, msg) if path.startswith(ANTHROPIC_PREFIX)
                else openai_error_body(400, msg))
        data = json.dumps(body).encode()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n",
                 b"content-length: " + str(len(data)).encode("ascii") + b"\r\n",
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + data)
        self.transport.close()


def uvicorn_config(app: Any, **options: Any) -> uvicorn.Config:
    """The uvicorn config every server of the app uses: httptools with the header deadline,
    the keep-alive timeout, no lifespan, the process's own logging."""
    return uvicorn.Config(app, http=HeaderTimeoutProtocol, timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S,
                          lifespan="off", log_config=None, **options)
