"""MTP drafts in the engine loop on a real tiny DeepSeek-V3 / GLM-4.5 with a next-token layer
(tests/model/mtp_checkpoints.py): greedy tokens with `speculative.method=mtp` are those without
speculation, drafts were verified (and some accepted), and an abort in the middle of
speculation returns every page."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from appliance.engine.protocol import GenerateRequest
from appliance.model import ModelRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from mtp_checkpoints import save_with_mtp  # noqa: E402

PROMPTS = [[5, 9, 33, 7, 100, 21, 3], [8, 8, 8], list(range(10, 40)), [151, 2, 77, 0, 64]]
SETTINGS = ("scheduler.max_batch_tokens=16",)  # the 30-token prompt prefills in chunks


@pytest.fixture(scope="module", params=["deepseek-v3", "glm-4.5"])
def checkpoint(request, tmp_path_factory):
    return save_with_mtp(tmp_path_factory.mktemp(request.param), request.param, echo=True)[0]


def _runner(folder):
    return ModelRunner(str(folder), kv_num_pages=96, page_size=4)


def _run(engine, reqs, steps: int | None = None) -> dict[int, list[int]]:
    for r in reqs:
        engine._submit(r)
    n = 0
    while (engine.requests or engine._inflight is not None) and (steps is None or n < steps):
        assert engine.step()
        n += 1
    out: dict[int, list[int]] = {}
    for m in engine.sent:
        for o in getattr(m, "items", []):
            out.setdefault(o.rid, []).append(o.token_id)
    return out


def _requests(max_new: int = 24):
    return [GenerateRequest(rid=i, prompt_ids=p, max_new_tokens=max_new, temperature=0.0,
                            ignore_eos=True) for i, p in enumerate(PROMPTS)]


def test_mtp_drafts_keep_the_greedy_tokens(checkpoint, make_engine):
    plain = _run(make_engine(_runner(checkpoint), overrides=SETTINGS), _requests())
    spec = make_engine(_runner(checkpoint), overrides=(*SETTINGS, "speculative.method=mtp",
                                                        "speculative.max_draft=3"))
    assert _run(spec, _requests()) == plain
    st = spec.scheduler.stats()
    assert st["spec_verify_rows_total"] > 0 and st["spec_accepted_tokens_total"] > 0
    assert st["pages_used"] == 0


def test_abort_while_speculating_returns_every_page(checkpoint, make_engine):
    """Every request aborted while a verify step (drafts from the MTP layer) is in flight."""
    spec = make_engine(_runner(checkpoint), overrides=(*SETTINGS, "speculative.method=mtp"))
    for r in _requests(max_new=150):
        spec._submit(r)
    for _ in range(200):
        spec.step()
        if spec._inflight is not None and spec._inflight.counts is not None:
            break
    assert spec._inflight is not None, spec.sent[-3:]
    assert spec._inflight.counts is not None and spec.scheduler.stats()["pages_used"] > 0
    for rid in list(spec.requests):
        spec._abort(rid)
    while spec._inflight is not None:
        spec.step()
    assert spec.scheduler.stats()["pages_used"] == 0
    assert not spec.speculator.source._context and not spec.speculator.source._chains
