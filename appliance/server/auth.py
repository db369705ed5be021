"""API-key check: when `server.api_key` is set, `/v1/*`, `/stats` and `/metrics` need
`Authorization: Bearer <key>` (OpenAI SDKs) or `x-api-key: <key>` (Anthropic SDKs); `/health`
stays open for probes."""

from __future__ import annotations

import secrets

from fastapi import Request

from appliance.server.errors import ApiError
from appliance.server.state import get_state


def presented_key(request: Request) -> str | None:
    header = request.headers.get("x-api-key")
    if header:
        return header.strip()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return None


async def require_api_key(request: Request) -> None:
    """FastAPI dependency; raises a 401 in the API's error shape."""
    expected = get_state(request).config.server.api_key
    if not expected:
        return
    key = presented_key(request)
    if key is None:
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                       code="invalid_api_key")
    if not secrets.compare_digest(key.encode(), expected.encode()):
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
