#!/usr/bin/env python3
"""The short table scripts/gpu_profile prints last, from what it wrote under OUT:
  timing/steps.csv         the engine's per-step timeline (appliance/engine/step_timing.py)
  timing/kernels-rows*.csv the top kernels of each torch.profiler window
  timing/trace-rows*.json  its chrome trace: the GPU work a step runs outside its CUDA graph
                           (the inputs' copies, the sampler: every kernel, copy and memset
                           not launched by a cudaGraphLaunch), per step
  bench-*.json             `tokenspeed bench throughput --json` of each load
  stats.jsonl              /stats's step_time (the cost model) polled during the loads
  loads.txt                "name start end" (epoch seconds) of each load: steps are grouped by it
  cpu.txt, cpu_pids.txt    each process's CPU ticks every second, and its command line: per load,
                           the frontend's, each engine rank's and the bench client's mean and
                           peak (over 1 s) share of a core

Within each load, steps are grouped by batch composition (profiled steps left out: the profiler
slows them):
  batch 1        one decode row, no prefill
  decode >= N    at least N decode rows, no prefill (N: --rows, the big load's profile window)
  mixed          decode rows and prefill tokens in one step
  prefill only   no decode row
Per group: medians of the host phases (ms) of the passes that launched them, the GPU time of the
step and the GPU's idle gap before it (host-bound when the gap is large), and the cost model's
prediction against the measured step time (median, and mean absolute error). Then per band of
16 decode rows, the GPU time of decode-only steps beside mixed steps of at most 256 tokens
(an extend graph's), and the prefill tokens those carried: what a chunk adds to a step.

    python scripts/profile_report.py OUT [--rows 192] [--top 8]
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

PHASES = ("other", "plan", "to_device", "launch", "wait", "commit", "emit")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=192, help="decode rows of the large-batch group")
    parser.add_argument("--top", type=int, default=8, help="kernels shown per profiler window")
    args = parser.parse_args()
    loads = read_loads(args.out / "loads.txt")
    lines = (bench_lines(args.out) + [""] + kernel_lines(args.out / "timing", args.top) + [""]
             + outside_graph_lines(args.out / "timing", args.top) + [""]
             + cost_model_lines(args.out / "stats.jsonl") + [""]
             + step_lines(args.out / "timing" / "steps.csv", args.rows, loads) + [""]
             + band_lines(args.out / "timing" / "steps.csv", loads) + [""]
             + cpu_lines(args.out, loads))
    text = "\n".join(lines)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0


def role(pid: str, processes: dict[str, tuple[str, str]]) -> str:
    """What a sampled process is, from its command line (and its parent's: the bench client's
    worker processes are spawned like engine ranks)."""
    parent, command = processes.get(pid, ("", ""))
    if " bench " in command or (
            "spawn_main" in command and " bench " in processes.get(parent, ("", ""))[1]):
        return "bench client"
    if " up " in command:
        return "frontend"
    if "spawn_main" in command:
        return "engine rank"
    return command.split(" ")[-1][:24] or "?"


def read_processes(lines: list[str]) -> dict[str, tuple[str, str]]:
    """cpu_pids.txt's lines "pid ppid=P command" (older files: "pid command") -> pid ->
    (parent pid or "", command)."""
    out = {}
    for line in lines:
        pid, _, rest = line.partition(" ")
        parent = ""
        if rest.startswith("ppid="):
            parent, _, rest = rest.partition(" ")
            parent = parent.removeprefix("ppid=")
        out[pid] = (parent, rest)
    return out


def cpu_lines(out: Path, loads: list[tuple[str, float, float]]) -> list[str]:
    """Per load and process: mean and peak % of a core (100 = one core busy all the time)."""
    samples, pids = out / "cpu.txt", out / "cpu_pids.txt"
    if not samples.is_file() or not pids.is_file():
        return ["no CPU samples (cpu.txt)"]
    head, *rest = pids.read_text().splitlines()
    tick = float(head.split()[1])
    processes = read_processes([line for line in rest if " " in line])
    series: dict[str, list[tuple[float, float]]] = {}
    for line in samples.read_text().splitlines():
        when, pid, ticks = line.split()
        series.setdefault(pid, []).append((float(when), float(ticks) / tick))
    lines = ["CPU per process (% of one core over the load: mean, peak 1 s)",
             f"{'load':<14} {'process':<14} {'pid':>7} {'mean %':>7} {'peak %':>7}"]
    for name, start, end in loads:
        for pid, points in sorted(series.items()):
            inside = [p for p in points if start <= p[0] <= end]
            if len(inside) < 2:
                continue
            rates = [100 * (b[1] - a[1]) / max(b[0] - a[0], 1e-6) for a, b in zip(inside, inside[1:])]
            mean = 100 * (inside[-1][1] - inside[0][1]) / max(inside[-1][0] - inside[0][0], 1e-6)
            if mean < 5:
                continue
            lines.append(f"{name:<14} {role(pid, processes):<14} {pid:>7} {mean:7.0f} "
                         f"{max(rates):7.0f}")
    return lines


def read_steps(path: Path) -> list[dict[str, float | None]]:
    with path.open() as f:
        return [{k: float(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(f)]


def read_loads(path: Path) -> list[tuple[str, float, float]]:
    """(name, start, end) of each load; one load over all time without the file."""
    if not path.is_file():
        return [("all", 0.0, float("inf"))]
    loads = []
    for line in path.read_text().splitlines():
        name, start, end = line.split()
        loads.append((name, float(start), float(end)))
    return loads


def group_of(step: dict[str, float | None], rows: int) -> str | None:
    decode, prefill = step["decode_rows"] or 0, step["prefill_tokens"] or 0
    if step["step"] is None or step["step"] < 0 or step["profiled"]:
        return None
    if prefill == 0:
        return "batch 1" if decode == 1 else f"decode >= {rows}" if decode >= rows else None
    return "mixed" if decode else "prefill only"


def step_lines(path: Path, rows: int, loads: list[tuple[str, float, float]]) -> list[str]:
    if not path.is_file():
        return [f"no step timeline ({path} missing: did the daemon stop cleanly?)"]
    groups: dict[tuple[str, str], list[dict[str, float | None]]] = {}
    for step in read_steps(path):
        load = next((n for n, start, end in loads if start <= (step["time_s"] or 0) <= end), None)
        if load is not None and (name := group_of(step, rows)) is not None:
            groups.setdefault((load, name), []).append(step)
    header = ("load", "group", "steps", "rows", "pf_tok", *PHASES, "host", "gpu", "gap", "pred", "meas", "|err|",
              "dec_tok/s")
    table = [header]
    for key in [(load, name) for load, _, _ in loads
                for name in ("batch 1", f"decode >= {rows}", "mixed", "prefill only")]:
        steps = groups.get(key, [])
        if not steps:
            continue
        host = [sum(s[f"{p}_ms"] or 0 for p in PHASES) for s in steps]
        errors = [abs(s["predicted_ms"] - s["measured_ms"]) for s in steps
                  if s["predicted_ms"] is not None and s["measured_ms"] is not None]
        table.append((*key, str(len(steps)), _median(steps, "decode_rows", 0), _median(steps, "prefill_tokens", 0),
                      *(_median(steps, f"{p}_ms") for p in PHASES), f"{statistics.median(host):.2f}",
                      _median(steps, "gpu_ms"), _median(steps, "gpu_gap_ms"),
                      _median(steps, "predicted_ms"), _median(steps, "measured_ms"),
                      f"{statistics.fmean(errors):.2f}" if errors else "-", _decode_rate(steps)))
    return ["per step (medians, ms; host = all phases of the pass that launched the step; gap = GPU "
            "idle before it; pred/meas = the cost model's prediction vs the step's measured time, what "
            "it is fitted on; dec_tok/s = rows / meas, profiler pauses left out):", *_format(table)]


BAND_ROWS = 16          # decode rows a band of the mixed-against-decode table spans
MIXED_MAX_TOKENS = 256  # the table's mixed steps: at most this many tokens (a graph's chunk)


def band_lines(path: Path, loads: list[tuple[str, float, float]]) -> list[str]:
    """Per load and band of BAND_ROWS decode rows: the median GPU time of its decode-only steps
    beside its mixed steps of at most MIXED_MAX_TOKENS tokens (and their prefill tokens): what
    a step pays for the chunk it carries (profiled steps left out)."""
    if not path.is_file():
        return []
    bands: dict[tuple[str, int, str], list[dict[str, float | None]]] = {}
    for step in read_steps(path):
        decode, prefill = int(step["decode_rows"] or 0), int(step["prefill_tokens"] or 0)
        if step["profiled"] or step["gpu_ms"] is None or decode == 0 or (
                decode + prefill > MIXED_MAX_TOKENS):
            continue
        load = next((n for n, start, end in loads if start <= (step["time_s"] or 0) <= end), None)
        if load is not None:
            kind = "mixed" if prefill else "decode"
            bands.setdefault((load, decode // BAND_ROWS, kind), []).append(step)
    table = [("load", "decode rows", "decode steps", "gpu", "mixed steps", "gpu", "pf_tok",
              "mixed - decode")]
    for load, band in sorted({(k[0], k[1]) for k in bands},
                             key=lambda k: ([n for n, _, _ in loads].index(k[0]), k[1])):
        dec, mix = bands.get((load, band, "decode"), []), bands.get((load, band, "mixed"), [])
        if not (dec and mix):
            continue
        dec_ms, mix_ms = _median(dec, "gpu_ms"), _median(mix, "gpu_ms")
        table.append((load, f"{band * BAND_ROWS}-{band * BAND_ROWS + BAND_ROWS - 1}",
                      str(len(dec)), dec_ms, str(len(mix)), mix_ms,
                      _median(mix, "prefill_tokens", 0), f"{float(mix_ms) - float(dec_ms):+.2f}"))
    if len(table) == 1:
        return []
    return [f"mixed against decode-only steps by decode rows (GPU ms, medians; mixed: at most "
            f"{MIXED_MAX_TOKENS} tokens, pf_tok their prefill tokens):", *_format(table)]


def _decode_rate(steps: list[dict[str, float | None]]) -> str:
    """Decode tokens per second at the group's median rows and measured step time."""
    rows, measured = _median(steps, "decode_rows"), _median(steps, "measured_ms")
    if "-" in (rows, measured) or float(measured) <= 0:
        return "-"
    return f"{1e3 * float(rows) / float(measured):.0f}"


