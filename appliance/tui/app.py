"""`TopApp`: the Textual dashboard behind `tokenspeed top`.

Polls `/stats` every `interval_s` without blocking the screen (an async request; a tick that
finds the previous one still waiting is skipped) and redraws from the snapshot it got. While the
daemon does not answer it says so in red, keeps the last figures dimmed and keeps retrying.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Label, Sparkline, Static

from appliance.tui import view
from appliance.tui.source import StatsSource, StatsUnavailable

POLL_INTERVAL_S = 0.5


class TopApp(App[int]):
    TITLE = "tokenspeed top"
    CSS = """
    #top { height: 1; }
    #header { width: 1fr; padding: 0 1; }
    #status { width: auto; padding: 0 1; color: $success; }
    #status.down { color: $error; text-style: bold; }
    #banner { display: none; padding: 0 1; background: $error 30%; color: $text; text-style: bold; }
    #banner.shown { display: block; }
    .panel { border: round $primary; border-title-color: $accent; border-title-style: bold;
             height: auto; padding: 0 1; }
    #panels { height: auto; }
    #kv { width: 1fr; }
    #flow { width: 1fr; }
    #flow Sparkline { height: 1; margin: 0 0 0 0; }
    #flow Label { color: $text-muted; }
    #users { height: 1fr; border: round $primary; border-title-color: $accent; border-title-style: bold; }
    #body { display: none; }
    #body.ready { display: block; }
    .stale { opacity: 60%; }
    """
    BINDINGS = [("q", "quit", "Quit"), ("s", "next_sort", "Sort by next column"),
                ("r", "reverse_sort", "Reverse order")]

    def __init__(self, source: StatsSource, interval_s: float = POLL_INTERVAL_S) -> None:
        super().__init__()
        self.source = source
        self.interval_s = interval_s
        self.stats: dict[str, Any] | None = None  # the snapshot on screen
        self.reachable: bool | None = None
        self.sort_by, self.sort_reverse = view.SORT_KEYS[0], False
        self._polling = False
        self._timer = None  # the poll interval, from on_mount

    def compose(self) -> ComposeResult:
        with Horizontal(id="top"):
            yield Static("tokenspeed top", id="header")
            yield Static(f"connecting to {self.source.socket_path} ...", id="status")
        yield Static("", id="banner")
        with Vertical(id="body"):  # shown once the first snapshot arrives
            with Horizontal(id="panels"):
                yield Static("", id="kv", classes="panel")
                with Vertical(id="flow", classes="panel"):
                    yield Static("", id="throughput")
                    yield Label("", id="generated-label")
                    yield Sparkline([], id="generated-history")
                    yield Label("", id="prompt-label")
                    yield Sparkline([], id="prompt-history")
            yield Static("", id="gpus", classes="panel")
            yield DataTable(id="users", cursor_type="none", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#kv").border_title = "KV cache"
        self.query_one("#flow").border_title = "Throughput"
        self.query_one("#gpus").border_title = "GPUs"
        table = self.query_one("#users", DataTable)
        table.border_title = "Users"
        for column in view.USER_COLUMNS:
            table.add_column(column, key=column)
        self._title_users()
        self._timer = self.set_interval(self.interval_s, self.poll)
        self.call_later(self.poll)

    async def on_unmount(self) -> None:
        # No new polls, and the one in flight ends (TIMEOUT_S at most) before its client
        # closes: closing an HTTP client under a request it is still reading is a race.
        if self._timer is not None:
            self._timer.stop()
        while self._polling:
            await asyncio.sleep(0.01)
        await self.source.aclose()

    async def poll(self) -> None:
        if self._polling:  # a slow answer: skip this tick rather than pile up requests
            return
        self._polling = True
        try:
            stats: dict[str, Any] | None = await self.source.fetch()
            reason = ""
        except StatsUnavailable as e:
            stats, reason = None, str(e)
        finally:
            self._polling = False
        if not self.is_running:  # the answer came while the app shut down: nothing to draw on
            return
        if stats is None:
            self.show_unreachable(reason)
        else:
            self.show(stats)

    # --- drawing -------------------------------------------------------------------------------
    def show_unreachable(self, reason: str) -> None:
        self.reachable = False
        status = self.query_one("#status", Static)
        status.add_class("down")
        status.update("● reconnecting")
        banner = self.query_one("#banner", Static)
        banner.add_class("shown")
        banner.update(f"daemon unreachable at {self.source.socket_path}: {reason}; retrying every "
                      f"{self.interval_s:g} s (is `tokenspeed up` running?)"
                      + ("  The figures below are the last ones received." if self.stats else ""))
        for widget in self.query(".panel, #users"):
            widget.add_class("stale")

    def show(self, stats: dict[str, Any]) -> None:
        self.stats, self.reachable = stats, True
        status = self.query_one("#status", Static)
        status.remove_class("down")
        status.update(f"● live  {time.strftime('%H:%M:%S')}")
        self.query_one("#banner", Static).remove_class("shown")
        for widget in self.query(".stale"):
            widget.remove_class("stale")
        self.query_one("#body").add_class("ready")
        self.query_one("#header", Static).update(view.header(stats))
        self.query_one("#kv", Static).update(view.kv_panel(stats))
        self.query_one("#throughput", Static).update(view.throughput_panel(stats))
        for name, key, prefix in (("generated", "generation_tokens_per_s", "generated"),
                                  ("prompt", "prompt_tokens_per_s", "prompt")):
            self.query_one(f"#{name}-label", Label).update(view.history_label(stats, prefix, key))
            self.query_one(f"#{name}-history", Sparkline).data = view.history(stats, key)
        self.query_one("#gpus", Static).update(view.gpu_panel(stats))
        self._fill_users()

    def _fill_users(self) -> None:
        table = self.query_one("#users", DataTable)
        table.clear()
        if self.stats is not None:
            table.add_rows(view.user_rows(self.stats, self.sort_by, self.sort_reverse))
            table.border_subtitle = "" if table.row_count else "no requests in flight"

    def _title_users(self) -> None:
        order = "descending" if self.sort_reverse else "ascending"
        self.query_one("#users", DataTable).border_title = (
            f"Users (by session, else user) · sorted by {self.sort_by}, {order}")

    # --- sorting -------------------------------------------------------------------------------
    def action_next_sort(self) -> None:
        keys = view.SORT_KEYS
        self._sort(keys[(keys.index(self.sort_by) + 1) % len(keys)], reverse=False)

    def action_reverse_sort(self) -> None:
        self._sort(self.sort_by, not self.sort_reverse)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        column = str(event.column_key.value)
        if column in view.SORT_KEYS:
            self._sort(column, reverse=self.sort_reverse if column == self.sort_by else False)

    def _sort(self, column: str, reverse: bool) -> None:
        self.sort_by, self.sort_reverse = column, reverse
        self._title_users()
        self._fill_users()
