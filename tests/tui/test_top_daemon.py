"""`tokenspeed top` against the real daemon (tiny model, CPU) with requests in flight: the users
table shows each session / user with the state and cached tokens the scheduler reports, the
panels show what /stats says, and once idle every KV and totals figure on screen equals an
independent GET /stats (pages pinned by a finished session turn included)."""

from __future__ import annotations

import threading

import pytest
from e2e.daemon_process import Daemon, start_daemon
from textual.widgets import DataTable, Static

from appliance.tui import view
from appliance.tui.app import TopApp
from appliance.tui.source import StatsSource

PAGE = 16


def _complete(daemon: Daemon, prompt: list[int], max_tokens: int, **extra) -> list[int]:
    with daemon.uds_client() as http:
        response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0, "return_token_ids": True, **extra},
                             headers=extra.pop("headers", {}))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


class Stream(threading.Thread):
    """One long streamed completion, read until `stop` is set (then the client goes away and the
    daemon aborts it)."""

    def __init__(self, daemon: Daemon, stop: threading.Event, prompt: list[int], headers: dict | None = None,
                 **body) -> None:
        super().__init__(daemon=True)
        self.daemon_, self.stop, self.headers = daemon, stop, headers or {}
        self.body = {"prompt": prompt, "max_tokens": 3000, "ignore_eos": True, "stream": True,
                     "temperature": 0, **body}
        self.chunks, self.status = 0, None

    def run(self) -> None:
        with self.daemon_.uds_client() as http, http.stream("POST", "/v1/completions", json=self.body,
                                                             headers=self.headers) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                self.chunks += line.startswith("data: ")
                if self.stop.is_set():
                    return


def _rows(app: TopApp) -> dict[str, list[str]]:
    table = app.query_one("#users", DataTable)
    return {str(table.get_row_at(i)[0]): [str(c) for c in table.get_row_at(i)] for i in range(table.row_count)}


async def _wait(pilot, predicate, seconds: float) -> None:
    for _ in range(int(seconds / 0.1)):
        if predicate():
            return
        await pilot.pause(0.1)
    assert predicate()


@pytest.mark.slow
@pytest.mark.anyio
async def test_dashboard_matches_a_live_daemon(tmp_path):
    daemon = start_daemon(tmp_path, "scheduler.tps_floor=0")
    stop = threading.Event()
    streams: list[Stream] = []
    try:
        turn_1 = list(range(20, 220))  # 200 tokens: 12 full pages once answered
        answer = _complete(daemon, turn_1, 8, headers={"x-session-id": "agent-a"})
        cached = (len(turn_1) + len(answer) - 1) // PAGE * PAGE
        streams = [Stream(daemon, stop, turn_1 + answer + [7] * 40, {"x-session-id": "agent-a"}),
                   Stream(daemon, stop, list(range(300, 400)), {"x-session-id": "agent-b"}),
                   Stream(daemon, stop, list(range(100, 150)), user="carol")]
        for stream in streams:
            stream.start()
        app = TopApp(StatsSource(str(daemon.socket)), interval_s=0.2)
        async with app.run_test(size=(130, 42)) as pilot:
            def all_decoding() -> bool:
                """Each decodes, and the engine has reported agent-a (its stats come every 0.25 s:
                a request may stream before they name it, and its cached tokens are known then).
                The frontend counts a user's tokens as it delivers them, on its event loop, so
                a snapshot can name a user decoding before its first token is counted: each
                user's count is waited for too (the assertions below still read them)."""
                rows = _rows(app)
                users = {u["key"]: u for u in app.stats["users"]} if app.stats else {}
                keys = ("agent-a", "agent-b", "carol")
                return (all(key in rows and rows[key][2] == "decoding" for key in keys)
                        and users.get("agent-a", {}).get("cached_tokens", 0) > 0
                        and all(users.get(key, {}).get("generated_tokens", 0) > 0 for key in keys))

            await _wait(pilot, all_decoding, 60)
            assert [stream.status for stream in streams] == [200] * 3
            stats, rows = app.stats, _rows(app)
            users = {u["key"]: u for u in stats["users"]}
            assert users["agent-a"]["cached_tokens"] == cached > 0  # turn 1's pinned pages were reused
            assert rows["agent-a"][4] == f"{cached:,}"
            prompts = {"agent-a": streams[0], "agent-b": streams[1], "carol": streams[2]}
            for key in ("agent-a", "agent-b", "carol"):
                assert rows[key] == [str(c) for c in view.user_rows({**stats, "users": [users[key]]})[0]]
                # context comes from the engine's progress (every 0.25 s), generated from the
                # frontend's live count: only each against its own lower bound
                assert users[key]["context_tokens"] >= len(prompts[key].body["prompt"])
                assert users[key]["generated_tokens"] > 0
            assert users["agent-a"]["context_tokens"] >= len(turn_1) + len(answer) + 40
            kv = str(app.query_one("#kv", Static).render())
            pages = view.KvPages.of(stats["kv"])
            assert pages.requests > 0 and f"requests {pages.requests:,}" in kv
            assert "TPM per GPU - (no GPU)" in str(app.query_one("#throughput", Static).render())
            assert "no GPU: the engine runs on the CPU" in str(app.query_one("#gpus", Static).render())

            stop.set()  # the clients go away: the daemon aborts their requests
            for stream in streams:
                stream.join(30)
            _complete(daemon, list(range(600, 660)), 4, headers={"x-session-id": "agent-c"})  # pinned
            await _wait(pilot, lambda: not _rows(app) and app.stats["requests"]["running"] == 0
                        and app.stats["kv"]["pages_pinned"] > 0, 30)
            await pilot.pause(1.0)  # several engine stats periods: idle figures are settled
            with daemon.uds_client() as http:
                truth = http.get("/stats").json()
            await pilot.pause(0.5)  # the dashboard's next polls
            shown = app.stats
            assert shown["kv"] == truth["kv"] and shown["totals"] == truth["totals"]
            assert shown["kv"]["pages_pinned"] >= 60 // PAGE
            kv = str(app.query_one("#kv", Static).render())
            pages = view.KvPages.of(truth["kv"])
            for name in ("requests", "pinned", "cached", "free"):
                assert f"{name} {getattr(pages, name):,}" in kv
            assert f"since start {view.ratio(truth['prefix_cache']['hit_rate'])}" in kv
            assert f"preemptions {truth['totals']['preemptions']:,}" in kv
            await pilot.press("q")
        log = daemon.log.read_text()  # `up` on a log file: rank 0's start-up stages as lines
        assert "engine ranks started" in log and "weights: " in log and " MB in " in log
        assert "HTTP Request" not in log and "Started server process" not in log  # libraries stay quiet
    finally:
        stop.set()
        assert daemon.stop() == 0, daemon.log.read_text()
