"""add_rms_norm_linear: the Triton one-row kernel (the norm inside the GEMV) against the
reference, and the Llama layer's one-token path that uses it against the layer's plain path."""
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: Triton backend untested")

from kernels import reference as R  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET unset", allow_module_level=True)

from kernels.triton import gemv as G  # noqa: E402


@pytest.mark.parametrize("n,k,residual,bias,silu", [
    (40, 64, True, False, False), (37, 100, True, True, False), (16, 256, False, False, False),
    (40, 64, True, False, True), (74, 100, False, True, True)])
def test_one_row_kernel_matches_the_reference(n, k, residual, bias, silu):
    """The residual sum comes back exactly (rounded to x's dtype); the product (and with silu,
    silu(gate) * up of its two halves) within float32 rounding; tiles that do not divide N or
    K."""
    gen = torch.Generator().manual_seed(n + k)
    x, g, w = (torch.randn(*s, generator=gen).to(DEV) for s in ((1, k), (k,), (n, k)))
    r = torch.randn(1, k, generator=gen).to(DEV) if residual else None
    b = torch.randn(n, generator=gen).to(DEV) if bias else None
    want_y, want_s = R.add_rms_norm_linear(x, r, g, 1e-6, w, b, silu)
    y, s = G.norm_gemv(x, r, g, 1e-6, w, b, silu,
                       G.GemvConfig(block_n=8, block_k=32, num_warps=4))
    assert y.shape == (1, n // 2 if silu else n)
    assert torch.equal(s, want_s)
    assert torch.allclose(y, want_y, rtol=1e-4, atol=1e-4)
    # more rows: the norm kernel, then linear
    x3 = torch.randn(3, k, generator=gen).to(DEV)
    y3, s3 = G.add_rms_norm_linear(x3, None, g, 1e-6, w, b, silu)
    assert torch.equal(s3, x3)
    assert torch.allclose(y3, R.add_rms_norm_linear(x3, None, g, 1e-6, w, b, silu)[0],
                          rtol=1e-4, atol=1e-4)


def _step(runner, ids: list[int], start: int, pages: torch.Tensor):
    """One row of len(ids) new tokens at positions start.. over one sequence's pages."""
    from appliance.model import ForwardBatch
    t, page, dev = len(ids), runner.page_size, runner.device
    pos = torch.arange(start, start + t, dtype=torch.int32, device=dev)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
    return runner.forward(ForwardBatch(
        input_ids=i32(ids), positions=pos, query_start=i32([0, t]), prefix_lens=i32([start]),
        seq_lens=i32([start + t]), page_table=pages.view(1, -1),
        slot_mapping=(pages[(pos // page).long()] * page + pos % page).to(torch.int32),
        num_decode=1 if t == 1 else 0))


def test_llama_one_token_steps_with_fused_norms_match_the_plain_layers():
    """A tiny Llama decoding one token a step: with every decoder layer's norms run inside
    qkv_proj and gate_up_proj (+ its activation; the Triton op, as on one GPU) the logits
    match the plain layers' and the greedy tokens are the same; the fused path really ran."""
    from appliance.model import ModelRunner, ModelSource
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32   # what the GPU fuses
    runner = ModelRunner(ModelSource(preset="tiny-llama", load_format="dummy"), device=DEV,
                         dtype=dtype, kv_num_pages=8, page_size=16)
    layers = runner.model.model.layers
    # plain norms on the CPU; on one GPU the layers are built with the fusion
    assert all((layer.norm_linear is not None) == (DEV == "cuda") for layer in layers)
    calls = []

    def fused(*args, **kwargs):
        calls.append((args[0].shape[0], kwargs.get("silu_and_mul", False)))
        return G.add_rms_norm_linear(*args, **kwargs)

    pages = torch.arange(4, dtype=torch.int32, device=runner.device)
    runs = []
    for norm_linear in (None, fused):
        for layer in layers:
            layer.norm_linear = norm_linear
        logits = _step(runner, [5, 9, 33, 7, 100], 0, pages)
        tokens, rows = [int(logits[-1].argmax())], []
        for i in range(6):
            row = _step(runner, [tokens[-1]], 5 + i, pages)[-1]
            rows.append(row)
            tokens.append(int(row.argmax()))
        runs.append((tokens, torch.stack(rows)))
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    assert torch.allclose(runs[0][1].float(), runs[1][1].float(), rtol=tol, atol=tol)
    if dtype == torch.float32:   # bf16 may flip a near tie
        assert runs[0][0] == runs[1][0]
    # each layer: the input norm into qkv_proj, the post-attention norm into gate_up + SiLU
    assert calls == [(1, False), (1, True)] * 6 * len(layers)
