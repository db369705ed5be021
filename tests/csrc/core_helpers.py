"""Helpers for the control-plane tests: drive appliance._core like the engine does."""
import numpy as np
import pytest

_core = pytest.importorskip("appliance._core")


def i32(xs):
    return np.asarray(xs, dtype=np.int32)


def make(num_pages=64, page_size=4, max_batch_tokens=64, max_running=16, tps_floor=0.0,
         session_ttl_s=30.0, max_seq_len=1024, **kw):
    cfg = _core.SchedulerConfig(num_pages=num_pages, page_size=page_size,
                                max_batch_tokens=max_batch_tokens, max_running=max_running,
                                tps_floor=tps_floor, session_ttl_s=session_ttl_s,
                                max_seq_len=max_seq_len, **kw)
    s = _core.Scheduler(cfg)
    s.set_test_clock(1000.0)
    return s


class Driver:
    """Plays the engine: plan -> 'sample' -> commit, resolving placeholders.

    `sampler(rid, position)` gives the token a row samples; by default a
    deterministic function of (rid, position) so replays are comparable.
    """

    def __init__(self, s, sampler=None, step_time=0.01):
        self.s = s
        self.sampler = sampler or (lambda rid, pos: 1000 + (rid * 7 + pos) % 97)
        self.step_time = step_time
        self.outputs = {}   # rid -> list of tokens
        self.finished = {}  # rid -> reason
        self.plans = []

    def sample_plan(self, p):
        toks = np.zeros(p.num_rows, np.int32)
        for b in range(p.num_rows):
            if p.sample[b]:
                rid = int(p.rids[b])
                toks[b] = self.sampler(rid, int(p.seq_lens[b]))
        return toks

    def handle(self, events):
        for rid, tok, why in events:
            self.outputs.setdefault(rid, []).append(tok)
            if why:
                self.finished[rid] = why

    def step(self, check=True):
        p = self.s.plan()
        if p is None:
            return None
        self.plans.append(p)
        ev = self.s.commit(p.step, self.sample_plan(p), self.step_time)
        self.handle(ev)
        if check:
            self.s.check_invariants()
        return p

    def run(self, max_steps=10000, check=True):
        for _ in range(max_steps):
            if self.step(check) is None:
                return
        raise AssertionError("scheduler did not drain")


class OverlapDriver(Driver):
    """The engine with one step in flight: plan(N+1) is called before commit(N).

    Placeholders -(r+1) in input_ids are resolved against the previous plan's
    sampled tokens, as the engine does on the device. Checks that no page of
    an uncommitted step is handed to a *different* request's new tokens.
    """

    def __init__(self, s, sampler=None, step_time=0.01):
        super().__init__(s, sampler, step_time)
        self.inflight = []  # (plan, sampled tokens)
        self.resolved = []  # per plan: input_ids with placeholders resolved

    def _resolve(self, p):
        ids = p.input_ids.copy()
        prev = self.inflight[-1] if self.inflight else None
        for i, t in enumerate(ids):
            if t < 0:
                assert prev is not None, "placeholder without a previous plan"
                r = -int(t) - 1
                pp, toks = prev
                assert pp.sample[r] == 1
                ids[i] = toks[r]
        return ids

    def _check_no_reuse(self, p):
        # Slots written by this plan must not be pages another request still
        # reads in an uncommitted plan (unless it is the same request).
        for pp, _ in self.inflight:
            for b in range(p.num_rows):
                rid = int(p.rids[b])
                new_pages = {int(x) // self.s.config.page_size for x in
                             p.slot_mapping[p.query_start[b]:p.query_start[b + 1]]}
                for c in range(pp.num_rows):
                    if int(pp.rids[c]) == rid:
                        continue
                    n = -(-int(pp.seq_lens[c]) // self.s.config.page_size)
                    old = set(int(x) for x in pp.page_table[c, :n])
                    assert not (new_pages & old), f"page reused while in flight: {new_pages & old}"

    def step(self, check=True):
        p = self.s.plan()
        if p is not None:
            self._check_no_reuse(p)
            ids = self._resolve(p)
            self.resolved.append((p, ids))
            self.plans.append(p)
            toks = self.sample_plan(p)
            self.inflight.append((p, toks))
        committed = False
        if len(self.inflight) >= 2 or (p is None and self.inflight):
            old, toks = self.inflight.pop(0)
            self.handle(self.s.commit(old.step, toks, self.step_time))
            committed = True
        if check:
            self.s.check_invariants()
        # None only when nothing could be planned and nothing was in flight.
        return p if p is not None else (True if committed else None)
