"""The benchmark rows: every Triton op at real model shapes, checked against the torch
reference, then timed with its default tuning beside the same-run ceilings and baselines.

Each `case_*` builds its inputs, checks the op (`err`: relative L2 error against the torch
reference, bf16; for `sample` the fraction of rows that differ, for `moe_route` of ids),
times it as a CUDA-graph replay (`graph_ms`) and eagerly, and emits one row. Baselines (torch
reference, torch SDPA flash on a contiguous cache, an eager per-expert loop, the op with
split-KV off) are timed only when the session asks for them. `CASES` lists the rows, `select`
picks them by op name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kernels import reference as R
from kernels.triton import attention_ops as TA
from kernels.triton import elementwise as TE
from kernels.triton import moe as TM
from kernels.triton import rope_kv as TR
from kernels.triton import route as TRT
from kernels.triton import sample as TS
from kernels.triton.attention import paged_attention

from .harness import BF16, DEV, Session, bench_ms, graph_ms, rel_err
from .inputs import (MLA_LATENT, MLA_ROPE, MLA_SCALE, causal_flops, gather_contig,
                     gqa_extend_inputs, gqa_inputs, mla_cache_bytes, mla_inputs, moe_weights,
                     new_token_kv, sample_logits)


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

def case_decode(s: Session, batch: int, ctx: int, page_size: int = 16, hq: int = 32,
                hk: int = 8, d: int = 128, table_ctx: int | None = None) -> None:
    """GQA decode; table_ctx as gqa_inputs'."""
    table, kc, vc, q, sl = gqa_inputs(batch, ctx, page_size, hq, hk, d, table_ctx)
    scale = d ** -0.5
    fn = lambda: TA.decode_attention(q, kc, vc, table, sl, page_size, scale)  # noqa: E731
    ref_fn = lambda: R.decode_attention(q, kc, vc, table, sl, page_size, scale)  # noqa: E731
    err = rel_err(fn(), ref_fn()) if batch * ctx <= (1 << 20) else None
    ms, eager = graph_ms(fn), bench_ms(fn)
    ref = s.baseline(lambda: bench_ms(ref_fn, rep=20) if batch * ctx <= (1 << 17) else None)

    def sdpa() -> float | None:
        kcont = gather_contig(kc, table, ctx, page_size)
        vcont = gather_contig(vc, table, ctx, page_size)
        return sdpa_ms(q[:, :, None, :], kcont, vcont, causal=False)
    nbytes = 2 * batch * ctx * hk * d * 2 + 2 * q.numel() * 2
    s.emit("decode_attention", f"B={batch} ctx={ctx} ps={page_size}"
           + (f" table={table_ctx}" if table_ctx else ""), ms, nbytes=nbytes, err=err,
           eager=eager, torch_ref=ref, sdpa=s.baseline(sdpa))


def case_extend(s: Session, seq: int, qlen: int, page_size: int = 16, hq: int = 32,
                hk: int = 8, d: int = 128, check: bool = True) -> None:
    """The op as the model calls it: given the new tokens' K/V (kernels/triton/prefill.py
    reads them contiguously); `gathered` is the generic kernel (every key through the page
    table), `gathered_unsplit` the same with split-KV off."""
    table, kc, vc, q, qs, sl = gqa_extend_inputs(seq, qlen, page_size, hq, hk, d)
    k_new, v_new = (new_token_kv(c, table, seq, qlen, page_size) for c in (kc, vc))
    scale = d ** -0.5
    fn = lambda: TA.extend_attention(q, kc, vc, table, qs, sl, page_size, scale,  # noqa: E731
                                     k_new=k_new, v_new=v_new)

    def gathered(num_splits: int | None = None) -> Callable[[], torch.Tensor]:
        return lambda: paged_attention(q, None, kc, None, vc, table, qs, sl, page_size, scale,
                                       num_splits)
    err = None
    if check:
        err = rel_err(fn(), R.extend_attention(q, kc, vc, table, qs, sl, page_size, scale))
    torch.cuda.empty_cache()
    ms, eager = graph_ms(fn), bench_ms(fn)
    unsplit = (s.baseline(lambda: graph_ms(gathered(num_splits=1))) if qlen < seq else None)

    def sdpa() -> float | None:
        if qlen != seq:
            return None
        kcont = gather_contig(kc, table, seq, page_size)
        vcont = gather_contig(vc, table, seq, page_size)
        return sdpa_ms(q.transpose(0, 1)[None], kcont, vcont, causal=True)
    s.emit("extend_attention", f"q={qlen} kv={seq} ps={page_size}", ms,
           flops=causal_flops(qlen, seq, hq, d, d), err=err, eager=eager,
           gathered=s.baseline(lambda: graph_ms(gathered())), gathered_unsplit=unsplit,
           sdpa=s.baseline(sdpa))


