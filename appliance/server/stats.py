"""`GET /stats`: the dashboard's JSON (docs/INTERFACES.md §5).

From the engine's latest snapshot: KV pages (pinned by sessions among them), the queue, totals
and where each request stands in the scheduler (state, context, cached tokens), the cost
model's predicted against measured step time (engine/step_timing.py). Measured here:
tokens per minute and their last minutes (token arrival times, tracker.py), each request's
decode TPS over the last 5 s, the prefix-cache hit rate of the last minute (counter_window.py),
speculative decoding's drafted/accepted counts, GPU telemetry (gpus.py). Requests are grouped
into users by session, else by user.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from appliance.engine.protocol import RequestProgress
from appliance.server.auth import require_api_key
from appliance.server.counter_window import CounterWindow
from appliance.server.state import AppState, get_state
from appliance.server.tracker import RequestTracker, TrackedRequest

router = APIRouter(dependencies=[Depends(require_api_key)])

HISTORY_BUCKET_S = 5  # sparkline points: 60 of them over the tracker's 5 minutes
TOTALS = {"prompt_tokens": "prompt_tokens_total", "generation_tokens": "generation_tokens_total",
          "prefix_cache_hit_tokens": "prefix_cache_hit_tokens_total", "preemptions": "preemptions_total"}


@router.get("/stats")
async def stats(request: Request) -> JSONResponse:
    return JSONResponse(stats_snapshot(get_state(request)))


def speculative_figures(engine: dict[str, float]) -> dict[str, float]:
    """Drafts verified and accepted since start; mean accepted length = tokens a verify row
    emitted on average (its accepted drafts + the one token the target chose); paused_steps:
    decode steps left before anyone drafts again (the batch-wide pause while verify steps
    emit fewer tokens a second than plain ones: engine/speculative/policy.py's BatchGate)."""
    drafted = int(engine.get("spec_draft_tokens_total", 0))
    accepted = int(engine.get("spec_accepted_tokens_total", 0))
    rows = int(engine.get("spec_verify_rows_total", 0))
    return {"draft_tokens": drafted, "accepted_tokens": accepted, "verify_rows": rows,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
            "mean_accepted_length": round(1 + accepted / rows, 4) if rows else 0.0,
            "paused_steps": int(engine.get("spec_gate_paused_steps", 0))}


def stats_snapshot(state: AppState) -> dict[str, Any]:
    engine = state.client.stats()
    tracker = state.tracker
    now = tracker.now()
    gpus = state.client.info.devices

    def count(key: str) -> int:
        return int(engine.get(key, 0))

    totals = {name: count(key) for name, key in TOTALS.items()}
    progress = state.client.request_progress()
    active = [_request(r, progress.get(r.rid), now) for r in sorted(tracker.active(), key=lambda r: r.rid)]
    pages_total, pages_used = count("pages_total"), count("pages_used")
    return {
        "model": state.model_name,
        "uptime_s": round(time.monotonic() - state.started_at, 3),
        "engine": state.engine_status,
        "device": "cuda" if gpus else "cpu",
        "tp_size": state.config.parallel.tp_size,
        "tps_floor": state.config.scheduler.tps_floor,
        "kv": {"page_size": count("page_size"), "pages_total": pages_total, "pages_used": pages_used,
               "pages_pinned": count("pages_pinned"), "pages_cached": count("pages_cached"),
               "pages_free": int(engine.get("pages_free", pages_total - pages_used))},
        "requests": {"running": count("requests_running"), "waiting": count("requests_waiting")},
        "throughput": _throughput(tracker, len(gpus)),
        "prefix_cache": _prefix_cache(totals, state.counters, now),
        "speculative": speculative_figures(engine),
        "step_time": _step_time(engine),
        "totals": totals,
        "history": {"bucket_s": HISTORY_BUCKET_S, **tracker.history(HISTORY_BUCKET_S)},
        "gpus": state.gpus.read(),
        "active": active,
        "users": _users(active),
    }


def _throughput(tracker: RequestTracker, num_gpus: int) -> dict[str, float | None]:
    generated = tracker.generation_tokens_per_minute()
    return {"generation_tokens_per_minute": round(generated, 3),
            "prompt_tokens_per_minute": round(tracker.prompt_tokens_per_minute(), 3),
            "generation_tokens_per_minute_per_gpu": round(generated / num_gpus, 3) if num_gpus else None}


def _step_time(engine: Mapping[str, float]) -> dict[str, float] | None:
    """The scheduler's cost model: its predicted step time against the measured one (launch to
    commit, what it is fitted on), means over the engine's last steps; None before a step."""
    if "step_time_measured_s" not in engine:
        return None
    return {"predicted_ms": round(1e3 * engine["step_time_predicted_s"], 3),
            "measured_ms": round(1e3 * engine["step_time_measured_s"], 3),
            "abs_error_ms": round(1e3 * engine["step_time_abs_error_s"], 3),
            "window_steps": int(engine["step_time_window_steps"])}


def _prefix_cache(totals: Mapping[str, int], window: CounterWindow, now: float) -> dict[str, Any]:
    """Hit rate (prompt tokens served from the cache) since start and over the last minute."""
    counters = {k: float(totals[k]) for k in ("prompt_tokens", "prefix_cache_hit_tokens")}
    change, covered_s = window.change(now, counters)
    window.record(now, counters)
    return {"hit_rate": _ratio(totals["prefix_cache_hit_tokens"], totals["prompt_tokens"]),
            "hit_rate_last_minute": _ratio(change.get("prefix_cache_hit_tokens", 0.0),
                                           change.get("prompt_tokens", 0.0)),
            "last_minute_covers_s": round(covered_s, 1)}


def _request(tracked: TrackedRequest, progress: RequestProgress | None, now: float) -> dict[str, Any]:
    """One request: the frontend's view, plus the scheduler's where it has reported it (a
    request it has not reported yet is queued, or decoding once tokens arrive). `decode_tps` is
    None until the first token."""
    if progress is None:
        state = "decoding" if tracked.generated_tokens else "queued"
        context, cached, prefill = tracked.prompt_tokens + tracked.generated_tokens, 0, None
    else:
        state, context, cached = progress.state, progress.context_tokens, progress.cached_tokens
        prefill = (round(100.0 * progress.kv_tokens / context, 1)
                   if state == "prefilling" and context else None)
    return {"rid": tracked.rid, "user": tracked.user, "session": tracked.session,
            "prompt_tokens": tracked.prompt_tokens, "generated_tokens": tracked.generated_tokens,
            "decode_tps": None if tracked.first_token_at is None else round(tracked.decode_tps(now), 3),
            "state": state,
            "context_tokens": context, "cached_tokens": cached, "prefill_pct": prefill}


def _users(active: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Requests grouped by session (`x-session-id`, `session_id`, Claude Code's `metadata.user_id`),
    else by user (`x-tokenspeed-user`, OpenAI `user`); "" gathers the anonymous ones. `decode_tps`
    is the slowest decoding request's (what the floor is about), None when none decodes."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for request in active:
        groups.setdefault(request["session"] or request["user"], []).append(request)
    users = []
    for key, requests in sorted(groups.items()):
        states: dict[str, int] = {}
        for r in requests:
            states[r["state"]] = states.get(r["state"], 0) + 1
        # (a request the scheduler decodes may have no token at the frontend yet: no TPS)
        decoding = [r["decode_tps"] for r in requests
                    if r["state"] == "decoding" and r["decode_tps"] is not None]
        prefills = [r["prefill_pct"] for r in requests if r["prefill_pct"] is not None]
        users.append({
            "key": key, "user": requests[0]["user"], "session": requests[0]["session"],
            "requests": len(requests), "states": states,
            "prefill_pct": min(prefills) if prefills else None,
            "context_tokens": sum(r["context_tokens"] for r in requests),
            "cached_tokens": sum(r["cached_tokens"] for r in requests),
            "generated_tokens": sum(r["generated_tokens"] for r in requests),
            "decode_tps": min(decoding) if decoding else None,
        })
    return users


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None
