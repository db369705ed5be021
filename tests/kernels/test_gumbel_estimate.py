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


def _tie(logits: torch.Tensor, noise: torch.Tensor, ids: list[int], want: torch.Tensor,
         n: int) -> list[int]:
    """The first n tokens of `ids` whose l can make l + g exactly `want` in float32 (the
    kernels' score at temperature 1; a g halfway between two float32 steps of `want` rounds
    to even, never to it), logits set so."""
    tied = []
    for i in ids:
        for l in _steps_around(want - noise[i]):
            if l + noise[i] == want:
                logits[i] = l
                tied.append(i)
                break
        if len(tied) == n:
            return tied
    raise AssertionError("too few tokens can tie")


def _steps_around(x: torch.Tensor, n: int = 3) -> list[torch.Tensor]:
    out = [x]
    for direction in (1e30, -1e30):
        y = x
        for _ in range(n):
            y = torch.nextafter(y, torch.tensor(direction))
            out.append(y)
    return out


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
    torch.manual_seed(1)
    sizes = S.sample_sizes()
    v, b = 3 * sizes.chunk, 24
    params, noise = _plain_rows(b, v)
    if filtered:
        params = (params[0], torch.full((b,), 40, dtype=torch.int32, device=DEV), *params[2:])
    logits = torch.randn(b, v, device=DEV)
    logits[: b - 4] -= 30.0             # the last rows keep their random logits
    gen = torch.Generator(device="cpu").manual_seed(7)
    for row in range(b - 4):
        # l + g == target, above every other token's (l < -26, g < 13 here); small, so that
        # the estimate's error spans several float32 steps of the score
        target = torch.tensor(0.5 + 0.001 * row, device=DEV)
        order = torch.randperm(v, generator=gen).tolist()
        ties = _tie(logits[row], noise[row], order, target, 2 + row % 5)
        if row % 3 == 0:                # and one more a float32 step above or below them
            step = torch.nextafter(target, target + row % 2 - .5)
            _tie(logits[row], noise[row], [i for i in order if i not in ties], step, 1)
    got = S.sample(logits, *params)
    want = R.sample(logits, *params)
    assert torch.equal(got, want)
    tied = (logits + noise)[: b - 4]
    assert ((tied.max(1).values - tied.topk(2, 1).values[:, 1]) < 1e-5).all()  # near-ties


@pytest.mark.slow
def test_near_ties_in_streamed_rows():
    """The same through the streamed finish (top-k above the candidate slots)."""
    torch.manual_seed(2)
    sizes = dataclasses.replace(S.sample_sizes(), chunk=64, kcap=8, block_v=64)
    v, b = 4 * sizes.chunk, 6
    params, noise = _plain_rows(b, v)
    params = (params[0], torch.full((b,), 100, dtype=torch.int32, device=DEV), *params[2:])
    logits = torch.randn(b, v, device=DEV) - 30.0
    last = []
    for row in range(b):                # three tokens of one block
        target = torch.tensor(0.5, device=DEV)
        ids = list(range(row, 64))
        ties = _tie(logits[row], noise[row], ids, target, 2)
        # and a third after them, on odd rows one float32 step ahead
        third = torch.nextafter(target, target + 1) if row % 2 else target
        last += _tie(logits[row], noise[row], [i for i in ids if i > ties[1]], third, 1)
    want = R.sample(logits, *params)
    assert torch.equal(S.sample(logits, *params, sizes=sizes), want)
    last = torch.tensor(last, device=DEV)
    assert (want[1::2] == last[1::2]).all() and (want[::2] != last[::2]).all()