def case_mla_decode(s: Session, batch: int, ctx: int, page_size: int = 64, heads: int = 16,
                    table_ctx: int | None = None) -> None:
    """page_size 64: configs/deepseek-v2-lite.yaml's; table_ctx as case_decode's."""
    table, cache, ql, qr, sl = mla_inputs(batch, ctx, page_size, heads, table_ctx=table_ctx)
    fn = lambda: TA.mla_decode(ql, qr, cache, table, sl, page_size, MLA_SCALE)  # noqa: E731
    ref_fn = lambda: R.mla_decode(ql, qr, cache, table, sl, page_size, MLA_SCALE)  # noqa: E731
    err = rel_err(fn(), ref_fn()) if batch * ctx <= (1 << 20) else None
    ms, eager = graph_ms(fn), bench_ms(fn)
    ref = s.baseline(lambda: bench_ms(ref_fn, rep=20) if batch * ctx <= (1 << 17) else None)
    nbytes = mla_cache_bytes(batch, ctx) + (ql.numel() + qr.numel() + ql.numel()) * 2
    s.emit("mla_decode", f"B={batch} ctx={ctx} H={heads} ps={page_size}"
           + (f" table={table_ctx}" if table_ctx else ""), ms, nbytes=nbytes, err=err,
           eager=eager, torch_ref=ref)


def case_mla_prefill(s: Session, qlen: int, seq: int, heads: int = 16,
                     page_size: int = 64) -> None:
    """DeepSeek-V2-Lite prefill attention of one row (qlen new tokens, seq keys) both ways,
    from the compressed cache to [qlen, H, Dv]: decompressed (the keys' slots, their gather,
    kv_b_proj's GEMM to per-head keys and values, then `mla_prefill`) against `absorbed` (W_UK
    into the query, `mla_extend` over the latent, W_UV out); err is the one against the other.
    TFLOP/s counts mla_prefill's attention alone; the time is the whole path."""
    from appliance.model.layers.mla import key_slots
    lat, dn, dv = MLA_LATENT, 128, 128
    table, cache, ql, qr, sl = mla_inputs(1, seq, page_size, heads, tokens=qlen)
    q_nope = torch.randn(qlen, heads, dn, dtype=BF16, device=DEV)
    w_kvb = torch.randn(heads * (dn + dv), lat, dtype=BF16, device=DEV) * lat ** -0.5
    w_uk = w_kvb.view(heads, dn + dv, lat)[:, :dn]
    w_uv = w_kvb.view(heads, dn + dv, lat)[:, dn:]
    qs = torch.tensor([0, qlen], dtype=torch.int32, device=DEV)

    def decompressed(num_splits: int | None = None) -> torch.Tensor:
        kv = cache[key_slots(table, sl, seq, page_size)]                       # [N, L+R]
        kvb = (kv[:, :lat] @ w_kvb.T).view(seq, heads, dn + dv)                # [N, H, Dn+Dv]
        return TA.mla_prefill(q_nope, qr, kvb[..., :dn], kv[:, lat:], kvb[..., dn:], qs, sl,
                              MLA_SCALE, num_splits)

    def absorbed() -> torch.Tensor:
        q_lat = torch.einsum("thd,hdl->thl", q_nope, w_uk)
        o = TA.mla_extend(q_lat, qr, cache, table, qs, sl, page_size, MLA_SCALE)
        return torch.einsum("thl,hvl->thv", o, w_uv)

    err = rel_err(decompressed(), absorbed())
    torch.cuda.empty_cache()
    s.emit("mla_prefill", f"q={qlen} kv={seq} H={heads} ps={page_size}", graph_ms(decompressed),
           flops=causal_flops(qlen, seq, heads, dn + MLA_ROPE, dv), err=err,
           absorbed=s.baseline(lambda: graph_ms(absorbed)),
           unsplit=s.baseline(lambda: graph_ms(lambda: decompressed(num_splits=1))))


