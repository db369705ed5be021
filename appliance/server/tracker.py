"""Per-request token timing measured in the frontend: decode TPS, tokens per minute (and their
last minutes, for sparklines), TTFT, ITL.

Everything here is fed from the token arrival times the frontend sees, so it is what a user sees.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0  # tokens per minute are measured over this window
HISTORY_S = 300.0  # per-second counts kept for the dashboard's sparklines
TPS_WINDOW_S = 5.0  # a request's decode TPS "now" is measured over this window


class RateWindow:
    """Counts over a sliding window, in one-second buckets (bounded memory at any rate)."""

    def __init__(self, window_s: float = HISTORY_S) -> None:
        self._window_s = window_s
        self._buckets: deque[list[float]] = deque()  # [bucket second, count]

    def add(self, count: float, now: float) -> None:
        second = math.floor(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([second, count])
        self._trim(now)

    def total(self, now: float, window_s: float = WINDOW_S) -> float:
        """The count of the last `window_s` seconds (at most the window it keeps)."""
        self._trim(now)
        return sum(count for second, count in self._buckets if second > now - window_s)

    def series(self, now: float, bucket_s: int, span_s: float) -> list[float]:
        """Rates per second in consecutive `bucket_s`-second buckets over the last `span_s`
        seconds of whole seconds before `now`, oldest first (the current second is not over)."""
        self._trim(now)
        end = math.floor(now)
        n = int(span_s // bucket_s)
        start = end - n * bucket_s
        sums = [0.0] * n
        for second, count in self._buckets:
            if start <= second < end:
                sums[int((second - start) // bucket_s)] += count
        return [total / bucket_s for total in sums]

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self._window_s:
            self._buckets.popleft()


@dataclass
class TrackedRequest:
    rid: int
    user: str
    prompt_tokens: int
    started_at: float
    session: str = ""
    generated_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    decode_arrivals: deque[float] = field(default_factory=deque)  # arrival times after the first

    def on_token(self, now: float) -> tuple[float | None, float | None]:
        """Record one token; returns (time to first token, inter-token latency), one of them None."""
        self.generated_tokens += 1
        previous, self.last_token_at = self.last_token_at, now
        if previous is None:
            self.first_token_at = now
            return now - self.started_at, None
        self.decode_arrivals.append(now)
        self._trim(now)
        return None, now - previous

    def decode_tps(self, now: float) -> float:
        """Decode tokens per second over the last TPS_WINDOW_S seconds (stalls count as time)."""
        if self.first_token_at is None:
            return 0.0
        self._trim(now)
        span = now - max(now - TPS_WINDOW_S, self.first_token_at)
        return len(self.decode_arrivals) / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        while self.decode_arrivals and self.decode_arrivals[0] <= now - TPS_WINDOW_S:
            self.decode_arrivals.popleft()


class RequestTracker:
    """The frontend's view of in-flight requests and recent throughput."""

    def __init__(self) -> None:
        self._active: dict[int, TrackedRequest] = {}
        self._generated = RateWindow()
        self._prompted = RateWindow()

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def start(self, rid: int, user: str, prompt_tokens: int, arrived_at: float | None = None,
              session: str = "") -> TrackedRequest:
        """Track a request; its TTFT counts from `arrived_at` (the HTTP arrival) when given."""
        now = self.now()
        started = now if arrived_at is None else arrived_at
        tracked = TrackedRequest(rid, user, prompt_tokens, started_at=started, session=session)
        self._active[rid] = tracked
        self._prompted.add(prompt_tokens, now)
        return tracked

    def on_token(self, tracked: TrackedRequest) -> tuple[float | None, float | None]:
        now = self.now()
        self._generated.add(1, now)
        return tracked.on_token(now)

    def finish(self, rid: int) -> None:
        self._active.pop(rid, None)

    def active(self) -> list[TrackedRequest]:
        return list(self._active.values())

    def active_rids(self) -> list[int]:
        return list(self._active)

    def generation_tokens_per_minute(self) -> float:
        return self._generated.total(self.now()) * 60.0 / WINDOW_S

    def prompt_tokens_per_minute(self) -> float:
        return self._prompted.total(self.now()) * 60.0 / WINDOW_S

    def history(self, bucket_s: int, span_s: float = HISTORY_S) -> dict[str, list[float]]:
        """Generated and prompt tokens per second, per `bucket_s` over the last `span_s`."""
        now = self.now()
        return {"generation_tokens_per_s": self._generated.series(now, bucket_s, span_s),
                "prompt_tokens_per_s": self._prompted.series(now, bucket_s, span_s)}
