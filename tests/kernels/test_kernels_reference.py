"""The torch reference ops against independent naive formulas (float64, loops)."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import reference as R
from kernel_testutil import make_paged, naive_attention, rel_err, slots_of


def test_rms_norm_and_fused_add():
    x, res, w = torch.randn(5, 24), torch.randn(5, 24), torch.randn(24)
    ref = torch.stack([r / math.sqrt(float((r.double() ** 2).mean()) + 1e-5) for r in x.double()])
    assert rel_err(R.rms_norm(x, w, 1e-5), ref * w.double()) < 1e-6
    xb, rb = x.bfloat16(), res.bfloat16()
    normed, s = R.fused_add_rms_norm(xb, rb, w.bfloat16(), 1e-5)
    assert s.dtype == torch.bfloat16 and normed.dtype == torch.bfloat16
    assert torch.equal(s, xb + rb)
    assert rel_err(normed, R.rms_norm(xb + rb, w.bfloat16(), 1e-5)) == 0.0


def test_silu_and_mul():
    x = torch.randn(4, 10)
    g, u = x[:, :5].double(), x[:, 5:].double()
    assert rel_err(R.silu_and_mul(x), g / (1 + torch.exp(-g)) * u) < 1e-6


def _cos_sin(max_pos, rot, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)  # [R/2]
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None]       # [P, R/2]
    return torch.cat([ang.cos(), ang.sin()], dim=1).float(), ang


@pytest.mark.parametrize("is_neox", [True, False])
def test_rope_is_complex_rotation(is_neox):
    t, h, d, rot = 6, 3, 16, 8
    cs, ang = _cos_sin(64, rot)
    q, k = torch.randn(t, h, d), torch.randn(t, 2, d)
    pos = torch.randint(0, 64, (t,))
    q2, k2 = R.rope(q, k, pos, cs, rot, is_neox)
    for x, y in ((q, q2), (k, k2)):
        xd = x.double()
        if is_neox:
            z = torch.complex(xd[..., : rot // 2], xd[..., rot // 2: rot])
        else:
            z = torch.complex(xd[..., 0:rot:2], xd[..., 1:rot:2])
        z = z * torch.exp(1j * ang[pos])[:, None, :]
        exp = xd.clone()
        if is_neox:
            exp[..., : rot // 2], exp[..., rot // 2: rot] = z.real, z.imag
        else:
            exp[..., 0:rot:2], exp[..., 1:rot:2] = z.real, z.imag
        assert rel_err(y, exp) < 1e-6
        assert torch.equal(y[..., rot:], x[..., rot:])


def test_store_kv_and_rope_store_kv():
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 6)
    kc, vc = torch.zeros(20, 2, 8), torch.zeros(20, 2, 6)
    slots = torch.tensor([7, 3, -1, 19])
    R.store_kv(k, v, kc, vc, slots)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kc[s], k[i]) and torch.equal(vc[s], v[i])
    assert int((kc.abs().sum(dim=(1, 2)) > 0).sum()) == 3
    cs, _ = _cos_sin(32, 8)
    q = torch.randn(4, 4, 8)
    pos = torch.tensor([0, 5, 9, 31])
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    q2, k2 = R.rope_store_kv(q, k, v, pos, cs, 8, True, kc2, vc2, slots)
    q3, k3 = R.rope(q, k, pos, cs, 8, True)
    assert torch.equal(q2, q3) and torch.equal(k2, k3)
    assert torch.equal(kc2[19], k3[3]) and torch.equal(vc2[7], v[0])


def _paged_cache(seq_lens, hk, d, dv, page_size):
    table, num_pages = make_paged(seq_lens, page_size)
    kc = torch.randn(num_pages * page_size, hk, d)
    vc = torch.randn(num_pages * page_size, hk, dv)
    return table, kc, vc


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_decode_attention_matches_dense_softmax(page_size):
    seq_lens = [1, 7, 33]
    hq, hk, d, dv = 8, 2, 16, 12
    table, kc, vc = _paged_cache(seq_lens, hk, d, dv, page_size)
    q = torch.randn(3, hq, d)
    out = R.decode_attention(q, kc, vc, table, torch.tensor(seq_lens), page_size, 0.3)
    for b, n in enumerate(seq_lens):
        sl = slots_of(table[b], n, page_size)
        ref = naive_attention(q[b:b + 1], kc[sl], vc[sl], [n - 1], 0.3)
        assert rel_err(out[b:b + 1], ref) < 1e-5


@pytest.mark.parametrize("page_size", [1, 8])
def test_extend_attention_is_causal_over_prefix(page_size):
    seq_lens, qlens = [5, 20, 9], [5, 3, 1]
    hq, hk, d = 4, 4, 8
    table, kc, vc = _paged_cache(seq_lens, hk, d, d, page_size)
    qs = torch.tensor([0] + list(torch.cumsum(torch.tensor(qlens), 0)))
    q = torch.randn(int(qs[-1]), hq, d)
    out = R.extend_attention(q, kc, vc, table, qs, torch.tensor(seq_lens), page_size, 0.5)
    for b, (n, m) in enumerate(zip(seq_lens, qlens)):
        sl = slots_of(table[b], n, page_size)
        ref = naive_attention(q[qs[b]:qs[b + 1]], kc[sl], vc[sl], list(range(n - m, n)), 0.5)
        assert rel_err(out[qs[b]:qs[b + 1]], ref) < 1e-5


def test_mla_decode_and_extend_match_naive():
    lat, rope_d, h, page_size = 16, 4, 3, 4
    seq_lens, qlens = [6, 11], [2, 4]
    table, num_pages = make_paged(seq_lens, page_size)
    cache = torch.randn(num_pages * page_size, lat + rope_d)
    qs = torch.tensor([0, 2, 6])
    ql, qr = torch.randn(6, h, lat), torch.randn(6, h, rope_d)
    out = R.mla_extend(ql, qr, cache, table, qs, torch.tensor(seq_lens), page_size, 0.2)
    dec = R.mla_decode(ql[[1, 5]], qr[[1, 5]], cache, table, torch.tensor(seq_lens), page_size, 0.2)
    for b, (n, m) in enumerate(zip(seq_lens, qlens)):
        c = cache[slots_of(table[b], n, page_size)].double()           # [N, L+R]
        for i in range(m):
            t = int(qs[b]) + i
            for hh in range(h):
                s = (c[:, :lat] @ ql[t, hh].double() + c[:, lat:] @ qr[t, hh].double()) * 0.2
                s[n - m + i + 1:] = float("-inf")
                ref = torch.softmax(s, 0) @ c[:, :lat]
                assert rel_err(out[t, hh], ref) < 1e-5
                if i == m - 1:
                    assert rel_err(dec[b, hh], ref) < 1e-5


def test_fused_moe_matches_token_loop():
    t, hd, inter, e, k = 5, 8, 6, 4, 2
    x = torch.randn(t, hd)
    w13, w2 = torch.randn(e, 2 * inter, hd), torch.randn(e, hd, inter)
    wts = torch.rand(t, k)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).int()
    out = R.fused_moe(x, w13, w2, wts, ids)
    ref = torch.zeros(t, hd, dtype=torch.float64)
    for i in range(t):
        for j in range(k):
            ex = int(ids[i, j])
            hmid = w13[ex].double() @ x[i].double()
            a = F.silu(hmid[:inter]) * hmid[inter:]
            ref[i] += float(wts[i, j]) * (w2[ex].double() @ a)
    assert rel_err(out, ref) < 1e-5
