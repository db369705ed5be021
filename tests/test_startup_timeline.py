"""scripts/lib/stack_sampler + scripts/startup_timeline.py: a process started with the sampler
on its path writes its threads' stacks and CPU, and the timeline names the thread that was
busy, in the function it was busy in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUSY = """
import threading, time

def spin_for_the_sampler(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))

worker = threading.Thread(target=spin_for_the_sampler, args=(1.2,), name="spinner")
worker.start()
time.sleep(1.2)
worker.join()
time.sleep(0.6)   # the sampler writes its file after TOKENSPEED_STACK_SAMPLE_S
"""


def test_a_sampled_process_shows_its_busy_thread(tmp_path):
    env = {**os.environ, "TOKENSPEED_STACK_SAMPLES": str(tmp_path),
           "TOKENSPEED_STACK_SAMPLE_S": "1.5", "TOKENSPEED_STACK_SAMPLE_MS": "5",
           "PYTHONPATH": str(ROOT / "scripts" / "lib" / "stack_sampler")}
    subprocess.run([sys.executable, "-c", BUSY], env=env, check=True, timeout=60)
    written = list(tmp_path.glob("*.json"))
    assert len(written) == 1 and not list(tmp_path.glob("*.part"))
    samples = json.loads(written[0].read_text())
    assert samples["pid"] > 0 and len(samples["samples"]) > 20
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "startup_timeline.py"),
                          str(tmp_path)], capture_output=True, text=True, check=True, timeout=60)
    busy = [line for line in out.stdout.splitlines()
            if line.strip().startswith("spinner") and "spin_for_the_sampler" in line]
    assert busy, out.stdout
    cpu = max(int(line.split("CPU")[1].split("%")[0]) for line in busy)
    assert cpu >= 20, out.stdout     # a spinning thread: most of a core, less on a loaded box


def test_without_the_variable_nothing_is_sampled(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TOKENSPEED_STACK_SAMPLES"}
    env["PYTHONPATH"] = str(ROOT / "scripts" / "lib" / "stack_sampler")
    code = "import threading; print(sorted(t.name for t in threading.enumerate()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60, cwd=tmp_path)
    assert out.stdout.strip() == "['MainThread']"
