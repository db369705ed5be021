"""Where a daemon's start-up went, from the stack samples of scripts/lib/stack_sampler (every
process of `tokenspeed up` run with TOKENSPEED_STACK_SAMPLES=DIR and that folder on PYTHONPATH).

For each second (--bucket) since the first process started, per process: its CPU use and its
waited-for children's (Triton's ptxas), how late its sampler woke (mean / max ms: a thread
waiting for the GIL wakes late, so this is how hard the others held it), and each thread that
used 5% of a core or more, with what it ran most (its innermost frame in this repository, then
its innermost frame) and that frame's share of the samples. Then, per thread, its top frames
over the whole run, idle ones left out (--top).

    python scripts/startup_timeline.py DIR [--bucket 1.0] [--top 8]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
# innermost frames where a thread waits rather than works
IDLE = {"wait", "sleep", "select", "poll", "_worker", "get", "accept", "recv", "recv_multipart",
        "_wait_for_tstate_lock", "join", "run_forever", "_run_once", "serve_forever",
        "_sample_stacks", "readline", "read", "recv_into", "epoll", "_poll"}


def label(frames: list, stack: list[int]) -> tuple[str, bool]:
    """(`repo frame < module being imported < innermost frame`, idle) for one stack
    (innermost first; each part only where there is one and it differs)."""
    if not stack:
        return "(no frames)", True
    inner = frames[stack[0]]
    ours = next((frames[i] for i in stack if frames[i][0].startswith(ROOT)), None)
    module = next((frames[i] for i in stack if frames[i][2] == "<module>"), None)
    parts = [_short(f) for f in (ours, module) if f is not None and f != inner]
    return " < ".join([*parts, _short(inner)]), inner[2] in IDLE


def _short(frame: list) -> str:
    path, line, name = frame
    path = path[len(ROOT) + 1:] if path.startswith(ROOT) else "/".join(path.split("/")[-2:])
    return f"{path}:{line} {name}"


def load(folder: str) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    return sorted(runs, key=lambda r: r["started_unix"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--bucket", type=float, default=1.0)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    runs = load(args.folder)
    if not runs:
        raise SystemExit(f"no samples in {args.folder}")
    origin = runs[0]["started_unix"]
    labels: dict[tuple, Counter] = defaultdict(Counter)     # (bucket, proc, thread) -> labels
    cpu: Counter = Counter()                                # (bucket, proc, thread) -> ticks
    late: dict[tuple, list[float]] = defaultdict(list)      # (bucket, proc) -> lateness
    totals: dict[tuple, Counter] = defaultdict(Counter)     # (proc, thread) -> busy labels
    for run in runs:
        proc = f"{run['name']}[{run['pid']}]"
        frames, stacks, hz = run["frames"], run["stacks"], run["clock_ticks_s"]
        offset = run["started_unix"] - origin
        last: dict[str, int] = {}
        for t, lateness, row, own, children in run["samples"]:
            b = int((t + offset) // args.bucket)
            late[b, proc].append(lateness)
            for thread, ticks in [*((r[0], r[2]) for r in row), (" process", own),
                                  (" ptxas etc.", children)]:
                if ticks >= 0:
                    cpu[b, proc, thread] += (ticks - last.get(thread, ticks)) / hz
                    last[thread] = ticks
            for thread, sid, _ in row:
                text, idle = label(frames, stacks[sid])
                labels[b, proc, thread][text] += 1
                if not idle:
                    totals[proc, thread][text] += 1
    for b in sorted({k[0] for k in late}):
        print(f"== {b * args.bucket:6.1f} s")
        for run in runs:
            proc = f"{run['name']}[{run['pid']}]"
            lat = late.get((b, proc))
            if not lat:
                continue
            busy = {k[2]: v for k, v in cpu.items() if k[0] == b and k[1] == proc}
            print(f"  {proc}: CPU {100 * busy.get(' process', 0) / args.bucket:.0f}% "
                  f"(children {100 * busy.get(' ptxas etc.', 0) / args.bucket:.0f}%); "
                  f"sampler late {1e3 * sum(lat) / len(lat):.1f} / {1e3 * max(lat):.0f} ms")
            for (bb, pp, thread), seen in sorted(labels.items()):
                share = busy.get(thread, 0) / args.bucket
                if bb == b and pp == proc and share >= 0.05:
                    text, k = seen.most_common(1)[0]
                    print(f"    {thread[:22]:<22} CPU {100 * share:3.0f}%; "
                          f"{100 * k / sum(seen.values()):3.0f}% {text}")
    print("== top frames a thread, whole run (samples not idle)")
    for (proc, thread), seen in sorted(totals.items()):
        print(f"  {proc} {thread}: {sum(seen.values())}")
        for text, k in seen.most_common(args.top):
            print(f"    {k:6d} {text}")


if __name__ == "__main__":
    main()
