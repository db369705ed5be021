"""`GET /health`, `GET /v1/models` and `GET /v1/models/{id}`."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from appliance.server.auth import require_api_key
from appliance.server.request_context import check_model
from appliance.server.state import AppState, get_state

router = APIRouter()
models_router = APIRouter(dependencies=[Depends(require_api_key)])


@router.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers probe with it
async def health(request: Request) -> JSONResponse:
    """200 `{"status": "ok"}` while the engine serves; else 503 with the engine's status
    ("starting" | "restarting" | "failed") and nothing more. Before the engine is up, the
    warm-up server answers instead: 503 "warming up" (warming_up.py)."""
    status = get_state(request).engine_status
    return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)


@models_router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = get_state(request)
    card = _card(state)
    return JSONResponse({"object": "list", "data": [card], "has_more": False,
                         "first_id": state.model_name, "last_id": state.model_name})


@models_router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    state = get_state(request)
    check_model(state, model_id)
    return JSONResponse(_card(state))


def _card(state: AppState) -> dict[str, Any]:
    created = int(state.created_at)
    card = {"id": state.model_name, "object": "model", "created": created, "owned_by": "tokenspeed",
            "max_model_len": state.client.max_model_len,
            # the same list also satisfies the Anthropic SDK's models.list()
            "type": "model", "display_name": state.model_name,
            "created_at": datetime.fromtimestamp(created, timezone.utc).isoformat().replace("+00:00", "Z")}
    return card
