"""Fault injection against the real daemon: requests in flight, an engine rank killed (or
stopped), and a tally of what each client was told. test_faults.py uses it; run it alone for a
longer tally (the figures the issue asks for):

    TOKENSPEED_CACHE=.cache/test .venv/bin/python tests/e2e/faults.py --rounds 10 --tp 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_process import Daemon, start_daemon  # noqa: E402


MODEL = "tiny-llama"
APIS = ("completions", "chat", "messages", "completions-whole")


def engine_ranks(frontend_pid: int) -> dict[int, int]:
    """rank -> pid of the daemon's engine ranks (children named tokenspeed-r<rank>), from /proc."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == frontend_pid and comm.startswith("tokenspeed-r") and state != "Z":
            ranks[int(comm.removeprefix("tokenspeed-r"))] = int(entry.name)
    return ranks


@dataclass
class Outcome:
    kind: str  # "finished" (a finish reason) | "error" (an error event / error status) | "lost"
    tokens: int
    ended: float  # time.monotonic()
    detail: str = ""


class InFlightRequest(threading.Thread):
    """One request through one API; `started` is set at its first generated text."""

    def __init__(self, base_url: str, api: str, index: int, max_tokens: int = 3000) -> None:
        super().__init__(daemon=True)
        self.base_url, self.api, self.index, self.max_tokens = base_url, api, index, max_tokens
        self.started = threading.Event()
        self.outcome: Outcome | None = None

    def run(self) -> None:
        try:
            if self.api == "completions-whole":
                self.outcome = self._whole()
            else:
                self.outcome = self._stream()
        except httpx.HTTPError as e:
            self.outcome = Outcome("lost", 0, time.monotonic(), f"{type(e).__name__}: {e}")
        self.started.set()

    def _body(self) -> tuple[str, dict]:
        text = f"fault injection stream {self.index}: tell me a long story"
        if self.api == "messages":
            return "/v1/messages", {"model": MODEL, "max_tokens": self.max_tokens, "stream": True,
                                    "messages": [{"role": "user", "content": text}]}
        if self.api == "chat":
            return "/v1/chat/completions", {"model": MODEL, "max_tokens": self.max_tokens,
                                            "stream": True, "ignore_eos": True,
                                            "messages": [{"role": "user", "content": text}]}
        return "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": self.max_tokens,
                                   "stream": self.api == "completions", "ignore_eos": True}

    def _whole(self) -> Outcome:
        path, body = self._body()
        self.started.set()  # no tokens to watch: it runs from now on
        response = httpx.post(self.base_url + path, json=body, timeout=60)
        data = response.json()
        if response.status_code >= 400 and "error" in data:
            return Outcome("error", 0, time.monotonic(), data["error"]["message"])
        reason = data["choices"][0]["finish_reason"]
        kind = "finished" if reason in ("stop", "length") else "lost"
        return Outcome(kind, data["usage"]["completion_tokens"], time.monotonic(), str(reason))

    def _stream(self) -> Outcome:
        path, body = self._body()
        tokens, event = 0, ""
        with httpx.stream("POST", self.base_url + path, json=body, timeout=60) as response:
            if response.status_code != 200:
                return Outcome("error", 0, time.monotonic(), f"status {response.status_code}")
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data or event == "error":
                    return Outcome("error", tokens, time.monotonic(), str(data.get("error")))
                if self.api == "messages":
                    if event == "content_block_delta":
                        tokens += 1
                        self.started.set()
                    if event == "message_stop":
                        return Outcome("finished", tokens, time.monotonic())
                    continue
                for choice in data.get("choices", []):
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        tokens += 1
                        self.started.set()
                    reason = choice.get("finish_reason")
                    if reason is not None:
                        kind = "finished" if reason in ("stop", "length") else "lost"
                        return Outcome(kind, tokens, time.monotonic(), reason)
        return Outcome("lost", tokens, time.monotonic(), "the stream ended without a finish or error")