def _median(steps: list[dict[str, float | None]], key: str, digits: int = 2) -> str:
    values = [s[key] for s in steps if s[key] is not None]
    return f"{statistics.median(values):.{digits}f}" if values else "-"


def kernel_lines(folder: Path, top: int) -> list[str]:
    lines = []
    for path in sorted(folder.glob("kernels-rows*.csv"), key=lambda p: int(p.stem.removeprefix("kernels-rows"))):
        with path.open() as f:
            kernels = list(csv.DictReader(f))
        lines.append(f"top kernels, profiler window at >= {path.stem.removeprefix('kernels-rows')} decode rows "
                     f"({path.name}):")
        table = [("kernel", "calls/step", "ms/step", "%")]
        table += [(k["kernel"][:70], k["calls_per_step"], k["ms_per_step"], k["pct"]) for k in kernels[:top]]
        lines += _format(table)
    return lines or [f"no kernel tables under {folder}"]


def _window_rows(path: Path, prefix: str) -> int:
    return int(path.stem.removeprefix(prefix))


def outside_graph_lines(folder: Path, top: int) -> list[str]:
    """Per profiler window with CUDA graphs: the GPU ops a step runs outside its graph."""
    lines = []
    for path in sorted(folder.glob("trace-rows*.json"),
                       key=lambda p: _window_rows(p, "trace-rows")):
        ops, steps = outside_graph_ops(json.loads(path.read_text()))
        if not steps:
            continue
        calls, us = sum(c for c, _ in ops.values()), sum(t for _, t in ops.values())
        lines.append(f"outside the CUDA graph, a step of the window at >= "
                     f"{_window_rows(path, 'trace-rows')} decode rows: {calls / steps:.1f} GPU "
                     f"ops, {us / steps:.1f} us of GPU time ({path.name}):")
        table = [("op", "calls/step", "us/step")]
        table += [(name[:70], f"{c / steps:.1f}", f"{t / steps:.2f}")
                  for name, (c, t) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]]
        lines += _format(table)
    return lines


