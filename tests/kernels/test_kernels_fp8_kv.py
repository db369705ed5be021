"""Every Triton kernel that writes or reads the paged KV cache against the torch reference
with an FP8 (e4m3) cache and per-layer scales (the format: test_kv_fp8_format.py).

Without a GPU the kernels run in the CPU interpreter (TRITON_INTERPRET=1), which loads float8
correctly but rounds into it wrongly (fp8_interpreter.py): these tests make the interpreter's
conversion torch's, which is what a GPU computes (`cvt.rn.satfinite`); scripts/gpu_fp8kv
checks the real conversion on an H200."""
import contextlib
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: Triton backend untested")

import kernels  # noqa: E402
from kernel_testutil import make_paged, rel_err  # noqa: E402
from kernels import reference as R  # noqa: E402
from kernels.reference.kv_cache import FP8_KV_DTYPE as F8  # noqa: E402
from kernels.reference.kv_cache import FP8_MAX, dequantize, quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET unset", allow_module_level=True)

import triton.language as tl  # noqa: E402
from fp8_interpreter import exact_fp8_rounding  # noqa: E402
from kernels.triton import attention_ops as A  # noqa: E402
from kernels.triton import rope_kv as RK  # noqa: E402
from kernels.triton.prefill import prefill_attention  # noqa: E402

TOL = 1e-4 if DEV == "cpu" else 2e-2   # both sides read the same e4m3 values: only the sums differ
K_SCALE, V_SCALE = 0.37, 0.11
# e4m3 keeps 3 mantissa bits: one step is 2^-3 of a normal value, 2^-9 below 2^-6
STEP, SUBNORMAL_STEP = 2.0 ** -3, 2.0 ** -9


@pytest.fixture(autouse=True)
def _gpu_rounding():
    with exact_fp8_rounding() if DEV == "cpu" else contextlib.nullcontext():
        yield


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


@triton.jit
def _cast(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, tl.load(X + i).to(Y.dtype.element_ty))


def test_interpreter_rounds_like_a_gpu():
    """The conversion the write tests rely on: nearest even, with the carry into the exponent
    (31.1 -> 32, 34 -> 32 (a tie), 36.5 -> 36)."""
    x = torch.linspace(-40, 40, 256, device=DEV)
    x[:3] = torch.tensor([31.1, 34.0, 36.5])
    y = torch.empty(256, dtype=F8, device=DEV)
    _cast[(1,)](x, y, N=256)
    assert torch.equal(_bytes(y), _bytes(x.to(F8)))


@pytest.mark.parametrize("is_neox", [True, False])
def test_store_kv_and_rope_store_kv_write_the_reference_bytes(is_neox):
    t, hq, hk, d, dv = 7, 4, 2, 16, 8
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(t, hq, d, generator=gen).to(DEV)
    k = (torch.randn(t, hk, d, generator=gen) * 200).to(DEV)     # some past 448 * K_SCALE
    v = torch.randn(t, hk, dv, generator=gen).to(DEV)
    slots = torch.randperm(3 * t, generator=gen)[:t].to(DEV)
    slots[2] = -1                                                  # padding: skipped
    caches = [torch.zeros(3 * t, hk, w, dtype=F8, device=DEV) for w in (d, dv, d, dv)]
    RK.store_kv(k, v, caches[0], caches[1], slots, K_SCALE, V_SCALE)
    R.store_kv(k, v, caches[2], caches[3], slots, K_SCALE, V_SCALE)
    assert torch.equal(_bytes(caches[0]), _bytes(caches[2]))
    assert torch.equal(_bytes(caches[1]), _bytes(caches[3]))
    assert caches[0].float().abs().max() == FP8_MAX                # saturated, not NaN

    cs = torch.randn(64, d, generator=gen).to(DEV)
    pos = torch.randint(0, 64, (t,), generator=gen).to(DEV)
    for c in caches:
        c.zero_()
    got = RK.rope_store_kv(q, k, v, pos, cs, d, is_neox, caches[0], caches[1], slots,
                           K_SCALE, V_SCALE)
    ref = R.rope_store_kv(q, k, v, pos, cs, d, is_neox, caches[2], caches[3], slots,
                          K_SCALE, V_SCALE)
    assert rel_err(got[0], ref[0]) < 1e-6 and rel_err(got[1], ref[1]) < 1e-6
    assert torch.equal(_bytes(caches[1]), _bytes(caches[3]))
    # k is rotated in float32 by both; the last-bit differences of the rotation may flip a
    # rounding: at most one e4m3 step apart
    a, b = dequantize(caches[0], K_SCALE), dequantize(caches[2], K_SCALE)
    assert ((a - b).abs() <= STEP * b.abs() + SUBNORMAL_STEP * K_SCALE).all()
    assert (a == b).float().mean() > 0.98


