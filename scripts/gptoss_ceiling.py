"""gpt-oss-20b on this GPU, the figures beside `tokenspeed bench` (scripts/gpu_gptoss runs both):

- the same-run ceilings (kernel_bench.harness.measure_ceilings: device copy, bf16 GEMM);
- the batch-1 decode bound they imply: copy bandwidth / active-parameter bytes per token
  (attention, router, the top-4 experts, the LM head; bf16; the KV read is left out);
- HF transformers' eager `generate` on the same shape (random bf16 weights, eager attention,
  its default experts implementation and its eager loop), batch 1 and batch 64;
- GPT-OSS's kernel options at its shapes, checked against the torch reference and timed as
  graph replays beside the default path: attention with sinks, with the 128-token window,
  and the experts with biases + clamped SwiGLU on HF's layout against the plain bf16 experts,
  and the same experts in MXFP4 read packed (`fused_moe_mxfp4`) against bf16.

    python scripts/gptoss_ceiling.py [--out DIR] [--skip-hf]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from kernel_bench.harness import BF16, DEV, Session, bench_ms, graph_ms, measure_ceilings, rel_err
from kernel_bench.inputs import gqa_extend_inputs, gqa_inputs, new_token_kv

from appliance.model.presets import preset_config
from kernels import ClampedSwiGLU, mxfp4
from kernels import reference as R
from kernels.triton import attention_ops as TA
from kernels.triton import moe as TM

HQ, HK, D, WINDOW = 64, 8, 64, 128         # gpt-oss attention: 64 q / 8 kv heads of 64
MOE_TOKENS = (1, 16, 64, 256, 1024, 4096)
DECODE_SHAPES = ((1, 32768), (1, 131072), (64, 8192), (256, 4096))    # (batch, context)
EXTEND_SHAPES = ((8192, 8192), (16384, 1024))                          # (keys, new tokens)


def active_param_bytes(cfg: dict, dtype_bytes: int = 2) -> int:
    """Weights one decode token reads: every layer's attention (q/k/v/o + biases, sinks,
    norms), router and top-k experts (+ biases), the final norm and the LM head; the
    embedding row is negligible."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hq, hk, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    e, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    attn = h * (hq + 2 * hk) * d + (hq + 2 * hk) * d + hq * d * h + h + hq + 2 * h
    experts = k * (h * 2 * i + 2 * i + i * h + h) + e * h + e
    return dtype_bytes * (cfg["num_hidden_layers"] * (attn + experts) + h + v * h)


