"""`tokenspeed bench` against a stand-in daemon (FastAPI on a Unix socket) that counts the
streams it holds at once: the connection pool follows --concurrency (past httpx's default of
100), the daemon's batch is reported from /stats, too few requests in flight are called out,
a --concurrency sweep with --plot writes a PNG, and nothing but the results is printed."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from appliance import bench as bench_client
from appliance import bench_processes
from appliance.bench import DaemonLoad, fewer_in_flight_warning
from appliance.cli import main
from appliance.server.serve import unix_socket


class CountingDaemon:
    """Holds each stream until `target` are open at once (or `hold_s` passed), then sends
    `tokens` tokens `token_delay_s` apart. /stats reports what it holds, capped at `stats_cap`."""

    def __init__(self, target: int, tokens: int = 3, token_delay_s: float = 0.0, hold_s: float = 5.0,
                 stats_cap: int | None = None) -> None:
        self.target, self.tokens, self.token_delay_s, self.hold_s = target, tokens, token_delay_s, hold_s
        self.stats_cap = stats_cap
        self.open = self.max_open = 0
        self.sampling: list[dict] = []  # each request's sampling fields
        self.app = FastAPI()
        self.app.get("/v1/models")(lambda: {"data": [{"id": "fake"}]})
        self.app.get("/stats")(self.stats)
        self.app.post("/v1/completions")(self.completions)

    def stats(self) -> dict:
        held = self.open if self.stats_cap is None else min(self.open, self.stats_cap)
        return {"requests": {"running": held, "waiting": 0}, "totals": {"prefix_cache_hit_tokens": 0}}

    async def completions(self, request: Request) -> StreamingResponse:
        body = await request.json()
        self.sampling.append({k: body[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                              if k in body})
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        deadline = time.monotonic() + self.hold_s
        while self.max_open < self.target and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

        async def stream():
            try:
                for i in range(self.tokens):
                    await asyncio.sleep(self.token_delay_s)
                    chunk = {"choices": [{"index": 0, "text": "", "token_ids": [i + 10]}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                usage = {"prompt_tokens": 4, "completion_tokens": self.tokens}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.open -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")


@contextmanager
def serving(daemon: CountingDaemon) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="ts-bench-", dir="/tmp"))
    path = folder / "ts.sock"
    server = uvicorn.Server(uvicorn.Config(daemon.app, log_config=None, lifespan="off", backlog=2048))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [unix_socket(str(path))]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield path
    finally:
        server.should_exit = True
        thread.join(10)
        path.unlink(missing_ok=True)
        folder.rmdir()


def bench(socket: Path, *args: str) -> list[str]:
    return ["bench", "throughput", "--set", f"server.socket={socket}", "--input-len", "4",
            "--output-len", "3", "--json", *args]


def test_pool_holds_every_request_asked_for_and_the_daemon_batch_is_reported(capsys):
    daemon = CountingDaemon(target=150, tokens=10, token_delay_s=0.1)  # all 150 open for 1 s
    with serving(daemon) as socket:
        assert main(bench(socket, "--concurrency", "150", "--requests", "150")) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)  # stdout is the JSON alone
    assert daemon.max_open == 150  # httpx's default pool would have held 50 of them back
    assert summary["concurrency"] == 150 and summary["requests"] == 150
    assert summary["daemon_in_flight_max"] == summary["daemon_running_max"] == 150
    assert 0 < summary["daemon_running_mean"] <= 150 and summary["daemon_samples"] >= 2
    assert "warning" not in summary
    assert err == ""  # no log lines (httpx logs every request at INFO)


def test_streams_spread_over_clients_of_a_few_connections_each(capsys, monkeypatch):
    """Each worker keeps its client: 12 streams over clients of 4 connections, 3 rounds."""
    monkeypatch.setattr(bench_client, "STREAMS_PER_CLIENT", 4)
    daemon = CountingDaemon(target=12, tokens=5, token_delay_s=0.02)
    with serving(daemon) as socket:
        assert main(bench(socket, "--concurrency", "12", "--requests", "36")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert daemon.max_open == 12 and summary["requests"] == 36
    assert summary["output_tokens"] == 36 * 5


def test_the_requests_sample_as_asked_in_one_process_and_spread_over_several(capsys,
                                                                            monkeypatch):
    """Greedy by default; --temperature / --top-p / --top-k / --repetition-penalty reach every
    request and the summary, also from a load spread over client processes (here 2 of 4
    streams each). Every field is sent: a model's own defaults never apply to the load."""
    daemon = CountingDaemon(target=4, tokens=3)
    with serving(daemon) as socket:
        assert main(bench(socket, "--concurrency", "4", "--requests", "4")) == 0
        greedy = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
        assert json.loads(capsys.readouterr().out)["sampling"] == greedy
        assert daemon.sampling == [greedy] * 4
        asked = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
        flags = ["--temperature", "0.7", "--top-p", "0.8", "--top-k", "20", "--repetition-penalty", "1.05"]
        for concurrency, processes in ((4, 1), (8, 2)):
            monkeypatch.setattr(bench_processes, "STREAMS_PER_PROCESS", 4)
            daemon.sampling.clear()
            daemon.target = concurrency
            assert bench_processes.processes_for(concurrency) == processes
            assert main(bench(socket, "--concurrency", str(concurrency), "--requests", "8",
                              *flags)) == 0
            summary = json.loads(capsys.readouterr().out)
            assert summary["sampling"] == asked and summary["output_tokens"] == 8 * 3
            assert daemon.sampling == [asked] * 8


