"""`tokenspeed top` against a small real HTTP server that serves /stats on a Unix socket."""

from __future__ import annotations

import json
import os
import socketserver
import tempfile
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from textual.widgets import DataTable, Static

from appliance.tui import view
from appliance.tui.app import TopApp
from appliance.tui.source import StatsSource

STATS = {
    "model": "tiny-llama", "uptime_s": 75.0,
    "kv": {"page_size": 16, "pages_total": 100, "pages_used": 50, "pages_cached": 25, "pages_free": 25},
    "requests": {"running": 3, "waiting": 2},
    "throughput": {"generation_tokens_per_minute": 12345.0, "prompt_tokens_per_minute": 999.0},
    "totals": {"prompt_tokens": 1000, "generation_tokens": 500, "prefix_cache_hit_tokens": 900, "preemptions": 4},
    "active": [
        {"rid": 7, "user": "alice", "prompt_tokens": 1200, "generated_tokens": 40, "decode_tps": 71.5},
        {"rid": 3, "user": "bob", "prompt_tokens": 90, "generated_tokens": 10, "decode_tps": 30.0},
        {"rid": 9, "user": "alice", "prompt_tokens": 50, "generated_tokens": 5, "decode_tps": 8.5},
    ],
}


class StatsServer:
    """ThreadingUnixStreamServer + BaseHTTPRequestHandler answering GET /stats with `self.stats`."""

    def __init__(self, path: str, api_key: str | None = None) -> None:
        self.path, self.stats, self.hits, self.api_key = path, dict(STATS), 0, api_key
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.hits += 1
                authorized = outer.api_key is None or self.headers.get("authorization") == f"Bearer {outer.api_key}"
                status, body = (200, outer.stats) if self.path == "/stats" and authorized else (401, {})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def address_string(self) -> str:
                return "uds"

            def log_message(self, *args) -> None:
                pass

        self._server = socketserver.ThreadingUnixStreamServer(path, Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        os.unlink(self.path)


@pytest.fixture()
def socket_path():
    folder = tempfile.mkdtemp(dir="/tmp")
    yield str(Path(folder) / "top.sock")


async def _wait(pilot, predicate, steps: int = 100) -> None:
    for _ in range(steps):
        if predicate():
            return
        await pilot.pause(0.05)
    assert predicate()


def _text(app: TopApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def _rows(app: TopApp, selector: str) -> list[list[str]]:
    table = app.query_one(selector, DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


@pytest.mark.anyio
async def test_dashboard_shows_stats_then_outage_then_recovers_and_quits(socket_path):
    server = StatsServer(socket_path)
    app = TopApp(StatsSource(socket_path), interval_s=0.1)
    async with app.run_test(size=(140, 40)) as pilot:
        await _wait(pilot, lambda: app.reachable is True)
        summary = _text(app, "#summary")
        assert "running 3" in summary and "waiting 2" in summary and "12,345 tok/min" in summary
        assert "prefix-cache hits 90.0%" in summary
        kv = _text(app, "#kv")
        assert "used 50" in kv and "cached 25" in kv and "free 25" in kv and "█" * 10 in kv
        assert _rows(app, "#requests") == [["3", "bob", "90", "10", "30.0"], ["7", "alice", "1,200", "40", "71.5"],
                                           ["9", "alice", "50", "5", "8.5"]]
        assert _rows(app, "#users") == [["alice", "2", "45", "80.0"], ["bob", "1", "10", "30.0"]]
        for selector in ("#kv", "#summary", "#requests", "#users"):  # all laid out on screen
            assert app.query_one(selector).region.height >= 1

        server.close()  # the daemon goes away: a clear message, and it keeps retrying
        await _wait(pilot, lambda: app.reachable is False)
        assert "unreachable" in _text(app, "#status") and "retrying" in _text(app, "#status")

        server = StatsServer(socket_path)
        server.stats = {**STATS, "active": [], "requests": {"running": 0, "waiting": 0}}
        await _wait(pilot, lambda: app.reachable is True)
        await _wait(pilot, lambda: _rows(app, "#requests") == [])
        assert server.hits >= 1
        await pilot.press("q")
    assert not app.is_running
    server.close()


@pytest.mark.anyio
async def test_polls_at_least_once_a_second_and_sends_api_key(socket_path):
    server = StatsServer(socket_path, api_key="k1")
    app = TopApp(StatsSource(socket_path, api_key="k1"))  # the default interval
    async with app.run_test() as pilot:
        await _wait(pilot, lambda: app.reachable is True)
        hits = server.hits
        await pilot.pause(1.2)
        assert server.hits >= hits + 1
        await pilot.press("q")
    server.close()


def test_view_helpers_handle_empty_and_unknown_values():
    assert view.request_rows({}) == [] and view.user_rows({"active": []}) == []
    assert "of 0 pages" in str(view.kv_bar({}))
    assert view.user_rows({"active": [{"rid": 1, "user": ""}]})[0][0] == view.ANONYMOUS
    assert "up 1h01m05s" in view.summary({"uptime_s": 3665})
