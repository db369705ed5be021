"""A stack sampler for every Python process started with this folder on PYTHONPATH (Python
imports `sitecustomize` at start-up), for seeing where a daemon's start-up goes across its
processes and threads (scripts/gpu_startup_profile, read by scripts/startup_timeline.py).

With TOKENSPEED_STACK_SAMPLES=DIR set, a daemon thread records every other thread's Python
stack each TOKENSPEED_STACK_SAMPLE_MS milliseconds (default 10) for TOKENSPEED_STACK_SAMPLE_S
seconds (default 60), then writes DIR/<process name>-<pid>.json. Each sample also records how
late the sampler woke (a sleeping thread waits for the GIL, so lateness is a measure of how hard
the other threads hold it), each thread's CPU time and the process's and its waited-for
children's (Triton's ptxas), in clock ticks from /proc. Without the variable this does nothing.
On the path it stands in for any other sitecustomize (the system's): for diagnostic runs only.
"""

import os

if os.environ.get("TOKENSPEED_STACK_SAMPLES"):
    import json
    import sys
    import threading
    import time

    _DEPTH = 128  # innermost frames kept a stack (imports nest deep)

    def _ticks(path: str, children: bool = False) -> int:
        """utime + stime (or cutime + cstime, the waited-for children's) of a /proc stat file;
        -1 when it is gone."""
        first = 13 if children else 11   # fields 14 and 15 (16, 17): after "pid (comm)", 11 on
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[first]) + int(fields[first + 1])
        except (OSError, IndexError, ValueError):
            return -1

    def _sample_stacks(folder: str, interval_s: float, duration_s: float) -> None:
        frame_ids: dict[tuple, int] = {}
        stack_ids: dict[tuple, int] = {}
        samples: list[list] = []
        me = threading.get_ident()
        started = time.monotonic()
        wall_started = time.time()
        due = started
        while True:
            due += interval_s
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            now = time.monotonic()
            if now - started > duration_s:
                break
            late = now - due
            if late > interval_s:   # fell behind: no burst of catch-up samples
                due = now
            threads = {t.ident: (t.name, t.native_id) for t in threading.enumerate()}
            row = []
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                stack = []
                while frame is not None and len(stack) < _DEPTH:
                    code = frame.f_code
                    key = (code.co_filename, frame.f_lineno, code.co_name)
                    stack.append(frame_ids.setdefault(key, len(frame_ids)))
                    frame = frame.f_back
                name, native = threads.get(tid, (str(tid), None))
                cpu = _ticks(f"/proc/self/task/{native}/stat") if native else -1
                row.append([name, stack_ids.setdefault(tuple(stack), len(stack_ids)), cpu])
            samples.append([round(now - started, 4), round(late, 4), row,
                            _ticks("/proc/self/stat"), _ticks("/proc/self/stat", children=True)])
        try:
            with open("/proc/self/comm") as f:
                name = f.read().strip()
        except OSError:
            name = "python"
        path = os.path.join(folder, f"{name}-{os.getpid()}.json")
        with open(path + ".part", "w") as f:   # renamed when whole: a reader waits for *.json
            json.dump({"pid": os.getpid(), "name": name, "started_unix": wall_started,
                       "argv": sys.argv[:4], "interval_s": interval_s,
                       "clock_ticks_s": os.sysconf("SC_CLK_TCK"),
                       "frames": list(frame_ids), "stacks": list(stack_ids),
                       "samples": samples}, f)
        os.replace(path + ".part", path)

    threading.Thread(target=_sample_stacks, name="stack-sampler", daemon=True,
                     args=(os.environ["TOKENSPEED_STACK_SAMPLES"],
                           float(os.environ.get("TOKENSPEED_STACK_SAMPLE_MS", "10")) / 1000,
                           float(os.environ.get("TOKENSPEED_STACK_SAMPLE_S", "60")))).start()
