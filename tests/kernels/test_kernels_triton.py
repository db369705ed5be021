"""Triton kernels against the torch reference on random inputs of several tiny shapes.

Without a GPU they run through Triton's CPU interpreter (TRITON_INTERPRET=1, set in conftest)."""
import dataclasses
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: Triton backend untested")

import kernels  # noqa: E402
from kernel_testutil import make_paged, naive_attention, rel_err  # noqa: E402
from kernels import reference as R  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET unset", allow_module_level=True)

from kernels.triton import attention_ops as A  # noqa: E402
from kernels.triton import elementwise as E  # noqa: E402
from kernels.triton import head_gemv as HG  # noqa: E402
from kernels.triton import moe as M  # noqa: E402
from kernels.triton import moe_gemv as MG  # noqa: E402
from kernels.triton import penalties as PN  # noqa: E402
from kernels.triton import rope_kv as RK  # noqa: E402
from kernels.triton import route as RT  # noqa: E402
from kernels.triton import sample as S  # noqa: E402

TOL = 1e-4 if DEV == "cpu" else 2e-2   # interpreter computes in fp32; the GPU dot in tf32/bf16


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


def test_registry_prefers_triton_on_cuda_only():
    assert kernels.selected_backend("decode_attention", device="cuda", dtype=torch.bfloat16,
                                    head_dim=128) == "triton"
    assert kernels.selected_backend("decode_attention", device="cpu",
                                    dtype=torch.float32) == "cpu"   # kernels/cpu
    assert "triton (priority 10): refused" in kernels.explain("rms_norm", device="cpu",
                                                              dtype=torch.float32)
    for op in kernels.OPS:
        assert ("triton" in kernels.backends(op)) == (op not in kernels.REFERENCE_ONLY), op


@pytest.mark.parametrize("t,h", [(1, 16), (5, 24), (3, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(t, h, dtype):
    x, r, w = rnd(t, h, dtype=dtype), rnd(t, h, dtype=dtype), rnd(h, dtype=dtype)
    assert rel_err(E.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6)) < 2e-3
    a, s = E.fused_add_rms_norm(x, r, w, 1e-6)
    ra, rs = R.fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, rs) and rel_err(a, ra) < 2e-3
    # weight None: a unit scale (the norm's own folded into the next linear's weight)
    assert rel_err(E.rms_norm(x, None, 1e-6), R.rms_norm(x, torch.ones_like(w), 1e-6)) < 2e-3
    a, s = E.fused_add_rms_norm(x, r, None, 1e-6)
    assert torch.equal(s, rs) and rel_err(a, R.fused_add_rms_norm(x, r, None, 1e-6)[0]) < 2e-3


@pytest.mark.parametrize("t,i", [(1, 8), (4, 40), (2, 1500)])
def test_silu_and_mul(t, i):
    x = rnd(t, 2 * i)
    assert rel_err(E.silu_and_mul(x), R.silu_and_mul(x)) < 1e-5


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("t,hq,hk,d,rot", [(3, 4, 2, 16, 16), (6, 6, 1, 24, 8)])
def test_rope_and_rope_store_kv(is_neox, t, hq, hk, d, rot):
    cs = rnd(64, rot)
    q, k, v = rnd(t, hq, d), rnd(t, hk, d), rnd(t, hk, 12)
    pos = torch.randint(0, 64, (t,), device=DEV)
    for a, b in zip(RK.rope(q, k, pos, cs, rot, is_neox), R.rope(q, k, pos, cs, rot, is_neox)):
        assert rel_err(a, b) < 1e-6
    slots = torch.randperm(3 * t, device=DEV)[:t]
    slots[0] = -1                                                # padding row is skipped
    caches = [torch.full((3 * t, hk, dd), 7.0, device=DEV) for dd in (d, 12, d, 12)]
    got = RK.rope_store_kv(q, k, v, pos, cs, rot, is_neox, caches[0], caches[1], slots)
    ref = R.rope_store_kv(q, k, v, pos, cs, rot, is_neox, caches[2], caches[3], slots)
    assert rel_err(got[0], ref[0]) < 1e-6 and rel_err(got[1], ref[1]) < 1e-6
    assert rel_err(caches[0], caches[2]) < 1e-6 and torch.equal(caches[1], caches[3])
    RK.store_kv(k, v, caches[0], caches[1], slots)
    R.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("dv", [32, 40])
def test_rope_store_kv_norms_v_as_the_rms_norm_kernel(dv):
    """MLA's call: v (the latent, a strided view of the kv_a output) RMS-normed by
    v_norm_weight in the same launch, written as the rms_norm kernel's output then store_kv
    would write it (bit-equal), and as the reference writes it; padding slots skipped."""
    t, rot = 5, 16
    cs = rnd(64, rot)
    q, kv = rnd(t, 4, rot), rnd(t, dv + rot)
    v, k = kv[:, None, :dv], kv[:, None, dv:]                     # [T, 1, Dv], [T, 1, R]
    w = rnd(dv)
    pos = torch.randint(0, 64, (t,), device=DEV)
    slots = torch.randperm(3 * t, device=DEV)[:t]
    slots[1] = -1
    caches = [torch.full((3 * t, 1, dd), 7.0, device=DEV) for dd in (rot, dv) * 3]
    got = RK.rope_store_kv(q, k, v, pos, cs, rot, False, caches[0], caches[1], slots,
                           v_norm_weight=w, v_norm_eps=1e-6)
    ref = R.rope_store_kv(q, k, v, pos, cs, rot, False, caches[2], caches[3], slots,
                          v_norm_weight=w, v_norm_eps=1e-6)
    normed = E.rms_norm(v.reshape(t, dv), w, 1e-6).view(t, 1, dv)
    RK.store_kv(got[1], normed, caches[4], caches[5], slots)
    assert rel_err(got[0], ref[0]) < 1e-6 and torch.equal(caches[0], caches[4])
    assert torch.equal(caches[1], caches[5]) and rel_err(caches[1], caches[3]) < 1e-5
    untouched = torch.ones(3 * t, dtype=torch.bool, device=DEV)
    untouched[slots[slots >= 0]] = False
    assert (caches[1][untouched] == 7.0).all()


@pytest.mark.parametrize("t,slot", [(1, 5), (1, -1), (3, 5)])
def test_mla_absorb_rope(t, slot):
    """MLA's W_UK product beside its rope + normed-latent cache write: one token in one launch
    (a padding slot writes nothing), more tokens by the two ops; against the reference, and
    the same as head_matmul then rope_store_kv."""
    from kernels.triton import mla_absorb_rope as MA
    heads, dn, lat, rot = 4, 24, 32, 16
    cs = rnd(64, rot)
    q_nope, q_rope = rnd(t, heads, dn), rnd(t, heads, rot)
    w_uk = rnd(heads, lat, dn).transpose(1, 2)                  # [H, Dn, L], strided as MLA's
    kv = rnd(t, lat + rot)
    v, k = kv[:, None, :lat], kv[:, None, lat:]                   # [T, 1, L], [T, 1, R]
    norm_w = rnd(lat)
    pos = torch.randint(0, 64, (t,), device=DEV)
    slots = torch.arange(slot, slot + t, device=DEV) if slot >= 0 else torch.full(
        (t,), -1, device=DEV)
    caches = [torch.full((16, 1, dd), 7.0, device=DEV) for dd in (rot, lat) * 3]
    args = (pos, cs, rot, False)
    got = MA.mla_absorb_rope(q_nope, w_uk, q_rope, k, v, *args, caches[0], caches[1], slots,
                             v_norm_weight=norm_w, v_norm_eps=1e-6)
    ref = R.mla_absorb_rope(q_nope, w_uk, q_rope, k, v, *args, caches[2], caches[3], slots,
                            v_norm_weight=norm_w, v_norm_eps=1e-6)
    apart = (HG.head_matmul(q_nope, w_uk),
             RK.rope_store_kv(q_rope, k, v, *args, caches[4], caches[5], slots,
                              v_norm_weight=norm_w, v_norm_eps=1e-6)[0])
    for a, b, c in zip(got, ref, apart):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5 and torch.equal(a, c)
    assert all(rel_err(caches[i], caches[i + 2]) < 1e-5 for i in (0, 1))
    assert torch.equal(caches[0], caches[4]) and torch.equal(caches[1], caches[5])
    assert (caches[1] == 7.0).all() == (slot < 0)


def _paged(seq_lens, page_size, hk, d, dv):
    table, num_pages = make_paged(seq_lens, page_size)
    return (table.to(DEV), rnd(num_pages * page_size, hk, d), rnd(num_pages * page_size, hk, dv),
            torch.tensor(seq_lens, dtype=torch.int32, device=DEV))


@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("seq_lens,hq,hk,splits", [([1, 40, 77], 8, 2, None),
                                                   ([100], 4, 4, 3), ([17, 2], 16, 1, 2),
                                                   ([340], 4, 2, 20)])
def test_decode_attention(page_size, seq_lens, hq, hk, splits):
    table, kc, vc, sl = _paged(seq_lens, page_size, hk, 16, 16)
    q = rnd(len(seq_lens), hq, 16)
    out = A.decode_attention(q, kc, vc, table, sl, page_size, 0.25, num_splits=splits)
    assert rel_err(out, R.decode_attention(q, kc, vc, table, sl, page_size, 0.25)) < TOL


@pytest.mark.parametrize("seq_lens", [[0, 70, 9], [70]])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_gqa_decode_merges_in_the_last_split_and_leaves_its_tickets_at_zero(seq_lens, splits):
    """kernels/triton/gqa_decode.py (the registered GQA decode without a window): with two rows
    or more, the program that takes a row's last ticket merges its splits (with sinks) and
    every counter is back at zero for the next launch; one row merges in a launch of its own
    (empty splits write -inf); a row without keys gets zeros; twice over the same counters."""
    from kernels.triton.gqa_decode import TICKETS
    table, kc, vc, sl = _paged(seq_lens, 4, 2, 16, 16)
    sinks = rnd(8)
    for _ in range(2):
        q = rnd(len(seq_lens), 8, 16)
        out = A.decode_attention(q, kc, vc, table, sl, 4, 0.3, num_splits=splits, sinks=sinks)
        ref = R.decode_attention(q, kc, vc, table, sl, 4, 0.3, sinks=sinks)
        assert rel_err(out, ref) < TOL
        assert not TICKETS.current[q.device].any()
    assert seq_lens[0] or not out[0].any()


@pytest.mark.parametrize("split_tiles", [1, 2, 5])
def test_split_kv_short_rows_in_a_wide_table(split_tiles):
    """Rows far shorter than their page table (CUDA graphs pad it to the longest servable
    sequence) are cut by their own length into splits of at least split_tiles tiles; splits
    past a row's end write only their lse and the merge stops before them. GQA, and MLA on
    both kernels."""
    from kernels.triton.attention import paged_attention
    from kernels.triton.mla_decode import mla_decode_chunked
    seq_lens, page_size = [1, 40, 77, 0], 4
    table, kc, vc, sl = _paged(seq_lens, page_size, 2, 16, 16)
    table = torch.cat([table, torch.zeros(4, 60, dtype=torch.int32, device=DEV)], 1)  # 256+
    q = rnd(4, 8, 16)
    out = paged_attention(q, None, kc, None, vc, table, None, sl, page_size, 0.25,
                          num_splits=7, split_tiles=split_tiles)
    assert rel_err(out, R.decode_attention(q, kc, vc, table, sl, page_size, 0.25)) < TOL
    assert torch.count_nonzero(out[3]) == 0                               # the empty row
    cache = rnd(kc.shape[0], 48)
    ql, qr = rnd(4, 16, 32), rnd(4, 16, 16)
    ref = R.mla_decode(ql, qr, cache, table, sl, page_size, 0.2)
    chunked = mla_decode_chunked(ql, qr, cache, table, sl, page_size, 0.2, num_splits=7,
                                 split_tiles=split_tiles)
    generic = paged_attention(ql, qr, cache[:, None, :32], cache[:, None, 32:], None, table,
                              None, sl, page_size, 0.2, num_splits=7, split_tiles=split_tiles)
    assert rel_err(chunked, ref) < TOL and rel_err(generic, ref) < TOL


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("seq_lens,qlens,hq,hk", [([30, 9, 50], [30, 1, 17], 4, 2),
                                                  ([45], [45], 2, 2), ([20, 33], [0, 20], 8, 1)])
def test_extend_attention(page_size, seq_lens, qlens, hq, hk):
    d = 24 if hq == 2 else 16          # a non-power-of-two head dim takes the predicated path
    table, kc, vc, sl = _paged(seq_lens, page_size, hk, d, 32)
    qs = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32,
                      device=DEV)
    q = rnd(sum(qlens), hq, d)
    out = A.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3)
    assert rel_err(out, R.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3)) < TOL


