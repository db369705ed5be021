"""What `tokenspeed up` shows while the engine starts: a line per stage, with a spinner and the
time it has taken while it runs, then a check and what it did (weights loaded with GB/s, CUDA
graphs captured, warm-up). The stages come from engine rank 0 (protocol.Progress). On a stream
that is not a terminal (a log file) each finished stage is a log line instead."""

from __future__ import annotations

import logging
import os
from types import TracebackType

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from appliance.engine.protocol import Progress as StageMessage

SPAWN_STAGE = "engine ranks"

log = logging.getLogger(__name__)


class StartupProgress:
    def __init__(self, console: Console) -> None:
        self._progress = Progress(SpinnerColumn(finished_text="[green]✓"),
                                  TextColumn("{task.description}"),
                                  TimeElapsedColumn(), console=console,
                                  disable=not console.is_terminal)
        self._log = not console.is_terminal
        self._tasks: dict[str, TaskID] = {}
        self._done: set[str] = set()

    def __enter__(self) -> StartupProgress:
        self._progress.start()
        self._begin(SPAWN_STAGE, "starting the engine ranks")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            self._end(SPAWN_STAGE, "engine ranks started")
        self._progress.stop()

    def on_stage(self, message: StageMessage) -> None:
        """Called (from the thread that starts the engine) for each stage as it starts and ends."""
        self._end(SPAWN_STAGE, "engine ranks started")  # rank 0 speaks: the ranks are up
        if message.summary is None:
            self._begin(message.stage, f"{message.stage} ...")
        else:
            self._end(message.stage, f"{message.stage}: {message.summary}")

    def _begin(self, stage: str, description: str) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(description, total=None)

    def _end(self, stage: str, description: str) -> None:
        if stage in self._done:
            return
        self._begin(stage, description)
        self._progress.update(self._tasks[stage], description=description, total=1, completed=1)
        self._done.add(stage)
        if self._log:
            log.info("%s", description)


def since_process_start() -> str:
    """"N.N s after the process started" (interpreter start-up and imports included: what a
    user waits for), from /proc; "start-up time unknown" where there is none."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return "start-up time unknown"
    return f"{uptime - start_ticks / os.sysconf('SC_CLK_TCK'):.1f} s after the process started"
