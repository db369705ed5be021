"""`TopApp`: the Textual dashboard behind `tokenspeed top`."""

from __future__ import annotations

import time
from typing import Any

from textual.app import App, ComposeResult
from textual.widgets import DataTable, Footer, Header, Label, Static

from appliance.tui import view
from appliance.tui.source import StatsSource, StatsUnavailable

POLL_INTERVAL_S = 0.5


class TopApp(App[int]):
    TITLE = "tokenspeed top"
    CSS = """
    #status { height: auto; padding: 0 1; color: $success; }
    #status.down { color: $error; text-style: bold; }
    #kv, #summary { height: auto; padding: 0 1; }
    Label { padding: 1 1 0 1; text-style: bold; }
    #requests { height: 2fr; }
    #users { height: 1fr; }
    """
    BINDINGS = [("q", "quit", "Quit")]

    def __init__(self, source: StatsSource, interval_s: float = POLL_INTERVAL_S) -> None:
        super().__init__()
        self.source = source
        self.interval_s = interval_s
        self.stats: dict[str, Any] | None = None
        self.reachable: bool | None = None
        self._polling = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"connecting to {self.source.socket_path} ...", id="status")
        yield Static("", id="kv")
        yield Static("", id="summary")
        yield Label("Active requests")
        yield DataTable(id="requests", cursor_type="none", zebra_stripes=True)
        yield Label("Users")
        yield DataTable(id="users", cursor_type="none")
        yield Footer()

    def on_mount(self) -> None:
        requests = self.query_one("#requests", DataTable)
        requests.add_columns("rid", "user", "prompt tok", "generated", "decode tok/s")
        self.query_one("#users", DataTable).add_columns("user", "requests", "generated", "decode tok/s")
        self.set_interval(self.interval_s, self.poll)
        self.call_later(self.poll)

    async def on_unmount(self) -> None:
        await self.source.aclose()

    async def poll(self) -> None:
        if self._polling:  # a slow answer: skip this tick rather than pile up requests
            return
        self._polling = True
        try:
            stats = await self.source.fetch()
        except StatsUnavailable as e:
            self.show_unreachable(str(e))
        else:
            self.show(stats)
        finally:
            self._polling = False

    def show_unreachable(self, reason: str) -> None:
        self.reachable = False
        status = self.query_one("#status", Static)
        status.add_class("down")
        status.update(f"daemon unreachable at {self.source.socket_path}: {reason} "
                      f"(retrying every {self.interval_s:g} s; is `tokenspeed up` running?)")

    def show(self, stats: dict[str, Any]) -> None:
        self.stats, self.reachable = stats, True
        status = self.query_one("#status", Static)
        status.remove_class("down")
        status.update(f"connected to {self.source.socket_path}   updated {time.strftime('%H:%M:%S')}")
        self.query_one("#kv", Static).update(view.kv_bar(stats.get("kv", {})))
        self.query_one("#summary", Static).update(view.summary(stats))
        _fill(self.query_one("#requests", DataTable), view.request_rows(stats))
        _fill(self.query_one("#users", DataTable), view.user_rows(stats))


def _fill(table: DataTable, rows: list[tuple[str, ...]]) -> None:
    table.clear()
    table.add_rows(rows)