@pytest.mark.parametrize("splits", [2, 5])
def test_extend_split_kv(splits):
    """Extend programs split over their keys (as the sizing does for launches short of
    programs): a row of one query over a long prefix, a whole-new row, an empty row (GQA,
    values wider than keys), against the reference."""
    from kernels.triton.attention import paged_attention
    seq_lens, qlens, page_size, d = [70, 33, 20], [1, 33, 0], 4, 16
    table, kc, vc, sl = _paged(seq_lens, page_size, 2, d, 32)
    qs = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32,
                      device=DEV)
    q = rnd(sum(qlens), 4, d)
    out = paged_attention(q, None, kc, None, vc, table, qs, sl, page_size, 0.3,
                          num_splits=splits, split_tiles=1)
    assert rel_err(out, R.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3)) < TOL


def test_extend_split_rule():
    """Launches split to at most extend_wave programs per SM (floor), each split at least
    min_split_tiles tiles and at most max_extend_splits; from extend_wave / 2 programs per SM
    up they stay whole. A sizing with extend_wave 0 never splits."""
    from kernels.triton.split_kv import SplitSizing
    sizing, cpu, sms = SplitSizing(), torch.device("cpu"), 4   # num_sms of the interpreter
    slots = int(sizing.extend_wave * sms)                       # 5
    assert sizing.extend_splits(slots // 2 + 1, 1 << 20, 64, cpu) == 1
    assert sizing.extend_splits(2, 1 << 20, 64, cpu) == slots // 2
    assert sizing.extend_splits(1, 1 << 20, 64, cpu) == min(slots, sizing.max_extend_splits)
    assert sizing.extend_splits(1, 3 * sizing.min_split_tiles * 64, 64, cpu) == 3
    assert sizing.extend_splits(1, 64, 64, cpu) == 1
    assert SplitSizing(extend_wave=0).extend_splits(1, 1 << 20, 64, cpu) == 1
    # a short extend tile's own wave and fewest tiles a split (attention.SHORT_EXTEND_TILES)
    assert sizing.extend_splits(1, 1 << 20, 64, cpu, wave=2.0) == 8
    assert sizing.extend_splits(1, 3 * 32 * 64, 64, cpu, wave=2.0, tiles=32) == 3


@pytest.mark.parametrize("seq_lens,hq,hk,splits,rotary_dim,is_neox,sinks",
                         [([1, 40, 77], 8, 2, None, 16, True, False),
                          ([70], 4, 2, 3, 8, False, True), ([0, 33, 9], 8, 2, 8, 16, True, False),
                          ([21, 50], 32, 1, 2, 12, True, False)])
@pytest.mark.parametrize("in_registers", [True, False])
def test_rope_decode_attention_matches_rope_store_kv_then_decode(seq_lens, hq, hk, splits,
                                                                 rotary_dim, is_neox, sinks,
                                                                 in_registers, monkeypatch):
    """gqa_decode.py with the new tokens (rope_decode_attention): the output and both caches
    as the reference's rope_store_kv, then decode_attention; rows of one key, split or not,
    two head blocks a KV head (32 query heads on one), partial rotary, GPT-J pairs, sinks, a
    row without keys (slot -1: nothing stored); the last split attending to the new key from
    registers or reading it back from the cache."""
    from kernel_testutil import slots_of

    from kernels.triton import gqa_decode as GD
    monkeypatch.setattr(GD, "NEW_KEY_IN_REGISTERS_ROWS", 1 << 30 if in_registers else 0)
    table, kc, vc, sl = _paged(seq_lens, 4, hk, 16, 16)
    b = len(seq_lens)
    q, k, v = rnd(b, hq, 16), rnd(b, hk, 16), rnd(b, hk, 16)
    positions = (sl - 1).clamp(min=0)
    slots = torch.tensor([slots_of(table[i].cpu(), n, 4)[-1] if n else -1
                          for i, n in enumerate(seq_lens)], device=DEV)
    cos_sin = rnd(128, rotary_dim)
    extra = dict(sinks=rnd(hq)) if sinks else {}
    kr, vr = kc.clone(), vc.clone()
    ref = R.rope_decode_attention(q, k, v, positions, cos_sin, rotary_dim, is_neox, kr, vr,
                                  slots, table, sl, 4, 0.3, **extra)
    new = GD.NewTokens(k, v, positions, cos_sin, rotary_dim, is_neox, slots)
    out = GD.gqa_decode(q, kc, vc, table, sl, 4, 0.3, num_splits=splits, new=new, **extra)
    assert rel_err(out, ref) < TOL
    # the rotation's rounding may differ by an ulp on a GPU (fused multiply-adds)
    assert torch.allclose(kc, kr, rtol=1e-5, atol=1e-6) and torch.equal(vc, vr)


def test_merge_splits_ignores_the_partials_of_empty_splits():
    """The merge launch: the splits' partials weighted by their lse; an empty split (lse -inf)
    wrote no partial, and whatever its memory holds (NaN here) stays out of the sum."""
    from kernels.triton import split_kv as SK
    part_o, part_l = rnd(2, 3, 5, 16), rnd(2, 3, 5)
    part_l[0, :, 3:] = float("-inf")                  # row 0: splits 3 and 4 empty
    part_l[1, 1, :] = float("-inf")                   # row 1, head 1: no keys at all
    part_o[part_l == float("-inf")] = float("nan")
    out = torch.empty(2, 3, 16, device=DEV)
    SK.merge_splits(part_o, part_l, out)
    w = torch.softmax(part_l * math.log(2), -1).nan_to_num(0.0)        # exp2 weights
    want = (w[..., None] * part_o.nan_to_num(0.0)).sum(2)
    assert torch.allclose(out, want, atol=1e-5) and not out.isnan().any()


def test_decode_split_cap():
    """A decode launch splits to fill the GPU (splits_per_sm programs an SM), capped by the
    pieces its page table holds: of its own fewest tiles (tiles_per_split) for MLA and for
    GQA launches of up to fine_cap_gqa_programs programs, of min_split_tiles otherwise or
    without fine_cap."""
    import dataclasses

    from kernels.triton.split_kv import SplitSizing
    cpu, sms = torch.device("cpu"), 4                      # num_sms of the interpreter
    fine = SplitSizing(gqa_splits_per_sm=64, mla_splits_per_sm=64)
    coarse = dataclasses.replace(fine, fine_cap=False)
    want = 64 * sms // 8                                   # 8 programs: one row, 8 KV heads
    assert coarse.decode_splits(8, 1024, 32, cpu, False) == 1024 // (4 * 32) < want
    assert fine.decode_splits(8, 1024, 32, cpu, False) == 1024 // 32 == want
    assert fine.decode_splits(1, 1024, 32, cpu, True) == 1024 // 32        # MLA, one row
    assert coarse.decode_splits(1, 1024, 32, cpu, True) == 1024 // (4 * 32)
    # GQA over more programs, MLA over many: the min_split_tiles cap either way
    assert fine.decode_splits(16, 1024, 32, cpu, False) == coarse.decode_splits(
        16, 1024, 32, cpu, False) == 1024 // (4 * 32)
    many = 4 * fine.fine_split_programs + 1
    assert fine.decode_splits(many, 1 << 20, 32, cpu, True) == coarse.decode_splits(
        many, 1 << 20, 32, cpu, True)


def test_fp8_decode_of_many_rows_takes_wide_key_tiles(monkeypatch):
    """On a GPU, GQA decode over an FP8 cache takes 128-key tiles from FP8_WIDE_ROWS rows on
    (fewer unpacking instructions a key); few rows, bf16 caches, MLA and extend launches keep
    their tiles; the op passes the cache's element size."""
    from kernels.triton import attention as AT
    monkeypatch.setattr(AT, "interpreting", lambda: False)
    wide = AT.attention_tiles(True, False, 4, AT.FP8_WIDE_ROWS, fp8=True)
    assert (wide.block_n, wide.num_warps, wide.num_stages) == (128, 4, 3)
    plain = AT.attention_tiles(True, False, 4, AT.FP8_WIDE_ROWS)
    assert AT.attention_tiles(True, False, 4, AT.FP8_WIDE_ROWS - 1, fp8=True) == plain
    assert plain.block_n == 64
    assert AT.attention_tiles(True, True, 16, 256, fp8=True) == AT.attention_tiles(True, True, 16)
    assert (AT.attention_tiles(False, False, 4, 256, fp8=True)
            == AT.attention_tiles(False, False, 4, 256))
    # a kernel reading its values as words (gqa_decode) widens later, at 2 stages
    words = AT.attention_tiles(True, False, 4, AT.FP8_WORDS_WIDE_ROWS, fp8=True, v_words=True)
    assert (words.block_n, words.num_warps, words.num_stages) == (128, 4, 2)
    assert AT.attention_tiles(True, False, 4, AT.FP8_WORDS_WIDE_ROWS - 1, fp8=True,
                              v_words=True) == plain
    monkeypatch.undo()
    seen = []
    real = AT.attention_tiles
    monkeypatch.setattr(AT, "attention_tiles", lambda *a, **k: seen.append(k) or real(*a, **k))
    table, kc, vc, sl = _paged([40] * 2, 16, 2, 16, 32)
    q = rnd(2, 4, 16)
    AT.paged_attention(q, None, kc.to(torch.float8_e4m3fn), None, vc.to(torch.float8_e4m3fn),
                       table, None, sl, 16, 0.25)
    assert seen == [{"fp8": True}]


def test_few_row_gqa_decode_takes_narrow_key_tiles(monkeypatch):
    """On a GPU, GQA decode of NARROW_DECODE_ROWS rows or fewer over a 16-bit cache takes
    32-key tiles (shorter latency chains); more rows, FP8 caches, MLA and a launch of unknown
    size keep theirs."""
    from kernels.triton import attention as AT
    monkeypatch.setattr(AT, "interpreting", lambda: False)
    tiles = {rows: AT.attention_tiles(True, False, 4, rows) for rows in (1, 2, 3, 16)}
    assert [tiles[r].block_n for r in (1, 2, 3, 16)] == [32, 32, 64, 64]
    assert tiles[1].num_stages == tiles[16].num_stages == 2
    assert AT.attention_tiles(True, False, 4, 1, fp8=True).block_n == 64
    assert AT.attention_tiles(True, True, 16, 1) == AT.attention_tiles(True, True, 16)
    assert AT.attention_tiles(True, False, 4).block_n == 64


def test_short_extend_launches_take_small_tiles(monkeypatch):
    """On a GPU (not the interpreter's tiny tiles) a GQA extend launch of few tokens, a verify
    step's, takes the small tiles of SHORT_EXTEND_TILES; longer ones the prefill tiles; decode
    and MLA tiles do not depend on the token count. The short tile is correct: a
    verify-shaped launch on 16-row tiles against the reference."""
    from kernels.triton import attention as AT
    monkeypatch.setattr(AT, "interpreting", lambda: False)
    for short in AT.SHORT_EXTEND_TILES:
        tiles = AT.attention_tiles(False, False, 4, short.most)
        assert tiles.block_t * tiles.g_blk == short.rows and tiles.num_warps == 4
        assert (tiles.split_tiles, tiles.split_wave) == (short.split_tiles, short.wave)
    longest = AT.SHORT_EXTEND_TILES[-1].most
    long_ = AT.attention_tiles(False, False, 4, longest + 1)
    assert long_.block_t * long_.g_blk == 256 and long_ == AT.attention_tiles(False, False, 4)
    assert AT.attention_tiles(False, True, 16, 8) == AT.attention_tiles(False, True, 16)
    assert AT.attention_tiles(True, False, 4, 8) == AT.attention_tiles(True, False, 4)
    monkeypatch.undo()
    seq_lens, qlens, page_size = [70, 41, 1], [5, 5, 1], 4
    table, kc, vc, sl = _paged(seq_lens, page_size, 2, 16, 32)
    qs = torch.tensor([0, 5, 10, 11], dtype=torch.int32, device=DEV)
    q = rnd(11, 8, 16)
    want = R.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3)
    tiles = AT.AttentionTiles(g_blk=4, block_t=4, block_n=16, num_warps=4, num_stages=2)
    out = AT.paged_attention(q, None, kc, None, vc, table, qs, sl, page_size, 0.3, tiles=tiles)
    assert rel_err(out, want) < TOL
    # the tile's own split sizing: a wave of 8 programs an SM, splits of at least 2 tiles (the
    # 72-key page table holds 2 such splits, so the 70-key row is cut in two)
    split = AT.AttentionTiles(g_blk=4, block_t=4, block_n=16, num_warps=4, num_stages=2,
                              split_tiles=2, split_wave=8.0)
    out = AT.paged_attention(q, None, kc, None, vc, table, qs, sl, page_size, 0.3, tiles=split)
    assert rel_err(out, want) < TOL


