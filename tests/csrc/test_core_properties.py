"""Hypothesis: random submit/plan/commit/abort/clock/draft sequences through the binding.

Drafts are set on random requests (refused unless the request is decoding with every token
committed); their verify rows commit a random number of accepted drafts, sometimes with a stop
id inside the accepted run, while other steps are in flight, requests are preempted and aborted.

After every operation the C++ invariants hold (no page leaked or owned twice,
refcounts equal the leases holding them, cache tree and LRU consistent); every
plan is well formed; at the end every request has ended and the pool drains to
zero use, with only cached pages left, which eviction frees.
"""
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_helpers import i32, make

PS = 4
STOP = 3

submit = st.tuples(st.just("submit"), st.integers(0, 11),          # rid
                   st.integers(0, 2), st.integers(1, 30),          # prefix family, length
                   st.integers(1, 16), st.sampled_from(["", "a", "b"]))
ops = st.lists(
    st.one_of(
        submit, submit, submit,
        st.tuples(st.just("plan")), st.tuples(st.just("plan")), st.tuples(st.just("plan")),
        st.tuples(st.just("commit")), st.tuples(st.just("commit")),
        st.tuples(st.just("abort"), st.integers(0, 11)),
        st.tuples(st.just("draft"), st.integers(0, 11), st.integers(1, 6)),
        st.tuples(st.just("draft"), st.just(-1), st.integers(1, 6)),  # every live request
        st.tuples(st.just("draft"), st.just(-1), st.integers(1, 6)),
        st.tuples(st.just("clock"), st.floats(0.0, 20.0)),
    ),
    min_size=30,
    max_size=100,
)


def token_for(rid, pos, salt):
    return int((rid * 31 + pos * 17 + salt) % 11)  # 3 (STOP) comes up now and then


def verify_tokens(p, salt):
    """One token per logits row (B + total_drafts) and the counts a verifier would give: a
    pseudo-random number of each verify row's drafts accepted, then one sampled token."""
    toks, counts = [], []
    for r in range(p.num_rows):
        rid, k = int(p.rids[r]), int(p.num_draft[r])
        lo = int(p.query_start[r])
        drafts = p.input_ids[lo + 1:lo + 1 + k].tolist()
        accepted = (rid * 7 + int(p.seq_lens[r]) + salt) % (k + 1)
        bonus = token_for(rid, int(p.prefix_lens[r]) + 1 + accepted, salt)
        row = drafts[:accepted] + [bonus]
        toks += row + [0] * (k + 1 - len(row))
        counts.append(len(row))
    return np.array(toks, np.int32), np.array(counts, np.int32)


