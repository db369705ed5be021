"""Per-row logits processors and log-probabilities through the engine loop, against references
no one here wrote: HF transformers' RepetitionPenaltyLogitsProcessor, torch.log_softmax, and
OpenAI's documented presence / frequency penalty formula."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, RepetitionPenaltyLogitsProcessor

from appliance.config import load_config
from appliance.engine.model_files import resolve_model_files
from appliance.engine.protocol import Constraint, GenerateRequest
from appliance.model import ModelRunner

from .conftest import FakeRunner, outputs, rejected, run_to_end

VOCAB = 40
EOS = 3
# [last, next]: random logits of both signs, and a model that likes to repeat its last token
TABLE = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)) + 3 * torch.eye(VOCAB)


def table_model(last: torch.Tensor) -> torch.Tensor:
    """A deterministic model: the next token's logits are a fixed row per last token."""
    return TABLE[last]


def eos_first(last: torch.Tensor) -> torch.Tensor:
    logits = TABLE[last].clone()
    logits[:, EOS] = 100.0
    return logits


@pytest.fixture
def engine(make_engine):
    return make_engine(FakeRunner(VOCAB, table_model, eos_token_ids=(EOS,)))


def greedy(rid: int, **fields) -> GenerateRequest:
    return GenerateRequest(rid, **{"prompt_ids": [5, 9, 5, 11], "max_new_tokens": 12,
                                   "temperature": 0.0, "ignore_eos": True, **fields})


def tokens(engine, rid: int) -> list[int]:
    return [o.token_id for o in outputs(engine, rid)]


def reference_greedy(prompt: list[int], n: int, process) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        scores = process(torch.tensor([ids]), TABLE[ids[-1]].clone().unsqueeze(0))
        ids.append(int(scores.argmax()))
    return ids[len(prompt):]


def test_repetition_penalty_matches_transformers(engine):
    prompt = [5, 9, 5, 11]
    engine._submit(greedy(1, repetition_penalty=1.8))
    engine._submit(greedy(2))
    run_to_end(engine)
    expected = reference_greedy(prompt, 12, RepetitionPenaltyLogitsProcessor(1.8))
    assert tokens(engine, 1) == expected
    assert tokens(engine, 2) == reference_greedy(prompt, 12, lambda ids, s: s)
    assert tokens(engine, 1) != tokens(engine, 2)  # the penalty changed the greedy output


def test_presence_and_frequency_penalties_follow_openai(engine):
    """logit -= frequency * count + presence * (count > 0), counts over generated tokens."""
    prompt = [5, 9, 5, 11]

    def openai(ids, scores):
        counts = torch.bincount(ids[0, len(prompt):], minlength=VOCAB).float()
        return scores - 0.7 * counts - 1.5 * (counts > 0).float()

    engine._submit(greedy(1, presence_penalty=1.5, frequency_penalty=0.7, max_new_tokens=20))
    run_to_end(engine)
    assert tokens(engine, 1) == reference_greedy(prompt, 20, openai)


def test_logit_bias_forces_and_bans_tokens(engine):
    engine._submit(greedy(1, logit_bias={17: 100.0}, temperature=1.0, seed=3))
    first = reference_greedy([5, 9, 5, 11], 1, lambda ids, s: s)[0]
    engine._submit(greedy(2, logit_bias={first: -100.0}, max_new_tokens=1))
    run_to_end(engine)
    assert tokens(engine, 1) == [17] * 12
    assert tokens(engine, 2) != [first]


def test_min_tokens_holds_back_eos_and_stop_ids(make_engine):
    eng = make_engine(FakeRunner(VOCAB, eos_first, eos_token_ids=(EOS,)))
    eng._submit(greedy(1, ignore_eos=False, min_tokens=5, max_new_tokens=20))
    eng._submit(greedy(2, ignore_eos=False, max_new_tokens=20))
    run_to_end(eng)
    out = outputs(eng, 1)
    assert len(out) == 6 and EOS not in [o.token_id for o in out[:5]]
    assert (out[-1].token_id, out[-1].finish_reason) == (EOS, "stop")
    assert [(o.token_id, o.finish_reason) for o in outputs(eng, 2)] == [(EOS, "stop")]


def test_min_tokens_holds_back_a_user_stop_id(engine):
    first = reference_greedy([5, 9, 5, 11], 1, lambda ids, s: s)[0]
    engine._submit(greedy(1, stop_token_ids=[first], min_tokens=1, logit_bias={first: 50.0},
                          ignore_eos=False))
    run_to_end(engine)
    out = tokens(engine, 1)
    assert out[0] != first and out[1:] == [first]  # held back once, then it stops


def test_logprobs_are_the_models_raw_log_softmax(engine):
    """Whatever temperature, penalties and bias do to the sampling, the log-probabilities are
    log_softmax of the model's logits; the alternatives come most probable first."""
    engine._submit(greedy(1, logprobs=5, temperature=0.9, seed=1, repetition_penalty=1.3,
                          logit_bias={4: 2.0}))
    engine._submit(greedy(2, logprobs=0))
    engine._submit(greedy(3))
    run_to_end(engine)
    prompt = [5, 9, 5, 11]
    for rid, k in ((1, 5), (2, 0)):
        last = prompt[-1]
        for out in outputs(engine, rid):
            expected = torch.log_softmax(TABLE[last], dim=-1)
            lp = out.logprobs
            assert math.isclose(lp.logprob, float(expected[out.token_id]), abs_tol=1e-5)
            top = expected.topk(k) if k else None
            assert lp.top_ids == (top.indices.tolist() if k else [])
            assert lp.top_logprobs == pytest.approx(top.values.tolist() if k else [], abs=1e-5)
            assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
            last = out.token_id
    assert all(o.logprobs is None for o in outputs(engine, 3))


