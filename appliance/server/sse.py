"""Server-sent events: `data: <json>` lines (OpenAI) or `event: <name>` + `data:` (Anthropic)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from fastapi.responses import StreamingResponse

from appliance.server.errors import ApiError

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()


def dumps(obj: Any) -> str:
    return _encoder.encode(obj).decode()


def data(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


def event(name: str, obj: Any) -> str:
    return f"event: {name}\ndata: {dumps(obj)}\n\n"


def response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def guarded(chunks: AsyncIterator[str], on_error: Callable[[ApiError], str]) -> AsyncIterator[str]:
    """Pass chunks through; an error after the response started becomes a final error event."""
    try:
        async for chunk in chunks:
            yield chunk
    except ApiError as e:
        yield on_error(e)
    except Exception:
        log.exception("error while streaming a response")
        yield on_error(ApiError(500, "Internal server error while streaming"))
