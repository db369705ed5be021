"""The engine loop keeps one step in flight: step N+1 is planned and launched before step N
is committed, its decode inputs are step N's sampled tokens (placeholders resolved on the
device), and the tokens that come out are those of a plain plan -> run -> commit loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from appliance.engine.engine import resolve_placeholders, to_forward_batch
from appliance.engine.plan_arrays import PlanArrays
from appliance.engine.protocol import GenerateRequest

VOCAB = 50


class CountingRunner:
    """A model whose greedy next token is (last input id * 3 + 1) % VOCAB; records batches."""

    device = torch.device("cpu")
    num_pages, page_size, max_model_len, vocab_size = 64, 4, 256, VOCAB
    eos_token_ids: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.inputs: list[list[int]] = []

    def forward(self, batch) -> torch.Tensor:
        ids = batch.input_ids
        assert (ids >= 0).all(), "a placeholder reached the model"
        self.inputs.append(ids.tolist())
        last = ids[batch.query_start[1:].long() - 1]                      # [B]
        logits = torch.zeros(batch.num_rows, VOCAB)
        logits[torch.arange(batch.num_rows), (last * 3 + 1) % VOCAB] = 1.0
        return logits


def expected(prompt: list[int], n: int) -> list[int]:
    out, last = [], prompt[-1]
    for _ in range(n):
        last = (last * 3 + 1) % VOCAB
        out.append(last)
    return out


@pytest.fixture
def engine(make_engine):
    return make_engine(CountingRunner())


def tokens_of(sent, rid: int) -> list[int]:
    return [o.token_id for m in sent for o in getattr(m, "items", []) if o.rid == rid]


def test_one_step_in_flight_gives_the_sequential_tokens(engine):
    prompts = {1: [5, 6, 7], 2: [9] * 9}
    for rid, prompt in prompts.items():
        engine._submit(GenerateRequest(rid, prompt, max_new_tokens=6, temperature=0.0,
                                       ignore_eos=True))
    in_flight_after_step = []
    while engine.requests or engine._inflight is not None:
        assert engine.step()
        in_flight_after_step.append(engine.scheduler.inflight_steps())
    for rid, prompt in prompts.items():
        assert tokens_of(engine.sent, rid) == expected(prompt, 6)
    # every launch but the last left its step uncommitted while the next one was planned
    assert in_flight_after_step.count(1) >= 5
    assert engine.scheduler.stats()["pages_used"] == 0


def test_abort_during_flight_returns_pages(engine):
    engine._submit(GenerateRequest(3, [1, 2, 3, 4, 5], max_new_tokens=50, temperature=0.0,
                                   ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine._abort(3)
    while engine.step():
        pass
    assert engine._inflight is None
    assert engine.scheduler.stats()["pages_used"] == 0


def test_placeholders_read_the_previous_tokens():
    arrays = PlanArrays(step=1, num_decode=2, input_ids=np.array([-2, -1, 7], np.int32),
                        positions=np.array([4, 9, 0], np.int32),
                        query_start=np.array([0, 1, 2, 3], np.int32),
                        prefix_lens=np.array([4, 9, 0], np.int32),
                        seq_lens=np.array([5, 10, 1], np.int32),
                        slot_mapping=np.array([4, 9, 12], np.int32),
                        sample=np.array([1, 1, 1], np.int32),
                        num_draft=np.zeros(3, np.int32),
                        page_table=np.array([[0, 1], [2, 0], [3, 0]], np.int32))
    batch = to_forward_batch(arrays, torch.device("cpu"), torch.tensor([11, 22], dtype=torch.int32))
    assert batch.input_ids.tolist() == [22, 11, 7]
    assert batch.page_table.tolist() == [[0, 1], [2, 0], [3, 0]]
    assert batch.seq_lens.tolist() == [5, 10, 1]


def test_decode_rows_in_order_take_the_previous_tokens_as_they_are():
    """Row t reading row t of the step before (a decode step whose rows kept their order):
    the ids are the previous tokens' first rows, a view (no launch); any other order and
    a literal id go through the lookup."""
    prev = torch.tensor([11, 22, 33], dtype=torch.int32)
    ids = resolve_placeholders(torch.tensor([-1, -2]), np.array([-1, -2], np.int32), prev)
    assert ids.tolist() == [11, 22] and ids.data_ptr() == prev.data_ptr()
    for host in ([-2, -1], [-1, 5], [7]):
        host_ids = np.array(host, np.int32)
        ids = resolve_placeholders(torch.from_numpy(host_ids), host_ids, prev)
        assert ids.tolist() == [int(prev[-i - 1]) if i < 0 else i for i in host]


def test_a_request_ended_by_a_stop_token_has_its_pages_back_in_the_next_stats(engine):
    """Its end is known at the commit of its step; the step in flight behind it was planned
    with it and holds its pages until that one commits: the stats go out before its last
    output and again after that commit, so /stats is current one step after the reply ends
    (not one stats period, ~0.5 s, later)."""
    from appliance.engine.protocol import Stats

    prompt = [5, 6, 7]
    stop = expected(prompt, 4)[-1]
    engine._submit(GenerateRequest(1, prompt, max_new_tokens=50, temperature=0.0,
                                   stop_token_ids=[stop]))
    while engine.step():
        pass
    assert tokens_of(engine.sent, 1)[-1] == stop
    stats = [m.values for m in engine.sent if isinstance(m, Stats)]
    assert stats[-2]["requests_running"] == 0 and stats[-1]["pages_used"] == 0


def test_first_output_carries_the_prefix_cache_hit(engine):
    """The first TokenOutput of a request carries the prompt tokens the scheduler reused
    (0 on a cold cache; every full page of the earlier turn on the next one); later outputs
    carry None. A finished request publishes stats before its last output."""
    from appliance.engine.protocol import Outputs, Stats

    prompt = list(range(1, 19))  # 18 tokens, page size 4
    engine._submit(GenerateRequest(1, prompt, max_new_tokens=3, temperature=0.0, ignore_eos=True))
    while engine.step():
        pass
    turn1 = [o for m in engine.sent if isinstance(m, Outputs) for o in m.items if o.rid == 1]
    assert [o.cached_tokens for o in turn1] == [0, None, None]
    last = next(i for i, m in enumerate(engine.sent)
                if isinstance(m, Outputs) and any(o.finish_reason for o in m.items))
    assert isinstance(engine.sent[last - 1], Stats)
    assert engine.sent[last - 1].values["generation_tokens_total"] == 3
    hits_before = engine.scheduler.stats()["prefix_cache_hit_tokens_total"]
    engine._submit(GenerateRequest(2, prompt + expected(prompt, 3) + [7], max_new_tokens=2,
                                   temperature=0.0, ignore_eos=True))
    while engine.step():
        pass
    turn2 = [o for m in engine.sent if isinstance(m, Outputs) for o in m.items if o.rid == 2]
    hit = engine.scheduler.stats()["prefix_cache_hit_tokens_total"] - hits_before
    assert turn2[0].cached_tokens == hit == 20 and turn2[1].cached_tokens is None