def tiny_runner() -> ModelRunner:
    config = load_config(None, ["device=cpu", "kv.num_pages=64"])
    return ModelRunner.from_config(config, resolve_model_files(config), torch.device("cpu"),
                                   torch.float32, tp_rank=0, tp_size=1)


def test_every_processor_on_the_tiny_models_logits(make_engine, tiny_tokenizer_path):
    """The real runner hands out inference tensors: the processors and the grammar mask edit
    them in place all the same."""
    eng = make_engine(tiny_runner(), tiny_tokenizer_path)
    eng._submit(GenerateRequest(1, [1, 20, 30], max_new_tokens=4, logit_bias={7: 100.0},
                                repetition_penalty=1.1, presence_penalty=0.2, min_tokens=2, logprobs=2))
    eng._submit(GenerateRequest(2, [1, 20, 30], max_new_tokens=8, temperature=0.0,
                                constraint=Constraint("lark", 'start: "yes" | "no"')))
    run_to_end(eng)
    assert tokens(eng, 1) == [7] * 4
    *text, end = tokens(eng, 2)
    assert end in eng.runner.eos_token_ids
    assert AutoTokenizer.from_pretrained(tiny_tokenizer_path).decode(text) in ("yes", "no")


def test_logprobs_of_the_tiny_model_match_its_logits(make_engine):
    """Runner-level: the engine's logprobs for the tiny model's tokens equal torch.log_softmax
    of the logits ModelRunner.forward returned in those steps."""
    runner = tiny_runner()
    seen = []
    forward = runner.forward

    def recording(batch):
        seen.append(forward(batch).clone())
        return seen[-1]

    runner.forward = recording
    eng = make_engine(runner)
    eng._submit(GenerateRequest(1, [1, 20, 30, 40], max_new_tokens=3, logprobs=3, temperature=0.0))
    run_to_end(eng)
    outs = outputs(eng, 1)
    assert len(outs) == 3 == len(seen)
    for out, logits in zip(outs, seen):
        expected = torch.log_softmax(logits[0], dim=-1)
        assert out.token_id == int(logits[0].argmax()) == out.logprobs.top_ids[0]
        assert out.logprobs.logprob == pytest.approx(float(expected[out.token_id]), abs=1e-5)
        assert out.logprobs.top_logprobs == pytest.approx(expected.topk(3).values.tolist(), abs=1e-5)


@pytest.mark.parametrize("fields,words", [
    ({"logit_bias": {VOCAB: 1.0}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {1: math.nan}}, "logit_bias"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"), ({"presence_penalty": math.nan}, "presence"),
    ({"frequency_penalty": -math.inf}, "frequency"), ({"min_tokens": -1}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    # values that overflow float32 logits (inf - inf: a NaN row fails the whole step)
    ({"logit_bias": {1: 4e16}}, "logit_bias"), ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"frequency_penalty": -5e304}, "frequency"), ({"presence_penalty": 2.5}, "presence"),
])
def test_bad_processor_fields_are_rejected_alone(engine, fields, words):
    engine._submit(greedy(1, **fields))
    engine._submit(greedy(2, repetition_penalty=1.2))
    assert list(rejected(engine)) == [1] and words in rejected(engine)[1]
    run_to_end(engine)
    assert len(tokens(engine, 2)) == 12 and engine.scheduler.stats()["pages_used"] == 0


def test_penalty_slots_are_reused(engine):
    for rid in range(1, 25):
        engine._submit(greedy(rid, repetition_penalty=1.5, max_new_tokens=3))
        if rid % 6 == 0:
            run_to_end(engine)
    run_to_end(engine)
    pool = engine.sampler.processors._pool
    assert pool.prompt_seen.shape[0] == 8 and len(pool._free) == 8
    assert all(tokens(engine, rid) == tokens(engine, 1) for rid in range(1, 25))


def test_no_memory_for_penalty_statistics_rejects_that_request_alone(engine, monkeypatch):
    """The pool grows on the device as penalized requests arrive: an allocation that fails
    refuses the request that needed it, and the engine serves on (the others, and later ones
    once memory is back)."""
    from appliance.engine.logits_processors import PenaltyPool

    grow = PenaltyPool._grow

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(PenaltyPool, "_grow", out_of_memory)
    engine._submit(greedy(1, repetition_penalty=1.5))
    engine._submit(greedy(2))
    assert list(rejected(engine)) == [1] and "no device memory" in rejected(engine)[1]
    monkeypatch.setattr(PenaltyPool, "_grow", grow)
    engine._submit(greedy(3, repetition_penalty=1.5))
    run_to_end(engine)
    assert tokens(engine, 1) == [] and len(tokens(engine, 2)) == len(tokens(engine, 3)) == 12
    assert engine.scheduler.stats()["pages_used"] == 0 and 1 not in engine.requests
