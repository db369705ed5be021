"""`tokenspeed top` against a small real HTTP server that serves /stats on a Unix socket: what
each panel shows, the outage and recovery, polling at least twice a second without blocking the
screen, sorting, and SVG snapshots of the busy, idle and disconnected screens."""

from __future__ import annotations

import json
import os
import socketserver
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from textual.widgets import DataTable, Static

from appliance.tui import view
from appliance.tui.app import TopApp
from appliance.tui.source import StatsSource, StatsUnavailable

from .samples import CLAUDE_CODE_USER, busy, idle
from .snapshot import check_snapshot

SIZE = (130, 42)


class StatsServer:
    """ThreadingUnixStreamServer + BaseHTTPRequestHandler answering GET /stats with `self.stats`
    (after `delay_s`) and GET /health."""

    def __init__(self, path: str, stats: dict | None = None, api_key: str | None = None) -> None:
        self.path, self.stats, self.hits, self.api_key = path, stats or busy(), 0, api_key
        self.delay_s = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                authorized = outer.api_key is None or self.headers.get("authorization") == f"Bearer {outer.api_key}"
                if self.path == "/stats" and authorized:
                    outer.hits += 1
                    time.sleep(outer.delay_s)
                    status, body = 200, outer.stats
                elif self.path == "/health":
                    status, body = 200, {"status": "ok"}
                else:
                    status, body = 401, {}
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the dashboard gave up waiting (the slow daemon's test): no traceback

            def address_string(self) -> str:
                return "uds"

            def log_message(self, *args) -> None:
                pass

        self._server = socketserver.ThreadingUnixStreamServer(path, Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        os.unlink(self.path)


class FixedSource(StatsSource):
    """One fixed snapshot, or an outage (None): for snapshots, no sockets or timing involved."""

    def __init__(self, stats: dict | None) -> None:
        self.socket_path, self.stats = "/run/tokenspeed/ts.sock", stats

    async def fetch(self) -> dict:
        if self.stats is None:
            raise StatsUnavailable("no daemon is listening on the socket")
        return self.stats

    async def aclose(self) -> None:
        pass


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


def text(app: TopApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def rows(app: TopApp) -> list[list[str]]:
    table = app.query_one("#users", DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


@pytest.mark.anyio
async def test_panels_show_the_snapshot_then_outage_then_recovery(socket_path):
    server = StatsServer(socket_path)
    app = TopApp(StatsSource(socket_path), interval_s=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await _wait(pilot, lambda: app.reachable is True)
        header = text(app, "#header")
        assert "llama-3.1-8b" in header and "2× NVIDIA H200" in header and "TP 2" in header
        assert "up 1h02m05s" in header and "TPS floor 70" in header
        kv = text(app, "#kv")
        assert "KV occupancy 60.0%" in kv and "of 1,000 pages × 16 tokens" in kv
        assert "requests 500" in kv and "pinned 100" in kv and "cached 250" in kv and "free 150" in kv
        assert "█" * 20 + "▓" * 4 + "▒" * 10 + "░" * 6 in kv  # 40 cells in proportion
        assert "last min 93.1%" in kv and "since start 90.0%" in kv and "preemptions 4" in kv
        assert "speculative acceptance 71.0% of drafts, 2.40 tokens a step" in kv
        flow = text(app, "#throughput")
        assert "TPM 420,000" in flow and "TPM per GPU 210,000" in flow
        assert "generated 7,000 tok/s · prompt 1,000 tok/s" in flow
        gpus = text(app, "#gpus")
        assert "GPU0 NVIDIA H200" in gpus and " 87%" in gpus and "120.0/141.0 GiB" in gpus
        assert "520 W / 700 W" in gpus and "GPU1" in gpus
        assert rows(app) == [  # slowest first: the floor is about them
            ["bench-user-3", "1", "decoding", "40,000", "30,000", "51.2", "120"],
            ["alice", "1", "decoding", "12,000", "0", "74.0", "900"],
            ["user_ab12cd34… · 5f0c1a2…", "2", "prefill 42%, decoding", "96,000", "88,000", "92.5", "350"],
            ["(anonymous)", "1", "queued", "300", "0", "-", "0"]]
        for selector in ("#kv", "#throughput", "#gpus", "#users"):
            assert app.query_one(selector).region.height >= 1  # all laid out on screen

        server.close()  # the daemon goes away: said in red, the last figures stay dimmed, retried
        await _wait(pilot, lambda: app.reachable is False)
        assert "reconnecting" in text(app, "#status") and app.query_one("#status").has_class("down")
        banner = text(app, "#banner")
        assert "daemon unreachable" in banner and "retrying every 0.1 s" in banner
        assert app.query_one("#kv").has_class("stale") and "requests 500" in text(app, "#kv")

        server = StatsServer(socket_path, stats=idle())
        await _wait(pilot, lambda: app.reachable is True and rows(app) == [])
        assert not app.query_one("#kv").has_class("stale") and "live" in text(app, "#status")
        assert "no GPU: the engine runs on the CPU" in text(app, "#gpus")
        assert "TPM per GPU - (no GPU)" in text(app, "#throughput")
        await pilot.press("q")
    assert not app.is_running
    server.close()


@pytest.mark.anyio
async def test_polls_twice_a_second_without_blocking_and_sends_api_key(socket_path):
    server = StatsServer(socket_path, api_key="k1")
    app = TopApp(StatsSource(socket_path, api_key="k1"))  # the default interval
    async with app.run_test(size=SIZE) as pilot:
        await _wait(pilot, lambda: app.reachable is True)
        hits = server.hits
        await pilot.pause(1.1)
        assert server.hits >= hits + 2
        server.delay_s = 3.0  # a slow daemon: the screen still answers keys at once
        await pilot.pause(0.6)
        started = time.monotonic()
        await pilot.press("s")
        # blocked behind the poll, the key would wait ~2.4 s; a busy CI machine may take ~0.8
        assert app.sort_by == "context" and time.monotonic() - started < 1.2
        slow_hits = server.hits
        await pilot.pause(1.0)
        assert server.hits <= slow_hits + 1  # no pile-up: one request at a time
        await pilot.press("q")
    server.close()


@pytest.mark.anyio
async def test_users_sort_by_key_and_header():
    app = TopApp(FixedSource(busy()), interval_s=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await _wait(pilot, lambda: app.reachable is True)
        await pilot.press("s")  # TPS -> context
        assert [r[3] for r in rows(app)] == ["300", "12,000", "40,000", "96,000"]
        await pilot.press("r")
        assert [r[3] for r in rows(app)] == ["96,000", "40,000", "12,000", "300"]
        assert "sorted by context, descending" in str(app.query_one("#users").border_title)
        table = app.query_one("#users", DataTable)
        x = sum(c.get_render_width(table) for c in list(table.columns.values())[:4]) + 2
        await pilot.click("#users", offset=(x, 1))  # the "cached" column's header (inside the border)
        await pilot.pause(0.1)
        assert app.sort_by == "cached" and [r[4] for r in rows(app)] == ["0", "0", "30,000", "88,000"]
        await pilot.press("q")


@pytest.mark.anyio
@pytest.mark.parametrize("name, stats", [("busy", busy()), ("idle", idle()), ("disconnected", None)])
async def test_screen_snapshots(name, stats):
    app = TopApp(FixedSource(stats), interval_s=60)  # one poll: the screen stays put
    async with app.run_test(size=SIZE) as pilot:
        await _wait(pilot, lambda: app.reachable is (stats is not None) and len(app.query("FooterKey")) >= len(app.BINDINGS))
        await pilot.wait_for_scheduled_animations()
        await pilot.pause(0.2)
        check_snapshot(name, app.export_screenshot())


def test_view_helpers():
    assert view.user_rows({}) == [] and view.header({}).plain.startswith("?")
    assert view.user_label(CLAUDE_CODE_USER, "5f0c1a2b-9d3e-4c1f") == "user_ab12cd34… · 5f0c1a2…"
    assert view.user_label("carol", "") == "carol" and view.user_label("", "s-1") == "s-1"
    assert view.user_label("carol", "s-1") == "carol · s-1" and view.user_label("", "") == view.ANONYMOUS
    assert view.user_state({"states": {"decoding": 3, "queued": 1}}) == "3× decoding, queued"
    assert view.user_state({"states": {"prefilling": 1}, "prefill_pct": 7.4}) == "prefill 7%"
    assert [view.tps_cell(t, 70).style for t in (69.9, 70.0, 80.4, 80.5)] == ["bold red", "yellow", "yellow",
                                                                              "green"]
    assert view.tps_cell(5.0, 0).style == "" and view.tps_cell(None, 70).plain == "-"
    bar = view.kv_bar(view.KvPages(total=7, requests=1, pinned=1, cached=1, free=4), width=10)
    assert len(bar.plain) == 10 and bar.plain.count("░") >= 5
    assert view.kv_bar(view.KvPages.of({}), width=10).plain == "░" * 10
    assert view.speculative_acceptance({"speculative": {"draft_tokens": 0, "accepted_tokens": 0}}) is None
    assert view.speculative_acceptance({"speculative": {
        "draft_tokens": 200, "accepted_tokens": 50, "mean_accepted_length": 1.25,
        "paused_steps": 64}}) == "25.0% of drafts, 1.25 tokens a step, drafting paused for 64 steps"
    assert view.duration(3665) == "1h01m05s" and view.ratio(None) == "-"


@pytest.mark.anyio
@pytest.mark.parametrize("stats", [busy(), None])
async def test_an_answer_arriving_after_the_app_closed_is_dropped(stats):
    app = TopApp(FixedSource(stats), interval_s=60)
    async with app.run_test(size=SIZE) as pilot:
        await _wait(pilot, lambda: app.reachable is not None)
    await app.poll()  # as a poll in flight at shutdown would return: no widget left to draw on
