"""While the engine loads (weights, CUDA graphs, warm-up): the daemon's sockets already answer.

`tokenspeed up` binds its sockets before it starts the engine; `WarmingUp` serves them meanwhile
with an app that answers `GET /health` 503 `{"status": "warming up"}` and every other request
503 in the API's error shape (OpenAI's, Anthropic's under /v1/messages) with `Retry-After`, so
a client or supervisor sees a starting daemon, not a refused connection. It serves duplicates
of the listening sockets: when it stops, the originals keep listening (connections that arrive
meanwhile wait in the backlog) and `serve()` takes them over with the real app.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from types import TracebackType

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from appliance.server.connection import uvicorn_config
from appliance.server.errors import RETRY_AFTER_S, ApiError, error_response
from appliance.server.serve import DrainingServer

STATUS = "warming up"
MESSAGE = "the engine is warming up (loading the model); retry shortly"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def warming_up_app() -> Starlette:
    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": STATUS}, status_code=503)

    async def unavailable(request: Request) -> JSONResponse:
        return error_response(request, ApiError(503, MESSAGE, retry_after_s=RETRY_AFTER_S))

    return Starlette(routes=[Route("/health", health, methods=["GET", "HEAD"]),
                             Route("/{path:path}", unavailable, methods=METHODS)])


class WarmingUp:
    """Serves `warming_up_app` on duplicates of `sockets` in a thread, for the `with` block."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self._sockets = [s.dup() for s in sockets]
        self._server = DrainingServer(uvicorn_config(warming_up_app(), timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve(sockets=self._sockets)),
                                        name="warming-up", daemon=True)

    def __enter__(self) -> WarmingUp:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._server.should_exit = True
        self._thread.join(5.0)
        for s in self._sockets:
            s.close()