def check_plan(p, prev, cfg):
    b, t = p.num_rows, p.num_tokens
    assert t <= cfg.max_batch_tokens
    assert len(set(p.rids.tolist())) == b
    assert p.query_start[0] == 0 and p.query_start[-1] == t
    qs = np.diff(p.query_start)
    assert (qs[: p.num_decode] == 1).all() and (qs > 0).all()
    nd = p.num_draft
    assert (nd[: p.num_decode] == 0).all() and int(nd.sum()) == p.total_drafts
    verify = np.flatnonzero(nd)
    # verify rows follow the plain decodes, a sampled next token plus its drafts
    assert verify.tolist() == list(range(p.num_decode, p.num_decode + len(verify)))
    assert (qs[verify] == nd[verify] + 1).all() and (p.sample[verify] == 1).all()
    assert (p.seq_lens - p.prefix_lens == qs).all()
    written = {}
    for r in range(b):
        n = -(-int(p.seq_lens[r]) // PS)
        pages = p.page_table[r, :n].tolist()
        assert len(set(pages)) == n
        assert (p.page_table[r, n:] == 0).all()
        lo, hi = p.query_start[r], p.query_start[r + 1]
        pos = p.positions[lo:hi]
        assert pos.tolist() == list(range(int(p.prefix_lens[r]), int(p.seq_lens[r])))
        for k, ps_ in zip(pos, p.slot_mapping[lo:hi]):
            assert ps_ == pages[k // PS] * PS + k % PS
        for k, tok in zip(pos, p.input_ids[lo:hi]):
            assert tok >= 0 or r < p.num_decode  # verify rows: committed token + drafts
            if tok < 0:  # placeholder: a sampled row of the previous plan, same request
                assert prev is not None
                src = -int(tok) - 1
                assert prev.rids[src] == p.rids[r] and prev.sample[src] == 1
        for s in p.slot_mapping[lo:hi]:
            written.setdefault(int(s) // PS, set()).add(r)
    # A page written by one row is not read by another row of the same step.
    for r in range(b):
        n = -(-int(p.seq_lens[r]) // PS)
        for pg in p.page_table[r, :n].tolist():
            assert written.get(pg, {r}) <= {r}


def check_no_inflight_reuse(p, inflight_plans):
    # No page still read by an uncommitted step is written for another request.
    for r in range(p.num_rows):
        lo, hi = p.query_start[r], p.query_start[r + 1]
        new_pages = {int(x) // PS for x in p.slot_mapping[lo:hi]}
        for q in inflight_plans:
            for c in range(q.num_rows):
                if q.rids[c] == p.rids[r]:
                    continue
                n = -(-int(q.seq_lens[c]) // PS)
                assert not new_pages & set(q.page_table[c, :n].tolist()), "in-flight page reused"


@settings(max_examples=int(os.environ.get("CORE_HYPOTHESIS_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(ops=ops, num_pages=st.integers(12, 32), salt=st.integers(0, 5),
       budget=st.sampled_from([8, 16, 64]), floor=st.sampled_from([0.0, 50.0]))
def test_random_operation_sequences_keep_invariants(ops, num_pages, salt, budget, floor):
    s = make(num_pages=num_pages, page_size=PS, max_batch_tokens=budget, max_running=6,
             tps_floor=floor, session_ttl_s=5.0, max_seq_len=48)
    cfg = s.config
    clock = 1000.0
    live = {}        # rid -> (max_new, generated count)
    ended = set()
    inflight = []    # (plan, tokens)
    last_plan = None
    events_seen = {}

    def do_commit():
        p, (toks, counts) = inflight.pop(0)
        for rid, tok, why in s.commit(p.step, toks, 0.01, counts):
            assert rid in live, f"event for a request that is not live: {rid}"
            events_seen[rid] = events_seen.get(rid, 0) + 1
            assert events_seen[rid] <= live[rid]
            if why == "length":
                assert events_seen[rid] == live[rid]
            if why == "stop":
                assert tok == STOP
            if why:
                del live[rid]
                ended.add(rid)

    def do_plan():
        nonlocal last_plan
        p = s.plan()
        if p is None:
            return False
        check_plan(p, last_plan, cfg)
        check_no_inflight_reuse(p, [q for q, _ in inflight])
        last_plan = p
        inflight.append((p, verify_tokens(p, salt)))
        return True

    for op in ops:
        kind = op[0]
        if kind == "submit":
            _, rid, fam, n, max_new, sess = op
            prompt = [fam * 100 + (i % 9) + 4 for i in range(n)]
            if rid in live:
                try:
                    s.submit(rid, i32(prompt), max_new, i32([STOP]), sess)
                    raise AssertionError("duplicate rid accepted")
                except ValueError:
                    pass
            elif n + max_new > cfg.max_seq_len or -(-(n + max_new) // PS) > num_pages:
                try:
                    s.submit(rid, i32(prompt), max_new, i32([STOP]), sess)
                    raise AssertionError("oversized request accepted")
                except ValueError:
                    pass
            else:
                s.submit(rid, i32(prompt), max_new, i32([STOP]), sess)
                live[rid] = max_new
                events_seen[rid] = 0
        elif kind == "plan":
            if len(inflight) < 2:
                do_plan()
        elif kind == "commit":
            if inflight:
                do_commit()
        elif kind == "abort":
            rid = op[1]
            assert s.abort(rid) == (rid in live)
            live.pop(rid, None)
        elif kind == "draft":
            _, which, k = op
            for rid in ([which] if which >= 0 else list(live)):
                # drafts that sometimes hold the stop id, so an accepted run can end early
                kept = s.set_drafts(rid, i32([(rid + j + salt) % 11 for j in range(k)]))
                assert 0 <= kept <= k
                assert kept == 0 or s.state(rid) == "decoding"
            clock += op[1]
            s.set_test_clock(clock)
        s.check_invariants()

    # Drain: every live request must end.
    for _ in range(3000):
        if not live and not inflight:
            break
        planned = len(inflight) < 2 and do_plan()
        if inflight and (not planned or len(inflight) >= 2):
            do_commit()
        elif not planned and not inflight:
            raise AssertionError(f"stuck with live requests {sorted(live)}: {s.stats()}")
        s.check_invariants()
    assert not live and not inflight, "requests did not end"
    st_ = s.stats()
    assert st_["requests_running"] == 0 and st_["requests_waiting"] == 0
    # Session pins expire; then nothing is in use and eviction frees the pool.
    s.set_test_clock(clock + 100.0)
    assert s.plan() is None
    st_ = s.stats()
    assert st_["pages_used"] == 0, st_
    assert st_["pages_cached"] + st_["pages_free"] == st_["pages_total"]
    s.evict_cache()
    assert s.stats()["pages_free"] == st_["pages_total"]
    s.check_invariants()
