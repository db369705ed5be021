"""CPU `sample`: the reference's function (kernels/reference/sample.py), token for token, with
less of its work. The reference, per sampled row, sorts the whole vocabulary for top-p and
draws float64 noise for every token; here:

- top-p's floor comes from the row's largest values only: torch.topk of a count that grows
  4x until the nucleus ends inside it (the reference's prefix sums over the sorted values are
  sequential, so a prefix of them is the same);
- the noise is drawn only for tokens that can win: a filtered row's kept tokens; a plain
  row's tokens whose logit plus the largest noise any token can draw (GUMBEL_MAX) reaches the
  top logit plus the smallest (GUMBEL_MIN), which the top token's score is at least. The
  default model's logits (SmolLM2-135M, a code prompt) leave a median of 1.6K of its 49K
  tokens at temperature 1 within the top's own noise, and about 100 at 0.7;
- the row's hash key is computed on Python ints (row_key takes them), not 1-element tensors.

NaN logits count as -inf, as in the reference; a row with a +inf logit, or no finite logit, is
the reference's own computation.

The default model at 8 streams on a 2-core box (scripts/bench_cpu_sampling, two rounds, each
against the reference in the same sitting): top-k 20 + top-p 0.8 72.5-74.1 -> 87.0-87.4 tok/s,
top-p 0.95 57.7-58.4 -> 74.5-76.0, temperature 1 alone 87.0-88.8 either way.
"""
from __future__ import annotations

import torch

from kernels.reference.sample import (GUMBEL_MAX, GUMBEL_MIN, _filter_row, noise,
                                      nucleus_floor, row_key, sample_row, without_nan)
from kernels.registry import register

FIRST_TOP_P_COUNT = 64  # values topk takes first for top-p's floor


@register("sample", backend="cpu", priority=5, supports=lambda f: f["device"] == "cpu")
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] float32 -> tokens [B] int32."""
    logits = without_nan(logits)
    out = logits.argmax(dim=1).to(torch.int32)          # every greedy row in one op
    for i in (temperature > 0.0).nonzero().flatten().tolist():
        l = logits[i].float() / float(temperature[i])
        k, p = int(top_k[i]), float(top_p[i])
        top = l.max()
        token = None
        if bool(top > float("-inf")) and bool(top < float("inf")):
            token = _sampled_row(l, top, k, p, row_key(int(seeds[i]), int(positions[i])))
        if token is None:   # the reference's computation
            token = sample_row(l, k, p, seeds[i:i + 1], positions[i:i + 1])
        out[i] = token
    return out


def _sampled_row(l: torch.Tensor, top: torch.Tensor, top_k: int, top_p: float,
                 key: int) -> int | None:
    """The row's token (its largest logit `top` finite), or None where the tokens that can win
    leave no finite score (the reference then decides)."""
    if 0 < top_k < l.shape[0] or top_p < 1.0:
        l = _filter_row(l, top_k, top_p, _top_p_floor)
        ids = (l > float("-inf")).nonzero().flatten()                 # the kept tokens
    else:   # those that can reach the top token's score, at least top + GUMBEL_MIN
        ids = (l + GUMBEL_MAX >= top + GUMBEL_MIN).nonzero().flatten()
    if ids.numel() == 0:
        return None
    scores = l[ids] + noise(key, ids)
    best = scores.argmax()                       # ids ascending: the smallest id of ties
    return int(ids[best]) if bool(scores[best] > float("-inf")) else None


def _top_p_floor(e: torch.Tensor, z: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference's floor, over the largest values of e (sorted by topk) until the nucleus
    ends inside them."""
    count = min(FIRST_TOP_P_COUNT, e.shape[0])
    while True:
        floor, ended = nucleus_floor(e.topk(count).values, z, top_p)
        if ended or count == e.shape[0]:
            return floor
        count = min(4 * count, e.shape[0])
