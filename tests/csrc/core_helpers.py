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
