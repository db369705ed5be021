"""Draft sources and the draft policy: n-gram prompt lookup against a brute-force definition,
and the policy's back-off per request (misses) and per batch (compute-bound steps)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.engine.speculative.draft import DraftSource
from appliance.engine.speculative.ngram import MAX_NGRAM, MIN_NGRAM, NgramDraft
from appliance.engine.speculative.policy import DraftPolicy, StepCost


def lookup(context: list[int], k: int) -> list[int]:
    """The definition: the longest suffix (MAX..MIN tokens) that occurred earlier, at its
    latest earlier occurrence, proposes the k tokens that followed it; past the end of the
    context, the proposal continues as the same lookup on the extended context would."""
    context = list(context)
    for n in range(min(MAX_NGRAM, len(context)), MIN_NGRAM - 1, -1):
        suffix = context[len(context) - n:]
        for i in range(len(context) - 1, n - 1, -1):   # i: index of the follower
            if context[i - n:i] == suffix:
                out = []
                while len(out) < k:   # the match is len - i back: the text repeats with it
                    out.append(context[i + len(out)] if i + len(out) < len(context)
                               else out[len(out) - (len(context) - i)])
                return out
    return []


@settings(max_examples=300, deadline=None)
@given(prompt=st.lists(st.integers(0, 4), min_size=1, max_size=40),
       chunks=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=5), max_size=8),
       k=st.integers(1, 6))
def test_ngram_proposes_what_followed_the_latest_longest_match(prompt, chunks, k):
    src: DraftSource = NgramDraft()
    src.start(7, prompt, "")
    context = list(prompt)
    assert src.propose(7, k) == lookup(context, k)
    for chunk in chunks:
        src.extend(7, chunk)
        context += chunk
        assert src.propose(7, k) == lookup(context, k)
    src.finish(7)
    assert src.propose(7, k) == []


def test_ngram_finds_a_repeated_edit():
    src = NgramDraft()
    code = [10, 11, 12, 13, 14, 15, 16, 17]
    src.start(1, code + [99] + code[:3], "s")
    assert src.propose(1, 4) == [13, 14, 15, 16]


def test_ngram_continues_a_repetition_past_the_end():
    src = NgramDraft()
    src.start(1, [5, 1, 2, 3, 1, 2, 3, 1, 2], "")
    assert src.propose(1, 7) == [3, 1, 2, 3, 1, 2, 3]
    src.start(2, [4, 4, 4], "")
    assert src.propose(2, 3) == [4, 4, 4]


FREE = StepCost(tokens=4, time_s=0.01, draft_token_s=1e-6)        # memory-bound: drafts ~free
COMPUTE_BOUND = StepCost(tokens=64, time_s=0.05, draft_token_s=0.002)  # a draft ~ 2.5 tokens


def test_drafting_backs_off_when_drafts_miss_and_retries_later():
    pol = DraftPolicy(max_draft=8)
    pol.add(1)
    assert pol.lengths([1], FREE)[1] > 0   # a new request starts drafting
    for _ in range(12):
        pol.record(1, drafted=4, accepted=0)
    missing = StepCost(tokens=4, time_s=0.01, draft_token_s=2e-4)
    assert pol.lengths([1], missing)[1] == 0
    for _ in range(200):
        pol.idle(1)
    assert pol.lengths([1], missing)[1] > 0   # the evidence faded: it tries again


def test_repeated_misses_pause_drafting_even_when_drafts_are_free():
    pol = DraftPolicy(max_draft=8)
    pol.add(1)
    free = StepCost(tokens=1, time_s=0.01, draft_token_s=0.0)
    for _ in range(3):
        assert pol.lengths([1], free)[1] == 8
        pol.record(1, drafted=8, accepted=0)
    assert pol.lengths([1], free)[1] == 0          # paused
    for _ in range(8):
        pol.idle(1)
    assert pol.lengths([1], free)[1] == 8          # retries after the pause
    for _ in range(3):
        pol.record(1, drafted=8, accepted=0)
    for _ in range(8):
        pol.idle(1)
    assert pol.lengths([1], free)[1] == 0          # the second pause is twice as long
    for _ in range(8):
        pol.idle(1)
    assert pol.lengths([1], free)[1] == 8
    pol.record(1, drafted=8, accepted=2)           # an acceptance resets the pauses
    for _ in range(3):
        pol.record(1, drafted=8, accepted=0)
    for _ in range(8):
        pol.idle(1)
    assert pol.lengths([1], free)[1] > 0


def test_chains_grow_with_acceptance():
    pol = DraftPolicy(max_draft=8)
    cost = StepCost(tokens=4, time_s=0.01, draft_token_s=5e-4)
    pol.add(1)
    pol.add(2)
    for _ in range(20):
        pol.record(1, drafted=4, accepted=4)
        pol.record(2, drafted=4, accepted=1)
    k = pol.lengths([1, 2], cost)
    assert k[1] > k[2] > 0 and k[1] <= 8


def test_a_compute_bound_batch_stops_drafting():
    pol = DraftPolicy(max_draft=8)
    for rid in range(64):
        pol.add(rid)
        for _ in range(10):
            pol.record(rid, drafted=4, accepted=3)   # alpha ~ 0.75
    assert all(n > 0 for n in pol.lengths(list(range(64)), FREE).values())
    assert all(n == 0 for n in pol.lengths(list(range(64)), COMPUTE_BOUND).values())


def test_unknown_and_removed_requests_get_no_drafts():
    pol = DraftPolicy(max_draft=4)
    pol.add(1)
    pol.remove(1)
    assert pol.lengths([1, 2], FREE) == {1: 0, 2: 0}


def test_drafts_must_pay_for_the_eager_step_they_bring():
    """An H200-like 8B step: a 10 ms graph decode of 16 rows; any drafts make it eager, 25 ms
    more. Middling acceptance does not earn that back; near-certain acceptance does; and a
    step already eager for its prefill (eager_s 0) drafts as before."""
    graph_step = StepCost(tokens=16, time_s=0.010, draft_token_s=2e-5, eager_s=0.025)
    mixed_step = StepCost(tokens=16, time_s=0.010, draft_token_s=2e-5, eager_s=0.0)
    middling, sure = DraftPolicy(max_draft=8), DraftPolicy(max_draft=8)
    for rid in range(16):
        middling.add(rid)
        sure.add(rid)
        for _ in range(30):
            middling.record(rid, drafted=4, accepted=1)   # alpha ~ 0.25 .. 0.5
            sure.record(rid, drafted=8, accepted=8)       # alpha ~ 1
    rows = list(range(16))
    assert all(n == 0 for n in middling.lengths(rows, graph_step).values())
    assert all(n > 0 for n in middling.lengths(rows, mixed_step).values())
    assert all(n == 8 for n in sure.lengths(rows, graph_step).values())


def test_the_engine_charges_the_eager_step_only_where_decode_replays_graphs():
    from types import SimpleNamespace

    from appliance.engine.engine import Engine

    coeffs = (1e-3, 1e-4, 1e-4, 1e-8, 2e-5, 0.025)            # a..f: f = 25 ms
    sched = SimpleNamespace(cost_coeffs=lambda: coeffs)
    lens = [100] * 16
    decode = SimpleNamespace(predicted_time_s=0.010, total_drafts=0, num_tokens=16, num_rows=16,
                             seq_lens=lens)
    verify = SimpleNamespace(predicted_time_s=0.036, total_drafts=50, num_tokens=66, num_rows=16,
                             seq_lens=lens)
    mixed = SimpleNamespace(predicted_time_s=0.060, total_drafts=0, num_tokens=80, num_rows=17,
                            seq_lens=lens + [64])
    gpu = SimpleNamespace(scheduler=sched, runner=SimpleNamespace(decode_graphs=object()))
    cpu = SimpleNamespace(scheduler=sched, runner=SimpleNamespace(decode_graphs=None))
    cost = Engine._cost_without_drafts
    assert cost(gpu, decode, 16).eager_s == 0.025 and cost(gpu, decode, 16).graphs
    assert not cost(cpu, decode, 16).graphs
    after_verify = cost(gpu, verify, 16)              # as if plain: less its drafts and f
    assert after_verify.eager_s == 0.025 and abs(after_verify.time_s - 0.010) < 1e-12
    assert cost(gpu, mixed, 16).eager_s == 0.0        # eager anyway for its prefill
    assert cost(cpu, verify, 16).eager_s == 0.0       # no graphs: every step is eager
    assert abs(cost(cpu, verify, 16).time_s - 0.035) < 1e-12


def test_drafts_are_cut_to_what_the_extend_graphs_hold():
    """DeepSeek-V2-Lite on an H200: 64 rows x 8 drafts (576 logits rows) ran eagerly at 3.7
    decode steps, past the graphs' 512. With room for 448 drafts, the chains are cut to fit,
    the least likely drafts first (the shorter-lived chains lose theirs)."""
    pol = DraftPolicy(max_draft=8)
    for rid in range(64):
        pol.add(rid)
        for _ in range(30):
            pol.record(rid, drafted=8, accepted=8 if rid < 32 else 6)
    rows = list(range(64))
    unbounded = StepCost(tokens=64, time_s=0.010, draft_token_s=1e-6)
    assert sum(pol.lengths(rows, unbounded).values()) == 64 * 8
    k = pol.lengths(rows, StepCost(tokens=64, time_s=0.010, draft_token_s=1e-6, max_drafts=448))
    assert sum(k.values()) == 448
    assert all(k[rid] == 8 for rid in range(32))          # near-certain chains stay whole
    assert min(k[rid] for rid in range(32, 64)) >= 5      # the rest share the cut evenly
    tight = StepCost(tokens=64, time_s=0.010, draft_token_s=1e-6, max_drafts=0)
    assert sum(pol.lengths(rows, tight).values()) == 0


def test_the_engine_tells_the_policy_the_extend_graphs_room():
    from types import SimpleNamespace

    from appliance.engine.engine import Engine
    from appliance.model.extend_graph import ExtendGraphs

    graphs = SimpleNamespace(buckets=[128, 512, 2048], max_logits=512)
    assert ExtendGraphs.draft_room(graphs, 64) == 448
    assert ExtendGraphs.draft_room(graphs, 600) == 0
    coeffs = (1e-3, 1e-4, 1e-4, 1e-8, 2e-5, 0.002)
    step = SimpleNamespace(predicted_time_s=0.010, total_drafts=0, num_tokens=64, num_rows=64,
                           seq_lens=[100] * 64)
    room = SimpleNamespace(draft_room=lambda rows: ExtendGraphs.draft_room(graphs, rows))
    engine = SimpleNamespace(scheduler=SimpleNamespace(cost_coeffs=lambda: coeffs),
                             runner=SimpleNamespace(decode_graphs=object(), extend_graphs=room))
    assert Engine._cost_without_drafts(engine, step, 64).max_drafts == 448
    engine.runner.extend_graphs = None                # verify steps are eager anyway
    assert Engine._cost_without_drafts(engine, step, 64).max_drafts is None


def test_a_draft_token_is_charged_at_most_a_decode_tokens_work():
    """The fitted e may say a draft costs more than a decode token (stale evidence from mixed
    steps); the policy is told b + d * the mean length at most."""
    from types import SimpleNamespace

    from appliance.engine.engine import Engine

    stuck = (1e-3, 2e-3, 1e-3, 1e-5, 0.048, 0.0)              # e = 48 ms, b = 2 ms
    step = SimpleNamespace(predicted_time_s=0.2, total_drafts=0, num_tokens=8, num_rows=8,
                           seq_lens=[1500] * 8)
    engine = SimpleNamespace(scheduler=SimpleNamespace(cost_coeffs=lambda: stuck),
                             runner=SimpleNamespace(decode_graphs=None))
    assert abs(Engine._cost_without_drafts(engine, step, 8).draft_token_s - 0.017) < 1e-12
    fitted = (1e-3, 2e-3, 1e-3, 1e-5, 0.003, 0.0)
    engine.scheduler = SimpleNamespace(cost_coeffs=lambda: fitted)
    assert Engine._cost_without_drafts(engine, step, 8).draft_token_s == 0.003


def test_new_requests_probe_to_learn_their_acceptance():
    """8 rows on 2 CPU cores: a draft token costs most of a row's share of the step, so the
    prior alpha of 1/2 is refused. A request without evidence probes with PROBE_DRAFTS; good
    probes earn it full chains, failed ones pause it; on a graph step nobody probes alone."""
    from appliance.engine.speculative.policy import MISS_LIMIT, PROBE_DRAFTS

    cpu_step = StepCost(tokens=8, time_s=0.065, draft_token_s=0.006)       # tau ~ 0.74
    graph_step = StepCost(tokens=8, time_s=0.010, draft_token_s=2e-5, eager_s=0.025,
                          graphs=True)
    mixed_gpu_step = StepCost(tokens=8, time_s=0.065, draft_token_s=0.006, graphs=True)
    pol = DraftPolicy(max_draft=8)
    for rid in (1, 2):
        pol.add(rid)
    assert pol.lengths([1, 2], cpu_step) == {1: PROBE_DRAFTS, 2: PROBE_DRAFTS}
    assert pol.lengths([1, 2], graph_step) == {1: 0, 2: 0}
    assert pol.lengths([1, 2], mixed_gpu_step) == {1: 0, 2: 0}   # eager already: still not alone
    for _ in range(3):
        pol.record(1, drafted=PROBE_DRAFTS, accepted=PROBE_DRAFTS)      # re-emits what it read
    for _ in range(MISS_LIMIT):
        pol.record(2, drafted=PROBE_DRAFTS, accepted=0)                 # drafts that miss
    k = pol.lengths([1, 2], cpu_step)
    assert k[1] > PROBE_DRAFTS and k[2] == 0
