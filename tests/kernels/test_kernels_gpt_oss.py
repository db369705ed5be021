"""GPT-OSS's kernel options: attention with sinks and a sliding window, fused MoE with expert
biases, the clamped SwiGLU and interleaved gate/up rows, and on MXFP4 weights read packed.

The torch references are checked against float64 attention written here and against HF
transformers' GptOssExperts; the Triton kernels against the references (through Triton's
CPU interpreter without a GPU), on tiny shapes."""
import os

import pytest
import torch

from kernel_testutil import make_paged, rel_err
from kernels import ClampedSwiGLU
from kernels import mxfp4
from kernels import reference as R

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter's numpy exp overflows to inf inside sigmoid / silu of large negatives: exact
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


def sink_attention(q, keys, values, q_pos, scale, sinks, window):
    """float64, head by head: query m sees keys n with q_pos[m] - window < n <= q_pos[m]
    (window 0: all n <= q_pos[m]); head h's sink logit joins the denominator."""
    m_, hq, _ = q.shape
    g = hq // keys.shape[1]
    n = torch.arange(keys.shape[0])[None, :]
    pos = torch.tensor(q_pos)[:, None]
    hidden = (n > pos) | ((n <= pos - window) if window else torch.zeros_like(n > pos))
    out = torch.zeros(m_, hq, values.shape[-1], dtype=torch.float64)
    for h in range(hq):
        s = (q[:, h].double() @ keys[:, h // g].double().T * scale).masked_fill(hidden, -1e300)
        sink = torch.full((m_, 1), float(sinks[h]) if sinks is not None else -1e300,
                          dtype=torch.float64)
        p = torch.cat([s, sink], 1).softmax(1)[:, :-1]
        out[:, h] = p @ values[:, h // g].double()
    return out


def _paged(seq_lens, page_size, hk, d, dv, gen):
    table, num_pages = make_paged(seq_lens, page_size, gen=gen)
    kc = torch.randn(num_pages * page_size, hk, d, generator=gen)
    vc = torch.randn(num_pages * page_size, hk, dv, generator=gen)
    return table, kc, vc, torch.tensor(seq_lens, dtype=torch.int32)


def _row_keys(table, b, n, page_size, cache):
    slots = R.attention.gather_slots(table[b], n, page_size)
    return cache[slots]


@pytest.mark.parametrize("window", [0, 1, 6])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_reference_attention_with_sinks_and_window(window, with_sinks):
    gen = torch.Generator().manual_seed(window * 2 + with_sinks)
    seq_lens, qlens, page_size = [3, 20, 13], [3, 1, 9], 4
    table, kc, vc, sl = _paged(seq_lens, page_size, 2, 8, 8, gen)
    q = torch.randn(sum(qlens), 4, 8, generator=gen)
    sinks = torch.randn(4, generator=gen) * 2 if with_sinks else None
    qs = torch.tensor([0, 3, 4, 13], dtype=torch.int32)
    out = R.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.4, sinks=sinks,
                             window=window)
    for b, (n, ql) in enumerate(zip(seq_lens, qlens)):
        rows = slice(int(qs[b]), int(qs[b + 1]))
        want = sink_attention(q[rows], _row_keys(table, b, n, page_size, kc),
                              _row_keys(table, b, n, page_size, vc), list(range(n - ql, n)),
                              0.4, sinks, window)
        assert rel_err(out[rows], want) < 1e-6
    dec = R.decode_attention(q[[2, 3, 12]], kc, vc, table, sl, page_size, 0.4, sinks=sinks,
                             window=window)
    assert torch.allclose(dec, out[[2, 3, 12]], atol=1e-6)


def test_reference_window_never_reads_before_the_window():
    """Slots of positions before every query's window hold NaN: outputs stay finite."""
    gen = torch.Generator().manual_seed(5)
    seq_lens, page_size, window = [30, 17], 4, 5
    table, kc, vc, sl = _paged(seq_lens, page_size, 2, 8, 8, gen)
    clean = R.decode_attention(torch.ones(2, 4, 8), kc, vc, table, sl, page_size, 0.3,
                               window=window)
    for b, n in enumerate(seq_lens):
        old = R.attention.gather_slots(table[b], n - window, page_size)
        kc[old], vc[old] = float("nan"), float("nan")
    out = R.decode_attention(torch.ones(2, 4, 8), kc, vc, table, sl, page_size, 0.3,
                             window=window)
    assert torch.equal(out, clean)


def test_reference_experts_equal_transformers():
    """fused_moe with biases, the clamped SwiGLU and interleaved gate/up (HF's [E, H, 2I]
    tensors seen transposed) == transformers' GptOssExperts, routed by HF's router. The
    SwiGLU's alpha and limit are the experts' own (transformers 5.17 fixes them at 1.702 and
    7.0 whatever the config says; later versions read the config)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss import modeling_gpt_oss as hf

    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=6,
                                    num_experts_per_tok=3, swiglu_limit=1.5)
    experts, router = hf.GptOssExperts(cfg), hf.GptOssTopKRouter(cfg)
    for p in list(experts.parameters()) + list(router.parameters()):
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(11, 32)
    with torch.no_grad():
        _, scores, ids = router(x)
        want = experts(x, ids, scores)
        logits = torch.nn.functional.linear(x, router.weight, router.bias)
    weights, our_ids = R.moe_route(logits, 3, "softmax", True, None, 1, 1, 1.0)
    assert torch.equal(our_ids.long(), ids) and torch.allclose(weights, scores, atol=1e-6)
    with torch.no_grad():
        got = R.fused_moe(x, experts.gate_up_proj.transpose(1, 2),
                          experts.down_proj.transpose(1, 2), weights, our_ids,
                          experts.gate_up_proj_bias, experts.down_proj_bias,
                          ClampedSwiGLU(experts.alpha, experts.limit), interleaved=True)
    assert rel_err(got, want) < 1e-5


def _mxfp4_experts(gen, e, h, inter):
    """Random MXFP4 expert weights (codes, scales near 2^-2) and biases: w13 [E, 2I, H],
    w2 [E, H, I] as blocks + scales."""
    def packed(out, inn):
        return (torch.randint(0, 256, (e, out, inn // 32, 16), dtype=torch.uint8, generator=gen),
                torch.randint(122, 128, (e, out, inn // 32), dtype=torch.uint8, generator=gen))
    return (*packed(2 * inter, h), *packed(h, inter),
            torch.randn(e, 2 * inter, generator=gen), torch.randn(e, h, generator=gen))


def test_reference_mxfp4_experts_equal_dequantized_by_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(4)
    b13, s13, b2, s2, bias13, bias2 = _mxfp4_experts(gen, 4, 64, 32)
    x = torch.randn(7, 64, generator=gen)
    w, ids = R.moe_route(torch.randn(7, 4, generator=gen), 2, "softmax", True, None, 1, 1, 1.0)
    act = ClampedSwiGLU(1.702, 3.0)
    got = R.fused_moe_mxfp4(x, b13, s13, b2, s2, w, ids, bias13, bias2, act, True)
    gate_up = convert_moe_packed_tensors(b13, s13, dtype=torch.float32)           # [E, H, 2I]
    down = convert_moe_packed_tensors(b2, s2, dtype=torch.float32)                # [E, I, H]
    # The weights must match bit for bit; the outputs only to rounding, since a transposed view
    # and a contiguous copy may take different BLAS paths.
    assert torch.equal(mxfp4.dequantize(b13, s13, torch.float32), gate_up.transpose(1, 2))
    assert torch.equal(mxfp4.dequantize(b2, s2, torch.float32), down.transpose(1, 2))
    want = R.fused_moe(x, gate_up.transpose(1, 2), down.transpose(1, 2), w, ids, bias13, bias2,
                       act, interleaved=True)
    assert rel_err(got, want) < 1e-6


# --------------------------------------------------------------------------- Triton
triton_only = pytest.mark.skipif(DEV == "cpu" and not INTERPRETED,
                                 reason="no GPU and TRITON_INTERPRET unset")
TOL = 1e-4 if DEV == "cpu" else 2e-2


def _triton():
    pytest.importorskip("triton", reason="triton is not installed")
    from kernels.triton import attention_ops, moe
    return attention_ops, moe


@triton_only
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("window,splits", [(0, None), (0, 3), (6, None), (6, 3), (40, 2)])
def test_triton_decode_with_sinks_and_window(page_size, window, splits):
    A, _ = _triton()
    gen = torch.Generator().manual_seed(page_size + window)
    table, kc, vc, sl = (t.to(DEV) for t in _paged([1, 40, 77], page_size, 2, 16, 16, gen))
    q, sinks = rnd(3, 8, 16), rnd(8) * 2
    for b, n in enumerate([1, 40, 77]):   # slots before the window are never read
        old = R.attention.gather_slots(table[b], max(0, n - window), page_size) if window else []
        kc[old], vc[old] = float("nan"), float("nan")
    out = A.decode_attention(q, kc, vc, table, sl, page_size, 0.25, num_splits=splits,
                             sinks=sinks, window=window)
    ref = R.decode_attention(q, kc, vc, table, sl, page_size, 0.25, sinks=sinks, window=window)
    assert rel_err(out, ref) < TOL


@triton_only
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("new_kv", [False, True])
def test_triton_extend_with_sinks_and_window(window, new_kv):
    """Chunks over a cached prefix; given the new tokens' K/V a full layer takes the contiguous
    prefill kernel (kernels/triton/prefill.py), a window layer the gathering one."""
    A, _ = _triton()
    gen = torch.Generator().manual_seed(window + 10 * new_kv)
    seq_lens, qlens, page_size = [30, 9, 50], [30, 1, 17], 4
    table, kc, vc, sl = (t.to(DEV) for t in _paged(seq_lens, page_size, 2, 16, 16, gen))
    qs = torch.tensor([0, 30, 31, 48], dtype=torch.int32, device=DEV)
    q, sinks = rnd(48, 4, 16), rnd(4) * 2
    k_new = v_new = None
    if new_kv:   # the rows' new tokens, as the model hands them over
        slots = torch.cat([R.attention.gather_slots(table[b], n, page_size)[n - ql:]
                           for b, (n, ql) in enumerate(zip(seq_lens, qlens))])
        k_new, v_new = kc[slots].contiguous(), vc[slots].contiguous()
    out = A.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3, k_new=k_new,
                             v_new=v_new, sinks=sinks, window=window)
    ref = R.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3, sinks=sinks,
                             window=window)
    assert rel_err(out, ref) < TOL


@triton_only
@pytest.mark.parametrize("t,e,k", [(1, 8, 4), (9, 6, 3), (40, 4, 2)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_triton_fused_moe_gpt_oss_options(t, e, k, interleaved):
    """Biases, the clamped SwiGLU (limit low enough to clamp) and gate/up layouts, on HF's
    transposed [E, H, 2I] / [E, I, H] tensors; one block per pair (t=1) and aligned."""
    _, M = _triton()
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    h, inter = 32, 24
    x = rnd(t, h, dtype=dt)
    gate_up, down = rnd(e, h, 2 * inter, dtype=dt) * 0.5, rnd(e, inter, h, dtype=dt) * 0.5
    b13, b2 = rnd(e, 2 * inter, dtype=dt), rnd(e, h, dtype=dt)
    w, ids = R.moe_route(rnd(t, e), k, "softmax", True, None, 1, 1, 1.0)
    args = (x, gate_up.transpose(1, 2), down.transpose(1, 2), w, ids, b13, b2,
            ClampedSwiGLU(1.702, 1.5), interleaved)
    assert rel_err(M.fused_moe(*args), R.fused_moe(*args)) < TOL
    # the default path (no options) is untouched
    plain = (x, gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous(), w, ids)
    assert rel_err(M.fused_moe(*plain), R.fused_moe(*plain)) < TOL


@triton_only
@pytest.mark.parametrize("t,e,k", [(1, 4, 2), (9, 6, 3), (40, 4, 2)])
def test_triton_fused_moe_mxfp4(t, e, k):
    """The experts read packed (codes decoded in registers, one block per pair at t=1)."""
    _, M = _triton()
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(t)
    b13, s13, b2, s2, bias13, bias2 = (a.to(DEV) for a in _mxfp4_experts(gen, e, 64, 64))
    x = rnd(t, 64, dtype=dt)
    w, ids = R.moe_route(rnd(t, e), k, "softmax", True, None, 1, 1, 1.0)
    for biases in ((None, None), (bias13.to(dt), bias2.to(dt))):
        args = (x, b13, s13, b2, s2, w, ids, *biases, ClampedSwiGLU(1.702, 2.0), True)
        assert rel_err(M.fused_moe_mxfp4(*args), R.fused_moe_mxfp4(*args)) < TOL
