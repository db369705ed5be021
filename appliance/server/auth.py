"""API-key check: when `server.api_key` is set, `/v1/*`, `/stats` and `/metrics` need
`Authorization: Bearer <key>` (OpenAI SDKs) or `x-api-key: <key>` (Anthropic SDKs); `/health`
stays open for probes."""

from __future__ import annotations

import secrets

from fastapi import Request

from appliance.server.errors import ApiError
from appliance.server.state import get_state


def presented_keys(request: Request) -> list[str]:
    """The keys the request carries: `x-api-key` and a bearer token (clients may send both,
    e.g. an SDK's default x-api-key next to the Authorization header a proxy adds)."""
    keys = []
    header = request.headers.get("x-api-key", "").strip()
    if header:
        keys.append(header)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    return keys


async def require_api_key(request: Request) -> None:
    """FastAPI dependency; raises a 401 in the API's error shape. Either correct key passes."""
    expected = get_state(request).config.server.api_key
    if not expected:
        return
    keys = presented_keys(request)
    if not keys:
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                       code="invalid_api_key")
    if not any(secrets.compare_digest(key.encode(), expected.encode()) for key in keys):
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