def test_bad_sampling_flags_are_refused_before_the_load(tmp_path, capsys):
    socket = tmp_path / "none.sock"
    for flag, value, says in (("--temperature", "-0.1", "must be in [0, 2]"),
                              ("--temperature", "nan", "expected a finite number"),
                              ("--top-p", "0", "must be in (0, 1]"),
                              ("--top-p", "1.5", "must be in (0, 1]"),
                              ("--top-k", "-1", "must be >= 0"),
                              ("--top-k", "2.5", "expected a whole number"),
                              ("--repetition-penalty", "0", "must be in (0, 2]")):
        with pytest.raises(SystemExit):
            main(["bench", "throughput", "--set", f"server.socket={socket}", flag, value])
        assert says in capsys.readouterr().err
    assert main(["bench", "greedy", "--set", f"server.socket={socket}", "--top-k", "5"]) == 2
    assert "`bench greedy` compares greedy tokens" in capsys.readouterr().err


def test_fewer_requests_in_the_daemon_than_sent_is_called_out(capsys):
    daemon = CountingDaemon(target=20, tokens=10, token_delay_s=0.1, stats_cap=5)
    with serving(daemon) as socket:
        assert main(bench(socket, "--concurrency", "20", "--requests", "20")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["daemon_in_flight_max"] == 5 and summary["daemon_running_max"] == 5
    assert "never had more than 5 requests in flight" in summary["warning"]
    assert "fewer than the 20 sent at once" in summary["warning"]


def test_too_few_samples_are_not_judged():
    assert fewer_in_flight_warning(DaemonLoad([1, 1], [1, 1]), expected=8) is None
    assert fewer_in_flight_warning(DaemonLoad([8, 8, 8], [8, 9, 8]), expected=8) is None


def test_sweep_with_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # in the `test` extra; the message without it is tested below
    plot = tmp_path / "sweep.png"
    daemon = CountingDaemon(target=1, hold_s=0.0, token_delay_s=0.01)
    with serving(daemon) as socket:
        assert main(bench(socket, "--concurrency", "1,2,4", "--requests", "8", "--plot", str(plot))) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["concurrency"] for s in summaries] == [1, 2, 4]
    assert all(s["requests"] == 8 and s["output_tokens"] == 24 for s in summaries)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_bad_sweeps_and_missing_matplotlib_are_clear_errors(tmp_path, capsys, monkeypatch):
    socket = tmp_path / "none.sock"  # never reached: the arguments are refused first
    assert main(["bench", "latency", "--set", f"server.socket={socket}", "--concurrency", "1,2"]) == 2
    assert "a list of --concurrency levels is a throughput sweep" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(bench(socket, "--plot", str(tmp_path / "x.png"))) == 2
    assert "--plot needs matplotlib: pip install 'tokenspeed[plot]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(bench(socket, "--concurrency", "4,0"))
    assert "concurrency levels must be >= 1" in capsys.readouterr().err


def _dropping_transport(drops: int) -> tuple[httpx.MockTransport, list[int]]:
    """A server that closes the first `drops` requests unanswered, then streams one chunk."""
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) <= drops:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, text='data: {"n": 1}\n\ndata: [DONE]\n\n')

    return httpx.MockTransport(handler), calls


async def _chunks(transport: httpx.MockTransport) -> list[dict]:
    async with httpx.AsyncClient(transport=transport, base_url="http://tokenspeed") as http:
        return [chunk async for chunk in bench_client._sse(http, "/v1/completions", {}, "")]


def test_a_request_dropped_unanswered_is_sent_again_once():
    transport, calls = _dropping_transport(drops=1)
    assert asyncio.run(_chunks(transport)) == [{"n": 1}] and len(calls) == 2
    transport, calls = _dropping_transport(drops=2)
    with pytest.raises(httpx.RemoteProtocolError):
        asyncio.run(_chunks(transport))
    assert len(calls) == 2


def test_no_daemon_and_bad_lengths_are_one_line_errors_not_tracebacks(tmp_path, capsys):
    """No daemon on the socket: one line saying so (an 82-line traceback before); lengths and
    counts under 1 are refused by the arguments (--requests 0 printed a report of zeros)."""
    socket = tmp_path / "none.sock"
    assert main(["bench", "latency", "--set", f"server.socket={socket}", "--requests", "2"]) == 1
    err = capsys.readouterr().err
    assert f"no daemon answers on {socket}" in err and "Traceback" not in err
    for flag in ("--requests", "--input-len", "--output-len"):
        with pytest.raises(SystemExit):
            main(["bench", "latency", "--set", f"server.socket={socket}", flag, "0"])
        assert "must be >= 1, got 0" in capsys.readouterr().err


async def _refused_stream() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "the prompt is too long", "type": "x"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://t") as http:
        async for _ in bench_client._sse(http, "/v1/completions", {}, ""):
            pass


def test_a_refused_request_is_a_bench_error_with_the_daemons_message():
    with pytest.raises(bench_client.BenchError, match="answered HTTP 400: the prompt is too long$"):
        asyncio.run(_refused_stream())
