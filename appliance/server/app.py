"""`build_app`: the FastAPI app with every route, error handler and the app-owned state."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from appliance.config import AppConfig
from appliance.engine.sampling_defaults import SamplingDefaults
from appliance.server import anthropic, health, metrics, openai, responses, stats
from appliance.server.body_limit import BodyLimitMiddleware
from appliance.server.errors import install_error_handlers
from appliance.server.metrics import FrontendMetrics
from appliance.server.request_context import ArrivalTimeMiddleware
from appliance.server.state import AppState, EngineClientLike


def build_app(config: AppConfig, client: EngineClientLike, tokenizer: Any,
              sampling_defaults: SamplingDefaults = SamplingDefaults()) -> FastAPI:
    app = FastAPI(title="TokenSpeed", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tokenspeed = AppState(config=config, client=client, tokenizer=tokenizer,
                                    metrics=FrontendMetrics(client.stats),
                                    sampling_defaults=sampling_defaults)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.server.max_body_bytes)
    app.add_middleware(ArrivalTimeMiddleware)  # outermost: stamped before anything else runs
    for router in (health.router, health.models_router, *openai.ROUTERS, *responses.ROUTERS, *anthropic.ROUTERS,
                   metrics.router, stats.router):
        app.include_router(router)
    return app