@pytest.mark.parametrize("n,k,bias", [(40, 64, False), (37, 100, True), (16, 2048, False)])
def test_linear_one_row_gemv(n, k, bias):
    """One row takes the GEMV (K a multiple of its step or not, N ragged, with a bias) and
    matches F.linear; more rows, or a strided row, go to torch's product."""
    from kernels.triton import gemv as G
    x, w = rnd(1, k), rnd(n, k)
    b = rnd(n) if bias else None
    want = torch.nn.functional.linear(x, w, b)
    assert G.gemv_applies(x, w, b)
    assert rel_err(G.gemv(x, w, b, G.GemvConfig(block_n=8, block_k=64, num_warps=4)),
                   want) < 1e-5
    assert rel_err(G.linear(x, w, b), want) < 1e-5
    xs = rnd(3, k)
    assert not G.gemv_applies(xs, w, b) and not G.gemv_applies(rnd(1, 2 * k)[:, ::2], w, b)
    assert torch.equal(G.linear(xs, w, b), torch.nn.functional.linear(xs, w, b))
    assert G.gemv_config(128256, 4096) == G.WIDE and G.gemv_config(4096, 14336) == G.NARROW
    assert G.gemv_config(576, 2048) == G.gemv_config(5632, 2048) == G.SMALL     # DeepSeek-V2-Lite
    assert G.gemv_config(2048, 2816) == G.NARROW                                 # its shared down
    assert G.gemv_config(4096, 4096) == G.NARROW                                 # the 8B's o_proj
    assert G.gemv_config(6144, 4096) == G.TALL                                   # ... and qkv
    assert G.gemv_config(28672, 4096, norm=True) == G.WIDE                       # gate_up, normed
    assert G.gemv_config(6144, 4096, norm=True) == G.TALL