def hf_generate_tps(cfg: dict, batch: int, new_tokens: int, experts: str | None) -> float:
    """Output tokens/s of transformers' eager generate (attention eager; experts: None for
    its default, or "eager") on cfg's shape, random bf16 weights, 128-token prompts."""
    import transformers

    hf_cfg = transformers.GptOssConfig(**{k: v for k, v in cfg.items()
                                          if k not in ("architectures", "torch_dtype")})
    kw = {"attn_implementation": "eager", "dtype": BF16}
    if experts:
        kw["experts_implementation"] = experts
    with torch.device(DEV):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, **kw).eval()
    prompt = torch.randint(0, cfg["vocab_size"], (batch, 128), device=DEV)
    gen = dict(do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    model.generate(prompt, min_new_tokens=4, max_new_tokens=4, **gen)   # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(prompt, min_new_tokens=new_tokens, max_new_tokens=new_tokens, **gen)
    torch.cuda.synchronize()
    tps = batch * new_tokens / (time.perf_counter() - started)
    del model
    torch.cuda.empty_cache()
    return tps


def attention_rows(s: Session) -> None:
    """decode / extend at gpt-oss's heads: plain, + sinks (full layers), + sinks and the
    window (sliding layers: reads 128 keys whatever the context)."""
    for batch, ctx in DECODE_SHAPES:
        table, kc, vc, q, sl = gqa_inputs(batch, ctx, 16, HQ, HK, D)
        sinks = torch.randn(HQ, dtype=BF16, device=DEV)
        for name, opts in (("plain", {}), ("sinks", dict(sinks=sinks)),
                           ("sinks+window", dict(sinks=sinks, window=WINDOW))):
            def fn(o=opts):
                return TA.decode_attention(q, kc, vc, table, sl, 16, D ** -0.5, **o)
            err = (rel_err(fn(), R.decode_attention(q, kc, vc, table, sl, 16, D ** -0.5, **opts))
                   if batch * ctx <= (1 << 20) or "window" in opts else None)
            keys = min(ctx, WINDOW) if "window" in opts else ctx
            s.emit("gptoss_decode", f"B={batch} ctx={ctx} {name}", graph_ms(fn),
                   nbytes=2 * batch * keys * HK * D * 2 + 2 * q.numel() * 2, err=err)
        del kc, vc
        torch.cuda.empty_cache()
    for seq, qlen in EXTEND_SHAPES:
        table, kc, vc, q, qs, sl = gqa_extend_inputs(seq, qlen, 16, HQ, HK, D)
        k_new, v_new = (new_token_kv(c, table, seq, qlen, 16) for c in (kc, vc))
        sinks = torch.randn(HQ, dtype=BF16, device=DEV)
        for name, opts in (("plain", {}), ("sinks", dict(sinks=sinks)),
                           ("sinks+window", dict(sinks=sinks, window=WINDOW))):
            def fn(o=opts):
                return TA.extend_attention(q, kc, vc, table, qs, sl, 16, D ** -0.5,
                                           k_new=k_new, v_new=v_new, **o)
            err = rel_err(fn(), R.extend_attention(q, kc, vc, table, qs, sl, 16, D ** -0.5,
                                                   **opts)) if qlen * seq <= (1 << 24) else None
            visible = qlen * min(seq, WINDOW) if "window" in opts else \
                qlen * (seq - qlen) + qlen * (qlen + 1) / 2
            s.emit("gptoss_extend", f"q={qlen} kv={seq} {name}", graph_ms(fn),
                   flops=2.0 * HQ * visible * 2 * D, err=err)


def moe_rows(s: Session, cfg: dict) -> None:
    """gpt-oss-20b's experts (32 x 2880 -> 2880, top-4): GPT-OSS's options on HF's layout
    against the default path on [E, 2I, H] / [E, H, I] (the same math without biases and
    with silu); then the experts in MXFP4 read packed against the bf16 ones (`bf16`, the
    same experts dequantized); `weights` = the rate the used experts' bytes are read at."""
    e, h, inter, k = (cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"],
                      cfg["num_experts_per_tok"])
    gate_up = torch.randn(e, h, 2 * inter, dtype=BF16, device=DEV) * 0.02
    down = torch.randn(e, inter, h, dtype=BF16, device=DEV) * 0.02
    b13 = torch.randn(e, 2 * inter, dtype=BF16, device=DEV) * 0.02
    b2 = torch.randn(e, h, dtype=BF16, device=DEV) * 0.02
    w13, w2 = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    act = ClampedSwiGLU(float(cfg.get("swiglu_alpha", 1.702)), float(cfg["swiglu_limit"]))
    for tokens in MOE_TOKENS:
        x = torch.randn(tokens, h, dtype=BF16, device=DEV)
        weights, ids = R.moe_route(torch.randn(tokens, e, device=DEV), k, "softmax", True,
                                   None, 1, 1, 1.0)
        args = (x, gate_up.transpose(1, 2), down.transpose(1, 2), weights, ids, b13, b2, act,
                True)
        fn = lambda a=args: TM.fused_moe(*a)  # noqa: E731
        err = rel_err(fn(), R.fused_moe(*args)) if tokens <= 256 else None
        plain = lambda: TM.fused_moe(x, w13, w2, weights, ids)  # noqa: E731
        ms = graph_ms(fn)
        used = int(ids.unique().numel())
        row = s.emit("gptoss_moe", f"T={tokens} E={e} k={k}", ms,
                     flops=6.0 * tokens * k * inter * h, err=err, plain=graph_ms(plain),
                     eager=bench_ms(fn))
        _weights_note(s, row, used * 3 * inter * h * 2, ms)
    blocks13 = torch.randint(0, 256, (e, 2 * inter, h // 32, 16), dtype=torch.uint8, device=DEV)
    scales13 = torch.randint(118, 122, (e, 2 * inter, h // 32), dtype=torch.uint8, device=DEV)
    blocks2 = torch.randint(0, 256, (e, h, inter // 32, 16), dtype=torch.uint8, device=DEV)
    scales2 = torch.randint(118, 122, (e, h, inter // 32), dtype=torch.uint8, device=DEV)
    dq13 = mxfp4.dequantize(blocks13, scales13, BF16)                       # [E, 2I, H]
    dq2 = mxfp4.dequantize(blocks2, scales2, BF16)                          # [E, H, I]
    for tokens in MOE_TOKENS:
        x = torch.randn(tokens, h, dtype=BF16, device=DEV)
        weights, ids = R.moe_route(torch.randn(tokens, e, device=DEV), k, "softmax", True,
                                   None, 1, 1, 1.0)
        args = (x, blocks13, scales13, blocks2, scales2, weights, ids, b13, b2, act, True)
        fn = lambda a=args: TM.fused_moe_mxfp4(*a)  # noqa: E731
        err = rel_err(fn(), R.fused_moe_mxfp4(*args)) if tokens <= 256 else None
        bf16 = lambda: TM.fused_moe(x, dq13, dq2, weights, ids, b13, b2, act, True)  # noqa: E731
        ms = graph_ms(fn)
        used = int(ids.unique().numel())
        row = s.emit("gptoss_moe_mxfp4", f"T={tokens} E={e} k={k}", ms,
                     flops=6.0 * tokens * k * inter * h, err=err, bf16=graph_ms(bf16),
                     eager=bench_ms(fn))
        _weights_note(s, row, used * 3 * inter * h * 17 / 32, ms)


def _weights_note(s: Session, row, nbytes: float, ms: float) -> None:
    gbs = nbytes / ms / 1e6
    row.note = f"weights {gbs:.0f} GB/s = {100 * gbs / s.ceilings.copy_gbs:.0f}% copy"
    print(f"  {'':19s} {row.note}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    cfg = preset_config("gpt-oss-20b")
    s = Session(measure_ceilings(), baselines=True)
    active = active_param_bytes(cfg)
    summary = {"device": torch.cuda.get_device_name(), "copy_gbs": s.ceilings.copy_gbs,
               "gemm_tflops": s.ceilings.gemm_tflops, "active_param_gb": active / 1e9,
               "batch1_bound_tps": s.ceilings.copy_gbs * 1e9 / active}
    print(json.dumps(summary, indent=1), flush=True)
    attention_rows(s)
    moe_rows(s, cfg)
    if not args.skip_hf:
        for batch, new, experts in ((1, 64, None), (1, 32, "eager"), (64, 32, None)):
            key = f"hf_b{batch}_{experts or 'default'}_tps"
            try:
                summary[key] = hf_generate_tps(cfg, batch, new, experts)
            except Exception as e:  # noqa: BLE001 - report and carry on
                summary[key] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            print(f"{key}: {summary[key]}", flush=True)
    s.save(args.out)
    with open(os.path.join(args.out, "gptoss_ceiling.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(s.table())
    print(json.dumps(summary, indent=1))
    return 1 if s.failures() else 0


if __name__ == "__main__":
    raise SystemExit(main())