def case_mla_extend(s: Session, seq: int, heads: int = 16, page_size: int = 16,
                    check: bool = True) -> None:
    table, cache, ql, qr, sl = mla_inputs(1, seq, page_size, heads, tokens=seq)
    qs = torch.tensor([0, seq], dtype=torch.int32, device=DEV)
    fn = lambda: TA.mla_extend(ql, qr, cache, table, qs, sl, page_size, MLA_SCALE)  # noqa: E731
    err = None
    if check:
        err = rel_err(fn(), R.mla_extend(ql, qr, cache, table, qs, sl, page_size, MLA_SCALE))
    torch.cuda.empty_cache()
    ms, eager = graph_ms(fn), bench_ms(fn)
    s.emit("mla_extend", f"q=kv={seq} H={heads}", ms, eager=eager,
           flops=causal_flops(seq, seq, heads, MLA_LATENT + MLA_ROPE, MLA_LATENT), err=err)


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


def case_moe(s: Session, tokens: int, w: tuple[torch.Tensor, torch.Tensor],
             top_k: int = 6) -> None:
    """DeepSeek-V2-Lite's routed experts (w: moe_weights()); besides TFLOP/s, the note gives
    the rate at which the used experts' weights are read (decode batches are bound by it)."""
    w13, w2 = w
    experts, inter, hidden = w2.shape[0], w2.shape[2], w2.shape[1]
    x = torch.randn(tokens, hidden, dtype=BF16, device=DEV)
    logits = torch.randn(tokens, experts, device=DEV)
    weights, ids = R.moe_route(logits, top_k, "softmax", False, None, 1, 1, 1.0)
    fn = lambda: TM.fused_moe(x, w13, w2, weights, ids)  # noqa: E731
    err = rel_err(fn(), R.fused_moe(x, w13, w2, weights, ids)) if tokens <= 1024 else None
    ms, eager = graph_ms(fn), bench_ms(fn)
    loop = s.baseline(lambda: bench_ms(lambda: torch_loop_moe(x, w13, w2, weights, ids),
                                       rep=40))
    row = s.emit("fused_moe", f"T={tokens} E={experts} k={top_k}", ms,
                 flops=6.0 * tokens * top_k * inter * hidden, err=err, eager=eager,
                 torch_loop=loop)
    used = int(ids.unique().numel())
    gbs = (used * 3 * inter * hidden * 2 + tokens * hidden * 4) / ms / 1e6
    row.note = (f"weights {gbs:.0f} GB/s = {100 * gbs / s.ceilings.copy_gbs:.0f}% copy "
                f"({used} experts)")
    print(f"  {'':19s} {row.note}")


def case_moe_route(s: Session, tokens: int, experts: int = 64, top_k: int = 6) -> None:
    """DeepSeek-V2-Lite routing (softmax, top-6 of 64); err = fraction of ids that differ.
    The baseline is the torch reference as a graph too: both run inside the decode graph."""
    logits = torch.randn(tokens, experts, device=DEV) * 2
    args = (top_k, "softmax", False, None, 1, 1, 1.0)
    fn = lambda: TRT.moe_route(logits, *args)  # noqa: E731
    ref_fn = lambda: R.moe_route(logits, *args)  # noqa: E731
    err = float((fn()[1] != ref_fn()[1]).float().mean())
    s.emit("moe_route", f"T={tokens} E={experts} k={top_k}", graph_ms(fn),
           nbytes=logits.numel() * 4, err=err, eager=bench_ms(fn),
           torch_ref_graph=s.baseline(lambda: graph_ms(ref_fn)))


def case_router_logits(s: Session, tokens: int, experts: int = 64, hidden: int = 2048) -> None:
    """DeepSeek-V2-Lite's gate: bf16 x [T, 2048] against the float32 [64, 2048] weight. The
    baseline is the torch reference (cast + cuBLAS fp32) as a graph too."""
    x = torch.randn(tokens, hidden, dtype=BF16, device=DEV)
    w = torch.randn(experts, hidden, device=DEV) * 0.02
    fn = lambda: TRT.router_logits(x, w)  # noqa: E731
    ref_fn = lambda: R.router_logits(x, w)  # noqa: E731
    s.emit("router_logits", f"T={tokens} E={experts} H={hidden}", graph_ms(fn),
           nbytes=w.numel() * 4 + x.numel() * 2, err=rel_err(fn(), ref_fn()),
           eager=bench_ms(fn), torch_ref_graph=s.baseline(lambda: graph_ms(ref_fn)))