@dataclass
class Tally:
    requests: int = 0
    faults: int = 0
    finished: int = 0
    told_error: int = 0
    lost: int = 0  # ended without a finish reason or an error: the client was not told
    pages_leaked: int = 0
    worst_error_s: float = 0.0  # from the fault to the last error a client got
    details: list[str] = field(default_factory=list)

    def add(self, outcomes: list[Outcome], fault_at: float) -> None:
        for o in outcomes:
            self.requests += 1
            if o.kind == "finished":
                self.finished += 1
            elif o.kind == "error":
                self.told_error += 1
                self.worst_error_s = max(self.worst_error_s, o.ended - fault_at)
            else:
                self.lost += 1
                self.details.append(o.detail)

    def line(self) -> str:
        return (f"requests {self.requests}, faults {self.faults}, finished {self.finished}, "
                f"told of an error {self.told_error}, lost {self.lost}, pages leaked "
                f"{self.pages_leaked}, slowest error {self.worst_error_s:.1f} s after the fault")


def start_requests(daemon: Daemon, count: int, timeout: float = 30) -> list[InFlightRequest]:
    """Start `count` requests and wait until each produced text, or `timeout` passed: then
    some may still wait in the engine's queue (the TPS floor admits what it can serve)."""
    requests = [InFlightRequest(daemon.base_url, APIS[i % len(APIS)], i) for i in range(count)]
    for r in requests:
        r.start()
    deadline = time.monotonic() + timeout
    for r in requests:
        r.started.wait(max(0.0, deadline - time.monotonic()))
    assert any(r.started.is_set() for r in requests), "no request produced anything"
    return requests


def inject(daemon: Daemon, rank: int, sig: int = signal.SIGKILL) -> tuple[int, float]:
    """Send `sig` to engine rank `rank`; (its pid, when)."""
    pid = engine_ranks(daemon.proc.pid)[rank]
    os.kill(pid, sig)
    return pid, time.monotonic()


def finish(requests: list[InFlightRequest], timeout: float = 60) -> list[Outcome]:
    for r in requests:
        r.join(timeout)
    return [r.outcome or Outcome("lost", 0, time.monotonic(), "no answer") for r in requests]


def wait_status(daemon: Daemon, code: int, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.health() == code:
            return True
        time.sleep(0.2)
    return False


def probe(daemon: Daemon) -> str:
    """One ordinary request; its finish reason."""
    body = {"model": MODEL, "prompt": "after the fault", "max_tokens": 8, "ignore_eos": True}
    response = httpx.post(daemon.base_url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["finish_reason"]


def pages_in_use_when_idle(daemon: Daemon, timeout: float = 30) -> int:
    """KV pages still in use once nothing runs (no sessions here, so 0 unless leaked)."""
    deadline = time.monotonic() + timeout
    while True:
        with daemon.uds_client() as http:
            stats = http.get("/stats").json()
        queues = stats["requests"]
        idle = not stats["active"] and not queues["running"] and not queues["waiting"]
        if idle or time.monotonic() > deadline:
            time.sleep(0.6)  # the engine publishes its counters every 0.25 s
            with daemon.uds_client() as http:
                return http.get("/stats").json()["kv"]["pages_used"]
        time.sleep(0.2)


def fault_round(daemon: Daemon, tally: Tally, rank: int, streams: int,
                sig: int = signal.SIGKILL) -> list[Outcome]:
    """Requests in flight, `sig` to `rank`; tallies what the clients were told, waits until the
    daemon serves again and counts the KV pages left in use once idle."""
    requests = start_requests(daemon, streams)
    _, fault_at = inject(daemon, rank, sig)
    tally.faults += 1
    outcomes = finish(requests)
    tally.add(outcomes, fault_at)
    assert wait_status(daemon, 200), f"daemon did not come back:\n{daemon.log.read_text()}"
    tally.add([Outcome("finished" if probe(daemon) == "length" else "lost", 8, time.monotonic())],
              fault_at)
    tally.pages_leaked += pages_in_use_when_idle(daemon)
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tsf-", dir="/tmp"))
    daemon = start_daemon(folder, f"parallel.tp_size={args.tp}",
                          f"engine.max_restarts={args.rounds}")
    tally = Tally()
    try:
        for i in range(args.rounds):
            fault_round(daemon, tally, rank=i % args.tp, streams=args.streams)
            print(f"round {i + 1}: {tally.line()}", flush=True)
    finally:
        code = daemon.stop()
    print(f"tp {args.tp}: {tally.line()}; daemon exit code {code}")
    for detail in tally.details:
        print("lost:", detail)
    return 0 if tally.lost == 0 and tally.pages_leaked == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
