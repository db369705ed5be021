"""`GET /stats`: the dashboard's JSON (docs/INTERFACES.md §5).

KV and queue figures and totals come from the engine's latest stats snapshot; throughput and
per-request decode TPS are measured here from token arrival times (a sliding 60 s window).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from appliance.server.auth import require_api_key
from appliance.server.state import AppState, get_state

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/stats")
async def stats(request: Request) -> JSONResponse:
    return JSONResponse(stats_snapshot(get_state(request)))


def speculative_figures(engine: dict[str, float]) -> dict[str, float]:
    """Drafts verified and accepted since start; mean accepted length = tokens a verify row
    emitted on average (its accepted drafts + the one token the target chose)."""
    drafted = int(engine.get("spec_draft_tokens_total", 0))
    accepted = int(engine.get("spec_accepted_tokens_total", 0))
    rows = int(engine.get("spec_verify_rows_total", 0))
    return {"draft_tokens": drafted, "accepted_tokens": accepted, "verify_rows": rows,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
            "mean_accepted_length": round(1 + accepted / rows, 4) if rows else 0.0}


def stats_snapshot(state: AppState) -> dict[str, Any]:
    engine = state.client.stats()
    tracker = state.tracker
    now = tracker.now()

    def count(key: str) -> int:
        return int(engine.get(key, 0))

    pages_total = count("pages_total")
    return {
        "model": state.model_name,
        "uptime_s": round(time.monotonic() - state.started_at, 3),
        "kv": {"page_size": count("page_size"), "pages_total": pages_total, "pages_used": count("pages_used"),
               "pages_cached": count("pages_cached"),
               "pages_free": int(engine.get("pages_free", pages_total - count("pages_used")))},
        "requests": {"running": count("requests_running"), "waiting": count("requests_waiting")},
        "throughput": {"generation_tokens_per_minute": round(tracker.generation_tokens_per_minute(), 3),
                       "prompt_tokens_per_minute": round(tracker.prompt_tokens_per_minute(), 3)},
        "speculative": speculative_figures(engine),
        "totals": {"prompt_tokens": count("prompt_tokens_total"),
                   "generation_tokens": count("generation_tokens_total"),
                   "prefix_cache_hit_tokens": count("prefix_cache_hit_tokens_total"),
                   "preemptions": count("preemptions_total")},
        "active": [{"rid": r.rid, "user": r.user, "prompt_tokens": r.prompt_tokens,
                    "generated_tokens": r.generated_tokens, "decode_tps": round(r.decode_tps(now), 3)}
                   for r in sorted(tracker.active(), key=lambda r: r.rid)],
    }