def outside_graph_ops(trace: dict) -> tuple[dict[str, tuple[int, float]], int]:
    """A chrome trace's kernels, copies and memsets not launched by a cudaGraphLaunch, by
    short name -> (calls, us), and how many graph launches (steps) the trace holds."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    launches = {e.get("args", {}).get("correlation") for e in events
                if e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch"}
    ops: dict[str, tuple[int, float]] = {}
    for e in events:
        if (e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                and e.get("args", {}).get("correlation") not in launches):
            name = short_kernel_name(e.get("name", ""))
            calls, us = ops.get(name, (0, 0.0))
            ops[name] = (calls + 1, us + float(e.get("dur", 0.0)))
    return ops, len(launches)


# torch's generic launchers: the functor inside names the op
_LAUNCHERS = ("vectorized_elementwise_kernel", "unrolled_elementwise_kernel",
              "elementwise_kernel", "index_elementwise_kernel")


def short_kernel_name(name: str) -> str:
    """A kernel's name without its template arguments, a copy's kind ("Memcpy HtoD"); for
    torch's generic elementwise launchers, the op inside them (neg_kernel_cuda)."""
    found = re.findall(r"at::native::(?:\(anonymous namespace\)::)?(\w+)", name)
    inner = [n for n in found if n not in _LAUNCHERS and n not in ("gpu_index_kernel",)]
    if found and inner:
        return inner[0]
    return name.removeprefix("void ").split("<")[0].split("(")[0].strip()


def bench_lines(out: Path) -> list[str]:
    keys = ("requests", "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "decode_tps_min",
            "decode_tps_mean", "requests_above_floor", "daemon_running_mean", "daemon_running_max")
    table = [("load", *keys)]
    for path in sorted(out.glob("bench-*.json")):
        try:
            result = json.loads(path.read_text())
        except ValueError:
            table.append((path.stem, "no result"))
            continue
        table.append((path.stem, *(_number(result.get(k)) for k in keys)))
    return ["bench:", *_format(table)]


def cost_model_lines(path: Path) -> list[str]:
    if not path.is_file():
        return ["no /stats step_time samples"]
    samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    samples = [s for s in samples if s]
    if not samples:
        return ["no /stats step_time samples"]
    table = [("/stats step_time", "samples", "predicted_ms", "measured_ms", "abs_error_ms")]
    table.append(("mean of samples", str(len(samples)),
                  *(f"{statistics.fmean(s[k] for s in samples):.2f}"
                    for k in ("predicted_ms", "measured_ms", "abs_error_ms"))))
    return _format(table)


def _number(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def _format(table: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(table[0]))]
    return ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in table]


if __name__ == "__main__":
    sys.exit(main())
