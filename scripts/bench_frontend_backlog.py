#!/usr/bin/env python3
"""The frontend alone, fed faster than it can stream: what it delivers and its CPU per token.

The server process is the daemon's frontend (`serve`: uvicorn, the OpenAI endpoints, the output
pipeline) over the real `EngineClient`, whose engine is replaced by a synthetic one on its
monitor thread: every `--step-ms` it hands the client one token for each running request (an
Outputs message through `_dispatch`, as rank 0's would), so the model costs nothing and the
token rate offered is B / step. The client (this process) opens B streaming completions over
the Unix socket and only counts bytes and SSE events: it costs far less than the server.

    .venv/bin/python scripts/bench_frontend_backlog.py [--streams 256] [--tokens 256]
        [--step-ms 2 20]

One row per step time: tokens offered per second, tokens delivered per second (all streams'
tokens over the wall time from the first request to the last [DONE]), the server's CPU
microseconds per token, and SSE events per token (1.0 when every token is its own chunk).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN_IDS = (260, 261, 262, 263, 264, 265, 266, 267)  # ordinary pieces of the tiny vocabulary


def _serve(socket_path: str, step_ms: float) -> None:
    """The server process: `serve` over an EngineClient whose engine is synthetic."""
    from appliance.config import load_config
    from appliance.engine import protocol
    from appliance.engine.client import EngineClient
    from appliance.engine.instance import EngineInfo
    from appliance.engine.model_files import resolve_model_files
    from appliance.frontend_tokenizer import load_tokenizer
    from appliance.server.serve import serve

    class SyntheticEngine:
        """One token a step for every running request, on the client's monitor thread."""

        def __init__(self, on_message) -> None:
            self.info = EngineInfo(max_model_len=4096, num_pages=4096, page_size=16,
                                   vocab_size=49152, eos_token_ids=(2,))
            self._on_message = on_message
            self._left: dict[int, int] = {}  # rid -> tokens still to generate
            self._inbox: list[protocol.ToEngine] = []
            self._next_step = time.monotonic()

        def send(self, message: protocol.ToEngine) -> None:
            self._inbox.append(message)  # list.append is atomic: the loop thread sends

        def poll(self, timeout_ms: int) -> None:
            while self._inbox:
                message = self._inbox.pop(0)
                if isinstance(message, protocol.GenerateRequest):
                    self._left[message.rid] = message.max_new_tokens
                elif isinstance(message, protocol.AbortRequest):
                    self._left.pop(message.rid, None)
            time.sleep(max(0.0, self._next_step - time.monotonic()))
            self._next_step = max(self._next_step + step_ms / 1e3, time.monotonic() - 0.1)
            items = []
            for rid, left in list(self._left.items()):
                done = left == 1
                items.append(protocol.TokenOutput(rid, TOKEN_IDS[left % len(TOKEN_IDS)],
                                                  "length" if done else None))
                if done:
                    del self._left[rid]
                else:
                    self._left[rid] = left - 1
            if items:
                self._on_message(protocol.Outputs(items))

        def failure(self) -> str | None:
            return None

        def stop(self, timeout_s: float) -> None:
            pass

        def kill(self) -> None:
            pass

    class SyntheticClient(EngineClient):
        def _start(self, on_progress=None):
            return SyntheticEngine(self._dispatch)

    with socket.socket() as s:  # TCP is served too: any free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = load_config(None, ["model.preset=tiny-llama", f"server.socket={socket_path}",
                                f"server.port={port}", "scheduler.tps_floor=0"])
    files = resolve_model_files(config)
    client = SyntheticClient(config, files)
    sys.exit(serve(config, client, load_tokenizer(files.tokenizer)))


async def _stream(socket_path: str, tokens: int) -> tuple[int, int]:
    """One streamed completion: (SSE events, bytes) until its [DONE]."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    body = json.dumps({"prompt": "hi", "max_tokens": tokens, "stream": True, "ignore_eos": True})
    writer.write(f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(body)}\r\n\r\n{body}".encode())
    events = received = 0
    tail = b""
    while True:
        data = await reader.read(1 << 16)
        if not data:
            break
        received += len(data)
        events += (tail + data).count(b"data: ") - tail.count(b"data: ")
        tail = data[-16:]
        if b"[DONE]" in tail:
            break
    writer.close()
    return events, received


async def _load(socket_path: str, streams: int, tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    results = await asyncio.gather(*(_stream(socket_path, tokens) for _ in range(streams)))
    return time.perf_counter() - started, sum(events for events, _ in results)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(streams: int, tokens: int, step_ms: float) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="ts-fe-"))
    socket_path = str(folder / "d.sock")
    server = mp.get_context("spawn").Process(target=_serve, args=(socket_path, step_ms))
    server.start()
    try:
        for _ in range(600):
            if Path(socket_path).exists() or not server.is_alive():
                break
            time.sleep(0.1)
        time.sleep(1.0)
        if not server.is_alive():
            raise SystemExit("the server process failed to start")
        asyncio.run(_load(socket_path, 8, 16))  # warm: imports, first requests
        cpu0 = _cpu_s(server.pid)
        wall, events = asyncio.run(_load(socket_path, streams, tokens))
        cpu = _cpu_s(server.pid) - cpu0
    finally:
        server.terminate()
        server.join(30)
    total = streams * tokens
    return {"step_ms": step_ms, "offered_tok_s": round(streams / (step_ms / 1e3)),
            "delivered_tok_s": round(total / wall), "server_us_per_token": round(1e6 * cpu / total, 1),
            "events_per_token": round(events / total, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--step-ms", type=float, nargs="+", default=[2.0, 20.0])
    args = parser.parse_args()
    rows = [measure(args.streams, args.tokens, step) for step in args.step_ms]
    print(f"{'step ms':>8} {'offered tok/s':>14} {'delivered tok/s':>16} {'server us/token':>16} "
          f"{'events/token':>13}")
    for r in rows:
        print(f"{r['step_ms']:8.1f} {r['offered_tok_s']:14d} {r['delivered_tok_s']:16d} "
              f"{r['server_us_per_token']:16.1f} {r['events_per_token']:13.3f}")


if __name__ == "__main__":
    main()
