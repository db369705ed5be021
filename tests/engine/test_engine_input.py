"""Rank 0 refuses, with a Rejected for that request alone, any request whose fields would raise
inside a step (issue 16: `top_k` 10^12 overflowed the sampler's int32 and took the engine
down); the requests already running are untouched and no KV page is leaked."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.engine import protocol
from appliance.engine.engine import Engine
from appliance.engine.protocol import GenerateRequest

VOCAB = 50
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1


class UniformRunner:
    """Equal logits for every token: the sampler, not the model, picks."""

    device = torch.device("cpu")
    num_pages, page_size, max_model_len, vocab_size = 64, 4, 256, VOCAB
    eos_token_ids: tuple[int, ...] = ()

    def forward(self, batch) -> torch.Tensor:
        return torch.zeros(batch.num_rows, VOCAB)


@pytest.fixture
def engine(make_engine):
    return make_engine(UniformRunner())


def good(rid: int, **fields) -> GenerateRequest:
    return GenerateRequest(rid, **{"prompt_ids": [1, 2, 3], "max_new_tokens": 4, "ignore_eos": True, **fields})


BAD_FIELDS = [
    {"top_k": 1_000_000_000_000}, {"top_k": INT32_MAX + 1}, {"top_k": -1},
    {"seed": INT64_MAX + 1}, {"seed": -(2**63) - 1}, {"seed": 2**64 - 1},
    {"temperature": math.nan}, {"temperature": math.inf}, {"temperature": -0.5},
    {"temperature": 1e39},  # inf as float32: logits / inf gives NaN
    {"top_p": 0.0}, {"top_p": math.nan}, {"top_p": 1.5}, {"top_p": -1.0},
    {"top_p": 1e-50},  # 0 as float32
    {"max_new_tokens": 0}, {"max_new_tokens": INT32_MAX + 1}, {"max_new_tokens": 2**40},
    {"prompt_ids": [1, VOCAB]}, {"prompt_ids": [-1]}, {"prompt_ids": [2**40]}, {"prompt_ids": []},
    {"stop_token_ids": [VOCAB]}, {"stop_token_ids": [2**40]}, {"stop_token_ids": [-3]},
]


def run_to_end(engine: Engine) -> None:
    for _ in range(200):
        if not engine.step():
            return
    raise AssertionError("the engine did not go idle")


@pytest.mark.parametrize("fields", BAD_FIELDS, ids=lambda f: f"{next(iter(f))}={next(iter(f.values()))!r}"[:40])
def test_out_of_range_request_is_rejected_alone(engine, fields):
    engine._submit(good(1, temperature=0.7, seed=5))
    engine._submit(good(2, **fields))
    rejected = [m for m in engine.sent if isinstance(m, protocol.Rejected)]
    assert [m.rid for m in rejected] == [2] and rejected[0].message
    assert list(engine.requests) == [1]
    run_to_end(engine)
    outputs = [o for m in engine.sent if isinstance(m, protocol.Outputs) for o in m.items]
    assert [o.rid for o in outputs] == [1] * 4 and outputs[-1].finish_reason == "length"
    assert engine.scheduler.stats()["pages_used"] == 0


def test_duplicate_request_id_is_rejected_and_the_first_keeps_running(engine):
    engine._submit(good(7))
    engine._submit(good(7, max_new_tokens=9))
    assert [m.rid for m in engine.sent if isinstance(m, protocol.Rejected)] == [7]
    run_to_end(engine)
    assert sum(len(m.items) for m in engine.sent if isinstance(m, protocol.Outputs)) == 4


def test_in_range_extremes_are_accepted(engine):
    engine._submit(good(1, top_k=INT32_MAX, seed=INT64_MAX, temperature=100.0, top_p=1e-9,
                        stop_token_ids=[0, VOCAB - 1], prompt_ids=[0, VOCAB - 1]))
    engine._submit(good(2, seed=-(2**63), top_k=0, temperature=0.0, max_new_tokens=250))
    engine._submit(good(3, temperature=1e-300, top_p=1e-30))  # sampled greedily; 1e-30 in float32
    assert not [m for m in engine.sent if isinstance(m, protocol.Rejected)]
    for _ in range(6):
        engine.step()
    engine._abort(2)
    run_to_end(engine)
    assert engine.scheduler.stats()["pages_used"] == 0


NUMBERS = (st.integers(min_value=-(2**64), max_value=2**64) | st.floats(allow_nan=True, allow_infinity=True))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_field_value_makes_a_step_raise(engine, data):
    """Whatever a request holds, it is rejected or it runs; the engine never raises."""
    fields = {
        "top_k": data.draw(st.integers(min_value=-(2**64), max_value=2**64)),
        "seed": data.draw(st.none() | st.integers(min_value=-(2**64), max_value=2**64)),
        "temperature": data.draw(st.floats(allow_nan=True, allow_infinity=True)),
        "top_p": data.draw(st.floats(allow_nan=True, allow_infinity=True)),
        "max_new_tokens": data.draw(st.integers(min_value=-5, max_value=2**40)),
        "prompt_ids": data.draw(st.lists(st.integers(min_value=-2, max_value=2**40), max_size=5)),
        "stop_token_ids": data.draw(st.lists(st.integers(min_value=-2, max_value=VOCAB + 2), max_size=3)),
        "logit_bias": data.draw(st.dictionaries(st.integers(min_value=-2, max_value=VOCAB + 2),
                                                st.floats(allow_nan=True, allow_infinity=True), max_size=3)),
        "repetition_penalty": data.draw(st.floats(allow_nan=True, allow_infinity=True)),
        "presence_penalty": data.draw(st.floats(allow_nan=True, allow_infinity=True)),
        "frequency_penalty": data.draw(st.floats(allow_nan=True, allow_infinity=True)),
        "min_tokens": data.draw(st.integers(min_value=-5, max_value=2**40)),
        "logprobs": data.draw(st.none() | st.integers(min_value=-3, max_value=30)),
    }
    rid = len(engine.sent) + 1000
    engine._submit(GenerateRequest(rid, **fields))
    for _ in range(3):
        engine.step()
    engine._abort(rid)
    run_to_end(engine)
    assert engine.scheduler.stats()["pages_used"] == 0
