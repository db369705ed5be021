"""The register-lean MLA decode kernel (kernels/triton/mla_decode.py) against the torch reference.

Tiny shapes through Triton's CPU interpreter when no GPU is present (TRITON_INTERPRET=1, set in
conftest): latent 64/128 in 1, 2 or 4 chunks, rope 16/32 (and 24, the masked rope path), 1 to
20 heads (20: a partial second head block), page sizes 1/5/16, 1 or 3 splits, the query loaded
per tile or hoisted, a row of length 0 (zeros, as the reference and the generic kernel give)."""
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: Triton backend untested")

from kernel_testutil import make_paged, rel_err  # noqa: E402
from kernels import reference as R  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET unset", allow_module_level=True)

from kernels.triton import attention_ops as A  # noqa: E402
from kernels.triton.mla_decode import default_nc, mla_decode_chunked, tma_supported  # noqa: E402

TOL = 1e-4 if DEV == "cpu" else 2e-2   # interpreter computes in fp32; the GPU dot in tf32/bf16
SEQ_LENS = [37, 0, 1, 70]               # a partial tile, an empty row, one key, several tiles


def rnd(*shape, gen=None):
    return torch.randn(*shape, generator=gen).to(DEV)


def _inputs(lat, rope, heads, page_size, seq_lens=SEQ_LENS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table, num_pages = make_paged(seq_lens, page_size, gen=gen)
    cache = rnd(num_pages * page_size, lat + rope, gen=gen)                # [S, L+R]
    ql = rnd(len(seq_lens), heads, lat, gen=gen)                           # [B, H, L]
    qr = rnd(len(seq_lens), heads, rope, gen=gen)                          # [B, H, R]
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    return ql, qr, cache, table.to(DEV), sl


# (latent, rope, heads, page_size, splits, nc, q_in_loop): every valid nc of latent 64 (chunks
# of 16/32/64) and 128 (32/64/128) with the query per tile and hoisted; each rope width, head
# count, page size and split count meets both query modes and several of the others
CASES = [
    (64, 16, 1, 1, 3, 1, True),
    (64, 32, 20, 5, 1, 1, False),
    (64, 32, 4, 16, 3, 2, True),
    (64, 16, 16, 1, 1, 2, False),
    (64, 16, 20, 16, 3, 4, True),
    (64, 32, 1, 5, 3, 4, False),
    (128, 32, 16, 5, 1, 1, True),
    (128, 16, 4, 16, 3, 1, False),
    (128, 16, 20, 1, 1, 2, True),
    (128, 32, 20, 16, 3, 2, False),
    (128, 16, 4, 5, 1, 4, True),
    (128, 32, 16, 1, 3, 4, False),
]


@pytest.mark.parametrize("lat,rope,heads,page_size,splits,nc,q_in_loop", CASES)
def test_mla_decode_chunked_matches_reference(lat, rope, heads, page_size, splits, nc,
                                              q_in_loop):
    ql, qr, cache, table, sl = _inputs(lat, rope, heads, page_size)
    out = mla_decode_chunked(ql, qr, cache, table, sl, page_size, 0.2, num_splits=splits,
                             nc=nc, q_in_loop=q_in_loop)
    ref = R.mla_decode(ql, qr, cache, table, sl, page_size, 0.2)
    assert out.shape == ref.shape and out.dtype == ql.dtype
    assert rel_err(out, ref) < TOL
    assert torch.count_nonzero(out[1]) == 0                               # the empty row


@pytest.mark.parametrize("splits", [1, 3])
def test_projected_by_w_uv(splits, monkeypatch):
    """The op's projected form (w_uv = W_UV^T [H, L, Dv], strided as MLA views it): one token
    of several splits merges inside W_UV's launch (no merge launch); one split, or more
    rows, merge (if split) and then project. Against the reference op's projected form."""
    from kernels.triton import mla_decode as MD
    lat, rope, heads, dv = 64, 16, 4, 24
    merges = []
    real_merge = MD.merge_splits
    monkeypatch.setattr(MD, "merge_splits", lambda *a: merges.append(1) or real_merge(*a))
    for seq_lens in ([70], [37, 70]):
        ql, qr, cache, table, sl = _inputs(lat, rope, heads, 16, seq_lens)
        w_uv = rnd(heads, dv, lat).transpose(1, 2)                           # [H, L, Dv]
        got = A.mla_decode(ql, qr, cache, table, sl, 16, 0.2, num_splits=splits, w_uv=w_uv)
        want = R.mla_decode(ql, qr, cache, table, sl, 16, 0.2, w_uv=w_uv)
        assert got.shape == (len(seq_lens), heads, dv) and rel_err(got, want) < TOL
        o_latent = R.mla_decode(ql, qr, cache, table, sl, 16, 0.2)
        assert rel_err(want, torch.einsum("bhl,hld->bhd", o_latent, w_uv)) < 1e-6
    assert len(merges) == (1 if splits > 1 else 0)    # the two-row batch's merge only


def test_defaults_and_the_generic_kernel_agree():
    """Default nc/splits/tiles; also equal (to fp32 rounding) to the generic Triton kernel."""
    assert (default_nc(512), default_nc(64), default_nc(32), default_nc(16)) == (4, 4, 2, 1)
    ql, qr, cache, table, sl = _inputs(64, 16, 16, 5, seed=1)
    out = mla_decode_chunked(ql, qr, cache, table, sl, 5, 0.3)
    assert rel_err(out, R.mla_decode(ql, qr, cache, table, sl, 5, 0.3)) < TOL
    assert rel_err(out, A.mla_decode_generic(ql, qr, cache, table, sl, 5, 0.3)) < TOL


def test_strided_query_wide_tiles_masked_rope_and_wide_head_block():
    """A query view with a non-contiguous head stride (as a bmm output transposed), a rope
    width that is not a power of two (predicated rope columns), BLOCK_N=32, G_BLK=32 > H."""
    _, _, cache, table, sl = _inputs(64, 24, 20, 16, seed=2)
    gen = torch.Generator().manual_seed(3)
    ql = rnd(20, len(SEQ_LENS), 64, gen=gen).transpose(0, 1)               # [B, H, L] view
    qr = rnd(len(SEQ_LENS), 20, 24, gen=gen)
    ref = R.mla_decode(ql, qr, cache, table, sl, 16, 0.2)
    for kw in (dict(block_n=32, num_splits=3), dict(g_blk=32, nc=2, num_splits=1),
               dict(block_n=32, q_in_loop=False, num_splits=2)):
        assert rel_err(mla_decode_chunked(ql, qr, cache, table, sl, 16, 0.2, **kw), ref) < TOL


def _poison_unused_slots(cache, table, sl, page_size):
    """NaN in every cache slot no row uses: a kernel that reads past a row's end (a whole
    page copied for a partial tile) would turn its output NaN."""
    used = torch.zeros(cache.shape[0], dtype=torch.bool, device=cache.device)
    for b, n in enumerate(sl.tolist()):
        pos = torch.arange(n, device=cache.device)
        used[table[b, pos // page_size].long() * page_size + pos % page_size] = True
    cache[~used] = float("nan")


@pytest.mark.parametrize("page_size,splits", [(16, 3), (32, 1), (64, 2)])
def test_tensor_descriptor_tiles_match_gathered(page_size, splits):
    """Whole tiles copied by tensor descriptors (1, 2 or 4 tiles of 16 keys per page) give the
    reference's output; the partial last tile is still gathered, so slots past a row's end
    (NaN here) are never read."""
    lens = [37, 0, 1, 70, 96]
    ql, qr, cache, table, sl = _inputs(64, 16, 16, page_size, seq_lens=lens, seed=4)
    _poison_unused_slots(cache, table, sl, page_size)
    assert tma_supported(cache, page_size, 16, 16)
    ref = R.mla_decode(ql, qr, cache, table, sl, page_size, 0.2)
    for tma in (True, False):
        out = mla_decode_chunked(ql, qr, cache, table, sl, page_size, 0.2, block_n=16,
                                 num_splits=splits, tma=tma)
        assert rel_err(out, ref) < TOL


def test_rejects_bad_inputs():
    ql, qr, cache, table, sl = _inputs(64, 16, 4, 5)
    with pytest.raises(ValueError, match="chunks"):
        mla_decode_chunked(ql, qr, cache, table, sl, 5, 0.2, nc=8)       # chunk of 8 < 16
    with pytest.raises(ValueError, match="chunks"):
        mla_decode_chunked(ql[..., :48], qr, cache[:, :64], table, sl, 5, 0.2)  # L=48
    with pytest.raises(ValueError, match="width"):
        mla_decode_chunked(ql, qr, cache[:, :70], table, sl, 5, 0.2)
    with pytest.raises(ValueError, match="int32"):
        mla_decode_chunked(ql, qr, cache, table.long(), sl, 5, 0.2)
    with pytest.raises(ValueError, match="block_n"):
        mla_decode_chunked(ql, qr, cache, table, sl, 5, 0.2, block_n=24)
    with pytest.raises(ValueError, match="tma"):                          # pages of 5 keys
        mla_decode_chunked(ql, qr, cache, table, sl, 5, 0.2, tma=True)


@pytest.mark.parametrize("qlens", [[3, 0, 1, 9, 2], [2, 0, 1, 3, 11]])
def test_extend_a_token_a_row_matches_reference(qlens, monkeypatch):
    """mla_extend as one decode row per token (verify rows): ragged rows of 1 + k tokens, an
    empty row, a one-token row, and a last row that is all new tokens (an extend graph's
    padding row); NaN in every slot no row uses. The registered op takes this path up to
    MLA_PER_TOKEN_MAX_TOKENS tokens (16 here) and the generic kernel above it: both match."""
    from kernels.triton.mla_decode import mla_extend_per_token

    lens = [37, 0, 1, 70, qlens[-1]]
    ql, qr, cache, table, sl = _inputs(64, 16, 16, 16, seq_lens=lens, seed=5)
    _poison_unused_slots(cache, table, sl, 16)
    qs = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32,
                      device=DEV)
    t = int(qs[-1])
    gen = torch.Generator().manual_seed(6)
    ql, qr = rnd(t, 16, 64, gen=gen), rnd(t, 16, 16, gen=gen)
    ref = R.mla_extend(ql, qr, cache, table, qs, sl, 16, 0.2)
    monkeypatch.setattr(A, "MLA_PER_TOKEN_MAX_TOKENS", 16)
    out = mla_extend_per_token(ql, qr, cache, table, qs, sl, 16, 0.2)
    assert out.shape == ref.shape and rel_err(out, ref) < TOL
    assert rel_err(A.mla_extend(ql, qr, cache, table, qs, sl, 16, 0.2), ref) < TOL
    assert (t <= A.MLA_PER_TOKEN_MAX_TOKENS) == (qlens[-1] == 2)  # both paths of the op
