"""The sampler's float32 Gumbel estimate (kernels/triton/sample.py): within its stated error of
the exact noise for every input, and the rows whose estimate cannot tell the best token apart
(near-ties) still sample exactly the reference's token.

Without a GPU the kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, set in
conftest)."""
import dataclasses
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: Triton backend untested")
import triton.language as tl  # noqa: E402

from kernels import reference as R  # noqa: E402
from kernels.reference.sample import gumbel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET unset", allow_module_level=True)

from kernels.triton import sample as S  # noqa: E402

ESTIMATE_ERROR = 1e-6   # what _noisy_argmax's slack is sized on (500x this)
BLOCK = 1 << 20


@triton.jit
def _noise_both(Exact, Estimate, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Exact + r, S._gumbel_of_bits(r.to(tl.uint32)))
    tl.store(Estimate + r, S._gumbel_estimate_of_bits(r.to(tl.uint32)))


@pytest.mark.slow
def test_estimate_within_its_error_for_every_input():
    """All 2^24 inputs (the noise is a function of 24 random bits), the exact noise computed
    as the kernels compute it, in float64."""
    n = 1 << 24
    exact = torch.empty(n, device=DEV)
    estimate = torch.empty(n, device=DEV)
    _noise_both[(n // BLOCK,)](exact, estimate, BLOCK=BLOCK)
    u = (torch.arange(n, device=DEV, dtype=torch.float64) + 0.5) / n
    assert torch.equal(exact, (-torch.log(-torch.log(u))).float())
    err = (estimate.double() - exact.double()).abs()
    assert err.max().item() < ESTIMATE_ERROR
    assert S.ESTIMATE_SLACK.value >= 500 * ESTIMATE_ERROR


def _plain_rows(b: int, v: int):
    """Plain sampling (temperature only) for b rows of v tokens: the params and row noise."""
    temp = torch.ones(b, device=DEV)
    top_k = torch.zeros(b, dtype=torch.int32, device=DEV)
    top_p = torch.ones(b, device=DEV)
    seeds = torch.randint(-2 ** 62, 2 ** 62, (b,), device=DEV)
    pos = torch.randint(0, 10 ** 6, (b,), device=DEV)
    noise = gumbel(seeds, pos, v)                                             # [B, V]
    return (temp, top_k, top_p, seeds, pos), noise


@pytest.mark.parametrize("filtered", [False, True])
def test_near_ties_sample_the_reference_token(filtered):
    """Rows whose best scores l + g tie exactly, or within a float32 rounding: logits set so
    that several tokens of a chunk (or of the candidates, top-k on) score one value. The
    estimate cannot order them, so the exact scores decide (the smallest id of exact ties);
    other rows' single best token is taken from the estimate. All equal the reference."""
    sizes = S.sample_sizes()
    v, b = 3 * sizes.chunk, 24
    params, noise = _plain_rows(b, v)
    if filtered:
        params = (params[0], torch.full((b,), 40, dtype=torch.int32, device=DEV), *params[2:])
    logits = torch.randn(b, v, device=DEV)
    gen = torch.Generator(device="cpu").manual_seed(7)
    for row in range(b - 4):            # the last rows keep their random logits
        ties = torch.randperm(v, generator=gen)[: 2 + row % 5].to(DEV)
        # l + g == target up to rounding, above every other token's (l < 4, g < 13 here)
        target = 20.0 + 0.001 * row
        logits[row, ties] = target - noise[row, ties]
        if row % 3 == 0:                # one float32 step apart instead
            l = logits[row, ties[0]]
            logits[row, ties[0]] = torch.nextafter(l, l + (row % 2 * 2 - 1))
    got = S.sample(logits, *params)
    want = R.sample(logits, *params)
    assert torch.equal(got, want)
    tied = (logits + noise)[: b - 4]
    assert ((tied.max(1).values - tied.topk(2, 1).values[:, 1]) < 1e-5).all()  # near-ties


@pytest.mark.slow
def test_near_ties_in_streamed_rows():
    """The same through the streamed finish (top-k above the candidate slots)."""
    sizes = dataclasses.replace(S.sample_sizes(), chunk=64, kcap=8, block_v=64)
    v, b = 4 * sizes.chunk, 6
    params, noise = _plain_rows(b, v)
    params = (params[0], torch.full((b,), 100, dtype=torch.int32, device=DEV), *params[2:])
    logits = torch.randn(b, v, device=DEV)
    for row in range(b):
        ties = torch.tensor([3 + row, 30 + row, 60], device=DEV)   # one block
        logits[row, ties] = 20.0 - noise[row, ties]
        if row % 2:                     # the last of them one float32 step ahead
            logits[row, 60] = torch.nextafter(logits[row, 60], logits[row, 60] + 1)
    want = R.sample(logits, *params)
    assert torch.equal(S.sample(logits, *params, sizes=sizes), want)
    assert (want[1::2] == 60).all() and (want[::2] != 60).all()