@pytest.mark.parametrize("rows,n,k,bias", [(2, 40, 64, False), (5, 37, 100, True),
                                           (16, 80, 512, False)])
def test_linear_of_a_few_rows(rows, n, k, bias, monkeypatch):
    """The few-rows kernel (ragged N and K, a bias, small tiles and the rule's): F.linear's
    product within fp16 rounding (fp16: the interpreter's dot takes no bf16). `linear` gives
    it 2-16 16-bit rows of a weight of at least MIN_N rows; not one row, 17 rows of a
    qkv-shaped weight, float32 rows, a smaller weight, or with TOKENSPEED_FEW_ROWS=0."""
    from kernels.triton import few_rows as FR
    from kernels.triton import gemv as G
    torch.manual_seed(rows * n + k)
    half = torch.float16
    x, w = rnd(rows, k, dtype=half), rnd(n, k, dtype=half)
    b = rnd(n, dtype=half) if bias else None
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    small = FR.FewRowsConfig(block_n=16, block_k=32, num_warps=4, num_stages=2)
    assert rel_err(FR.few_rows_linear(x, w, b, small), want) < 1e-2
    assert rel_err(FR.few_rows_linear(x, w, b), want) < 1e-2
    assert not FR.few_rows_applies(x, w, b)                             # fewer than MIN_N rows
    tall = rnd(FR.MIN_N, k, dtype=half)
    assert FR.few_rows_applies(x, tall, None)
    assert torch.equal(G.linear(x, tall), FR.few_rows_linear(x, tall))
    assert rel_err(G.linear(x, tall), torch.nn.functional.linear(x.float(), tall.float())) < 1e-2
    assert not FR.few_rows_applies(x[:1], tall, None)
    assert not FR.few_rows_applies(x.float(), tall.float(), None)
    big_tall = rnd(FR.BIG_N, k, dtype=half)
    assert not FR.few_rows_applies(rnd(17, k, dtype=half), big_tall, None)   # qkv-like: cuBLAS
    monkeypatch.setenv(FR.ENV, "0")
    FR.few_rows_enabled.cache_clear()
    try:
        assert not FR.few_rows_applies(x, tall, None)
    finally:
        monkeypatch.delenv(FR.ENV)
        FR.few_rows_enabled.cache_clear()
    assert FR.few_rows_config(4096, 14336) == FR.few_rows_config(4096, 4096) == FR.NARROW
    assert FR.few_rows_config(6144, 4096) == FR.TALL
    assert FR.few_rows_config(28672, 4096) == FR.few_rows_config(128256, 4096) == FR.WIDE


@pytest.mark.parametrize("rows,block_m", [(40, 32), (40, 64), (64, 64)])
def test_linear_of_a_few_dozen_rows(rows, block_m):
    """17-64 rows: one row tile (the weight streamed past L2) or several (neighbouring programs
    share a weight tile), F.linear's product within fp16 rounding."""
    from kernels.triton import few_rows as FR
    torch.manual_seed(rows + block_m)
    half = torch.float16
    x, w, b = rnd(rows, 96, dtype=half), rnd(50, 96, dtype=half), rnd(50, dtype=half)
    cfg = FR.FewRowsConfig(block_n=16, block_k=32, num_warps=4, num_stages=2, block_m=block_m)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert rel_err(FR.few_rows_linear(x, w, b, cfg), want) < 1e-2


def test_linear_routes_a_few_dozen_rows():
    """17-64 rows of o / down / gate_up / head-shaped weights take the few-rows kernel's 64-row
    tile; qkv-shaped ones (more outputs than inputs, not wide), 65 rows, stay on cuBLAS."""
    from kernels.triton import few_rows as FR
    from kernels.triton import gemv as G
    half = torch.float16
    assert FR.few_rows_config(4096, 4096, 17) == FR.few_rows_config(4096, 14336, 64) \
        == FR.MEDIUM_NARROW
    assert FR.few_rows_config(28672, 4096, 32) == FR.MEDIUM_WIDE
    assert FR.few_rows_config(6144, 4096, 32) is None
    k = 64
    wide = rnd(FR.WIDE_N + 8, k, dtype=half)
    x = rnd(33, k, dtype=half)
    assert FR.few_rows_applies(x, wide, None)
    got = G.linear(x, wide)
    assert torch.equal(got, FR.few_rows_linear(x, wide))
    assert rel_err(got, torch.nn.functional.linear(x.float(), wide.float())) < 1e-2
    assert not FR.few_rows_applies(rnd(FR.MAX_ROWS + 1, k, dtype=half), wide, None)
    assert not FR.few_rows_applies(x, rnd(FR.BIG_N, k, dtype=half), None)   # qkv-like
    small = rnd(FR.MIN_N, k, dtype=half)
    assert FR.few_rows_applies(x, small, None)
    assert rel_err(G.linear(x, small), torch.nn.functional.linear(x.float(), small.float())) < 1e-2
    assert not FR.few_rows_applies(x, small[:-1], None)                      # under MIN_N


def test_few_rows_tiles_of_small_weights():
    """DeepSeek-V2-Lite's weights under BIG_N outputs: NARROW at 2-16 rows whatever their
    shape, from 17 rows MEDIUM_SMALL up to SMALL_N outputs, MEDIUM_NARROW above; the 8B's
    kinds keep their tiles."""
    from kernels.triton import few_rows as FR
    assert FR.few_rows_config(576, 2048, 4) == FR.few_rows_config(3072, 2048, 16) == FR.NARROW
    assert FR.few_rows_config(2048, 2816, 64) == FR.few_rows_config(576, 2048, 17) \
        == FR.MEDIUM_SMALL
    assert FR.few_rows_config(3072, 2048, 32) == FR.MEDIUM_NARROW
    assert FR.few_rows_config(5632, 2048, 32) is None                  # shared gate_up: ties
    assert FR.few_rows_config(5632, 2048, 8) == FR.few_rows_config(6144, 4096, 8) == FR.TALL


@pytest.mark.parametrize("n,k,res,silu,bias", [(40, 64, True, False, False),
                                                (37, 100, False, False, True),
                                                (16, 2048, True, True, False),
                                                (20, 100, True, True, True)])
def test_rms_norm_linear_one_row_is_one_gemv(n, k, res, silu, bias):
    """One row: the norm inside the GEMV's loads (a ragged K step, with and without the
    residual, the SiLU epilogue, a bias). In float32 it is the reference (norm, then linear);
    in bf16 the normed row is not rounded before the dot products, so it is the reference
    within bf16 rounding, and the new residual (program 0's store) is the norm kernel's
    exactly. More rows take the norm kernel, then linear / linear_silu_and_mul, bit-equal
    to those ops."""
    from kernels.triton import gemv as G
    torch.manual_seed(n * k)  # unseeded, one draw (SiLU, bias) went past 2e-2: 2.2e-2; 60 seeds: max 1.9e-2
    config = G.GemvConfig(block_n=8, block_k=64, num_warps=4)
    rows = 2 * n if silu else n
    # bf16: the SiLU epilogue multiplies two rounded outputs, so their rounding adds up
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2 if silu else 2e-2)):
        x, g, w = rnd(1, k, dtype=dtype), rnd(k, dtype=dtype) + 1, rnd(rows, k, dtype=dtype)
        r = rnd(1, k, dtype=dtype) if res else None
        b = rnd(rows, dtype=dtype) if bias else None
        want, want_r = R.rms_norm_linear(x, r, g, 1e-6, w, b, silu)
        got, got_r = G.rms_norm_linear(x, r, g, 1e-6, w, b, silu)
        assert rel_err(got, want) < tol and rel_err(got_r, want_r) < tol
        if r is None:
            assert got_r is x
        else:  # the sum rounded as the norm kernel rounds it
            assert torch.equal(got_r, E.fused_add_rms_norm(x, r, g, 1e-6)[1])
        out_r = torch.empty_like(x)
        small_tiles = G.gemv(x, w, b, config, silu, G.RowNorm(g, 1e-6, r, out_r))
        assert rel_err(small_tiles, want) < tol
    xs, rs = rnd(3, k, dtype=torch.bfloat16), rnd(3, k, dtype=torch.bfloat16)
    normed, new_r = E.fused_add_rms_norm(xs, rs, g, 1e-6)
    project = G.linear_silu_and_mul if silu else G.linear
    got, got_r = G.rms_norm_linear(xs, rs, g, 1e-6, w, b, silu)
    assert torch.equal(got, project(normed, w, b)) and torch.equal(got_r, new_r)


