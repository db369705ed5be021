"""Benchmark the Triton kernels at real model shapes against same-run ceilings.

For every case: check the Triton op against the torch reference first (relative error), then
time it as a CUDA-graph replay with the L2 flushed before each call (and eagerly, do_bench
median) and print achieved GB/s or TFLOP/s beside the ceilings measured in this run (a large
device-to-device copy; a bf16 8192^3 GEMM), plus the torch reference / torch SDPA / per-expert
torch loop where they apply.

    PYTHONPATH=. python3 scripts/bench_kernels.py [--out DIR] [--only decode,moe,...] [--quick]
    ... --tune | --tune-mla | --tune-stages | --tune-moe | --tune-splits   (sweeps; see each)

Shapes: Llama-3.1-8B (32 q heads, 8 kv heads, head_dim 128, hidden 4096, intermediate 14336,
vocab 128256) and DeepSeek-V2-Lite (16 heads, kv_lora_rank 512, rope 64, 64 experts top-6,
hidden 2048, moe_intermediate 1408). Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels  # noqa: E402
from kernels import reference as R  # noqa: E402
from kernels.triton import attention as TA_attention  # noqa: E402
from kernels.triton import attention_ops as TA  # noqa: E402
from kernels.triton import elementwise as TE  # noqa: E402
from kernels.triton import moe as TM  # noqa: E402
from kernels.triton import rope_kv as TR  # noqa: E402
from kernels.triton import route as TRT  # noqa: E402
from kernels.triton import sample as TS  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
TOL = 2e-2  # bf16 operands


@dataclass
class Row:
    kernel: str
    shape: str
    ms: float
    unit: str                      # "GB/s" or "TFLOP/s"
    value: float
    pct: float                     # of the same-run ceiling for that unit
    err: float | None = None       # relative error vs the torch reference (None: not checked)
    baselines: dict = field(default_factory=dict)   # name -> ms
    note: str = ""


CEIL: dict[str, float] = {}
ROWS: list[Row] = []


def bench_ms(fn: Callable[[], object], rep: int = 60) -> float:
    """Median ms of eager calls (CPU launch cost included when the GPU waits for it)."""
    return float(triton.testing.do_bench(fn, warmup=15, rep=rep, return_mode="median"))


_FLUSH: list[torch.Tensor] = []


def graph_ms(fn: Callable[[], object], n: int = 10, replays: int = 7, captures: int = 2
             ) -> float:
    """Median ms of fn as a CUDA graph replay, the L2 flushed before each call: graph of n x
    (flush, fn) minus graph of n x flush, over n; the best of `captures` captures (a capture
    right after the torch reference freed its large temporaries replayed 25% slower, steadily,
    than the next one: H100, MLA decode B=1 x 128K, 93 vs 74 us). Falls back to bench_ms if
    capture fails."""
    return min(_graph_ms_once(fn, n, replays) for _ in range(captures))


def _graph_ms_once(fn: Callable[[], object], n: int, replays: int) -> float:
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device=DEV))   # > L2
    flush = _FLUSH[0]
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        g_fn, g_flush = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_fn):
            for _ in range(n):
                flush.zero_()
                fn()
        with torch.cuda.graph(g_flush):
            for _ in range(n):
                flush.zero_()
    except Exception as e:  # noqa: BLE001 - e.g. an op that syncs with the host
        print(f"  (graph capture failed, eager timing: {type(e).__name__})")
        return bench_ms(fn)
    return max(_replay_ms(g_fn, replays) - _replay_ms(g_flush, replays), 1e-6) / n


def _replay_ms(g: "torch.cuda.CUDAGraph", replays: int) -> float:
    times = []
    for _ in range(replays + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times = sorted(times[1:])
    return times[len(times) // 2]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def emit(kernel: str, shape: str, ms: float, *, nbytes: float = 0.0, flops: float = 0.0,
         err: float | None = None, **baselines: float | None) -> None:
    if flops:
        unit, value = "TFLOP/s", flops / ms / 1e9
    else:
        unit, value = "GB/s", nbytes / ms / 1e6
    pct = 100.0 * value / CEIL["TFLOP/s" if flops else "GB/s"]
    row = Row(kernel, shape, ms, unit, value, pct, err,
              {k: v for k, v in baselines.items() if v is not None})
    ROWS.append(row)
    base = " ".join(f"{k}={v * 1e3:.1f}us" for k, v in row.baselines.items())
    e = "unchecked" if err is None else f"err={err:.1e}" + ("" if err < TOL else " FAIL")
    print(f"{kernel:20s} {shape:28s} {ms * 1e3:10.1f}us {value:8.1f} {unit:7s} "
          f"{pct:5.1f}%  {e:14s} {base}", flush=True)


def measure_ceilings(trials: int = 3) -> None:
    """Copy bandwidth and bf16 GEMM rate, the best of `trials` timings each: clocks vary
    between runs (the GEMM measured 701-797 TFLOP/s on one H100 within an hour), and the
    best is the conservative ceiling for the percentages."""
    src = torch.randn(1 << 30, dtype=BF16, device=DEV)                  # 2 GiB
    dst = torch.empty_like(src)
    ms = min(bench_ms(lambda: dst.copy_(src)) for _ in range(trials))
    CEIL["GB/s"] = 2 * src.numel() * 2 / ms / 1e6
    del src, dst
    a = torch.randn(8192, 8192, dtype=BF16, device=DEV)
    b = torch.randn(8192, 8192, dtype=BF16, device=DEV)
    ms = min(bench_ms(lambda: a @ b) for _ in range(trials))
    CEIL["TFLOP/s"] = 2 * 8192 ** 3 / ms / 1e9
    del a, b
    torch.cuda.empty_cache()
    print(f"ceilings: copy {CEIL['GB/s']:.0f} GB/s (read+write), bf16 GEMM 8192^3 "
          f"{CEIL['TFLOP/s']:.0f} TFLOP/s", flush=True)


# ----------------------------------------------------------------------------- paged caches

def paged_table(batch: int, ctx: int, page_size: int) -> tuple[torch.Tensor, int]:
    """Each row gets its own pages in a random order: [B, P] int32, num_pages."""
    per = triton.cdiv(ctx, page_size)
    num_pages = batch * per + 1
    perm = torch.randperm(num_pages, device=DEV)[: batch * per].to(torch.int32)
    return perm.view(batch, per).contiguous(), num_pages


def gather_contig(cache: torch.Tensor, table: torch.Tensor, ctx: int, page_size: int
                  ) -> torch.Tensor:
    """cache [S, H, D] -> contiguous [B, H, ctx, D] (the SDPA baseline's layout)."""
    n = torch.arange(ctx, device=DEV)
    slots = table.long()[:, n // page_size] * page_size + n % page_size        # [B, ctx]
    return cache[slots].transpose(1, 2).contiguous()


def sdpa_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> float | None:
    """Flash SDPA on contiguous [B, H, L, D] tensors, GQA through enable_gqa."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal,  # noqa: E731
                                                        enable_gqa=True)
            fn()
            return graph_ms(fn)
    except Exception as e:  # noqa: BLE001 - a baseline that does not run is just absent
        print(f"  (sdpa unavailable: {type(e).__name__}: {str(e)[:80]})")
        return None


# ----------------------------------------------------------------------------- attention

def gqa_inputs(batch: int, ctx: int, page_size: int, hq: int = 32, hk: int = 8, d: int = 128,
               table_ctx: int | None = None):
    """Paged GQA decode inputs (Llama-3.1-8B heads by default): table, k/v caches, q,
    seq_lens (all ctx). table_ctx: page-table width in tokens when wider than ctx (CUDA
    graphs pad tables to the longest servable sequence)."""
    table, num_pages = paged_table(batch, max(ctx, table_ctx or 0), page_size)
    kc = torch.randn(num_pages * page_size, hk, d, dtype=BF16, device=DEV)
    vc = torch.randn_like(kc)
    q = torch.randn(batch, hq, d, dtype=BF16, device=DEV)
    sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    return table, kc, vc, q, sl


def case_decode(batch: int, ctx: int, page_size: int = 16, hq: int = 32, hk: int = 8,
                d: int = 128, table_ctx: int | None = None) -> None:
    """table_ctx as gqa_inputs'."""
    table, kc, vc, q, sl = gqa_inputs(batch, ctx, page_size, hq, hk, d, table_ctx)
    scale = d ** -0.5
    fn = lambda: TA.decode_attention(q, kc, vc, table, sl, page_size, scale)  # noqa: E731
    ref_fn = lambda: R.decode_attention(q, kc, vc, table, sl, page_size, scale)  # noqa: E731
    err = rel_err(fn(), ref_fn()) if batch * ctx <= (1 << 20) else None
    ms, eager = graph_ms(fn), bench_ms(fn)
    ref = bench_ms(ref_fn, rep=20) if batch * ctx <= (1 << 17) else None
    kcont = gather_contig(kc, table, ctx, page_size)
    vcont = gather_contig(vc, table, ctx, page_size)
    sd = sdpa_ms(q[:, :, None, :], kcont, vcont, causal=False)
    del kcont, vcont
    nbytes = 2 * batch * ctx * hk * d * 2 + 2 * q.numel() * 2
    emit("decode_attention", f"B={batch} ctx={ctx} ps={page_size}"
         + (f" table={table_ctx}" if table_ctx else ""), ms, eager=eager,
         nbytes=nbytes, err=err,
         torch_ref=ref, sdpa=sd)


def causal_flops(qlen: int, seq: int, heads: int, dqk: int, dv: int) -> float:
    """Exact FLOPs of causal attention for qlen queries that end a seq-long sequence."""
    visible = qlen * (seq - qlen) + qlen * (qlen + 1) / 2
    return 2.0 * heads * visible * (dqk + dv)


def new_token_kv(cache: torch.Tensor, table: torch.Tensor, seq: int, qlen: int,
                 page_size: int) -> torch.Tensor:
    """The cache rows of positions [seq - qlen, seq) of row 0: the K (or V) of an extend
    step's new tokens as the model hands them over, [qlen, H, D] contiguous."""
    n = torch.arange(seq - qlen, seq, device=DEV)
    return cache[table[0].long()[n // page_size] * page_size + n % page_size].contiguous()


def unsplit_extend(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """fn with extend launches never split over their keys (the sizing before split-KV
    extend): the same-run baseline of the `unsplit` columns."""
    def run() -> torch.Tensor:
        keep, TA_attention.EXTEND_WAVE = TA_attention.EXTEND_WAVE, 0.0
        try:
            return fn()
        finally:
            TA_attention.EXTEND_WAVE = keep
    return run


def case_extend(seq: int, qlen: int, page_size: int = 16, hq: int = 32, hk: int = 8,
                d: int = 128, check: bool = True) -> None:
    """The op as the model calls it: given the new tokens' K/V (kernels/triton/prefill.py
    reads them contiguously); `gathered` is the same op without them (every key through the
    page table, the generic kernel)."""
    table, num_pages = paged_table(1, seq, page_size)
    kc = torch.randn(num_pages * page_size, hk, d, dtype=BF16, device=DEV)
    vc = torch.randn_like(kc)
    k_new, v_new = (new_token_kv(c, table, seq, qlen, page_size) for c in (kc, vc))
    q = torch.randn(qlen, hq, d, dtype=BF16, device=DEV)
    qs = torch.tensor([0, qlen], dtype=torch.int32, device=DEV)
    sl = torch.tensor([seq], dtype=torch.int32, device=DEV)
    scale = d ** -0.5
    fn = lambda: TA.extend_attention(q, kc, vc, table, qs, sl, page_size, scale,  # noqa: E731
                                     k_new=k_new, v_new=v_new)
    gathered = lambda: TA.extend_attention(q, kc, vc, table, qs, sl, page_size,  # noqa: E731
                                           scale)
    err = None
    if check:
        err = rel_err(fn(), R.extend_attention(q, kc, vc, table, qs, sl, page_size, scale))
    torch.cuda.empty_cache()
    ms, eager, gathered_ms = graph_ms(fn), bench_ms(fn), graph_ms(gathered)
    unsplit = graph_ms(unsplit_extend(gathered)) if qlen < seq else None
    sd = None
    if qlen == seq:
        kcont = gather_contig(kc, table, seq, page_size)
        vcont = gather_contig(vc, table, seq, page_size)
        sd = sdpa_ms(q.transpose(0, 1)[None], kcont, vcont, causal=True)
        del kcont, vcont
    emit("extend_attention", f"q={qlen} kv={seq} ps={page_size}", ms, eager=eager,
         flops=causal_flops(qlen, seq, hq, d, d), err=err, gathered=gathered_ms,
         gathered_unsplit=unsplit, sdpa=sd)


def mla_inputs(batch: int, ctx: int, page_size: int, heads: int, lat: int = 512,
               rope: int = 64, tokens: int | None = None, table_ctx: int | None = None):
    table, num_pages = paged_table(batch, max(ctx, table_ctx or 0), page_size)
    cache = torch.randn(num_pages * page_size, lat + rope, dtype=BF16, device=DEV)
    t = tokens if tokens is not None else batch
    ql = torch.randn(t, heads, lat, dtype=BF16, device=DEV)
    qr = torch.randn(t, heads, rope, dtype=BF16, device=DEV)
    sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    return table, cache, ql, qr, sl


def case_mla_decode(batch: int, ctx: int, page_size: int = 64, heads: int = 16,
                    table_ctx: int | None = None) -> None:
    """page_size 64: configs/deepseek-v2-lite.yaml's; table_ctx as case_decode's."""
    table, cache, ql, qr, sl = mla_inputs(batch, ctx, page_size, heads, table_ctx=table_ctx)
    scale = (128 + 64) ** -0.5
    fn = lambda: TA.mla_decode(ql, qr, cache, table, sl, page_size, scale)  # noqa: E731
    ref_fn = lambda: R.mla_decode(ql, qr, cache, table, sl, page_size, scale)  # noqa: E731
    err = rel_err(fn(), ref_fn()) if batch * ctx <= (1 << 20) else None
    ms, eager = graph_ms(fn), bench_ms(fn)
    ref = bench_ms(ref_fn, rep=20) if batch * ctx <= (1 << 17) else None
    nbytes = batch * ctx * 576 * 2 + (ql.numel() + qr.numel() + ql.numel()) * 2
    emit("mla_decode", f"B={batch} ctx={ctx} H={heads} ps={page_size}"
         + (f" table={table_ctx}" if table_ctx else ""), ms, eager=eager,
         nbytes=nbytes,
         err=err, torch_ref=ref)


def case_mla_prefill(qlen: int, seq: int, heads: int = 16, page_size: int = 64) -> None:
    """DeepSeek-V2-Lite prefill attention of one row (qlen new tokens, seq keys) both ways,
    from the compressed cache to [qlen, H, Dv]: decompressed (the keys' slots, their gather,
    kv_b_proj's GEMM to per-head keys and values, then `mla_prefill`) against `absorbed` (W_UK
    into the query, `mla_extend` over the latent, W_UV out). TFLOP/s counts mla_prefill's
    attention alone; the time is the whole path."""
    from appliance.model.layers.mla import key_slots
    lat, rope, dn, dv = 512, 64, 128, 128
    table, cache, ql, qr, sl = mla_inputs(1, seq, page_size, heads, tokens=qlen)
    q_nope = torch.randn(qlen, heads, dn, dtype=BF16, device=DEV)
    w_kvb = torch.randn(heads * (dn + dv), lat, dtype=BF16, device=DEV) * lat ** -0.5
    w_uk = w_kvb.view(heads, dn + dv, lat)[:, :dn]
    w_uv = w_kvb.view(heads, dn + dv, lat)[:, dn:]
    qs = torch.tensor([0, qlen], dtype=torch.int32, device=DEV)
    scale = (dn + rope) ** -0.5

    def decompressed() -> torch.Tensor:
        kv = cache[key_slots(table, sl, seq, page_size)]                       # [N, L+R]
        kvb = (kv[:, :lat] @ w_kvb.T).view(seq, heads, dn + dv)                # [N, H, Dn+Dv]
        return TA.mla_prefill(q_nope, qr, kvb[..., :dn], kv[:, lat:], kvb[..., dn:], qs, sl,
                              scale)

    def absorbed() -> torch.Tensor:
        q_lat = torch.einsum("thd,hdl->thl", q_nope, w_uk)
        o = TA.mla_extend(q_lat, qr, cache, table, qs, sl, page_size, scale)
        return torch.einsum("thl,hvl->thv", o, w_uv)

    err = rel_err(decompressed(), absorbed())
    torch.cuda.empty_cache()
    ms, absorbed_ms = graph_ms(decompressed), graph_ms(absorbed)
    emit("mla_prefill", f"q={qlen} kv={seq} H={heads} ps={page_size}", ms,
         flops=causal_flops(qlen, seq, heads, dn + rope, dv), err=err, absorbed=absorbed_ms,
         unsplit=graph_ms(unsplit_extend(decompressed)))


def case_mla_extend(seq: int, heads: int = 16, page_size: int = 16, check: bool = True) -> None:
    table, cache, ql, qr, sl = mla_inputs(1, seq, page_size, heads, tokens=seq)
    qs = torch.tensor([0, seq], dtype=torch.int32, device=DEV)
    scale = (128 + 64) ** -0.5
    fn = lambda: TA.mla_extend(ql, qr, cache, table, qs, sl, page_size, scale)  # noqa: E731
    err = None
    if check:
        err = rel_err(fn(), R.mla_extend(ql, qr, cache, table, qs, sl, page_size, scale))
    torch.cuda.empty_cache()
    ms, eager = graph_ms(fn), bench_ms(fn)
    emit("mla_extend", f"q=kv={seq} H={heads}", ms, eager=eager,
         flops=causal_flops(seq, seq, heads, 576, 512),
         err=err)


# ----------------------------------------------------------------------------- MoE

def torch_loop_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                   ids: torch.Tensor) -> torch.Tensor:
    """The usual eager baseline: one bf16 GEMM pair per expert that received tokens."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    inter = w2.shape[2]
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)                       # [n]
        h = x[tok] @ w13[e].t()                                              # [n, 2I]
        y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].t()               # [n, H]
        out.index_add_(0, tok, y.float() * weights[tok, slot][:, None])
    return out.to(x.dtype)


def case_moe(tokens: int, experts: int = 64, top_k: int = 6, hidden: int = 2048,
             inter: int = 1408, w: tuple | None = None) -> None:
    w13, w2 = w
    x = torch.randn(tokens, hidden, dtype=BF16, device=DEV)
    logits = torch.randn(tokens, experts, device=DEV)
    weights, ids = R.moe_route(logits, top_k, "softmax", False, None, 1, 1, 1.0)
    fn = lambda: TM.fused_moe(x, w13, w2, weights, ids)  # noqa: E731
    err = rel_err(fn(), R.fused_moe(x, w13, w2, weights, ids)) if tokens <= 1024 else None
    ms, eager = graph_ms(fn), bench_ms(fn)
    loop = bench_ms(lambda: torch_loop_moe(x, w13, w2, weights, ids), rep=40)
    flops = 6.0 * tokens * top_k * inter * hidden
    used = int(ids.unique().numel())
    nbytes = used * 3 * inter * hidden * 2 + tokens * hidden * 4
    emit("fused_moe", f"T={tokens} E={experts} k={top_k}", ms, eager=eager, flops=flops, err=err,
         torch_loop=loop)
    gbs = nbytes / ms / 1e6
    pct = 100 * gbs / CEIL["GB/s"]
    ROWS[-1].note = f"weights {gbs:.0f} GB/s = {pct:.0f}% copy ({used} experts)"
    print(f"  {'':19s} {ROWS[-1].note}")


def case_moe_route(tokens: int, experts: int = 64, top_k: int = 6) -> None:
    """DeepSeek-V2-Lite routing (softmax, top-6 of 64); err = fraction of ids that differ.
    The baseline is the torch reference as a graph too: both run inside the decode graph."""
    logits = torch.randn(tokens, experts, device=DEV) * 2
    args = (top_k, "softmax", False, None, 1, 1, 1.0)
    fn = lambda: TRT.moe_route(logits, *args)  # noqa: E731
    ref_fn = lambda: R.moe_route(logits, *args)  # noqa: E731
    err = float((fn()[1] != ref_fn()[1]).float().mean())
    emit("moe_route", f"T={tokens} E={experts} k={top_k}", graph_ms(fn), eager=bench_ms(fn),
         nbytes=logits.numel() * 4, err=err, torch_ref_graph=graph_ms(ref_fn))


def case_router_logits(tokens: int, experts: int = 64, hidden: int = 2048) -> None:
    """DeepSeek-V2-Lite's gate: bf16 x [T, 2048] against the float32 [64, 2048] weight. The
    baseline is the torch reference (cast + cuBLAS fp32) as a graph too."""
    x = torch.randn(tokens, hidden, dtype=BF16, device=DEV)
    w = torch.randn(experts, hidden, device=DEV) * 0.02
    fn = lambda: TRT.router_logits(x, w)  # noqa: E731
    ref_fn = lambda: R.router_logits(x, w)  # noqa: E731
    emit("router_logits", f"T={tokens} E={experts} H={hidden}", graph_ms(fn),
         eager=bench_ms(fn), nbytes=w.numel() * 4 + x.numel() * 2, err=rel_err(fn(), ref_fn()),
         torch_ref_graph=graph_ms(ref_fn))


# ----------------------------------------------------------------------------- small ops

def case_norm(tokens: int, hidden: int = 4096) -> None:
    x = torch.randn(tokens, hidden, dtype=BF16, device=DEV)
    r = torch.randn_like(x)
    w = torch.randn(hidden, dtype=BF16, device=DEV)
    fn = lambda: TE.fused_add_rms_norm(x, r, w, 1e-6)  # noqa: E731
    ref_fn = lambda: R.fused_add_rms_norm(x, r, w, 1e-6)  # noqa: E731
    err = rel_err(fn()[0], ref_fn()[0])
    ms, eager = graph_ms(fn), bench_ms(fn)
    emit("fused_add_rms_norm", f"T={tokens} H={hidden}", ms, eager=eager,
         nbytes=4 * x.numel() * 2, err=err,
         torch_ref=bench_ms(ref_fn))


def case_silu(tokens: int, inter: int = 14336) -> None:
    x = torch.randn(tokens, 2 * inter, dtype=BF16, device=DEV)
    fn = lambda: TE.silu_and_mul(x)  # noqa: E731
    err = rel_err(fn(), R.silu_and_mul(x))
    ms, eager = graph_ms(fn), bench_ms(fn)
    emit("silu_and_mul", f"T={tokens} I={inter}", ms, eager=eager,
         nbytes=1.5 * x.numel() * 2, err=err,
         torch_ref=bench_ms(lambda: R.silu_and_mul(x)))


def case_rope_kv(tokens: int, hq: int = 32, hk: int = 8, d: int = 128) -> None:
    q = torch.randn(tokens, hq, d, dtype=BF16, device=DEV)
    k = torch.randn(tokens, hk, d, dtype=BF16, device=DEV)
    v = torch.randn_like(k)
    inv = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=DEV).float() / d)
    ang = torch.arange(131072, device=DEV).float()[:, None] * inv[None]
    cs = torch.cat([ang.cos(), ang.sin()], 1)
    pos = torch.randint(0, 131072, (tokens,), device=DEV)
    kc = torch.zeros(tokens * 2, hk, d, dtype=BF16, device=DEV)
    vc, kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(kc), torch.zeros_like(kc)
    slots = torch.randperm(tokens * 2, device=DEV)[:tokens]
    fn = lambda: TR.rope_store_kv(q, k, v, pos, cs, d, True, kc, vc, slots)  # noqa: E731
    ref_fn = lambda: R.rope_store_kv(q, k, v, pos, cs, d, True, kc2, vc2, slots)  # noqa: E731
    got, ref = fn(), ref_fn()
    err = max(rel_err(got[0], ref[0]), rel_err(kc, kc2), rel_err(vc, vc2))
    ms, eager = graph_ms(fn), bench_ms(fn)
    nbytes = 2 * q.numel() * 2 + 3 * k.numel() * 2 + 2 * v.numel() * 2
    emit("rope_store_kv", f"T={tokens} Hq={hq} Hk={hk} D={d}", ms, eager=eager,
         nbytes=nbytes, err=err,
         torch_ref=bench_ms(ref_fn))


def sample_logits(batch: int, vocab: int, peaked: bool) -> torch.Tensor:
    """N(0, 16) logits; peaked: 8 random tokens per row lifted by 16 (the top 128 then hold
    nearly all the mass, as in most LLM steps; at N(0, 16) alone they often do not)."""
    logits = torch.randn(batch, vocab, device=DEV) * 4
    if peaked:
        lift = torch.rand(batch, vocab, device=DEV).topk(8, 1).indices
        logits.scatter_add_(1, lift, torch.full(lift.shape, 16.0, device=DEV))
    return logits


def case_sample(batch: int, mode: str, vocab: int = 128256) -> None:
    """mode: greedy, plain, topkK_topP, topP (top-p alone); a _peaked suffix: peaked logits."""
    logits = sample_logits(batch, vocab, mode.endswith("_peaked"))
    name, mode = mode, mode.removesuffix("_peaked")
    greedy, k_on, p_on = mode == "greedy", mode.startswith("topk"), "topp" in mode
    temp = torch.full((batch,), 0.0 if greedy else 0.8, device=DEV)
    top_k = torch.full((batch,), 50 if k_on else 0, dtype=torch.int32, device=DEV)
    top_p = torch.full((batch,), float(mode.split("topp")[1]) if p_on else 1.0, device=DEV)
    seeds = torch.randint(0, 2 ** 62, (batch,), device=DEV)
    pos = torch.randint(0, 2 ** 20, (batch,), device=DEV)
    fn = lambda: TS.sample(logits, temp, top_k, top_p, seeds, pos)  # noqa: E731
    ref_fn = lambda: R.sample(logits, temp, top_k, top_p, seeds, pos)  # noqa: E731
    mismatch = float((fn() != ref_fn()).float().mean())
    ms, eager = graph_ms(fn), bench_ms(fn)
    emit("sample", f"B={batch} V={vocab} {name}", ms, eager=eager,
         nbytes=logits.numel() * 4, err=mismatch,
         torch_ref=bench_ms(ref_fn, rep=20) if batch <= 64 else None)


# ----------------------------------------------------------------------------- tuning

def time_attention_config(label: str, cfg: dict | None, make: Callable[[], tuple],
                          spm: int | None = None, tag: str = "tune") -> None:
    """Time one tile config of the generic paged attention kernel (None: its defaults) and,
    with `spm`, one split sizing: `make()` -> (fn, work, unit) is built and timed under them,
    then the defaults are restored. Prints one line with the rate and the same-run ceiling's
    percentage, or the error."""
    from kernels.triton import attention as KA
    default_cfg, default_spm = KA._config, KA.SPLITS_PER_SM
    KA._config = (lambda *a, **k: dict(cfg)) if cfg else default_cfg
    if spm is not None:
        KA.SPLITS_PER_SM = spm
    try:
        fn, work, unit = make()
        ms = graph_ms(fn)
        rate = work / ms / (1e9 if unit == "TFLOP/s" else 1e6)
        ceil = CEIL.get(unit)
        pct = f" {100 * rate / ceil:5.1f}%" if ceil else ""
        print(f"  {tag} {label:60s} {ms * 1e3:9.1f}us {rate:8.1f} {unit}{pct}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"  {tag} {label:60s} ERROR {type(e).__name__}: {str(e)[:120]}")
    finally:
        KA._config, KA.SPLITS_PER_SM = default_cfg, default_spm
        torch.cuda.empty_cache()


def time_variant(tag: str, label: str, fn: Callable[[], torch.Tensor],
                 err_of: Callable[[torch.Tensor], float], work: float, unit: str,
                 note: Callable[[float], str] = lambda ms: "") -> float | None:
    """Check one tuning variant's output (err_of, < TOL), time it as a graph and print one line
    with its rate, the same-run ceiling's percentage and note(ms). Returns the rate, or None
    when the variant raised (printed) or failed the check."""
    try:
        err = err_of(fn())
        ms = graph_ms(fn)
    except Exception as e:  # noqa: BLE001
        print(f"  {tag} {label} ERROR {type(e).__name__}: {str(e)[:120]}", flush=True)
        torch.cuda.empty_cache()
        return None
    rate = work / ms / (1e9 if unit == "TFLOP/s" else 1e6)
    ceil = CEIL.get(unit)
    pct = f" {100 * rate / ceil:5.1f}%" if ceil else ""
    bad = "" if err < TOL else " FAIL"
    print(f"  {tag} {label} {ms * 1e3:9.1f}us {rate:8.1f} {unit}{pct} err={err:.1e}{bad}"
          f"{note(ms)}", flush=True)
    return None if bad else rate


def tune_attention(mla_only: bool = False) -> None:
    """Time tile/split variants of the paged attention kernel at the target shapes; prints
    one line per variant (graph time) so the defaults in kernels/triton/attention.py can be
    set from measurements. mla_only: the MLA decode variants only (--tune-mla)."""
    def variant(cfg: dict | None, spm: int, label: str, case: Callable[[], tuple]) -> None:
        time_attention_config(label, cfg, case, spm)

    def dec(batch: int, ctx: int) -> Callable[[], tuple]:
        def make() -> tuple:
            table, kc, vc, q, sl = gqa_inputs(batch, ctx, 16)
            return (lambda: TA.decode_attention(q, kc, vc, table, sl, 16, 0.088),
                    4 * batch * ctx * 8 * 128, "GB/s")
        return make

    def mdec(batch: int, ctx: int) -> Callable[[], tuple]:
        def make() -> tuple:
            table, cache, ql, qr, sl = mla_inputs(batch, ctx, 16, 16)
            return (lambda: TA.mla_decode_generic(ql, qr, cache, table, sl, 16, 0.07),
                    batch * ctx * 576 * 2, "GB/s")
        return make

    def ext(seq: int, mla: bool) -> Callable[[], tuple]:
        def make() -> tuple:
            qs = torch.tensor([0, seq], dtype=torch.int32, device=DEV)
            if mla:
                table, cache, ql, qr, sl = mla_inputs(1, seq, 16, 16, tokens=seq)
                return (lambda: TA.mla_extend(ql, qr, cache, table, qs, sl, 16, 0.07),
                        causal_flops(seq, seq, 16, 576, 512), "TFLOP/s")
            table, num_pages = paged_table(1, seq, 16)
            kc = torch.randn(num_pages * 16, 8, 128, dtype=BF16, device=DEV)
            vc, q = torch.randn_like(kc), torch.randn(seq, 32, 128, dtype=BF16, device=DEV)
            sl = torch.tensor([seq], dtype=torch.int32, device=DEV)
            return (lambda: TA.extend_attention(q, kc, vc, table, qs, sl, 16, 0.088),
                    causal_flops(seq, seq, 32, 128, 128), "TFLOP/s")
        return make

    def cfg(g: int, t: int, n: int, w: int, s: int, trans: bool = False) -> dict:
        return dict(G_BLK=g, BLOCK_T=t, BLOCK_N=n, num_warps=w, num_stages=s, TRANS=trans)

    if os.environ.get("TUNE_GQA_DECODE") and not mla_only:
        for shape in ((1, 131072), (4, 32768)):
            for spm in (2, 4, 8):
                for n, w, s in ((64, 4, 2), (128, 4, 2), (64, 4, 3)):
                    variant(cfg(16, 1, n, w, s), spm, f"decode B={shape[0]} ctx={shape[1]} "
                            f"spm={spm} N={n} w={w} s={s}", dec(*shape))
    for shape in ((1, 32768), (1, 131072), (64, 8192)):
        for spm in (2, 4, 8):
            for n, w, s, tr in ((32, 4, 2, False), (32, 4, 2, True), (64, 4, 2, True),
                                (128, 8, 2, True), (64, 8, 2, True), (64, 8, 3, True),
                                (128, 8, 3, True), (32, 4, 3, True)):
                variant(cfg(16, 1, n, w, s, tr), spm, f"mla_decode B={shape[0]} ctx={shape[1]} "
                        f"spm={spm} N={n} w={w} s={s} trans={tr}", mdec(*shape))
    for shape in (() if mla_only else ((1, 131072), (16, 8192))):
        for n, w, s, tr in ((64, 4, 2, False), (64, 4, 2, True), (128, 4, 2, True),
                            (128, 8, 2, True), (64, 4, 3, True)):
            variant(cfg(16, 1, n, w, s, tr), 4, f"decode B={shape[0]} ctx={shape[1]} "
                    f"N={n} w={w} s={s} trans={tr}", dec(*shape))


MLA_TUNE_SHAPES = ((1, 131072), (64, 8192), (64, 32768), (1, 32768), (256, 4096))  # first prunes


def tune_mla_chunked(top: int | None = None) -> None:
    """Sweep kernels/triton/mla_decode.py's register-lean MLA decode (DeepSeek-V2-Lite: 16
    heads, latent 512, rope 64, page size 64, bf16). Phase 1 at B=1 ctx=131072: nc 4 x block_n
    {32, 64} x num_warps {4, 8} x num_stages {2, 3, 5} x tma {False, True}, query hoisted, 24
    configs; then the `top` best (env TUNE_MLA_TOP) at the other shapes, and at batch 1 the
    best two with 0.5 / 1 / 2 / 4 splits per SM. Each config is first checked against the
    generic kernel (attention_ops.py::mla_decode_generic): err = max |out - generic| / max
    |generic|; configs that raise print the error and are skipped.
    GB/s counts the KV cache bytes read (B * ctx * 576 * 2). Each config costs a compile of a
    few seconds (CPU) and ~0.1 s of GPU time."""
    from kernels.triton.mla_decode import mla_decode_chunked
    top = int(os.environ.get("TUNE_MLA_TOP", "6")) if top is None else top
    page_size, heads, scale = 64, 16, (128 + 64) ** -0.5
    ceil = CEIL.get("GB/s")

    def run_shape(batch: int, ctx: int, configs: list[dict]) -> list[tuple[float, dict]]:
        table, cache, ql, qr, sl = mla_inputs(batch, ctx, page_size, heads)
        nbytes = batch * ctx * 576 * 2
        base = TA.mla_decode_generic(ql, qr, cache, table, sl, page_size, scale).float()
        denom = float(base.abs().max().clamp_min(1e-30))

        def max_err(out: torch.Tensor) -> float:   # NaN -> inf: fails the check
            err = float((out.float() - base).abs().max()) / denom
            return err if err == err else float("inf")
        gen_ms = graph_ms(lambda: TA.mla_decode_generic(ql, qr, cache, table, sl, page_size,
                                                        scale))
        pct = f" {100 * nbytes / gen_ms / 1e6 / ceil:5.1f}%" if ceil else ""
        label = f"B={batch} ctx={ctx} generic kernel"
        print(f"  tune mla_chunked {label:64s} {gen_ms * 1e3:9.1f}us "
              f"{nbytes / gen_ms / 1e6:8.1f} GB/s{pct}", flush=True)
        results = []
        for c in configs:
            label = (f"B={batch} ctx={ctx} nc={c['nc']} N={c['block_n']} w={c['num_warps']} "
                     f"s={c['num_stages']} qloop={int(c['q_in_loop'])} tma={int(c['tma'])}"
                     + (f" regs={c['max_regs']}" if c.get("max_regs") else "")
                     + (f" splits={c['num_splits']}" if c.get("num_splits") else ""))
            fn = lambda c=c: mla_decode_chunked(ql, qr, cache, table, sl, page_size,  # noqa: E731
                                                scale, **c)
            gbs = time_variant("tune mla_chunked", f"{label:64s}", fn, max_err, nbytes, "GB/s",
                               lambda ms: f" (generic x{gen_ms / ms:.2f})")
            if gbs is not None:
                results.append((gbs, c))
        del table, cache, ql, qr, sl, base
        torch.cuda.empty_cache()
        return sorted(results, key=lambda r: -r[0])

    # num_stages >= 5 is what gives the KV tile (gathered or TMA-copied) two shared-memory
    # buffers (Triton 3.6 and 3.9 ttgir: 1 buffer at 2-4 stages: its page index is loaded in
    # the same iteration); 5 stages lost at 64-key tiles. Query per tile and 16-key tiles lost
    # every earlier sweep (docs/KERNELS.md)
    grid = [dict(nc=4, block_n=n, num_warps=w, num_stages=st, q_in_loop=False, tma=t)
            for n in (32, 64) for w in (4, 8) for st in (2, 3, 5) for t in (False, True)]
    first, rest = MLA_TUNE_SHAPES[0], MLA_TUNE_SHAPES[1:]
    print(f"\n== tune mla_decode_chunked: {len(grid)} configs at B={first[0]} ctx={first[1]}, "
          f"then the top {top} at the other shapes, split counts at batch 1", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def sweep_splits(batch: int, ctx: int, ranked: list[tuple[float, dict]]) -> None:
        """Batch 1: split-KV count in SM multiples; fewer, longer splits write and merge
        fewer fp32 partials (32 KB each) but fill fewer resident slots."""
        if batch == 1:
            run_shape(batch, ctx, [dict(c, num_splits=int(sms * f)) for _, c in ranked[:2]
                                   for f in (0.5, 1, 2, 4)])

    ranked = run_shape(*first, grid)
    best = [c for _, c in ranked[:top]]
    print(f"  tune mla_chunked best at B={first[0]} ctx={first[1]}: "
          + "; ".join(f"{g:.0f} GB/s {c}" for g, c in ranked[:top]), flush=True)
    sweep_splits(*first, ranked)
    for batch, ctx in rest:
        sweep_splits(batch, ctx, run_shape(batch, ctx, best))


def tune_stages() -> None:
    """Pipeline depth (num_stages) and tile variants of the generic paged attention kernel:
    GQA decode at batch 1, MLA decode, and the 8K prefill (target: 50% of the GEMM rate)."""
    def run(label: str, cfg: dict, fn: Callable[[], object], work: float, unit: str) -> None:
        time_attention_config(label, cfg, lambda: (fn, work, unit), tag="tune stages")

    def cfg(g: int, t: int, n: int, w: int, s: int) -> dict:
        return dict(G_BLK=g, BLOCK_T=t, BLOCK_N=n, num_warps=w, num_stages=s)

    print("\n== tune stages: generic paged attention kernel", flush=True)
    for batch, ctx in ((1, 32768), (1, 131072), (16, 8192)):
        table, kc, vc, q, sl = gqa_inputs(batch, ctx, 16)
        for n, w, s in ((64, 4, 2), (64, 4, 4), (64, 4, 5), (32, 4, 5), (128, 8, 5)):
            run(f"decode B={batch} ctx={ctx} N={n} w={w} s={s}", cfg(16, 1, n, w, s),
                lambda: TA.decode_attention(q, kc, vc, table, sl, 16, 0.088),
                4 * batch * ctx * 8 * 128, "GB/s")
        del kc, vc
    for batch, ctx in ((1, 131072), (64, 8192)):
        table, cache, ql, qr, sl = mla_inputs(batch, ctx, 64, 16)
        for n, w, s in ((32, 4, 2), (32, 4, 5), (16, 4, 5), (32, 8, 5)):
            run(f"mla_decode B={batch} ctx={ctx} N={n} w={w} s={s}", cfg(16, 1, n, w, s),
                lambda: TA.mla_decode_generic(ql, qr, cache, table, sl, 64, 0.07),
                batch * ctx * 576 * 2, "GB/s")
        del cache
    seq = 8192
    qs = torch.tensor([0, seq], dtype=torch.int32, device=DEV)
    table, num_pages = paged_table(1, seq, 16)
    kc = torch.randn(num_pages * 16, 8, 128, dtype=BF16, device=DEV)
    vc, q = torch.randn_like(kc), torch.randn(seq, 32, 128, dtype=BF16, device=DEV)
    sl = torch.tensor([seq], dtype=torch.int32, device=DEV)
    for g, t, n, w, s in ((4, 64, 64, 8, 3), (4, 64, 64, 8, 4), (4, 64, 64, 8, 5),
                          (4, 32, 64, 4, 3), (4, 32, 64, 4, 5), (4, 32, 128, 8, 3),
                          (4, 32, 128, 8, 4), (4, 64, 32, 8, 5), (4, 32, 64, 8, 4),
                          (4, 16, 128, 4, 3)):
        run(f"extend q=kv={seq} G={g} T={t} N={n} w={w} s={s}", cfg(g, t, n, w, s),
            lambda: TA.extend_attention(q, kc, vc, table, qs, sl, 16, 0.088),
            causal_flops(seq, seq, 32, 128, 128), "TFLOP/s")


def tune_prefill() -> None:
    """kernels/triton/prefill.py (new tokens' K/V by tensor descriptors) at Llama-3.1-8B's
    shapes (32q/8kv, d128), the generic kernel (every key gathered) timed beside it; each
    variant is checked against the generic kernel's output first. Tiles (env
    TUNE_PREFILL_TILES=0 skips them): rows {128, 256} x block_n {64, 128} x num_warps {4, 8}
    x num_stages {2, 3, 4} at causal prefills of 8K and 16K (target: 50% of the GEMM rate).
    Then the default tiles with a cached prefix: 1/2 .. 1/16 of 16K keys new, the split
    behind attention_ops.CONTIGUOUS_MIN_NEW."""
    from kernels.triton.prefill import prefill_attention
    print("\n== tune prefill: contiguous new-token K/V, Llama-3.1-8B (32q/8kv, d128)",
          flush=True)

    def run(seq: int, qlen: int, variants: list[dict]) -> None:
        table, num_pages = paged_table(1, seq, 16)
        kc = torch.randn(num_pages * 16, 8, 128, dtype=BF16, device=DEV)
        vc, q = torch.randn_like(kc), torch.randn(qlen, 32, 128, dtype=BF16, device=DEV)
        k_new, v_new = (new_token_kv(c, table, seq, qlen, 16) for c in (kc, vc))
        qs = torch.tensor([0, qlen], dtype=torch.int32, device=DEV)
        sl = torch.tensor([seq], dtype=torch.int32, device=DEV)
        flops = causal_flops(qlen, seq, 32, 128, 128)
        gen = lambda: TA.extend_attention(q, kc, vc, table, qs, sl, 16, 0.088)  # noqa: E731
        base = gen().float()
        for label, fn in [("generic (gathered)", gen)] + [
                (" ".join(f"{k}={v}" for k, v in c.items()) or "contiguous, default tiles",
                 lambda c=c: prefill_attention(q, kc, vc, k_new, v_new, table, qs, sl, 16,
                                               0.088, **c)) for c in variants]:
            time_variant("tune prefill", f"q={qlen} kv={seq} {label:44s}", fn,
                         lambda out: rel_err(out, base), flops, "TFLOP/s")
        del kc, vc, q, k_new, v_new, base
        torch.cuda.empty_cache()

    if os.environ.get("TUNE_PREFILL_TILES", "1") != "0":
        tiles = [dict(rows=r, block_n=n, num_warps=w, num_stages=st)
                 for r in (128, 256) for n in (64, 128) for w in (4, 8) for st in (2, 3, 4)]
        for seq in (8192, 16384):
            run(seq, seq, tiles)
    for qlen in (8192, 4096, 2048, 1024):
        run(16384, qlen, [{}])


def tune_moe() -> None:
    """Time tile variants of the fused MoE at DeepSeek-V2-Lite shapes."""
    default = TM._config
    w13 = torch.randn(64, 2816, 2048, dtype=BF16, device=DEV) * 0.02
    w2 = torch.randn(64, 2048, 1408, dtype=BF16, device=DEV) * 0.02
    variants = [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 128, 4, 4),
                (32, 128, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 64, 8, 3),
                (64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                (128, 256, 64, 8, 3), (128, 64, 64, 4, 4)]
    for t in (16, 256, 1024, 4096, 16384):
        x = torch.randn(t, 2048, dtype=BF16, device=DEV)
        wts, ids = R.moe_route(torch.randn(t, 64, device=DEV), 6, "softmax", False, None, 1, 1,
                               1.0)
        for bm, bn, bk, w, s in variants:
            if bm > 32 and t < 256 or bm < 64 and t > 4096:
                continue
            TM._config = lambda _p, c=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w,
                                           num_stages=s): c
            try:
                ms = graph_ms(lambda: TM.fused_moe(x, w13, w2, wts, ids))
                print(f"  tune moe T={t:6d} M={bm} N={bn} K={bk} w={w} s={s}  {ms * 1e3:9.1f}us "
                      f"{6.0 * t * 6 * 1408 * 2048 / ms / 1e9:7.1f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  tune moe T={t} M={bm} N={bn} ERROR {type(e).__name__}: {str(e)[:100]}")
            finally:
                TM._config = default


def _split_tiles_row(label: str, call: Callable[[int], object]) -> None:
    cells = [f"{t} tiles {graph_ms(lambda t=t: call(t)) * 1e3:6.1f}us" for t in (1, 2, 4)]
    print(f"  tune split tiles {label}: " + "  ".join(cells), flush=True)


def tune_split_tiles() -> None:
    """Fewest KV tiles per split (attention.py's min_split_tiles) for short rows in 32K-wide
    page tables, as CUDA graphs pad them: MLA decode (DeepSeek-V2-Lite, page size 64) and GQA
    decode (Llama-3.1-8B, page size 16) at batch 1..64 x context 256..4096, 1/2/4 tiles."""
    from kernels.triton.attention import paged_attention
    from kernels.triton.mla_decode import mla_decode_chunked
    width = 32768
    for batch in (1, 2, 4, 8, 16, 32, 64):
        table, cache, ql, qr, _ = mla_inputs(batch, width, 64, 16)
        for ctx in (256, 1024, 4096):
            sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            _split_tiles_row(f"mla B={batch:3d} ctx={ctx:5d}", lambda t: mla_decode_chunked(
                ql, qr, cache, table, sl, 64, 0.07, split_tiles=t))
        del table, cache, ql, qr
    for batch in (1, 2, 4, 8, 16, 32):
        table, k, v, q, _ = gqa_inputs(batch, width, 16)
        for ctx in (256, 1024, 4096):
            sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            _split_tiles_row(f"gqa B={batch:3d} ctx={ctx:5d}", lambda t: paged_attention(
                q, None, k, None, v, table, None, sl, 16, 0.08, split_tiles=t))
        del k, v
    torch.cuda.empty_cache()
    tune_split_counts()


MLA_SPLIT_SHAPES = [(b, c) for b in (1, 2, 4, 8, 16, 32, 64) for c in (4096, 8192, 32768)
                    if b * c <= 64 * 32768] + [(128, 4096), (256, 4096)]
GQA_SPLIT_SHAPES = [(b, c) for b in (1, 4, 16, 64) for c in (8192, 32768)] + [(256, 4096)]
SPLIT_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def tune_split_counts() -> None:
    """Split-KV pieces per row for decode over whole rows in a 32K-wide page table (the
    CUDA-graph case): the sizing rule's count (`rule`) against fixed counts of 1..256, each
    split at least one tile; % of copy per cell, best marked. MLA: DeepSeek-V2-Lite (page size
    64); GQA: Llama-3.1-8B (page size 16)."""
    from kernels.triton.attention import _config, _num_splits, min_split_tiles, paged_attention
    from kernels.triton.mla_decode import mla_decode_chunked
    width, dev = 32768, torch.device(DEV)
    for batch, ctx in MLA_SPLIT_SHAPES:
        table, cache, ql, qr, _ = mla_inputs(batch, width, 64, 16)
        sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        _split_count_row(f"mla B={batch:3d} ctx={ctx:5d}", ctx, 64, batch * ctx * 576 * 2,
                         (_num_splits(batch, width, 64, dev, True), min_split_tiles(batch, True)),
                         lambda s, t: mla_decode_chunked(ql, qr, cache, table, sl, 64, 0.07,
                                                         num_splits=s, split_tiles=t))
        del table, cache, ql, qr
    block_n = _config(True, False, 4)["BLOCK_N"]
    for batch, ctx in GQA_SPLIT_SHAPES:
        table, k, v, q, _ = gqa_inputs(batch, width, 16)
        sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        _split_count_row(f"gqa B={batch:3d} ctx={ctx:5d}", ctx, block_n,
                         batch * ctx * 8 * 128 * 2 * 2,
                         (_num_splits(batch * 8, width, block_n, dev, False), 1),
                         lambda s, t: paged_attention(q, None, k, None, v, table, None, sl, 16,
                                                      0.08, num_splits=s, split_tiles=t))
        del table, k, v, q
    torch.cuda.empty_cache()


def _split_count_row(label: str, ctx: int, block_n: int, nbytes: int, rule: tuple[int, int],
                     call: Callable[[int | None, int | None], object]) -> None:
    cells = {"rule": graph_ms(lambda: call(None, None), captures=1)}
    for s in SPLIT_COUNTS:
        if s * block_n <= ctx:
            cells[str(s)] = graph_ms(lambda s=s: call(s, 1), captures=1)
    best = min(cells, key=cells.get)
    print(f"  tune splits {label}: " + "  ".join(
        f"{k}{'*' if k == best else ''} {nbytes / v / 1e6 / CEIL['GB/s']:4.0%}"
        for k, v in cells.items()) + f"  (best {cells[best] * 1e3:.1f}us, rule "
        f"{cells['rule'] * 1e3:.1f}us = {rule[0]} splits of >= {rule[1]} tiles)", flush=True)


def profile() -> None:
    """Kernel-level times of one call of each fused op (torch.profiler), to see fixed costs."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    w13 = torch.randn(64, 2816, 2048, dtype=BF16, device=DEV) * 0.02
    w2 = torch.randn(64, 2048, 1408, dtype=BF16, device=DEV) * 0.02
    x = torch.randn(1, 2048, dtype=BF16, device=DEV)
    wts, ids = R.moe_route(torch.randn(1, 64, device=DEV), 6, "softmax", False, None, 1, 1, 1.0)
    table, cache, ql, qr, sl = mla_inputs(1, 8192, 16, 16)
    calls = {"fused_moe T=1": lambda: TM.fused_moe(x, w13, w2, wts, ids),
             "mla_decode B=1 ctx=8K": lambda: TA.mla_decode(ql, qr, cache, table, sl, 16, 0.07)}
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(f"\n-- profile {name} (5 calls)")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                     max_name_column_width=50))


# ----------------------------------------------------------------------------- driver

def run_group(name: str, cases: list[Callable[[], None]]) -> None:
    print(f"\n== {name}", flush=True)
    for c in cases:
        try:
            c()
        except torch.cuda.OutOfMemoryError as e:
            print(f"  OOM: {str(e)[:100]}")
        except Exception as e:  # noqa: BLE001 - report the case, keep benchmarking the rest
            print(f"  ERROR {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.empty_cache()


def groups(quick: bool) -> dict[str, list[Callable[[], None]]]:
    dec = [(1, 1024), (1, 8192), (1, 32768), (1, 131072), (16, 8192), (16, 32768),
           (64, 8192), (256, 1024), (256, 4096)]
    mla = [(1, 8192), (1, 32768), (1, 131072), (16, 8192), (64, 8192), (64, 32768),
           (256, 4096)]
    moe_t = [1, 16, 64, 256, 1024, 4096, 16384]
    if quick:
        dec, mla, moe_t = dec[:3], mla[:2], moe_t[:4]
    moe_w: list = []

    def moe_case(t: int) -> Callable[[], None]:
        def run() -> None:
            if not moe_w:
                moe_w.append(torch.randn(64, 2 * 1408, 2048, dtype=BF16, device=DEV) * 0.02)
                moe_w.append(torch.randn(64, 2048, 1408, dtype=BF16, device=DEV) * 0.02)
            case_moe(t, w=tuple(moe_w))
        return run

    return {
        "decode_attention (Llama-3.1-8B: 32q/8kv heads, d128, bf16)":
            [lambda b=b, c=c: case_decode(b, c) for b, c in dec]
            + [lambda: case_decode(1, 32768, page_size=1), lambda: case_decode(1, 32768, 64),
               lambda: case_decode(1, 1024, table_ctx=32768)],
        "extend_attention (prefill, Llama-3.1-8B)":
            [lambda: case_extend(1024, 1024), lambda: case_extend(4096, 4096),
             lambda: case_extend(8192, 8192), lambda: case_extend(16384, 16384, check=False),
             lambda: case_extend(16384, 1024), lambda: case_extend(16384, 256)]
            + ([] if quick else [lambda: case_extend(32768, 4096, check=False)]),
        "mla_decode (DeepSeek-V2-Lite: 16 heads, 512+64)":
            [lambda b=b, c=c: case_mla_decode(b, c) for b, c in mla]
            + [lambda: case_mla_decode(1, 32768, page_size=16),
               lambda: case_mla_decode(1, 131072, page_size=16),
               lambda: case_mla_decode(1, 1024, table_ctx=32768),
               lambda: case_mla_decode(1, 4096, table_ctx=32768)],
        "mla_extend (DeepSeek-V2-Lite)":
            [lambda: case_mla_extend(1024), lambda: case_mla_extend(4096),
             lambda: case_mla_extend(8192, check=not quick)],
        "mla_prefill (DeepSeek-V2-Lite, decompressed vs absorbed)":
            [lambda q=q, k=k: case_mla_prefill(q, k)
             for q, k in ((8192, 8192), (1024, 16384), (512, 16384), (256, 16384),
                          (128, 16384), (64, 16384))],
        "fused_moe (DeepSeek-V2-Lite: 64 experts top-6, 2048 -> 1408)":
            [moe_case(t) for t in moe_t]
            + [lambda t=t: case_moe_route(t) for t in (1, 256, 4096)]
            + [lambda t=t: case_router_logits(t) for t in (1, 16, 64)],
        "small ops":
            [lambda: case_norm(1), lambda: case_norm(4096), lambda: case_silu(4096),
             lambda: case_rope_kv(1), lambda: case_rope_kv(4096),
             lambda: case_sample(1, "greedy"), lambda: case_sample(1, "topk50_topp0.9"),
             lambda: case_sample(1, "topp0.95"), lambda: case_sample(1, "topp0.95_peaked"),
             lambda: case_sample(64, "topk50_topp0.9"), lambda: case_sample(64, "topp0.95"),
             lambda: case_sample(64, "topp0.95_peaked"), lambda: case_sample(256, "greedy"),
             lambda: case_sample(256, "plain"),
             lambda: case_sample(256, "topk50_topp0.9")],
    }


def summary() -> str:
    lines = [f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
             f"triton {triton.__version__}  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"ceilings (same run): copy {CEIL['GB/s']:.0f} GB/s, bf16 GEMM {CEIL['TFLOP/s']:.0f} "
             f"TFLOP/s",
             "| kernel | shape | triton us | achieved | % ceiling | err | baselines us |",
             "|---|---|---|---|---|---|---|"]
    for r in ROWS:
        base = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r.baselines.items())
        if r.note:
            base += f"; {r.note}"
        err = "-" if r.err is None else f"{r.err:.1e}"
        lines.append(f"| {r.kernel} | {r.shape} | {r.ms * 1e3:.1f} | {r.value:.0f} {r.unit} | "
                     f"{r.pct:.0f}% | {err} | {base} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--only", default="", help="comma-separated group name prefixes")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--tune", action="store_true", help="sweep attention tile/split variants")
    ap.add_argument("--tune-mla", action="store_true",
                    help="sweep only the MLA decode variants (generic kernel and "
                         "kernels/triton/mla_decode.py), then exit unless --only is given")
    ap.add_argument("--tune-stages", action="store_true",
                    help="sweep pipeline depths of the generic attention kernel, then exit "
                         "unless --only or --tune-mla is given")
    ap.add_argument("--tune-moe", action="store_true",
                    help="sweep fused MoE tiles, then exit unless --only is given")
    ap.add_argument("--tune-splits", action="store_true",
                    help="sweep the fewest KV tiles per split for short rows in wide page "
                         "tables and the split counts of whole rows, then exit unless --only "
                         "is given")
    ap.add_argument("--tune-prefill", action="store_true",
                    help="sweep the contiguous-K/V prefill tiles, then exit unless --only is "
                         "given")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of fused ops")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA GPU")
    torch.manual_seed(0)
    print(kernels.explain("decode_attention", device="cuda", dtype=BF16, head_dim=128))
    measure_ceilings()
    if args.profile:
        profile()
    if args.tune:
        tune_attention()
        tune_mla_chunked()
        if os.environ.get("TUNE_MOE"):
            tune_moe()
    if args.tune_moe and not args.tune:
        tune_moe()
        if not args.only:
            return
    if args.tune_prefill:
        tune_prefill()
        if not args.only:
            return
    if args.tune_splits:
        tune_split_tiles()
        if not args.only:
            return
    if args.tune_stages:
        tune_stages()
        if not (args.only or args.tune_mla):
            return
    if args.tune_mla:
        if not args.tune:
            if os.environ.get("TUNE_MLA_GENERIC", "1") != "0":   # 72 generic-kernel variants
                tune_attention(mla_only=True)
            tune_mla_chunked()
        if not args.only:
            return
    only = [s for s in args.only.split(",") if s]
    for name, cases in groups(args.quick).items():
        if not only or any(name.startswith(o) for o in only):
            run_group(name, cases)
    text = summary()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_kernels.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
            json.dump({"ceilings": CEIL, "rows": [asdict(r) for r in ROWS]}, f, indent=1)
    print("\n" + text)


if __name__ == "__main__":
    main()
