"""The CPU backend's paged attention (kernels/cpu/paged_attention.py) gives the reference's
output: decode rows of any length (0 included), extend rows short (batched, as verify rows
are) and long (row by row) and empty in one call, GQA groups, an FP8 cache with scales, and
the reference's own path for windows and sinks."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.cpu import paged_attention as C
from kernels.reference import attention as R
from kernel_testutil import make_paged

PS = 4


def caches(pages: int, hk: int, d: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(pages * PS, hk, d, generator=g)
    v = torch.randn(pages * PS, hk, d + 8, generator=g)
    return k.to(dtype), v.to(dtype)


def test_the_cpu_backend_serves_attention_on_the_cpu_only():
    for op in ("decode_attention", "extend_attention"):
        assert kernels.selected_backend(op, device="cpu", dtype=torch.float32) == "cpu"
        assert kernels.selected_backend(op, device="cuda", dtype=torch.bfloat16) != "cpu"


@pytest.mark.parametrize("hq,hk", [(4, 4), (9, 3), (8, 1)])
def test_decode_equals_the_reference(hq, hk):
    lens = [1, 17, 40, 0, 9]
    table, pages = make_paged(lens, PS)
    kc, vc = caches(pages, hk, 16)
    q = torch.randn(len(lens), hq, 16)
    sl = torch.tensor(lens, dtype=torch.int32)
    got = C.decode_attention(q, kc, vc, table, sl, PS, 0.3)
    torch.testing.assert_close(got, R.decode_attention(q, kc, vc, table, sl, PS, 0.3))
    assert torch.count_nonzero(got[3]) == 0                              # no keys: zeros


@pytest.mark.parametrize("hq,hk", [(4, 2), (9, 3)])
def test_extend_rows_short_long_and_empty_equal_the_reference(hq, hk):
    lens, qlens = [30, 9, 50, 20, 5], [3, 1, 45, 0, 5]      # verify, decode, chunk, empty, whole
    table, pages = make_paged(lens, PS)
    kc, vc = caches(pages, hk, 16)
    qs = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(qlens), hq, 16)
    sl = torch.tensor(lens, dtype=torch.int32)
    got = C.extend_attention(q, kc, vc, table, qs, sl, PS, 0.3)
    torch.testing.assert_close(got, R.extend_attention(q, kc, vc, table, qs, sl, PS, 0.3))
    assert C.SHORT_QUERIES < 45 and all(n <= C.SHORT_QUERIES for n in (3, 1, 5))


def test_an_fp8_cache_and_its_scales():
    lens, qlens = [12, 7], [4, 1]
    table, pages = make_paged(lens, PS)
    kc, vc = caches(pages, 2, 16, torch.float8_e4m3fn)
    qs = torch.tensor([0, 4, 5], dtype=torch.int32)
    q = torch.randn(5, 4, 16)
    sl = torch.tensor(lens, dtype=torch.int32)
    kw = dict(k_scale=0.5, v_scale=2.0)
    torch.testing.assert_close(C.extend_attention(q, kc, vc, table, qs, sl, PS, 0.3, **kw),
                               R.extend_attention(q, kc, vc, table, qs, sl, PS, 0.3, **kw))
    torch.testing.assert_close(C.decode_attention(q[:2], kc, vc, table, sl, PS, 0.3, **kw),
                               R.decode_attention(q[:2], kc, vc, table, sl, PS, 0.3, **kw))


def test_windows_and_sinks_take_the_reference_path():
    lens, qlens = [30, 12], [2, 12]
    table, pages = make_paged(lens, PS)
    kc, vc = caches(pages, 2, 16)
    qs = torch.tensor([0, 2, 14], dtype=torch.int32)
    q = torch.randn(14, 4, 16)
    sl = torch.tensor(lens, dtype=torch.int32)
    kw = dict(sinks=torch.randn(4), window=8)
    torch.testing.assert_close(C.extend_attention(q, kc, vc, table, qs, sl, PS, 0.3, **kw),
                               R.extend_attention(q, kc, vc, table, qs, sl, PS, 0.3, **kw))
    torch.testing.assert_close(C.decode_attention(q[:2], kc, vc, table, sl, PS, 0.3, **kw),
                               R.decode_attention(q[:2], kc, vc, table, sl, PS, 0.3, **kw))