# ----------------------------------------------------------------------------- small ops

def case_norm(s: Session, tokens: int, hidden: int = 4096) -> None:
    x = torch.randn(tokens, hidden, dtype=BF16, device=DEV)
    r = torch.randn_like(x)
    w = torch.randn(hidden, dtype=BF16, device=DEV)
    fn = lambda: TE.fused_add_rms_norm(x, r, w, 1e-6)  # noqa: E731
    ref_fn = lambda: R.fused_add_rms_norm(x, r, w, 1e-6)  # noqa: E731
    err = rel_err(fn()[0], ref_fn()[0])
    ms, eager = graph_ms(fn), bench_ms(fn)
    s.emit("fused_add_rms_norm", f"T={tokens} H={hidden}", ms, nbytes=4 * x.numel() * 2,
           err=err, eager=eager, torch_ref=s.baseline(lambda: bench_ms(ref_fn)))


def case_silu(s: Session, tokens: int, inter: int = 14336) -> None:
    x = torch.randn(tokens, 2 * inter, dtype=BF16, device=DEV)
    fn = lambda: TE.silu_and_mul(x)  # noqa: E731
    err = rel_err(fn(), R.silu_and_mul(x))
    ms, eager = graph_ms(fn), bench_ms(fn)
    s.emit("silu_and_mul", f"T={tokens} I={inter}", ms, nbytes=1.5 * x.numel() * 2, err=err,
           eager=eager, torch_ref=s.baseline(lambda: bench_ms(lambda: R.silu_and_mul(x))))


def case_rope_kv(s: Session, tokens: int, hq: int = 32, hk: int = 8, d: int = 128) -> None:
    """Llama-3.1-8B's q/k rotation (NeoX, theta 500000) and the k/v cache write."""
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
    err = max(rel_err(got[0], ref[0]), rel_err(got[1], ref[1]), rel_err(kc, kc2),
              rel_err(vc, vc2))
    ms, eager = graph_ms(fn), bench_ms(fn)
    nbytes = 2 * q.numel() * 2 + 3 * k.numel() * 2 + 2 * v.numel() * 2
    s.emit("rope_store_kv", f"T={tokens} Hq={hq} Hk={hk} D={d}", ms, nbytes=nbytes, err=err,
           eager=eager, torch_ref=s.baseline(lambda: bench_ms(ref_fn)))


def case_sample(s: Session, batch: int, mode: str, vocab: int = 128256) -> None:
    """mode: greedy, plain, topkK_topP, topkK (top-k alone), topP (top-p alone); a _peaked
    suffix: peaked logits.
    err: the fraction of rows whose token differs from the reference's."""
    logits = sample_logits(batch, vocab, mode.endswith("_peaked"))
    name, mode = mode, mode.removesuffix("_peaked")
    greedy, k_on, p_on = mode == "greedy", mode.startswith("topk"), "topp" in mode
    temp = torch.full((batch,), 0.0 if greedy else 0.8, device=DEV)
    k = int(mode.split("_")[0].removeprefix("topk")) if k_on else 0
    top_k = torch.full((batch,), k, dtype=torch.int32, device=DEV)
    top_p = torch.full((batch,), float(mode.split("topp")[1]) if p_on else 1.0, device=DEV)
    seeds = torch.randint(0, 2 ** 62, (batch,), device=DEV)
    pos = torch.randint(0, 2 ** 20, (batch,), device=DEV)
    fn = lambda: TS.sample(logits, temp, top_k, top_p, seeds, pos)  # noqa: E731
    ref_fn = lambda: R.sample(logits, temp, top_k, top_p, seeds, pos)  # noqa: E731
    mismatch = float((fn() != ref_fn()).float().mean())
    ms, eager = graph_ms(fn), bench_ms(fn)
    s.emit("sample", f"B={batch} V={vocab} {name}", ms, nbytes=logits.numel() * 4,
           err=mismatch, eager=eager,
           torch_ref=s.baseline(lambda: bench_ms(ref_fn, rep=20) if batch <= 64 else None))


# ----------------------------------------------------------------------------- the rows

@dataclass(frozen=True)
class Case:
    op: str                                  # what `--rows` selects
    run: Callable[[Session], None]
    quick: bool = True                       # in the --quick set


