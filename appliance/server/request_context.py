"""Who is asking and in which agent session: the model check, `session` and `user` hints.

Session hint (the engine keeps a session's KV pages while the agent waits on a tool): header
`x-session-id`, else the body's `session_id` (OpenAI) or `metadata.session_id` (Anthropic), else
the session Claude Code embeds in `metadata.user_id` (`user_<id>_account_<id>_session_<uuid>`).
User (for /stats and the dashboard): header `x-tokenspeed-user`, else the OpenAI `user` field or
Anthropic `metadata.user_id`.
"""

from __future__ import annotations

import time

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.server.errors import ApiError
from appliance.server.json_body import strict_loads
from appliance.server.state import AppState

ARRIVAL_KEY = "tokenspeed.arrival"
SESSION_HEADER = "x-session-id"
USER_HEADER = "x-tokenspeed-user"
MAX_HINT_LEN = 256


def session_hint(request: Request, *body_values: str | None) -> str:
    return _first(request.headers.get(SESSION_HEADER), *body_values)


def user_hint(request: Request, *body_values: str | None) -> str:
    return _first(request.headers.get(USER_HEADER), *body_values)


def claude_code_ids(user_id: str | None) -> tuple[str | None, str | None]:
    """(user, session) of an Anthropic `metadata.user_id` as Claude Code writes it: the older
    `user_<hash>_account_<uuid>_session_<uuid>` (the user is `user_<hash>`), or a JSON object
    with `session_id` and `device_id` / `account_uuid` (the user is the account, else the
    device). Any other value is the user, with no session."""
    if not user_id:
        return None, None
    if user_id.lstrip().startswith("{"):
        try:
            ids = strict_loads(user_id)
        except ValueError:
            ids = None
        if isinstance(ids, dict):
            user = next((v for v in (ids.get("account_uuid"), ids.get("device_id"))
                         if isinstance(v, str) and v), None)
            session = ids.get("session_id")
            return user, session if isinstance(session, str) and session else None
    if "_session_" not in user_id:
        return user_id, None
    head, session = user_id.rsplit("_session_", 1)
    return head.split("_account_", 1)[0] or None, session or None


def check_model(state: AppState, model: str | None) -> None:
    """Like vLLM: a model name other than the served one is a 404 (an absent one means ours)."""
    if model and model != state.model_name:
        raise ApiError(404, f"The model `{model}` does not exist. This server serves "
                            f"`{state.model_name}`.", param="model", code="model_not_found")


def _first(*values: str | None) -> str:
    for value in values:
        if value and value.strip():
            return value.strip()[:MAX_HINT_LEN]
    return ""


class ArrivalTimeMiddleware:
    """Stamps each request's arrival (monotonic clock) before the body is read and parsed, so
    time to first token includes parsing, templating and tokenization."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[ARRIVAL_KEY] = time.monotonic()
        await self.app(scope, receive, send)


def arrival_time(request: Request) -> float | None:
    return request.scope.get(ARRIVAL_KEY)
