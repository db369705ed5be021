"""`tokenspeed top`: a Textual dashboard of a running daemon, read over its Unix socket.

May import `appliance.config` and httpx/Textual only; it talks to the daemon through `/stats`.
"""

from __future__ import annotations

from appliance.config import AppConfig


def run_top(config: AppConfig) -> int:
    """Run the dashboard until `q`; keeps retrying while the daemon is unreachable."""
    from appliance.tui.app import TopApp
    from appliance.tui.source import StatsSource

    TopApp(StatsSource.for_config(config)).run()
    return 0