@pytest.mark.parametrize("n,k,res,silu", [(40, 64, True, False), (16, 100, False, True)])
def test_rms_norm_linear_with_the_scale_in_the_weight(n, k, res, silu):
    """norm_weight None: a unit scale, the norm's own multiplied into the linear's columns
    (models/llama.py folds it at load). One row: the GEMV without the norm weight's loads;
    more rows: the norm kernel without its weight, then the linear. Float32: the weighted
    reference over the unscaled weight."""
    from kernels.triton import gemv as G
    torch.manual_seed(n + k)
    x, g, w = rnd(1, k), rnd(k) + 1, rnd(2 * n if silu else n, k)
    r = rnd(1, k) if res else None
    want, want_r = R.rms_norm_linear(x, r, g, 1e-6, w, None, silu)
    got, got_r = G.rms_norm_linear(x, r, None, 1e-6, w * g, None, silu)
    assert rel_err(got, want) < 1e-5 and rel_err(got_r, want_r) < 1e-6
    assert rel_err(R.rms_norm_linear(x, r, None, 1e-6, w * g, None, silu)[0], want) < 1e-5
    xs = rnd(3, k)
    rs = rnd(3, k) if res else None
    got, got_r = G.rms_norm_linear(xs, rs, None, 1e-6, w * g, None, silu)
    want, want_r = R.rms_norm_linear(xs, rs, g, 1e-6, w, None, silu)
    assert rel_err(got, want) < 1e-5 and rel_err(got_r, want_r) < 1e-6


@pytest.mark.parametrize("inter,k,bias", [(20, 64, False), (37, 100, True), (8, 2048, False)])
def test_linear_silu_and_mul_one_row_is_one_gemv_bit_equal_to_two_kernels(inter, k, bias):
    """One 16-bit row: the GEMV's SILU_MUL epilogue (gate and up rows paired in each
    program) gives exactly what the GEMV then the silu_and_mul kernel give, and matches the
    reference; more rows take `linear` (2-16 16-bit rows: the few-rows kernel), float32
    F.linear, then the silu_and_mul kernel."""
    from kernels.triton import gemv as G
    from kernels.triton.elementwise import silu_and_mul
    bf = torch.bfloat16
    x, w = rnd(1, k, dtype=bf), rnd(2 * inter, k, dtype=bf)
    b = rnd(2 * inter, dtype=bf) if bias else None
    config = G.GemvConfig(block_n=8, block_k=64, num_warps=4)
    fused = G.gemv(x, w, b, config, silu_mul=True)
    assert fused.shape == (1, inter)
    assert torch.equal(fused, silu_and_mul(G.gemv(x, w, b, config)))
    assert torch.equal(G.linear_silu_and_mul(x, w, b), G.gemv(x, w, b, silu_mul=True))
    assert rel_err(G.linear_silu_and_mul(x, w, b), R.linear_silu_and_mul(x, w, b)) < 2e-2
    three = rnd(3, k, dtype=torch.float16)   # fp16: the interpreter's dot takes no bf16
    for other, project in ((three, G.linear), (x.float(), torch.nn.functional.linear)):
        weight, bias_ = w.to(other.dtype), None if b is None else b.to(other.dtype)
        assert torch.equal(G.linear_silu_and_mul(other, weight, bias_),
                           silu_and_mul(project(other, weight, bias_)))
    assert rel_err(G.linear_silu_and_mul(three, w.half(), None if b is None else b.half()),
                   R.linear_silu_and_mul(three.float(), w.float(),
                                         None if b is None else b.float())) < 2e-2
    with pytest.raises(ValueError, match="equal count"):
        G.gemv(x, w[1:], None, config, silu_mul=True)


@pytest.mark.parametrize("rows,inter,k,bias,block_m", [(2, 20, 64, False, 16),
                                                       (5, 37, 100, True, 16),
                                                       (40, 24, 96, False, 64)])
def test_few_rows_silu_and_mul_is_one_launch_equal_to_two_kernels(rows, inter, k, bias,
                                                                   block_m):
    """2-64 16-bit rows: the few-rows kernel's SILU_MUL epilogue (gate and up rows paired in
    each output tile; ragged N and K, a bias, one or several row tiles) gives what the kernel
    then the silu_and_mul kernel give, and matches the reference. `linear_silu_and_mul` takes
    it where `linear` takes the few-rows kernel (a weight of at least MIN_N rows), not 65 rows.
    fp16: the interpreter's dot takes no bf16."""
    from kernels.triton import few_rows as FR
    from kernels.triton import gemv as G
    from kernels.triton.elementwise import silu_and_mul
    torch.manual_seed(rows * inter + k)
    half = torch.float16
    x, w = rnd(rows, k, dtype=half), rnd(2 * inter, k, dtype=half)
    b = rnd(2 * inter, dtype=half) if bias else None
    cfg = FR.FewRowsConfig(block_n=16, block_k=32, num_warps=4, num_stages=2, block_m=block_m)
    fused = FR.few_rows_linear(x, w, b, cfg, silu_mul=True)
    assert fused.shape == (rows, inter)
    assert torch.equal(fused, silu_and_mul(FR.few_rows_linear(x, w, b, cfg)))
    want = R.linear_silu_and_mul(x.float(), w.float(), None if b is None else b.float())
    assert rel_err(fused, want) < 2e-2
    big = rnd(FR.MIN_N, k, dtype=half)
    assert FR.few_rows_applies(x, big, None)
    assert torch.equal(G.linear_silu_and_mul(x, big), FR.few_rows_linear(x, big, silu_mul=True))
    many = rnd(FR.MAX_ROWS + 1, k, dtype=half)
    assert torch.equal(G.linear_silu_and_mul(many, big), silu_and_mul(G.linear(many, big)))
    with pytest.raises(ValueError, match="equal count"):
        FR.few_rows_linear(x, w[1:], None, cfg, silu_mul=True)


def test_router_gate_tile_before_the_wait_changes_nothing(monkeypatch):
    """With PDL the router reads its first gate tile before the wait (EARLY); the sums are
    the same, in the same order, as without it."""
    from kernels.triton import route as RT
    x, gate = rnd(2, 3000), rnd(5, 3000)                  # two gate tiles a row
    plain = RT.router_logits(x, gate)
    monkeypatch.setattr(RT, "_early", lambda launch: {**launch, "EARLY": True})
    assert torch.equal(RT.router_logits(x, gate), plain)


@pytest.mark.parametrize("heads,k,n", [(4, 32, 64), (3, 24, 40), (2, 64, 16)])
def test_head_matmul_one_token_gemv(heads, k, n):
    """One token takes the per-head GEMV, over MLA's two layouts (W_UK's [H, Dn, L] rows of
    kv_b_proj, contiguous along the output; W_UV^T, contiguous along K), K and N ragged or
    not; more tokens take einsum. Both match the reference."""
    from kernels.triton import head_gemv as HG
    kv_b = rnd(heads, 2 * k, n)                        # [W_UK ; W_UV]-like stacked rows
    w_uk = kv_b[:, :k]                                 # [H, K, N], strided heads
    w_uvt = rnd(heads, n, k).transpose(1, 2)           # [H, K, N], K contiguous
    for w in (w_uk, w_uvt):
        q = rnd(1, heads, 3 * k)[:, :, :k]             # a strided query, as q_nope is
        assert HG.head_gemv_applies(q, w)
        assert rel_err(HG.head_matmul(q, w), R.head_matmul(q, w)) < 1e-5
        more = rnd(3, heads, k)
        assert not HG.head_gemv_applies(more, w)
        assert torch.equal(HG.head_matmul(more, w), R.head_matmul(more, w))


def test_paged_attention_takes_its_tuning_as_arguments():
    """Tiles and split sizing given per call (as the benchmark's sweeps give them) serve
    decode and extend: tiles other than the defaults, a sizing that splits decode more; a
    key tile that is not a power of two is refused, so the tiles given are the tiles used."""
    from kernels.triton.attention import AttentionTiles, paged_attention
    from kernels.triton.split_kv import SplitSizing
    seq_lens, qlens, page_size = [40, 23], [9, 23], 4
    table, kc, vc, sl = _paged(seq_lens, page_size, 2, 16, 16)
    qs = torch.tensor([0, 9, 32], dtype=torch.int32, device=DEV)
    q = rnd(32, 4, 16)
    tiles = AttentionTiles(g_blk=4, block_t=4, block_n=32, num_warps=4, num_stages=1)
    out = paged_attention(q, None, kc, None, vc, table, qs, sl, page_size, 0.3, tiles=tiles)
    assert rel_err(out, R.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3)) < TOL
    with pytest.raises(Exception) as refused:
        paged_attention(q, None, kc, None, vc, table, qs, sl, page_size, 0.3,
                        tiles=dataclasses.replace(tiles, block_n=24))
    # compiled (not interpreted), Triton names the cause in the chained error
    causes, error = [], refused.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("power of 2" in c for c in causes), causes
    qd = rnd(2, 4, 16)
    out = paged_attention(qd, None, kc, None, vc, table, None, sl, page_size, 0.3,
                          sizing=SplitSizing(gqa_splits_per_sm=16))
    assert rel_err(out, R.decode_attention(qd, kc, vc, table, sl, page_size, 0.3)) < TOL


