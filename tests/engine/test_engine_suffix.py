"""`speculative.method: suffix` end to end in the engine on the tiny model's real runner: greedy
output is token for token the output without speculation, a repetitive prompt gets drafts
verified and accepted, and every request's suffix tree is gone when it ends (finished or
aborted)."""
from __future__ import annotations

import pytest
import torch

from appliance.config import load_config
from appliance.engine.model_files import resolve_model_files
from appliance.engine.protocol import GenerateRequest
from appliance.engine.speculative.suffix import SuffixDraft
from appliance.model import ModelRunner

from .conftest import outputs, run_to_end

PATTERN = [101, 202, 303, 404, 505, 606, 707, 808]  # the tiny model's vocabulary is 1000 ids


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    config = load_config(None, ["device=cpu", "model.preset=tiny-llama", "kv.num_pages=128"])
    return ModelRunner.from_config(config, resolve_model_files(config), torch.device("cpu"),
                                   torch.float32, tp_rank=0, tp_size=1)


def requests() -> list[GenerateRequest]:
    return [GenerateRequest(1, PATTERN * 6, max_new_tokens=48, temperature=0.0, ignore_eos=True),
            GenerateRequest(2, [11, 12, 13] + PATTERN * 3, max_new_tokens=40, temperature=0.0,
                            ignore_eos=True, session="agent-a"),
            GenerateRequest(3, [50 + i for i in range(30)], max_new_tokens=24, temperature=0.0,
                            ignore_eos=True)]


def tokens_of(engine, rids) -> dict[int, list[int]]:
    return {rid: [o.token_id for o in outputs(engine, rid)] for rid in rids}


def test_greedy_output_is_the_same_with_suffix_drafts(make_engine, runner):
    plain = make_engine(runner)
    for req in requests():
        plain._submit(req)
    run_to_end(plain)
    expected = tokens_of(plain, [1, 2, 3])
    assert all(len(t) == r.max_new_tokens for t, r in zip(expected.values(), requests()))

    spec = make_engine(runner, overrides=("speculative.method=suffix", "speculative.max_draft=6"))
    assert isinstance(spec.speculator.source, SuffixDraft)
    for req in requests():
        spec._submit(req)
    run_to_end(spec)
    assert tokens_of(spec, [1, 2, 3]) == expected
    stats = spec.scheduler.stats()
    assert stats["spec_verify_rows_total"] > 0
    assert 0 < stats["spec_accepted_tokens_total"] <= stats["spec_draft_tokens_total"]
    assert stats["pages_used"] == stats["pages_pinned"]  # only agent-a's retained turn
    assert spec.speculator.source.num_requests == 0  # each tree left with its request


def test_an_aborted_request_drops_its_tree(make_engine, runner):
    spec = make_engine(runner, overrides=("speculative.method=suffix",))
    spec._submit(requests()[0])
    for _ in range(6):
        spec.step()
    assert spec.speculator.source.num_requests == 1
    spec._abort(1)
    run_to_end(spec)
    assert spec.speculator.source.num_requests == 0
    assert spec.scheduler.stats()["pages_used"] == 0
