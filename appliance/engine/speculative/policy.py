"""How many drafts each request gets in a step, so that speculation never slows anyone down.

Per request: alpha, the chance that a draft is accepted given the drafts before it were (the
i-th draft of a chain survives with probability alpha^i), estimated from decayed counts of
accepted and rejected drafts. Per step: the cost model's draft-token coefficient `e` (seconds
a verify token adds to a step) against the step's own yield (tokens per second). A draft is
worth its slot when its expected tokens per second of added step time, alpha^i / e, beat the
step's rate: alpha^i >= e * tokens / time. At small batch a step is memory-bound, e is small
and chains run long; as the batch grows compute-bound, e rises toward a token's full cost and
drafting stops unless alpha is near 1. A request whose drafts keep missing drops below the
threshold; and after MISS_LIMIT verify rows in a row that accept nothing it stops drafting for
a pause that doubles with each such run (a step in which anyone drafts is planned after the
previous commit, without overlap, so even nearly free drafts are not free). Its evidence fades
while it does not draft, so it retries later.

Per step, the fixed cost of verifying at all: where plain decode steps replay decode graphs, a
step with drafts replays an extend graph (padded to its bucket) or, where none fits, runs
eagerly; the cost model knows that as its coefficient `f` (`StepCost.eager_s`: 0 when the step
is an extend step anyway, for its prefill, and on the CPU). Drafts are planned only when the
step's expected tokens per second with them, f included, beat its rate without: on an H200 an
eager 8B step pays ~25 ms of kernel launches over a ~5-10 ms graph step, which drafts at
random-text acceptance never earn back (16 users lost 6.5% of TPM to such steps before).

Probes: a request without evidence sits at the prior alpha = 1/2, which a compute-bound step's
threshold refuses, so it would never draft and never learn that its drafts are good (the edit
workload on 2 CPU cores: 8 and 16 users drafted 43 and 24 tokens in a whole run, against ~80%
acceptance at 1 and 4 users). So a request whose decayed evidence is below PROBE_EVIDENCE
drafts PROBE_DRAFTS tokens whenever the step pays for verification anyway: someone else
drafts, or no step replays a graph (the CPU). Where decode replays CUDA graphs a probe alone
would make a step eager and planned without overlap (an 8B on an H200 at 16 users: 0.94x TPM
in one of two runs where probes rode on mixed steps), so there it never goes alone. A probe
that misses counts toward MISS_LIMIT, so a request whose drafts keep failing probes ever more
rarely.

Per step, the graphs' room: an extend graph holds at most so many logits rows (one a row plus
one a draft; `StepCost.max_drafts`). A step with more drafts runs eagerly, a cost the model
above does not see (DeepSeek-V2-Lite at 64 rows x 8 drafts: 3.7 decode steps eagerly, against
1.65 in a graph at 4 drafts), so the least likely drafts (smallest alpha^i) are cut until the
step fits.

Per batch (`BatchGate`): what a verify step costs beyond that is not in the cost model: it runs
without overlap. So the steps themselves are compared: tokens per second of recent verify steps
against recent plain decode steps; while verifying gives fewer, nobody drafts, for a pause that
doubles as long as it keeps losing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PRIOR_ACCEPTED = 0.5  # pseudo-counts: a new request starts at alpha = 1/2
PRIOR_REJECTED = 0.5
KEEP_PER_VERIFY = 0.9  # weight an older verify row keeps when a new one is recorded
KEEP_PER_IDLE_STEP = 0.97  # evidence fades while a request does not draft (~ 30 steps)
ALPHA_RANGE = (1e-3, 0.999)
MISS_LIMIT = 3  # verify rows in a row with nothing accepted before drafting pauses
PAUSE_STEPS = (8, 512)  # the first pause, and the longest (each run of misses doubles it)
RATE_KEEP = 0.8  # weight an older step keeps in a step kind's tokens-per-second average
PROBE_DRAFTS = 2  # drafts a request without evidence gets, to learn its acceptance
PROBE_EVIDENCE = 0.5  # decayed accepted + rejected counts below which a request probes
GATE_MIN_STEPS = 3  # steps of each kind before verify and plain steps are compared
GATE_PAUSE_STEPS = (16, 1024)  # the batch-wide pause: first, longest


@dataclass
class _Acceptance:
    accepted: float = 0.0
    rejected: float = 0.0
    misses: int = 0  # verify rows in a row that accepted nothing
    paused: int = 0  # steps left without drafting
    next_pause: int = PAUSE_STEPS[0]

    def evidence(self) -> float:
        return self.accepted + self.rejected

    def alpha(self) -> float:
        a = (self.accepted + PRIOR_ACCEPTED) / (
            self.accepted + self.rejected + PRIOR_ACCEPTED + PRIOR_REJECTED)
        return min(max(a, ALPHA_RANGE[0]), ALPHA_RANGE[1])


@dataclass
class _Rate:
    """Decayed tokens and seconds of one kind of step."""

    tokens: float = 0.0
    seconds: float = 0.0
    steps: int = 0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens = self.tokens * RATE_KEEP + tokens
        self.seconds = self.seconds * RATE_KEEP + seconds
        self.steps += 1

    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class BatchGate:
    """Whether anyone may draft in the next step: closed while recent verify steps emitted
    fewer tokens per second than recent plain decode steps (module doc)."""

    def __init__(self) -> None:
        self.plain, self.verify = _Rate(), _Rate()
        self.paused = 0
        self.next_pause = GATE_PAUSE_STEPS[0]

    @property
    def open(self) -> bool:
        return self.paused == 0

    def record(self, verified: bool, tokens: int, seconds: float) -> None:
        """A decode step (every row emitted) with or without verify rows: its tokens and time."""
        if tokens <= 0 or seconds <= 0:
            return
        if not verified:
            self.plain.add(tokens, seconds)
            self.paused = max(0, self.paused - 1)
            return
        self.verify.add(tokens, seconds)
        if min(self.verify.steps, self.plain.steps) < GATE_MIN_STEPS:
            return
        if self.verify.per_second() < self.plain.per_second():
            self.paused, self.verify = self.next_pause, _Rate()  # the next trial starts afresh
            self.next_pause = min(2 * self.next_pause, GATE_PAUSE_STEPS[1])
        else:
            self.next_pause = GATE_PAUSE_STEPS[0]


@dataclass(frozen=True)
class StepCost:
    """What the cost model says about the next step without drafts."""

    tokens: float  # tokens it emits (its sampled rows)
    time_s: float  # its predicted time
    draft_token_s: float  # the cost model's e: time one verify token adds
    eager_s: float = 0.0  # time any drafts add at once (f; 0 if the step is eager anyway)
    graphs: bool = False  # plain decode steps replay CUDA graphs (no probe goes alone)
    max_drafts: int | None = None  # drafts the step's extend graph has logits rows for


class DraftPolicy:
    def __init__(self, max_draft: int) -> None:
        self.max_draft = max_draft
        self._stats: dict[int, _Acceptance] = {}

    def add(self, rid: int) -> None:
        self._stats[rid] = _Acceptance()

    def remove(self, rid: int) -> None:
        self._stats.pop(rid, None)

    def alpha(self, rid: int) -> float:
        return self._stats[rid].alpha()

    def record(self, rid: int, drafted: int, accepted: int) -> None:
        """A verify row of `rid` accepted `accepted` of its `drafted` drafts."""
        s = self._stats.get(rid)
        if s is None or drafted <= 0:
            return
        s.accepted = s.accepted * KEEP_PER_VERIFY + accepted
        s.rejected = s.rejected * KEEP_PER_VERIFY + (1.0 if accepted < drafted else 0.0)
        if accepted:
            s.misses, s.next_pause = 0, PAUSE_STEPS[0]
            return
        s.misses += 1
        if s.misses >= MISS_LIMIT:
            s.misses, s.paused = 0, s.next_pause
            s.next_pause = min(2 * s.next_pause, PAUSE_STEPS[1])

    def idle(self, rid: int) -> None:
        """A step passed without drafts for `rid`."""
        s = self._stats.get(rid)
        if s is not None:
            s.accepted *= KEEP_PER_IDLE_STEP
            s.rejected *= KEEP_PER_IDLE_STEP
            s.paused = max(0, s.paused - 1)

    def lengths(self, rids: list[int], cost: StepCost) -> dict[int, int]:
        """Draft-chain length for each of `rids` (0: no drafts) in the next step."""
        live = [rid for rid in rids if rid in self._stats and not self._stats[rid].paused]
        if not live or self.max_draft <= 0:
            return {rid: 0 for rid in rids}
        alphas = [self._stats[rid].alpha() for rid in live]
        logs = [math.log(a) for a in alphas]     # once a step, not once a round
        e, fixed = max(cost.draft_token_s, 0.0), max(cost.eager_s, 0.0)
        base_tokens, base_time = max(cost.tokens, 1.0), max(cost.time_s, 1e-9)
        tokens, time_s = base_tokens, base_time
        n: list[int] = []
        for _ in range(3):  # the threshold depends on the drafts it admits: a few rounds settle
            n = _chain_lengths(alphas, logs, e * tokens / time_s, self.max_draft)
            drafts = sum(n)
            tokens = base_tokens + sum(map(_expected_accepted, alphas, n))
            time_s = base_time + e * drafts + (fixed if drafts else 0.0)
        if tokens / time_s <= base_tokens / base_time:  # the drafts do not pay for the step
            n = [0] * len(live)
        if any(n) or not cost.graphs:   # verification is paid for: probes ride along
            for i, rid in enumerate(live):
                if n[i] == 0 and self._stats[rid].evidence() < PROBE_EVIDENCE:
                    n[i] = min(PROBE_DRAFTS, self.max_draft)
        if cost.max_drafts is not None:
            n = _fit(n, alphas, max(cost.max_drafts, 0))
        k = dict(zip(live, n))
        return {rid: k.get(rid, 0) for rid in rids}


def _fit(n: list[int], alphas: list[float], budget: int) -> list[int]:
    """Chain lengths `n` cut to at most `budget` drafts in all, keeping the likeliest: the
    i-th draft of a chain survives with alpha^i, which falls along the chain, so keeping the
    `budget` largest keeps a prefix of every chain. (In numpy: at 256 rows nearly 2,000
    drafts may go.)"""
    if sum(n) <= budget:
        return n
    lengths, alpha = np.array(n), np.array(alphas)
    rows = np.repeat(np.arange(lengths.size), lengths)                  # a row index a draft
    depth = np.arange(rows.size) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1
    keep = np.argsort(-(alpha[rows] ** depth), kind="stable")[:budget]  # depth: 1..n[row]
    return np.bincount(rows[keep], minlength=lengths.size).tolist()


def _chain_lengths(alphas: list[float], logs: list[float], tau: float,
                   max_draft: int) -> list[int]:
    """For each alpha (with its log): how many i >= 1 have alpha^i >= tau."""
    if tau <= 0:
        return [max_draft] * len(alphas)
    log_tau = math.log(tau)
    return [0 if tau > a else min(max_draft, int(log_tau / la + 1e-9))
            for a, la in zip(alphas, logs)]


def _expected_accepted(alpha: float, n: int) -> float:
    """sum_{i=1..n} alpha^i: the accepted drafts a chain of n is expected to give."""
    return alpha * (1.0 - alpha ** n) / (1.0 - alpha)
