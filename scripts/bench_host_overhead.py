#!/usr/bin/env python3
"""Host work per step at a large batch, on the CPU (no GPU needed):

  engine    rank 0's loop with B greedy rows on a model that costs nothing (bench_engine_step's
            FreeRunner): median ms per step, and how much of it the sampler takes (the CPU
            reference `sample`; a Triton kernel on a GPU).
  frontend  `tokenspeed up` with the tiny model and B concurrent streams from `tokenspeed bench
            throughput`: CPU time of the frontend process (event loop, engine monitor thread,
            tokenizer threads; not the engine ranks) per generated token, and the bench client's
            (`tokenspeed bench`: parsing every stream's events), which shares the host with it.

    .venv/bin/python scripts/bench_host_overhead.py [--batch 256] [--steps 300] [--output-len 128]
        [--part engine frontend]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_engine_step import FreeRunner, make_engine  # noqa: E402

from appliance.engine.protocol import GenerateRequest  # noqa: E402


def engine_step_ms(batch: int, steps: int) -> tuple[float, float]:
    """Median ms per step, and median ms of it in the sampler."""
    engine = make_engine(FreeRunner(batch, 1024, torch.device("cpu")), with_tokenizer=False)
    for rid in range(batch):
        engine._submit(GenerateRequest(rid, prompt_ids=[3, 4, 5, 6], max_new_tokens=2048,
                                       temperature=0.0, ignore_eos=True))
    sampling: list[float] = []
    sample = engine.sampler.sample

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return sample(*args, **kwargs)
        finally:
            sampling.append(time.perf_counter() - t0)

    engine.sampler.sample = timed
    times = []
    for i in range(steps + 30):
        t0 = time.perf_counter()
        engine.step()
        if i >= 30:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, statistics.median(sampling[30:]) * 1e3


def frontend_cpu_per_token(batch: int, output_len: int) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="ts-host-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [f"server.port={port}", f"server.socket={folder / 'd.sock'}", "model.preset=tiny-llama",
            f"scheduler.max_running={batch}", f"kv.num_pages={batch * (output_len // 16 + 8)}",
            "scheduler.tps_floor=0"]
    args = [a for item in sets for a in ("--set", item)]
    env = {**os.environ, "TOKENSPEED_CACHE": os.environ.get("TOKENSPEED_CACHE", str(ROOT / ".cache" / "test"))}
    cli = [sys.executable, "-m", "appliance.cli"]
    log = (folder / "daemon.log").open("w")
    daemon = subprocess.Popen([*cli, "up", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if subprocess.run([*cli, "status", *args], cwd=ROOT, env=env, capture_output=True).returncode == 0:
                break
            if daemon.poll() is not None:
                raise RuntimeError((folder / "daemon.log").read_text())
            time.sleep(0.5)
        bench = [*cli, "bench", "throughput", *args, "--concurrency", str(batch), "--requests", str(batch),
                 "--input-len", "32", "--output-len", str(output_len), "--json"]
        subprocess.run(bench[:-6] + ["--concurrency", "8", "--requests", "8", "--input-len", "32",
                                     "--output-len", "16", "--json"], cwd=ROOT, env=env, capture_output=True)
        tokens0, cpu0 = _generated(cli, args, env), _cpu_s(daemon.pid)
        client0 = _children_cpu_s()
        result = json.loads(subprocess.run(bench, cwd=ROOT, env=env, capture_output=True, text=True,
                                           check=True).stdout)
        client = _children_cpu_s() - client0
        cpu1, tokens1 = _cpu_s(daemon.pid), _generated(cli, args, env)
    finally:
        subprocess.run([*cli, "down", *args], cwd=ROOT, env=env, capture_output=True)
        daemon.wait(60)
    tokens = tokens1 - tokens0
    return {"generated_tokens": tokens, "frontend_cpu_s": round(cpu1 - cpu0, 3),
            "frontend_us_per_token": round(1e6 * (cpu1 - cpu0) / max(tokens, 1), 1),
            "client_us_per_token": round(1e6 * client / max(tokens, 1), 1),
            "output_tokens_per_s": round(result["output_tokens_per_s"], 1),
            "daemon_running_max": result.get("daemon_running_max")}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _generated(cli: list[str], args: list[str], env: dict[str, str]) -> int:
    out = subprocess.run([*cli, "status", *args], cwd=ROOT, env=env, capture_output=True, text=True).stdout
    return int(json.loads(out)["totals"]["generation_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--part", nargs="+", default=["engine", "frontend"], choices=["engine", "frontend"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "engine" in args.part:
        step, sampler = engine_step_ms(args.batch, args.steps)
        print(f"engine   B={args.batch}: {step:.3f} ms/step (median), sampler {sampler:.3f} ms of it, "
              f"the rest {step - sampler:.3f} ms")
    if "frontend" in args.part:
        print(f"frontend B={args.batch}: {json.dumps(frontend_cpu_per_token(args.batch, args.output_len))}")


if __name__ == "__main__":
    main()
