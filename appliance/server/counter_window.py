"""Engine counters over the last minute, from the snapshots `/stats` reads (e.g. the prefix-cache
hit rate of the last minute rather than since start).

The engine reports running totals only; a `CounterWindow` keeps one sample a second of the ones
it is shown and answers with the change over the oldest sample of the window. Nobody polling
means no samples: `change` then covers less than the window (it says how much), or nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

WINDOW_S = 60.0
SAMPLE_EVERY_S = 1.0


class CounterWindow:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, dict[str, float]]] = deque()

    def record(self, now: float, counters: Mapping[str, float]) -> None:
        if not self._samples or now - self._samples[-1][0] >= SAMPLE_EVERY_S:
            self._samples.append((now, dict(counters)))
        self._trim(now)

    def change(self, now: float, counters: Mapping[str, float]) -> tuple[dict[str, float], float]:
        """(counters minus the sample at the window's start, the seconds that covers); a counter
        that went down (the engine restarted) counts from zero."""
        self._trim(now)
        if not self._samples:
            return {}, 0.0
        then, base = self._samples[0]
        delta = {}
        for key, value in counters.items():
            before = base.get(key, 0.0)
            delta[key] = value - before if value >= before else value
        return delta, now - then

    def _trim(self, now: float) -> None:
        """Keep the newest sample at or before the window's start (the base of a full window)
        and those after it."""
        while len(self._samples) > 1 and self._samples[1][0] <= now - self._window_s:
            self._samples.popleft()