def _fp8_paged(seq_lens, page_size, hk, d, dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table, num_pages = make_paged(seq_lens, page_size, gen=gen)
    n = num_pages * page_size
    kc = quantize(torch.randn(n, hk, d, generator=gen) * 3, F8, K_SCALE).to(DEV)
    vc = quantize(torch.randn(n, hk, dv, generator=gen), F8, V_SCALE).to(DEV)
    return table.to(DEV), kc, vc, torch.tensor(seq_lens, dtype=torch.int32, device=DEV)


SCALES = dict(k_scale=K_SCALE, v_scale=V_SCALE)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("seq_lens,hq,hk,splits", [([1, 40, 77], 8, 2, None), ([100], 4, 4, 3),
                                                   ([340], 4, 2, 20)])
def test_decode_attention(page_size, seq_lens, hq, hk, splits):
    table, kc, vc, sl = _fp8_paged(seq_lens, page_size, hk, 16, 16)
    q = torch.randn(len(seq_lens), hq, 16, device=DEV)
    out = A.decode_attention(q, kc, vc, table, sl, page_size, 0.25, num_splits=splits, **SCALES)
    ref = R.decode_attention(q, kc, vc, table, sl, page_size, 0.25, **SCALES)
    assert rel_err(out, ref) < TOL


def test_bf16_queries_over_an_fp8_cache():
    """The model's case: bf16 queries, which the kernel turns to fp16 for the e4m3 tiles'
    cheaper conversion: decode and extend within bf16's rounding of the reference."""
    table, kc, vc, sl = _fp8_paged([50, 9], 4, 2, 16, 16)
    q = torch.randn(2, 8, 16, device=DEV).to(torch.bfloat16)
    out = A.decode_attention(q, kc, vc, table, sl, 4, 0.25, **SCALES)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), R.decode_attention(q.float(), kc, vc, table, sl, 4, 0.25,
                                                   **SCALES)) < 1e-2
    qs = torch.tensor([0, 3, 5], dtype=torch.int32, device=DEV)
    qe = torch.randn(5, 8, 16, device=DEV).to(torch.bfloat16)
    out = A.extend_attention(qe, kc, vc, table, qs, sl, 4, 0.25, **SCALES)
    assert rel_err(out.float(), R.extend_attention(qe.float(), kc, vc, table, qs, sl, 4, 0.25,
                                                   **SCALES)) < 1e-2


def test_decode_values_as_words_and_as_bytes():
    """gqa_decode reads e4m3 values of power-of-two width as 32-bit words unpacked in registers
    (paged_tiles.load_e4m3_words; a row's last tile masked), other widths byte by byte: both
    match the reference."""
    for dv in (32, 24):
        table, kc, vc, sl = _fp8_paged([45, 3], 4, 2, 16, dv, seed=5)
        q = torch.randn(2, 4, 16, device=DEV)
        out = A.decode_attention(q, kc, vc, table, sl, 4, 0.25, **SCALES)
        assert out.shape == (2, 4, dv)
        assert rel_err(out, R.decode_attention(q, kc, vc, table, sl, 4, 0.25, **SCALES)) < TOL


def test_values_read_as_words_need_aligned_rows():
    """A cache whose rows start off a 4-byte boundary is refused with an error that says so,
    not read as misaligned words."""
    table, kc, vc, sl = _fp8_paged([20], 4, 2, 16, 16)
    q = torch.randn(1, 4, 16, device=DEV)
    shifted = torch.empty(vc.numel() + 2, dtype=F8, device=DEV)[2:].view(vc.shape)
    shifted.copy_(vc)
    with pytest.raises(ValueError, match="4-byte boundaries"):
        A.decode_attention(q, kc, shifted, table, sl, 4, 0.25, **SCALES)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention_with_window_and_sinks(splits):
    """GPT-OSS's options on the same kernel with an FP8 cache."""
    table, kc, vc, sl = _fp8_paged([50, 9], 4, 2, 16, 16, seed=3)
    q = torch.randn(2, 4, 16, device=DEV)
    sinks = torch.randn(4, device=DEV)
    opts = dict(sinks=sinks, window=12, **SCALES)
    out = A.decode_attention(q, kc, vc, table, sl, 4, 0.25, num_splits=splits, **opts)
    assert rel_err(out, R.decode_attention(q, kc, vc, table, sl, 4, 0.25, **opts)) < TOL