# the op each group of rows is named by, and the model it takes its shapes from
TITLES = {
    "decode_attention": "Llama-3.1-8B: 32q/8kv heads, d128, bf16",
    "extend_attention": "prefill, Llama-3.1-8B",
    "mla_decode": "DeepSeek-V2-Lite: 16 heads, 512+64",
    "mla_extend": "DeepSeek-V2-Lite",
    "mla_prefill": "DeepSeek-V2-Lite, decompressed vs absorbed",
    "fused_moe": "DeepSeek-V2-Lite: 64 experts top-6, 2048 -> 1408",
    "moe_route": "DeepSeek-V2-Lite",
    "router_logits": "DeepSeek-V2-Lite",
    "fused_add_rms_norm": "Llama-3.1-8B",
    "silu_and_mul": "Llama-3.1-8B",
    "rope_store_kv": "Llama-3.1-8B",
    "sample": "vocabulary 128256",
}


def _moe_case(tokens: int, quick: bool) -> Case:
    weights: list = []          # loaded by the first MoE row that runs, shared by the rest

    def run(s: Session) -> None:
        if not weights:
            weights.extend(moe_weights())
        case_moe(s, tokens, tuple(weights))
    return Case("fused_moe", run, quick)


def _cases() -> list[Case]:
    rows: list[Case] = []

    def add(op: str, fn: Callable[..., None], *shapes: tuple | dict, quick: int = 99) -> None:
        """Rows of op, one per shape: fn's arguments after the session, positional (a tuple)
        or by name (a dict). The first `quick` rows are in the --quick set."""
        for i, shape in enumerate(shapes):
            args, kw = (shape, {}) if isinstance(shape, tuple) else ((), shape)
            rows.append(Case(op, lambda s, a=args, k=kw: fn(s, *a, **k), i < quick))

    add("decode_attention", case_decode, (1, 1024), (1, 8192), (1, 32768), (1, 131072),
        (16, 8192), (16, 32768), (64, 8192), (256, 1024), (256, 4096),
        dict(batch=1, ctx=32768, page_size=1), dict(batch=1, ctx=32768, page_size=64),
        dict(batch=1, ctx=1024, table_ctx=32768), quick=3)
    add("extend_attention", case_extend, (1024, 1024), (4096, 4096), (8192, 8192),
        dict(seq=16384, qlen=16384, check=False), (16384, 1024), (16384, 256),
        dict(seq=32768, qlen=4096, check=False), quick=6)
    add("mla_decode", case_mla_decode, (1, 8192), (1, 32768), (1, 131072), (16, 8192),
        (64, 8192), (64, 32768), (256, 4096), dict(batch=1, ctx=32768, page_size=16),
        dict(batch=1, ctx=131072, page_size=16), dict(batch=1, ctx=1024, table_ctx=32768),
        dict(batch=1, ctx=4096, table_ctx=32768), quick=2)
    add("mla_extend", case_mla_extend, (1024,), (4096,), (8192,))
    add("mla_prefill", case_mla_prefill, (8192, 8192), (1024, 16384), (512, 16384),
        (256, 16384), (128, 16384), (64, 16384))
    rows += [_moe_case(t, i < 4) for i, t in enumerate((1, 16, 64, 256, 1024, 4096, 16384))]
    add("moe_route", case_moe_route, (1,), (256,), (4096,))
    add("router_logits", case_router_logits, (1,), (16,), (64,))
    add("fused_add_rms_norm", case_norm, (1,), (4096,))
    add("silu_and_mul", case_silu, (4096,))
    add("rope_store_kv", case_rope_kv, (1,), (4096,))
    add("sample", case_sample, (1, "greedy"), (1, "plain"), (1, "topk50_topp0.9"),
        (1, "topk20_topp0.8"), (1, "topp0.95"), (1, "topp0.95_peaked"), (64, "topk50_topp0.9"),
        (64, "topp0.95"), (64, "topp0.95_peaked"), (256, "greedy"), (256, "plain"),
        (256, "topk50_topp0.9"), (256, "topk20_topp0.8"), (256, "topk100"))
    return rows


CASES = _cases()


def select(ops: list[str], quick: bool) -> list[Case]:
    """The rows of these ops (all when empty), --quick's subset if asked; an unknown op is a
    ValueError naming the known ones."""
    unknown = sorted(set(ops) - set(TITLES))
    if unknown:
        raise ValueError(f"unknown rows {unknown}; known: {', '.join(TITLES)}")
    return [c for c in CASES if (not ops or c.op in ops) and (c.quick or not quick)]
