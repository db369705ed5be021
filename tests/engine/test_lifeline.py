"""Engine ranks die with the frontend (even under kill -9) and with rank 0."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from appliance.engine.lifeline import process_alive

REPO = Path(__file__).resolve().parents[2]

# Arms the lifeline on the given pids, says so, then waits to be ended.
RANK = ("import sys, time\n"
        "from appliance.engine.lifeline import die_with\n"
        "die_with(*map(int, sys.argv[1:]))\n"
        "print('armed', flush=True)\n"
        "time.sleep(60)\n")
# A stand-in frontend: spawns a rank watching it, prints the rank's pid, waits to be killed.
FRONTEND = ("import os, subprocess, sys, time\n"
            "rank = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())],\n"
            "                        stdout=subprocess.PIPE, text=True)\n"
            "assert rank.stdout.readline() == 'armed\\n'\n"
            "print(rank.pid, flush=True)\n"
            "time.sleep(60)\n")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_alive(pid)


def test_a_rank_dies_when_its_frontend_is_killed():
    frontend = subprocess.Popen([sys.executable, "-c", FRONTEND, RANK], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
    rank = int(frontend.stdout.readline())
    assert process_alive(rank)
    frontend.kill()
    frontend.wait()
    assert _gone_within(rank, 5)


def test_a_rank_above_0_dies_with_rank_0():
    import os

    rank0 = subprocess.Popen(["sleep", "60"])
    rank1 = subprocess.Popen([sys.executable, "-c", RANK, str(os.getpid()), str(rank0.pid)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert rank1.stdout.readline() == "armed\n"
        rank0.kill()  # rank 0 stays a zombie until reaped: the lifeline must not wait for that
        time.sleep(0.2)
        assert rank1.wait(5) == 1
    finally:
        rank0.kill()
        rank0.wait()
        rank1.kill()
        rank1.wait()