@pytest.mark.parametrize("heads,page_size,splits", [(4, 4, None), (16, 1, 3), (20, 16, 1)])
def test_mla_decode_and_extend(heads, page_size, splits):
    lat, rope_d = 32, 16
    seq_lens, qlens = [21, 40], [5, 11]
    table, num_pages = make_paged(seq_lens, page_size)
    table = table.to(DEV)
    cache = rnd(num_pages * page_size, lat + rope_d)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    ql, qr = rnd(2, heads, lat), rnd(2, heads, rope_d)
    ref = R.mla_decode(ql, qr, cache, table, sl, page_size, 0.2)
    for op in (A.mla_decode, A.mla_decode_generic):   # registered (chunked at L=32), generic
        out = op(ql, qr, cache, table, sl, page_size, 0.2, num_splits=splits)
        assert rel_err(out, ref) < TOL
    qs = torch.tensor([0, 5, 16], dtype=torch.int32, device=DEV)
    ql, qr = rnd(16, heads, lat), rnd(16, heads, rope_d)
    out = A.mla_extend(ql, qr, cache, table, qs, sl, page_size, 0.2)
    assert rel_err(out, R.mla_extend(ql, qr, cache, table, qs, sl, page_size, 0.2)) < TOL


@pytest.mark.parametrize("seq_lens,qlens,heads", [([30, 9, 50], [30, 1, 17], 4),
                                                ([0, 45], [0, 45], 16), ([70], [3], 2)])
def test_mla_prefill(seq_lens, qlens, heads):
    """Decompressed MLA: per-row contiguous keys (prefix + new), k_nope / v as strided views
    of one kv_b-projection output [N, H * (Dn + Dv)], the rope key shared by the heads; rows
    with no keys, a row of one query over a long prefix; against the reference op, and the
    reference against the naive float64 formula."""
    dn, r, dv = 16, 16, 32
    n, t = sum(seq_lens), sum(qlens)
    kvb = rnd(n, heads * (dn + dv)).view(n, heads, dn + dv)
    k_nope, v, k_rope = kvb[..., :dn], kvb[..., dn:], rnd(n, r)
    q_nope, q_rope = rnd(t, heads, dn), rnd(t, heads, r)
    qs = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32,
                      device=DEV)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    ref = R.mla_prefill(q_nope, q_rope, k_nope, k_rope, v, qs, sl, 0.3)
    out = A.mla_prefill(q_nope, q_rope, k_nope, k_rope, v, qs, sl, 0.3)
    assert out.shape == (t, heads, dv) and rel_err(out, ref) < TOL
    k = torch.cat([k_nope, k_rope[:, None, :].expand(-1, heads, -1)], -1).cpu()
    q = torch.cat([q_nope, q_rope], -1).cpu()
    k0 = 0
    for b, (m, ql) in enumerate(zip(seq_lens, qlens)):
        rows = slice(int(qs[b]), int(qs[b + 1]))
        if ql:
            want = naive_attention(q[rows], k[k0:k0 + m], v.cpu()[k0:k0 + m],
                                   list(range(m - ql, m)), 0.3)
            assert rel_err(ref.cpu()[rows], want) < 1e-4
        k0 += m


@pytest.mark.parametrize("t,hd,inter,e,k", [(1, 32, 24, 8, 2), (1, 40, 23, 8, 6),
                                            (2, 32, 24, 4, 4), (9, 48, 40, 8, 3),
                                            (40, 32, 16, 4, 2)])
def test_fused_moe(t, hd, inter, e, k):
    """One token takes moe_gemv.py's GEMVs (the second case: K and I not whole tiles), up to
    PAIR_BLOCKS_MAX pairs one block per pair (2 tokens on all 4 experts, so experts repeat
    across blocks), above it the aligned grouped GEMM. On a GPU in
    bf16: the only dtypes the registry gives this kernel (fp32 tiles overflow shared memory)."""
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    x = rnd(t, hd, dtype=dt)
    w13, w2 = rnd(e, 2 * inter, hd, dtype=dt) * 0.2, rnd(e, hd, inter, dtype=dt) * 0.2
    w, ids = R.moe_route(rnd(t, e), k, "sigmoid", True, rnd(e), 1, 1, 1.5)
    assert rel_err(M.fused_moe(x, w13, w2, w, ids), R.fused_moe(x, w13, w2, w, ids)) < TOL
    shared = rnd(t, hd, dtype=dt)     # the shared experts' output, added in the top-k sum
    got = M.fused_moe(x, w13, w2, w, ids, shared=shared)
    assert rel_err(got, R.fused_moe(x, w13, w2, w, ids, shared=shared)) < TOL
    assert rel_err(got, R.fused_moe(x, w13, w2, w, ids).float() + shared.float()) < 2e-2


@pytest.mark.parametrize("t,inter,i_shared", [(1, 24, 48), (1, 23, 23), (1, 24, 36),
                                               (3, 24, 48)])
def test_fused_moe_runs_the_shared_experts(t, inter, i_shared):
    """shared_mlp: the shared experts' own weights. One token takes them as I-wide slices
    among moe_gemv's pairs (2 and 1 slices; one of them an expert off the reference's order:
    EP's id E); an intermediate not a multiple of I (36 over 24) or more tokens run them as
    SwiGLUMLP would. Against the reference, and the reference against SwiGLU by hand."""
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    e, hd, k = 8, 40, 3
    x = rnd(t, hd, dtype=dt)
    w13, w2 = rnd(e, 2 * inter, hd, dtype=dt) * 0.2, rnd(e, hd, inter, dtype=dt) * 0.2
    sw13, sw2 = rnd(2 * i_shared, hd, dtype=dt) * 0.2, rnd(hd, i_shared, dtype=dt) * 0.2
    w, ids = R.moe_route(rnd(t, e), k, "softmax", False, None, 1, 1, 1.0)
    ids[0, 0] = e
    got = M.fused_moe(x, w13, w2, w, ids, shared_mlp=(sw13, sw2))
    want = R.fused_moe(x, w13, w2, w, ids, shared_mlp=(sw13, sw2))
    assert rel_err(got, want) < TOL
    g, u = (x.float() @ sw13.float().t()).split(i_shared, dim=-1)
    by_hand = (torch.nn.functional.silu(g) * u) @ sw2.float().t()
    assert rel_err(want, R.fused_moe(x, w13, w2, w, ids).float() + by_hand) < 2e-2
    assert MG.shared_slices((sw13, sw2), inter) == (i_shared // inter
                                                    if i_shared % inter == 0 else 0)


@pytest.mark.parametrize("t", [1, 2, 9])
def test_fused_moe_skips_pairs_of_other_ranks(t):
    """Expert parallelism: a pair of id E (an expert on another rank) contributes nothing,
    as in the reference; the one-token GEMVs (t=1), one block per pair (t=2, k=3) and
    aligned (t=9)."""
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    e, hd, inter, k = 4, 32, 16, 3
    x = rnd(t, hd, dtype=dt)
    w13, w2 = rnd(e, 2 * inter, hd, dtype=dt) * 0.2, rnd(e, hd, inter, dtype=dt) * 0.2
    w, ids = R.moe_route(rnd(t, e + 2), k, "softmax", True, None, 1, 1, 1.0)
    ids = ids.clamp(max=e)                       # experts 4 and 5 live elsewhere: id E
    ids[0, -1] = e                               # at least one such pair in every case
    got = M.fused_moe(x, w13, w2, w, ids)
    here = ids < e
    want = R.fused_moe(x, w13, w2, w * here, torch.where(here, ids, 0))
    assert rel_err(got, want) < TOL and rel_err(R.fused_moe(x, w13, w2, w, ids), want) < TOL


def test_moe_align_pads_each_expert_to_whole_blocks():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]], dtype=torch.int32, device=DEV)
    pairs, block_expert, nb = M.align_by_expert(ids, 3, 4)
    pairs, block_expert = pairs.cpu(), block_expert.cpu()
    assert block_expert[:3].tolist() == [0, 1, 2] and (block_expert[3:] >= 3).all()
    assert pairs[:4].tolist() == [1, 4, 6, 6] and pairs[4:8].tolist() == [3, 6, 6, 6]
    assert pairs[8:12].tolist() == [0, 2, 5, 6]


