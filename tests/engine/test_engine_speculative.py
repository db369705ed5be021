"""The engine loop with speculation: drafts from the n-gram (or suffix) source go to the scheduler after
each commit, verify rows return logits at every token, and the tokens that come out are the
ones the loop gives without speculation."""
from __future__ import annotations

import time

import pytest
import torch

from appliance.engine import protocol
from appliance.engine.protocol import GenerateRequest

VOCAB = 50


class MarkovRunner:
    """Greedy next token (id * 3 + 1) % VOCAB of each logit token, a cycle n-gram lookup
    finds; `noise` adds a second, rarely winning, token so sampling has a distribution."""

    device = torch.device("cpu")
    num_pages, page_size, max_model_len, vocab_size = 64, 4, 512, VOCAB
    eos_token_ids: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.batches: list = []

    def forward(self, batch) -> torch.Tensor:
        ids = batch.input_ids
        assert (ids >= 0).all(), "a placeholder reached the model"
        self.batches.append(batch)
        at = ids[batch.logit_token_index]                                   # [N]
        logits = torch.zeros(at.shape[0], VOCAB)
        logits[torch.arange(at.shape[0]), (at * 3 + 1) % VOCAB] = 8.0
        logits[torch.arange(at.shape[0]), (at * 7 + 2) % VOCAB] = 5.0
        return logits


@pytest.fixture
def engines(make_engine):
    return lambda *overrides: make_engine(MarkovRunner(), overrides=overrides)


def run(engine, requests):
    for req in requests:
        engine._submit(req)
    while engine.requests or engine._inflight is not None:
        assert engine.step()
    out = {}
    for m in engine.sent:
        for o in getattr(m, "items", []):
            out.setdefault(o.rid, []).append(o.token_id)
    return out


REQUESTS = [
    dict(rid=1, prompt_ids=[5, 6, 7], max_new_tokens=40),
    dict(rid=2, prompt_ids=[9] * 9, max_new_tokens=33),
    dict(rid=3, prompt_ids=[11, 3], max_new_tokens=25, stop_token_ids=[20]),
]


