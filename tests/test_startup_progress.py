"""`tokenspeed up`'s start-up display: a line per engine stage, a check and a summary once done;
on a stream that is not a terminal, a log line per finished stage."""

from __future__ import annotations

import io
import logging

from rich.console import Console
from rich.text import Text

from appliance.engine.protocol import Progress
from appliance.startup_progress import StartupProgress

STAGES = [Progress("weights"), Progress("weights", "16.06 GB in 3.2 s (5.02 GB/s)"),
          Progress("CUDA graphs"), Progress("CUDA graphs", "13 decode batch sizes in 4.1 s"),
          Progress("warm-up"), Progress("warm-up", "1.2 s")]


def test_terminal_shows_each_stage_with_its_summary():
    out = io.StringIO()
    with StartupProgress(Console(file=out, force_terminal=True, width=100)) as progress:
        for message in STAGES:
            progress.on_stage(message)
    final = Text.from_ansi(out.getvalue().rsplit("\x1b[2K", 1)[-1]).plain  # the last frame
    lines = [line.rsplit(" ", 1)[0].rstrip() for line in final.splitlines() if line.strip()]
    assert lines == ["✓ engine ranks started", "✓ weights: 16.06 GB in 3.2 s (5.02 GB/s)",
                     "✓ CUDA graphs: 13 decode batch sizes in 4.1 s", "✓ warm-up: 1.2 s"]


def test_a_log_file_gets_a_line_per_finished_stage(caplog):
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="appliance.startup_progress"):
        with StartupProgress(Console(file=out, force_terminal=False)) as progress:
            for message in STAGES:
                progress.on_stage(message)
    assert out.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == [
        "engine ranks started", "weights: 16.06 GB in 3.2 s (5.02 GB/s)",
        "CUDA graphs: 13 decode batch sizes in 4.1 s", "warm-up: 1.2 s"]
