"""Where the dashboard's numbers come from: `GET /stats` over the daemon's Unix socket."""

from __future__ import annotations

from typing import Any

import httpx

from appliance.config import AppConfig

TIMEOUT_S = 2.0


class StatsUnavailable(Exception):
    """The daemon did not answer (not running, socket missing, error status, bad JSON)."""


class StatsSource:
    def __init__(self, socket_path: str, api_key: str | None = None) -> None:
        self.socket_path = socket_path
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=socket_path),
                                       base_url="http://tokenspeed", headers=headers, timeout=TIMEOUT_S)

    @classmethod
    def for_config(cls, config: AppConfig) -> StatsSource:
        return cls(config.server.socket, config.server.api_key)

    async def fetch(self) -> dict[str, Any]:
        try:
            response = await self._http.get("/stats")
            response.raise_for_status()
            stats = response.json()
        except (httpx.HTTPError, OSError, ValueError) as e:
            raise StatsUnavailable(_describe(e)) from None
        if not isinstance(stats, dict):
            raise StatsUnavailable("/stats did not return a JSON object")
        return stats

    async def aclose(self) -> None:
        await self._http.aclose()


def _describe(error: Exception) -> str:
    if isinstance(error, httpx.HTTPStatusError):
        return f"/stats answered {error.response.status_code}"
    if isinstance(error, httpx.ConnectError):
        return "no daemon is listening on the socket"
    return str(error) or type(error).__name__