def test_sample_matches_reference_exactly():
    b, v = 12, 300
    logits = rnd(b, v) * 3
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3] * 3, device=DEV)
    top_k = torch.tensor([0, 5, 50, 0, 1, 299, 300, 0, 10, 0, 3, 20], dtype=torch.int32,
                         device=DEV)
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.3, 1.0, 0.95, 1.0, 0.1, 0.99, 1.0, 0.6, 0.8],
                         device=DEV)
    seeds = torch.randint(-2 ** 62, 2 ** 62, (b,), device=DEV)
    pos = torch.randint(0, 10 ** 6, (b,), device=DEV)
    got = S.sample(logits, temp, top_k, top_p, seeds, pos)
    assert torch.equal(got, R.sample(logits, temp, top_k, top_p, seeds, pos))


# chunks of 128 tokens with 32 candidate slots each: rows of a few chunks exercise the limits
SMALL_SAMPLE = dict(chunk=128, kcap=32)


@pytest.mark.slow
def test_sample_top_p_alone_on_candidates_and_streamed():
    """Top-p without top-k, chunks of 128 with 32 candidates each (so that the candidates do
    not cover a row): rows whose top KCAP tokens hold top_p of the mass finish on the
    candidates (peaked rows; `medium` rows, whose nucleus ends inside the top KCAP where the
    mass outside it still moves that end), flat and lopsided rows stream the row; each row is
    drawn at several positions and all equal the reference. One row is all -inf but one
    token."""
    sizes = dataclasses.replace(S.sample_sizes(), **SMALL_SAMPLE)
    chunk, kcap = sizes.chunk, sizes.kcap
    v = 5 * chunk + 17
    peaked = rnd(2, v) * 6
    flat = rnd(1, v) * 0.05                            # the top KCAP hold ~5% of the mass
    medium = rnd(v) * 0.01 - 3.5                       # the top KCAP hold ~93% of the mass
    medium[torch.randperm(v, device=DEV)[:kcap]] = 2.0 + rnd(kcap) * 0.3
    # `lopsided`: 60 high tokens in the first chunk (32 kept), 10 in each other; all kept
    # candidates hold ~70% of the mass, the top KCAP ~31%: streamed at top_p 0.6
    lopsided = rnd(v) * 0.01 - 3.5
    high = torch.cat([torch.randperm(chunk, device=DEV)[:60]] + [
        c * chunk + torch.randperm(chunk, device=DEV)[:10] for c in range(1, 5)])
    lopsided[high] = 2.0 + rnd(high.numel()) * 0.3
    logits = torch.cat([peaked, flat.repeat(8, 1), medium.repeat(12, 1), lopsided.repeat(8, 1)])
    logits[0, :] = float("-inf")
    logits[0, 3] = 1.0
    b = logits.shape[0]
    temp = torch.tensor([1.0, 0.7] + [1.0] * 28, device=DEV)
    top_p = torch.tensor([0.9, 0.5] + [0.7] * 8 + [0.9] * 12 + [0.6] * 8, device=DEV)
    top_k = torch.zeros(b, dtype=torch.int32, device=DEV)
    seeds = torch.randint(-2 ** 62, 2 ** 62, (b,), device=DEV)
    pos = torch.randint(0, 10 ** 6, (b,), device=DEV)
    top_mass = torch.softmax(logits.float() / temp[:, None], 1).topk(kcap, 1).values.sum(1)
    assert torch.equal(top_mass >= top_p, torch.tensor([1, 1] + [0] * 8 + [1] * 12 + [0] * 8,
                                                       device=DEV, dtype=torch.bool))
    got = S.sample(logits, temp, top_k, top_p, seeds, pos, sizes=sizes)
    assert got[0] == 3
    assert torch.equal(got, R.sample(logits, temp, top_k, top_p, seeds, pos))


@pytest.mark.slow
def test_sample_ties_beyond_the_candidate_slots():
    """Masked logits (one value repeated) tie at a chunk's k-th largest more often than the
    chunk has candidate slots: the tokens above the ties are never dropped, and such rows
    stream (exact, ties kept as the reference keeps them). Top-k and top-p alone."""
    sizes = dataclasses.replace(S.sample_sizes(), **SMALL_SAMPLE)
    v, b = 3 * sizes.chunk, 16
    logits = torch.full((b, v), -1.0e4, device=DEV)
    logits[:, 100] = 5.0                      # after 100 ties in the first chunk
    logits[:, 3] = 4.5
    logits[8:, 200:260] = 4.0                 # rows 8..: 60 tied tokens, 56 in one chunk
    temp = torch.ones(b, device=DEV)
    top_k = torch.tensor([10] * 4 + [0] * 4 + [20] * 4 + [0] * 4, dtype=torch.int32,
                         device=DEV)
    top_p = torch.tensor([1.0] * 4 + [0.9] * 4 + [1.0] * 4 + [0.5] * 4, device=DEV)
    seeds = torch.randint(-2 ** 62, 2 ** 62, (b,), device=DEV)
    pos = torch.randint(0, 10 ** 6, (b,), device=DEV)
    got = S.sample(logits, temp, top_k, top_p, seeds, pos, sizes=sizes)
    assert torch.equal(got, R.sample(logits, temp, top_k, top_p, seeds, pos))
    assert (got[:8] == 100).any() and ((got[8:] >= 200) & (got[8:] < 260)).sum() >= 4


def _sample_as_reference(logits, temp, top_k, top_p, positions, sizes) -> None:
    """Every row's token equals the reference's at each of `positions` (one random seed a
    row)."""
    seeds = torch.randint(-2 ** 62, 2 ** 62, (logits.shape[0],), device=DEV)
    for pos in positions:
        at = torch.full((logits.shape[0],), pos, device=DEV)
        got = S.sample(logits, temp, top_k, top_p, seeds, at, sizes=sizes)
        assert torch.equal(got, R.sample(logits, temp, top_k, top_p, seeds, at))


def test_sample_top_k_floor_from_group_maxima():
    """Top-k <= GROUPS: a chunk's candidates are its tokens at or above the k-th largest of its
    group maxima where no more than KCAP reach it (random rows); a chunk whose largest tokens
    crowd into one group has more there and bisects for its k-th largest; ties at the floor
    are kept. Chunks of 64 in 8 groups of 8, 16 candidate slots; all rows equal the reference
    at several positions."""
    sizes = dataclasses.replace(S.sample_sizes(), chunk=64, kcap=16)
    assert S.chunk_groups(sizes.chunk) == 8
    v, b = 3 * sizes.chunk + 5, 16
    logits = rnd(b, v)
    logits[4:8, :64] = 0.0                          # crowded: chunk 0's top 8 in one group,
    logits[4:8, 8:16] = 6.0 + rnd(4, 8)             # every other group's maximum 0
    logits[8:12, 64:128:4] = 2.5                    # 16 ties above the rest of chunk 1
    logits[12:, :] = logits[12:, :].round()         # many ties everywhere
    top_k = torch.tensor([1, 3, 5, 8] * 4, dtype=torch.int32, device=DEV)
    temp = torch.full((b,), 0.9, device=DEV)
    top_p = torch.tensor([1.0, 0.8] * 8, device=DEV)
    _sample_as_reference(logits, temp, top_k, top_p, range(1000, 1003), sizes)


@pytest.mark.slow
def test_sample_candidates_ranked_pairwise():
    """Stage 2 ranks the candidates at or above its floor pairwise (top-k: fewer than k
    strictly larger; top-p: the mass strictly larger under top_p * z). Chunks of 128 with 32
    slots (NTOP 64). `ramp` rows: 30 near-equal tokens split over the chunks, top-k 30 and
    top-p swept, each nucleus ending a few tokens from where a 2% looser top-p would; `tied`
    rows: 30 ties a chunk at the k-th value, 90 in all (more than NTOP: the bisections over
    every candidate); random rows; top-p alone. Every row equals the reference at four
    positions."""
    sizes = dataclasses.replace(S.sample_sizes(), **SMALL_SAMPLE)
    v = 3 * sizes.chunk
    ramp = rnd(20, v) * 0.1 - 4.0
    for r in range(20):
        ramp[r, torch.randperm(v, device=DEV)[:30]] = 2.0 - 0.02 * torch.arange(30, device=DEV)
    tied = rnd(4, v) * 0.1 - 4.0
    for c in range(3):
        tied[:, c * sizes.chunk + torch.arange(30, device=DEV) * 4] = 3.0
    logits = torch.cat([ramp, tied, rnd(8, v) * 2, rnd(4, v) * 6])
    b = logits.shape[0]
    top_k = torch.tensor([30] * 20 + [10] * 4 + [1, 5, 20, 32] * 2 + [0] * 4,
                         dtype=torch.int32, device=DEV)
    top_p = torch.cat([torch.linspace(0.3, 0.7, 20, device=DEV),
                       torch.tensor([1.0, 0.9] * 2 + [1.0] * 4 + [0.8] * 4 + [0.9] * 4,
                                    device=DEV)])
    temp = torch.ones(b, device=DEV)
    _sample_as_reference(logits, temp, top_k, top_p, range(77, 81), sizes)


