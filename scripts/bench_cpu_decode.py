#!/usr/bin/env python3
"""Decode tokens/s on the CPU: TokenSpeed's daemon beside HF transformers' `generate`, same run.

    .venv/bin/python scripts/bench_cpu_decode.py [--batches 1 8] [--input-len 32] [--output-len 64]

Starts `tokenspeed up` (configs/default.yaml: SmolLM2-135M-Instruct, float32; `--set` passes
more overrides) on a free port, and loads the same GGUF in transformers (`gguf_file=`,
float32, torch's default thread count unless `--hf-threads`). Then, for each batch size B and each of `--rounds`
rounds, alternately:
- ours: `tokenspeed bench throughput` with B concurrent requests of `--input-len` prompt
  tokens and exactly `--output-len` output tokens (ignore_eos, greedy) through the HTTP API;
- transformers: `generate` on a [B, input-len] batch with min_new_tokens = max_new_tokens.
Reports the median over rounds of output tok/s (B * output-len / wall time, prefill included)
and decode tok/s (ours: B x the mean per-request rate after the first token; transformers:
B * (output-len - 1) / (time of the full generate - time of a 1-token generate)).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    args = _parser().parse_args()
    if args.hf_threads:
        torch.set_num_threads(args.hf_threads)
    with tempfile.TemporaryDirectory(prefix="tsbench-") as tmp:
        daemon, flags = _start_daemon(Path(tmp), args.set)
        try:
            model = _transformers_model(flags)
            rows = []
            for batch in args.batches:
                ours, theirs = [], []
                for _ in range(args.rounds):
                    ours.append(_ours(flags, batch, args.input_len, args.output_len))
                    theirs.append(_transformers(model, batch, args.input_len, args.output_len))
                rows.append({"batch": batch, "ours": _median(ours), "transformers": _median(theirs)})
        finally:
            daemon.terminate()
            daemon.wait(60)
    print(json.dumps({"input_len": args.input_len, "output_len": args.output_len,
                      "rounds": args.rounds, "cpu_count": os.cpu_count(),
                      "transformers_threads": torch.get_num_threads(), "results": rows}, indent=2))
    print(f"{'batch':>5} {'ours out':>9} {'hf out':>9} {'ours decode':>12} {'hf decode':>10}  (tok/s)")
    for r in rows:
        o, t = r["ours"], r["transformers"]
        print(f"{r['batch']:>5} {o['output_tps']:>9.1f} {t['output_tps']:>9.1f} "
              f"{o['decode_tps']:>12.1f} {t['decode_tps']:>10.1f}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hf-threads", type=int, default=0,
                   help="torch threads for transformers (0: torch's default, one per core)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides for the daemon (e.g. model.path=/x.gguf)")
    return p


def _start_daemon(folder: Path, overrides: list[str]) -> tuple[subprocess.Popen, list[str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = folder / "ts.sock"
    flags = ["--set", f"server.port={port}", "--set", f"server.socket={sock}"]
    for item in overrides:
        flags += ["--set", item]
    log = (folder / "daemon.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "up", *flags], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited:\n{(folder / 'daemon.log').read_text()}")
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=5) as http:
                if http.get("http://tokenspeed/health").status_code == 200:
                    return proc, flags
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the daemon did not become healthy in 600 s")


def _transformers_model(flags: list[str]):
    """The daemon's checkpoint (resolved by the same config) in transformers, float32."""
    from transformers import AutoModelForCausalLM

    from appliance.config import load_config
    from appliance.engine.model_files import resolve_model_files

    config = load_config(None, [f for f in flags if f != "--set"])
    checkpoint = Path(resolve_model_files(config).checkpoint)
    if checkpoint.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(checkpoint.parent, gguf_file=checkpoint.name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval()


def _ours(flags: list[str], batch: int, input_len: int, output_len: int) -> dict:
    cmd = [sys.executable, "-m", "appliance.cli", "bench", "throughput", *flags, "--json",
           "--requests", str(batch), "--concurrency", str(batch), "--input-len", str(input_len),
           "--output-len", str(output_len), "--seed", str(time.monotonic_ns())]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    summary = json.loads(out)
    return {"output_tps": summary["output_tokens_per_s"],
            "decode_tps": batch * summary["decode_tps_mean"]}


@torch.inference_mode()
def _transformers(model, batch: int, input_len: int, output_len: int) -> dict:
    ids = torch.randint(10, 500, (batch, input_len))

    def generate(new: int) -> float:
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started

    first = generate(1)
    full = generate(output_len)
    return {"output_tps": batch * output_len / full,
            "decode_tps": batch * (output_len - 1) / max(full - first, 1e-9)}


def _median(results: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


if __name__ == "__main__":
    sys.exit(main())