@pytest.mark.parametrize("method", ["ngram", "suffix"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculation_gives_the_tokens_of_plain_decoding(engines, temperature, method):
    reqs = [GenerateRequest(**r, temperature=temperature, seed=7, ignore_eos=True)
            for r in REQUESTS]
    plain = run(engines(), reqs)
    spec_engine = engines(f"speculative.method={method}", "speculative.max_draft=4")
    spec = run(spec_engine, reqs)
    assert spec == plain
    st = spec_engine.scheduler.stats()
    assert st["spec_verify_rows_total"] > 0 and st["spec_accepted_tokens_total"] > 0
    assert st["pages_used"] == 0
    verify_batches = [b for b in spec_engine.runner.batches if b.logit_index is not None]
    assert verify_batches and all(b.num_logits > b.num_rows for b in verify_batches)


# request 3's chain 11, 3, 10, ... reaches its stop id 20 at its 17th token: min_tokens 20 holds
# it back there; a bias of 3.5 lifts token 31 over the greedy token where 31 is the runner-up
PROCESSORS = {"penalties": dict(frequency_penalty=0.5),
              "logit_bias": dict(logit_bias={31: 3.5, 16: -9.0}),
              "min_tokens": dict(min_tokens=20)}


@pytest.mark.parametrize("method", ["ngram", "suffix"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("processor", sorted(PROCESSORS))
def test_processed_requests_get_drafts_and_the_tokens_of_plain_decoding(engines, temperature,
                                                                        method, processor):
    """Each logits row of a chain is processed as a plain decode at its position: a verify row
    counts the drafts before it in its chain as generated (repetition, presence, frequency)
    and the statistics count only the tokens a step emits; a bias is the same at every row;
    min_tokens holds the stop ids back by the row's own position. The tokens are plain
    decoding's, while drafts are accepted."""
    reqs = [GenerateRequest(**r, temperature=temperature, seed=7, ignore_eos=True,
                            **PROCESSORS[processor]) for r in REQUESTS]
    plain = run(engines(), reqs)
    unprocessed = run(engines(), [GenerateRequest(**r, temperature=temperature, seed=7,
                                                  ignore_eos=True) for r in REQUESTS])
    assert plain != unprocessed
    spec_engine = engines(f"speculative.method={method}", "speculative.max_draft=4")
    assert run(spec_engine, reqs) == plain
    st = spec_engine.scheduler.stats()
    assert st["spec_verify_rows_total"] > 0 and st["spec_accepted_tokens_total"] > 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_log_probabilities_with_drafts_are_plain_decodings(engines, temperature):
    """Each emitted token's log-probabilities come from its own logits row of the chain: the
    same tokens, sampled values and alternatives as without drafts."""
    reqs = [GenerateRequest(**r, temperature=temperature, seed=7, ignore_eos=True, logprobs=2)
            for r in REQUESTS]

    def outputs(engine):
        run(engine, reqs)
        return [(o.rid, o.token_id, o.logprobs) for m in engine.sent for o in getattr(m, "items", [])]

    plain = outputs(engines())
    spec_engine = engines("speculative.method=ngram", "speculative.max_draft=4")
    spec = outputs(spec_engine)
    assert sorted(spec, key=lambda o: o[0]) == sorted(plain, key=lambda o: o[0])
    assert all(lp is not None for _, _, lp in spec)
    assert spec_engine.scheduler.stats()["spec_accepted_tokens_total"] > 0


def test_an_opted_out_request_never_gets_drafts(engines):
    eng = engines("speculative.method=ngram")
    run(eng, [GenerateRequest(**REQUESTS[0], temperature=0.0, speculative=False)])
    assert eng.scheduler.stats()["spec_verify_rows_total"] == 0
    assert all(b.logit_index is None for b in eng.runner.batches)


def test_speculation_off_keeps_the_step_in_flight(engines):
    eng = engines()
    eng._submit(GenerateRequest(**REQUESTS[0], temperature=0.0))
    overlapped = 0
    while eng.requests or eng._inflight is not None:
        eng.step()
        overlapped += eng.scheduler.inflight_steps() == 1 and eng._inflight is not None
    assert overlapped >= 30


def test_verify_steps_are_planned_after_the_previous_commit(engines, monkeypatch):
    eng = engines("speculative.method=ngram")
    in_flight_at_verify_plans = []
    plan = eng.scheduler.plan

    class Spy:
        def __getattr__(self, name):
            return getattr(eng_scheduler, name)

        def plan(self):
            p = plan()
            if p is not None and p.total_drafts:
                in_flight_at_verify_plans.append(eng_scheduler.inflight_steps() - 1)
            return p
    eng_scheduler = eng.scheduler
    eng.scheduler = Spy()
    run(eng, [GenerateRequest(**REQUESTS[1], temperature=0.0)])
    assert in_flight_at_verify_plans and set(in_flight_at_verify_plans) == {0}


def sent_tokens(engine) -> int:
    return sum(len(getattr(m, "items", [])) for m in engine.sent)


@pytest.mark.parametrize("method", ["", "ngram"])
def test_a_commit_sends_its_tokens_after_the_next_launch(engines, method):
    """With or without drafts, the tokens a step commits leave after the next step's forward
    is launched: that host work overlaps the GPU even when verify steps cannot."""
    eng = engines(*([f"speculative.method={method}"] if method else []))
    at_launch = []
    forward = eng.runner.forward

    def spy(batch):
        at_launch.append(sent_tokens(eng))
        return forward(batch)
    eng.runner.forward = spy
    eng._submit(GenerateRequest(**REQUESTS[1], temperature=0.0, ignore_eos=True))
    before = []
    while eng.requests or eng._inflight is not None:
        before.append(sent_tokens(eng))
        launches = len(at_launch)
        eng.step()
        assert at_launch[launches:] in ([], [before[-1]])
    assert sent_tokens(eng) == REQUESTS[1]["max_new_tokens"]
    if method:
        assert eng.scheduler.stats()["spec_verify_rows_total"] > 0


class WrongDraft:
    """A draft source whose drafts the MarkovRunner never accepts (its next token after t is
    (3t + 1) % VOCAB; this proposes (3t + 2) % VOCAB)."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}

    def start(self, rid, prompt, session):
        self.last[rid] = prompt[-1]

    def extend(self, rid, tokens):
        self.last[rid] = tokens[-1]

    def propose(self, rid, max_draft):
        return [(self.last[rid] * 3 + 2) % VOCAB] * max_draft

    def finish(self, rid):
        self.last.pop(rid, None)


def test_drafts_that_always_miss_back_off_and_the_overlap_returns(engines):
    from appliance.engine.speculative.speculator import Speculator

    req = GenerateRequest(rid=1, prompt_ids=[5, 6, 7], max_new_tokens=200, temperature=0.0,
                          ignore_eos=True)
    plain = run(engines(), [req])
    eng = engines("speculative.method=ngram")
    eng.speculator = Speculator(WrongDraft(), max_draft=8)
    eng._submit(req)
    overlapped = 0
    while eng.requests or eng._inflight is not None:
        eng.step()
        overlapped += eng.scheduler.inflight_steps() == 1 and eng._inflight is not None
    out = {}
    for m in eng.sent:
        for o in getattr(m, "items", []):
            out.setdefault(o.rid, []).append(o.token_id)
    assert out == plain
    st = eng.scheduler.stats()
    assert st["spec_accepted_tokens_total"] == 0
    # 3 misses, then pauses of 8, 16, 32, 64, 128 steps: a handful of verify rows in 200 steps
    assert 3 <= st["spec_verify_rows_total"] <= 18
    assert overlapped >= 150


class SlowVerifyRunner(MarkovRunner):
    """Verify steps (logits at more tokens than rows) take `verify_s`, others `plain_s`: drafts
    that are all right but cost more than they give."""

    def __init__(self, plain_s: float, verify_s: float) -> None:
        super().__init__()
        self.plain_s, self.verify_s = plain_s, verify_s

    def forward(self, batch) -> torch.Tensor:
        verify = batch.logit_token_index.shape[0] > batch.seq_lens.shape[0]
        time.sleep(self.verify_s if verify else self.plain_s)
        return super().forward(batch)


def test_verify_steps_slower_than_plain_ones_close_the_batch_gate(engines, make_engine):
    req = GenerateRequest(rid=1, prompt_ids=[5, 6, 7], max_new_tokens=200, temperature=0.0,
                          ignore_eos=True)
    plain = run(engines(), [req])
    eng = make_engine(SlowVerifyRunner(plain_s=0.002, verify_s=0.05),
                      overrides=("speculative.method=ngram",))
    assert run(eng, [req]) == plain and len(plain[1]) == 200
    st = eng.scheduler.stats()
    # every draft is right (9 tokens a verify step), yet 50 ms for 9 loses to 2 ms for 1: after
    # 3 verify steps the gate closes for 16 plain steps, then 32, 64, ... (one trial each)
    assert st["spec_accepted_tokens_total"] >= 0.9 * st["spec_draft_tokens_total"] > 0
    assert st["spec_verify_rows_total"] <= 12
    # the pause is published with the engine's stats (/stats' speculative.paused_steps)
    eng.speculator.gate.paused = 7
    eng._publish_stats(force=True)
    published = [m for m in eng.sent if isinstance(m, protocol.Stats)][-1]
    assert published.values["spec_gate_paused_steps"] == 7


def test_batch_gate_compares_verify_and_plain_rates():
    from appliance.engine.speculative.policy import GATE_PAUSE_STEPS, BatchGate

    gate = BatchGate()
    for _ in range(3):
        gate.record(False, 8, 0.010)     # 800 tokens/s without drafts
        gate.record(True, 20, 0.020)     # 1000 with them: keeps drafting
    assert gate.open
    for _ in range(3):
        gate.record(True, 10, 0.020)     # 500: the average falls below 800
    assert not gate.open and gate.paused == GATE_PAUSE_STEPS[0]
    for _ in range(GATE_PAUSE_STEPS[0]):
        gate.record(False, 8, 0.010)
    assert gate.open                    # a new trial; losing again doubles the pause
    for _ in range(3):
        gate.record(True, 4, 0.020)
    assert gate.paused == 2 * GATE_PAUSE_STEPS[0]
    gate.record(True, 0, 0.0)           # nothing measured: ignored
    assert gate.paused == 2 * GATE_PAUSE_STEPS[0]
