"""Token sampling with no host sync: greedy, or top-k -> top-p -> Gumbel-max sampling whose
randomness is a pure function of (seed, position, token id).

Semantics (shared exactly by the Triton kernel):
- temperature <= 0: argmax of the logits (first index on ties).
- l = logits / temperature. top_k in (0, V): keep tokens with l >= the k-th largest l (ties kept).
- top_p < 1: with e = exp(l - max) over the kept tokens and Z = sum(e), keep token i iff the
  mass of kept tokens with e strictly greater than e_i is < top_p * Z (ties kept together).
- token = argmax over kept tokens of l + g, g = -log(-log(u)), u = uniform(seed, position, id).
- A broken model's logits: NaN is never sampled (it counts as -inf); tokens at an infinite
  max have e = 1 (not exp(inf - inf)); a row where nothing can be sampled gives token 0, so a
  token is always in [0, V).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.registry import register

M32 = 0xFFFFFFFF
MUL_A = 0x7FEB352D
MUL_B = 0x846CA68B
GOLDEN = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash ("lowbias32") on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * MUL_A) & M32
    x = x ^ (x >> 15)
    x = (x * MUL_B) & M32
    return x ^ (x >> 16)


def row_key(seeds, positions):
    """seeds, positions: [B] int64 tensors -> [B] int64 in [0, 2^32); or one seed and position
    as Python ints -> an int (Python's ints shift and mask as int64 two's complement does)."""
    s = seeds.long() if isinstance(seeds, torch.Tensor) else seeds
    p = positions.long() if isinstance(positions, torch.Tensor) else positions
    h = mix32(s & M32)
    h = mix32(h ^ ((s >> 32) & M32))
    h = mix32(h ^ (p & M32))
    return mix32(h ^ ((p >> 32) & M32))


def uniform(key, ids: torch.Tensor) -> torch.Tensor:
    """key: int64 tensor or int (row_key's), ids: int64 token ids (broadcast against key) ->
    u float64 in (0, 1) (exact: 24 random bits + 1/2), a pure function of (key, token id)."""
    r = mix32(key ^ ((ids * GOLDEN) & M32))
    return ((r >> 8).double() + 0.5) * (1.0 / 16777216.0)


def noise(key, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise float32 of (key, token ids) as `uniform` broadcasts them, computed in
    float64: -log(u) for u near 1 (the tokens that win) needs more precision than a float32
    log gives."""
    return (-torch.log(-torch.log(uniform(key, ids)))).float()


def gumbel(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B] x [B] -> Gumbel noise [B, V] float32 for every token id."""
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)            # [V]
    return noise(row_key(seeds, positions)[:, None], ids[None, :])


def _noise_of_u(u: float) -> float:
    return float((-torch.log(-torch.log(torch.tensor(u, dtype=torch.float64)))).float())


# The smallest and largest noise any token can draw (u = 2^-25 and 1 - 2^-25): -2.85, 17.33.
GUMBEL_MIN, GUMBEL_MAX = _noise_of_u(2.0 ** -25), _noise_of_u(1.0 - 2.0 ** -25)


# (e, z, top_p) -> the smallest e top-p keeps
TopPFloor = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _filter_row(l: torch.Tensor, top_k: int, top_p: float,
                top_p_floor: TopPFloor | None = None) -> torch.Tensor:
    """l: [V] float32 scaled logits -> l with filtered tokens at -inf. top_p_floor(e, z, top_p):
    the smallest e = exp(l - max) top-p keeps (default: from the whole row sorted; the CPU
    backend passes one that sorts less, the same value)."""
    v = l.shape[0]
    if 0 < top_k < v:
        kth = l.topk(top_k).values[-1]
        l = l.masked_fill(l < kth, float("-inf"))
    if top_p < 1.0:
        e = exp_from(l, l.max())                                               # [V]
        floor = (top_p_floor or _sorted_top_p_floor)(e, e.sum(), top_p)
        l = l.masked_fill(e < floor, float("-inf"))
    return l


def exp_from(l: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(l - m) for m = max(l), 1 where l is m (also when m is infinite)."""
    return torch.exp(torch.where(l == m, 0.0, l - m))


def without_nan(logits: torch.Tensor) -> torch.Tensor:
    """NaN logits as -inf: never sampled (module doc)."""
    return logits.masked_fill(logits.isnan(), float("-inf"))


def _sorted_top_p_floor(e: torch.Tensor, z: torch.Tensor, top_p: float) -> torch.Tensor:
    return nucleus_floor(e.sort(descending=True).values, z, top_p)[0]


def nucleus_floor(es: torch.Tensor, z: torch.Tensor, top_p: float) -> tuple[torch.Tensor, bool]:
    """es: e sorted descending (all of it, or its largest values first); z: the sum of all of
    e -> the smallest value of es that top-p keeps (the mass strictly above it < top_p * z),
    and whether a value of es is not kept (the nucleus ends inside es)."""
    above = torch.cumsum(es, 0) - es                                           # mass before
    # mass strictly greater than each sorted value: take it at the first of its ties
    first = torch.searchsorted(-es, -es, right=False)
    keep = above[first] < top_p * z
    return es[keep].min(), not bool(keep.all())


@register("sample", backend="torch", priority=0)
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] float32 -> tokens [B] int32."""
    b = logits.shape[0]
    logits = without_nan(logits)
    greedy = temperature <= 0.0                                                # [B]
    out = logits.argmax(dim=1).to(torch.int32)          # every greedy row in one op
    if bool(greedy.all()):
        return out
    for i in range(b):
        t = float(temperature[i])
        if t <= 0.0:
            continue
        out[i] = sample_row(logits[i].float() / t, int(top_k[i]), float(top_p[i]),
                            seeds[i:i + 1], positions[i:i + 1])
    return out


def sample_row(l: torch.Tensor, top_k: int, top_p: float, seed: torch.Tensor,
               position: torch.Tensor) -> int:
    """One row's token: l [V] the scaled logits, seed and position [1]."""
    l = _filter_row(l, top_k, top_p)
    return int((l + gumbel(seed, position, l.shape[0])[0]).argmax())