def test_extend_values_as_words_and_as_bytes():
    """The generic kernel's extend reads e4m3 values byte by byte unless asked for words
    (`paged_attention(v_words=True)`, gpu_verify_attention.py's sweep): both the reference's."""
    from kernels.triton.attention import paged_attention
    seq_lens = [30, 9, 50]
    table, kc, vc, sl = _fp8_paged(seq_lens, 16, 2, 16, 32, seed=6)
    qs = torch.tensor([0, 30, 31, 48], dtype=torch.int32, device=DEV)
    q = torch.randn(48, 4, 16, device=DEV)
    ref = R.extend_attention(q, kc, vc, table, qs, sl, 16, 0.3, **SCALES)
    for words in (False, True):
        out = paged_attention(q, None, kc, None, vc, table, qs, sl, 16, 0.3, v_words=words,
                              **SCALES)
        assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("window", [0, 10])
def test_extend_attention_gathered(window):
    seq_lens, qlens = [30, 9, 50], [30, 1, 17]
    table, kc, vc, sl = _fp8_paged(seq_lens, 16, 2, 24, 32, seed=4)   # d 24: predicated loads
    qs = torch.tensor([0, 30, 31, 48], dtype=torch.int32, device=DEV)
    q = torch.randn(48, 4, 24, device=DEV)
    out = A.extend_attention(q, kc, vc, table, qs, sl, 16, 0.3, window=window, **SCALES)
    ref = R.extend_attention(q, kc, vc, table, qs, sl, 16, 0.3, window=window, **SCALES)
    assert rel_err(out, ref) < TOL


def test_prefill_reads_the_fp8_prefix_and_the_new_tokens_unquantized():
    """kernels/triton/prefill.py: the cached prefix from the FP8 cache (scaled), the new tokens
    from the layer's K/V as they are. With k_new / v_new equal to the dequantized cache rows the
    reference over the cache is exact; with the unquantized K/V the output moves only by
    e4m3's error."""
    seq_lens, qlens, page_size, hq, hk, d = [40, 19], [24, 19], 16, 4, 2, 16
    table, kc, vc, sl = _fp8_paged(seq_lens, page_size, hk, d, d, seed=5)
    rows = [int(table[b, p // page_size]) * page_size + p % page_size
            for b, (n, m) in enumerate(zip(seq_lens, qlens)) for p in range(n - m, n)]
    slots = torch.tensor(rows, device=DEV)
    k_new, v_new = dequantize(kc[slots], K_SCALE), dequantize(vc[slots], V_SCALE)
    qs = torch.tensor([0, 24, 43], dtype=torch.int32, device=DEV)
    q = torch.randn(43, hq, d, device=DEV)
    ref = R.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3, **SCALES)
    out = prefill_attention(q, kc, vc, k_new, v_new, table, qs, sl, page_size, 0.3, **SCALES)
    assert rel_err(out, ref) < TOL
    assert A.use_contiguous(q, k_new, v_new, table, page_size)     # the op takes this kernel
    jitter = 1 + STEP / 2 * (2 * torch.rand(k_new.shape, device=DEV) - 1)
    out = prefill_attention(q, kc, vc, k_new * jitter, v_new * jitter, table, qs, sl,
                            page_size, 0.3, **SCALES)
    assert 0 < rel_err(out, ref) < 0.1


def test_registry_keeps_fp8_caches_from_kernels_that_cannot_read_them():
    """GQA kernels and the cache writers take an FP8 cache; MLA's do not (the torch reference
    serves, and the model refuses kv.dtype fp8 for MLA layers); any cache of the model's dtype
    is the default."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    for op in ("decode_attention", "extend_attention", "store_kv", "rope_store_kv"):
        assert kernels.selected_backend(op, kv_dtype=F8, **bf16) == "triton", op
    for op in ("mla_decode", "mla_extend"):
        assert kernels.selected_backend(op, **bf16) == "triton"
        assert kernels.selected_backend(op, kv_dtype=torch.bfloat16, **bf16) == "triton"
        assert kernels.selected_backend(op, kv_dtype=F8, **bf16) == "torch"
    assert kernels.selected_backend("decode_attention", kv_dtype=torch.float16,
                                    **bf16) == "torch"              # a cache of another dtype