@pytest.mark.slow
def test_sample_broken_logits():
    """A broken model's logits in every path (greedy, plain, top-k, top-p, top-p alone on the
    candidates and streamed, top-k above KCAP streamed): NaN tokens are never sampled, tokens
    at +inf share the mass, a row of NaN or -inf gives token 0; all as the reference, every
    token in range (a token V would index past the embedding)."""
    sizes = dataclasses.replace(S.sample_sizes(), **SMALL_SAMPLE)
    v, modes = 2 * sizes.chunk + 9, 7
    base = rnd(5, v) * 2
    base[0, 5] = float("nan")
    base[1, 200] = float("inf")
    base[2, [3, 150]] = float("inf")
    base[3] = float("nan")
    base[4] = float("-inf")
    logits = base.repeat(modes, 1)
    b = logits.shape[0]
    per_mode = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype,  # noqa
                                                                device=DEV).repeat_interleave(5)
    temp = per_mode([0.0, 1.0, 0.7, 1.0, 1.0, 1.0, 0.9])
    top_k = per_mode([0, 0, 20, 0, 0, 0, 50], torch.int32)    # 50 > KCAP: streamed
    top_p = per_mode([1.0, 1.0, 0.8, 0.9, 0.9, 0.01, 1.0])
    logits[25:30] = logits[25:30] * 0.01                      # flat: top-p alone streams
    logits[25:30, 7] = float("nan")
    seeds = torch.randint(-2 ** 62, 2 ** 62, (b,), device=DEV)
    pos = torch.randint(0, 10 ** 6, (b,), device=DEV)
    got = S.sample(logits, temp, top_k, top_p, seeds, pos, sizes=sizes)
    assert torch.equal(got, R.sample(logits, temp, top_k, top_p, seeds, pos))
    assert ((got >= 0) & (got < v)).all() and (got.view(modes, 5)[:, 3:] == 0).all()


@pytest.mark.parametrize("scoring,e,k,n_group,topk_group,bias,renorm", [
    ("softmax", 64, 6, 1, 1, False, False),      # DeepSeek-V2-Lite
    ("softmax", 20, 3, 4, 2, False, True),       # V2 group-limited, groups of 5
    ("sigmoid", 32, 4, 4, 2, True, True),        # V3: biased choice, top-2 group scores
    ("sigmoid", 48, 8, 1, 1, True, False)])
def test_moe_route(scoring, e, k, n_group, topk_group, bias, renorm):
    """Same experts in the same order as the reference, same weights (fp32 rounding)."""
    torch.manual_seed(e * 31 + k)      # exact id equality: fixed inputs, no near-ties by chance
    logits = rnd(9, e) * 2
    b = rnd(e) * 0.5 if bias else None
    w, ids = RT.moe_route(logits, k, scoring, renorm, b, n_group, topk_group, 2.5)
    rw, rids = R.moe_route(logits, k, scoring, renorm, b, n_group, topk_group, 2.5)
    assert ids.dtype == torch.int32 and torch.equal(ids, rids)
    assert torch.allclose(w, rw, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("t,h,e", [(1, 64, 16), (3, 100, 20), (5, 48, 7)])
def test_router_logits(t, h, e):
    """fp32 logits of a bf16 x against the float32 gate, as the reference; H and E not powers
    of two; a batch over ROUTER_ROWS_MAX takes the reference's path."""
    x, w = rnd(t, h, dtype=torch.bfloat16), rnd(e, h)
    got = RT.router_logits(x, w)
    assert got.dtype == torch.float32 and got.shape == (t, e)
    assert torch.allclose(got, R.router_logits(x, w), atol=1e-4, rtol=1e-5)
    big = rnd(RT.ROUTER_ROWS_MAX + 1, h, dtype=torch.bfloat16)
    assert torch.allclose(RT.router_logits(big, w), R.router_logits(big, w), atol=1e-4)


@pytest.mark.parametrize("h,e,res", [(96, 8, True), (100, 12, False), (4096, 64, True)])
def test_rms_norm_router_logits_one_token_in_one_launch(h, e, res):
    """One token: the norm inside the router kernel (H not a power of two, programs' slices
    ragged, one and several K tiles). Logits within float32 rounding of the reference (the
    normed row is not rounded to bf16 before the dot); the normed row the norm kernel's, the
    new residual exactly. More tokens: the norm kernel, then router_logits."""
    bf = torch.bfloat16
    x, g, w = rnd(1, h, dtype=bf), rnd(h, dtype=bf) + 1, rnd(e, h)
    r = rnd(1, h, dtype=bf) if res else None
    logits, normed, new_r = RT.rms_norm_router_logits(x, r, g, 1e-6, w)
    want = R.rms_norm_router_logits(x, r, g, 1e-6, w)
    assert rel_err(logits, want[0]) < 2e-2
    norm_kernel = E.fused_add_rms_norm(x, r, g, 1e-6) if res else (E.rms_norm(x, g, 1e-6), x)
    # the sum of squares in another order: the normed row may differ by an ulp on a GPU
    assert rel_err(normed, norm_kernel[0]) < 1e-2 and torch.equal(new_r, norm_kernel[1])
    assert (new_r is x) == (r is None)
    xs, rs = rnd(3, h, dtype=bf), rnd(3, h, dtype=bf)
    logits, normed, new_r = RT.rms_norm_router_logits(xs, rs, g, 1e-6, w)
    normed_apart, r_apart = E.fused_add_rms_norm(xs, rs, g, 1e-6)
    assert torch.equal(normed, normed_apart) and torch.equal(new_r, r_apart)
    assert torch.equal(logits, RT.router_logits(normed_apart, w))


def test_moe_route_rejects_bad_arguments():
    logits = rnd(2, 8)
    for args in [(9, "softmax", 1, 1), (2, "relu", 1, 1), (2, "softmax", 3, 1),
                 (2, "softmax", 2, 3), (3, "softmax", 4, 1), (1, "sigmoid", 8, 2)]:
        k, scoring, n_group, topk_group = args
        with pytest.raises(ValueError):
            RT.moe_route(logits, k, scoring, False, None, n_group, topk_group, 1.0)


@pytest.mark.parametrize("vocab", [7, 1500])
def test_apply_penalties_equals_the_reference(vocab):
    """Bit for bit, on rows of both signs, prompt and generated tokens, a row without penalties'
    state, penalties as a strided [R, 3] view (the engine's), and a one-column pool (the
    drafted entries of a verify step)."""
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(5, vocab, generator=g) * 4).to(DEV)
    seen = (torch.rand(3, vocab, generator=g) < 0.3).to(DEV)
    counts = torch.randint(0, 3, (3, vocab), generator=g, dtype=torch.int32).to(DEV)
    rows, slots = torch.tensor([4, 0, 2], device=DEV), torch.tensor([1, 2, 0], device=DEV)
    params = torch.tensor([[1.3, 0.5, 0.25], [0.8, -0.4, 1.5], [1.05, 0.0, 0.0]], device=DEV)
    want, got = logits.clone(), logits.clone()
    args = (rows, slots, seen, counts, params[:, 0], params[:, 1], params[:, 2])
    R.apply_penalties(want, *args)
    PN.apply_penalties(got, *args)
    assert torch.equal(got, want) and not torch.equal(got, logits)
    column = logits[rows, torch.tensor([0, 1, 2], device=DEV)].unsqueeze(1)     # [3, 1]
    one = torch.arange(3, device=DEV)
    pool = (seen[slots, :1].clone(), counts[slots, :1] + 1)
    want, got = column.clone(), column.clone()
    R.apply_penalties(want, one, one, *pool, params[:, 0], params[:, 1], params[:, 2])
    PN.apply_penalties(got, one, one, *pool, params[:, 0], params[:, 1], params[:, 2])
    assert torch.equal(got, want)


@pytest.mark.parametrize("verify", [False, True])
def test_count_tokens_equals_the_reference(verify):
    """The same counts as the reference: a plain step (place 0 counts, 1 does not) and a verify
    step whose chains share a slot, repeat a token and emit 0, 2 and 3 of their rows; more rows
    than one program takes."""
    g = torch.Generator().manual_seed(int(verify))
    counts = torch.randint(0, 3, (4, 50), generator=g, dtype=torch.int32).to(DEV)
    tokens = torch.tensor([7, 7, 7, 3, 9, 49, 0, 7] * 20, dtype=torch.int32, device=DEV)
    n = len(tokens)
    rows = torch.arange(n, device=DEV).flip(0)
    slots = torch.arange(n, device=DEV) % 3
    chains = torch.arange(n, device=DEV) % 3
    places = (torch.arange(n, device=DEV) // 3).int() if verify else \
        (torch.arange(n, device=DEV) % 2).int()
    accepted = torch.tensor([0, 2, 3], dtype=torch.int32, device=DEV) if verify else None
    want, got = counts.clone(), counts.clone()
    extra = (accepted, chains if verify else None)
    R.count_tokens(want, slots, rows, tokens, places, *extra)
    PN.count_tokens(got, slots, rows, tokens, places, *extra)
    assert torch.equal(got, want) and not torch.equal(got, counts)
    assert int((got - counts).sum()) == (5 if verify else n // 2)
