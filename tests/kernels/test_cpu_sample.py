"""The CPU `sample` backend draws the reference's tokens (kernels/reference/sample.py), for any
logits and parameters: spread from flat to peaked, ties, masked (-inf) tokens, a broken
model's NaN and +inf (one token, or a whole row of NaN or -inf: a token in range all the same),
top-k, top-p alone (a nucleus past the first topk count, so the count grows) and together; and
the registry gives it to the CPU."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import reference as R
from kernels.cpu import sample as cpu_sample
from kernels.reference.sample import gumbel

ROWS = 6


@st.composite
def batches(draw):
    v = draw(st.sampled_from([7, 64, 300, 1000]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    spread = draw(st.sampled_from([0.01, 0.3, 1.0, 4.0, 30.0]))
    logits = torch.randn(ROWS, v, generator=gen) * spread
    if draw(st.booleans()):                      # ties: few distinct values
        logits = (logits * 2).round() / 2
    if draw(st.booleans()):                      # masked tokens (processors, a grammar)
        logits[torch.rand(ROWS, v, generator=gen) < 0.5] = float("-inf")
        logits[:, draw(st.integers(0, v - 1))] = 1.0
    temperature = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.2, 0.7, 1.0, 1.6]),
                                             min_size=ROWS, max_size=ROWS)))
    top_k = torch.tensor(draw(st.lists(st.sampled_from([0, 1, 3, 20, v - 1, v, v + 5]),
                                       min_size=ROWS, max_size=ROWS)), dtype=torch.int32)
    top_p = torch.tensor(draw(st.lists(st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.05]),
                                       min_size=ROWS, max_size=ROWS)))
    special = draw(st.sampled_from([None, float("nan"), float("inf"), "nan row", "-inf row"]))
    row = draw(st.integers(0, ROWS - 1))
    if isinstance(special, float):
        logits[row, draw(st.integers(0, v - 1))] = special
    elif special is not None:
        logits[row] = float(special.split()[0])
    seeds = torch.randint(-2 ** 62, 2 ** 62, (ROWS,), generator=gen)
    positions = torch.randint(0, 10 ** 6, (ROWS,), generator=gen)
    return logits, temperature, top_k, top_p, seeds, positions


@settings(max_examples=150, deadline=None)
@given(batches())
def test_the_reference_tokens(batch):
    got = cpu_sample.sample(*batch)
    assert torch.equal(got, R.sample(*batch))
    assert ((got >= 0) & (got < batch[0].shape[1])).all()


def test_a_wide_nucleus_grows_the_topk_count(monkeypatch):
    """Flat rows: top-p 0.95 keeps most of 5,000 tokens, so the count goes 64 -> ... -> all."""
    counts = []
    topk = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda self, k, *a, **kw: (
        counts.append(k), topk(self, k, *a, **kw))[1])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5000, generator=gen) * 0.01
    args = (torch.ones(2), torch.zeros(2, dtype=torch.int32), torch.full((2,), 0.95),
            torch.arange(2), torch.arange(2))
    got = cpu_sample.sample(logits, *args)
    assert counts[:5] == [64, 256, 1024, 4096, 5000]
    monkeypatch.setattr(torch.Tensor, "topk", topk)
    assert torch.equal(got, R.sample(logits, *args))


def test_a_peaked_row_draws_noise_for_a_few_tokens(monkeypatch):
    """A plain row whose top logit stands 40 above the rest: only it can win, and only its
    noise is drawn."""
    drawn = []
    noise = cpu_sample.noise
    monkeypatch.setattr(cpu_sample, "noise", lambda key, ids: (
        drawn.append(ids.numel()), noise(key, ids))[1])
    logits = torch.randn(1, 5000)
    logits[0, 123] = 45.0
    args = (torch.ones(1), torch.zeros(1, dtype=torch.int32), torch.ones(1), torch.tensor([3]),
            torch.tensor([9]))
    assert cpu_sample.sample(logits, *args).item() == 123
    assert drawn == [1]


def test_a_token_far_below_the_top_wins_on_its_noise():
    """Plain rows whose winner's logit is 5-10 under the top logit's: the token with the row's
    largest noise (7-12 over 2,000 tokens) scores 2, against a top of logit 0 whose noise is
    under 1. Candidates must reach as far down as the largest noise goes."""
    v, rows = 2000, 8
    seeds, positions = torch.arange(rows) * 7919, torch.arange(rows) + 11
    noise = gumbel(seeds, positions, v)                                      # [B, V]
    logits = torch.full((rows, v), -50.0)
    largest, winners = noise.max(1)
    top = (noise < 1).int().argmax(1)              # a token of small noise, in each row
    logits[torch.arange(rows), top] = 0.0
    logits[torch.arange(rows), winners] = 2.0 - largest
    assert (logits.max(1).values - logits[torch.arange(rows), winners] > 5).all()
    args = (logits, torch.ones(rows), torch.zeros(rows, dtype=torch.int32), torch.ones(rows),
            seeds, positions)
    got = cpu_sample.sample(*args)
    assert torch.equal(got, winners.int()) and torch.equal(got, R.sample(*args))


def test_the_registry_gives_it_to_the_cpu_only():
    assert kernels.selected_backend("sample", device="cpu", dtype=torch.float32) == "cpu"
    assert kernels.selected_backend("sample", device="cuda", dtype=torch.float32) != "cpu"
