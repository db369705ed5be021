"""Every Triton kernel compiles for Hopper (sm_90) at the shapes the appliance launches.

Triton's CPU interpreter skips the compiler, so errors that only compiled kernels have (a
global that is not constexpr, a loop-carried value changing type, shared memory over the
limit) would otherwise surface only on a GPU. This compiles ahead of time, no GPU needed.
Each check runs in a subprocess without TRITON_INTERPRET, so the kernels are real JIT
functions there."""
import itertools
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton.backends.nvidia.compiler as _nv
    _nv.get_ptxas(90).path  # noqa: B018 - raises when the bundled ptxas is missing
except Exception as e:  # noqa: BLE001
    pytest.skip(f"triton's CUDA backend/ptxas unavailable: {e}", allow_module_level=True)

from kernels.triton import attention as A  # noqa: E402
from kernels.triton import elementwise as E  # noqa: E402
from kernels.triton import gemv as G  # noqa: E402
from kernels.triton import gqa_decode as GD  # noqa: E402
from kernels.triton import head_gemv as HG  # noqa: E402
from kernels.triton import mla_absorb_rope as MA  # noqa: E402
from kernels.triton import mla_decode as MD  # noqa: E402
from kernels.triton import moe as M  # noqa: E402
from kernels.triton import moe_gemv as MG  # noqa: E402
from kernels.triton import paged_tiles as PT  # noqa: E402
from kernels.triton import prefill as P  # noqa: E402
from kernels.triton import rope_kv as RK  # noqa: E402
from kernels.triton import few_rows as FR  # noqa: E402
from kernels.triton import penalties as PN  # noqa: E402
from kernels.triton import route as RT  # noqa: E402
from kernels.triton import sample as S  # noqa: E402
from kernels.triton import spec_accept as SA  # noqa: E402
from kernels.triton import split_kv as SK  # noqa: E402
from kernels.triton.common import next_pow2  # noqa: E402

pytestmark = pytest.mark.slow  # spawns processes / > 5 s: skipped by -m 'not slow'

CHECKS = ["attention", "mla_chunked", "prefill", "moe", "rows_and_sample", "per_batch",
          "gpt_oss", "fp8_kv", "pdl"]


@pytest.mark.parametrize("check", CHECKS)
def test_compiles_for_sm90(check):
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, here, env.get("PYTHONPATH", "")])
    code = f"import test_kernels_compile as t; t.check_{check}()"
    res = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]

PTR = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
       torch.int64: "*i64", torch.uint8: "*u8", torch.float8_e4m3fn: "*fp8e4nv"}


def compile_sm90(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int,
                 **options):
    """args: name -> torch dtype (pointer), int/float (scalar, 16-divisible ints marked) or a
    type string (e.g. "tensordesc<bf16[64, 128]>"); options: further compile options (e.g.
    maxnreg). Kernels compile as an sm_90 launch runs them: with PDL (kernels/triton/pdl.py)
    unless `constexprs` says otherwise."""
    if "PDL" in kernel.arg_names:
        constexprs = {"PDL": True, **constexprs}
        options = {"launch_pdl": constexprs["PDL"], **options}
    unknown = set(constexprs) - set(kernel.arg_names)
    assert not unknown, f"{kernel.fn.__name__} has no constexprs {sorted(unknown)}"
    sig, cex, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name], cex[(i,)] = "constexpr", constexprs[name]
            continue
        v = args.get(name, 1024)                       # strides default to a 16-multiple
        if isinstance(v, str):
            sig[name] = v
        elif isinstance(v, torch.dtype):
            sig[name] = PTR[v]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=cex, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    if constexprs.get("PDL"):
        early = kernel.fn.__name__ in WEIGHTS_BEFORE_WAIT
        _waits_before_memory(kernel.fn.__name__, compiled.asm["ptx"],
                             WRITES if early else GLOBAL_ACCESS)
    return compiled


# PTX instructions that read or write global memory (a TMA copy, an atomic, a plain access)
GLOBAL_ACCESS = ("ld.global", "st.global", "cp.async", "atom.global", "red.global")
WRITES = ("st.global", "atom.global", "red.global")
# kernels that read their weights (never written while serving) before the wait: only their
# writes are checked (their reads of other launches' outputs: check_pdl)
WEIGHTS_BEFORE_WAIT = ("_head_gemv_kernel", "_merged_head_gemv_kernel", "_absorb_rope_kernel",
                       "_router_logits_kernel")


def _waits_before_memory(name: str, ptx: str, ops: tuple[str, ...] = GLOBAL_ACCESS) -> None:
    """With PDL a kernel may run beside the one before it, so nothing it reads or writes may
    come before its griddepcontrol.wait (kernels/triton/pdl.py); the GEMV's L2 prefetch of
    weights is not an access. `ops`: the accesses checked (all by default)."""
    wait = ptx.find("griddepcontrol.wait")
    first = min((i for i in (ptx.find(op) for op in ops) if i >= 0), default=len(ptx))
    assert 0 <= wait < first, f"{name}: a global access before griddepcontrol.wait"


BF, F32, I32, I64 = torch.bfloat16, torch.float32, torch.int32, torch.int64


def check_attention() -> None:
    """GQA and MLA, decode (split-KV + merge) and extend, with the default tiles (the paged
    tile step and the extend block map of paged_tiles.py, the split range of split_kv.py
    inlined); and the decompressed MLA prefill (mla_prefill: 16 heads of 128 + shared 64 rope
    dims, values 128, on the GQA extend tiles of group 1)."""
    for decode in (True, False):
        for mla in (False, True):
            _attention(decode, mla)
    tiles = A.attention_tiles(False, False, 1)
    args = {n: BF for n in ("Q1", "Q2", "K1", "K2", "V", "Out")}
    args.update(PartO=F32, PartL=F32, PageTable=I32, QueryStart=I32, SeqLens=I32, BlockBatch=I32, BlockTok=I32,
                scale_log2=0.1, v_scale=1.0, group=1, min_split_len=64, stride_k2h=0)
    cex = dict(D1=128, D2=64, DV=128, BLOCK_D1=128, BLOCK_D2=64, BLOCK_DV=128,
               G_BLK=tiles.g_blk, BLOCK_T=tiles.block_t, BLOCK_N=tiles.block_n, N_HBLK=1,
               HAS_D2=True, SHARED_V=False, DECODE=False, EVEN_D=True, WINDOW=0,
               HAS_SINKS=False, PAGE_SIZE=1)
    compile_sm90(A._paged_attn_kernel, args, cex, tiles.num_warps, tiles.num_stages)


def _merge(dv: int, sinks: bool) -> None:
    """Merge tiles: many rows (wide column blocks), and batch 1 (narrow blocks, 256 splits)."""
    for block_dv, splits in ((128, 8), (16, 256)):
        compile_sm90(SK._merge_splits_kernel, dict(PartO=F32, PartL=F32, Out=BF, Sinks=BF),
                     dict(DV=dv, BLOCK_DV=min(block_dv, dv),
                          BLOCK_S=max(SK.MAX_DECODE_SPLITS, splits),
                          CHUNK_S=min(max(SK.MAX_DECODE_SPLITS, splits),
                                      SK.MERGE_TILE_ELEMS // block_dv), HAS_SINKS=sinks), 4, 1)


def _attention(decode: bool, mla: bool) -> None:
    tiles = A.attention_tiles(decode, mla, 16 if mla else 4)
    args = {n: BF for n in ("Q1", "Q2", "K1", "K2", "V", "Out")}
    args.update(PartO=F32, PartL=F32, PageTable=I32, QueryStart=I32, SeqLens=I32, BlockBatch=I32, BlockTok=I32,
                scale_log2=0.1, v_scale=1.0, group=4, min_split_len=64)
    d1, d2 = (512, 64) if mla else (128, 0)
    cex = dict(D1=d1, D2=d2, DV=d1, BLOCK_D1=d1, BLOCK_D2=max(16, d2), BLOCK_DV=d1,
               G_BLK=tiles.g_blk, BLOCK_T=tiles.block_t, BLOCK_N=tiles.block_n, N_HBLK=1,
               HAS_D2=mla, SHARED_V=mla, DECODE=decode, EVEN_D=True,
               WINDOW=0, HAS_SINKS=False, PAGE_SIZE=16)
    compile_sm90(A._paged_attn_kernel, args, cex, tiles.num_warps, tiles.num_stages)
    _merge(d1, False)
    if decode and not mla:
        for rows in (1, 16):           # 32-key tiles (A.NARROW_DECODE_ROWS), then 64-key ones
            _gqa_decode(128, 4, sinks=False, rows=rows)


def check_mla_chunked() -> None:
    """The register-lean MLA decode at DeepSeek-V2-Lite shapes (L=512, R=64, G_BLK=16): the
    registered default (4 chunks, 64-key tiles, 4 warps, query hoisted), then 32-key tiles
    with the latent in 4 and 2 chunks at 4 and 8 warps (split-KV or not is a run-time
    branch of each variant), the query per tile or hoisted, 16 or 4 heads (TP4: masked rows), one with a register cap; whole tiles
    copied by tensor descriptors (TMA) or gathered; then the rope + cache write with the
    latent's norm."""
    args = dict(QL=BF, QR=BF, KV=BF, Out=BF, PageTable=I32, SeqLens=I32, scale_log2=0.1,
                num_heads=16, min_split_len=64, stride_kv=576)
    for nc, block_n, warps, q_in_loop, heads, regs, tma in (
            (4, 64, 4, False, 16, None, True), (4, 64, 4, False, 16, None, False),
            (4, 32, 4, True, 16, 128, False), (4, 32, 8, False, 16, None, True),
            (2, 32, 4, True, 4, None, False), (2, 32, 8, False, 16, None, True)):
        descs = (dict(DescLat=f"tensordesc<bf16[{block_n}, {512 // nc}]>",
                      DescRope=f"tensordesc<bf16[{block_n}, 64]>") if tma
                 else dict(DescLat=BF, DescRope=BF))
        cex = dict(L=512, R=64, BLOCK_R=64, CH=512 // nc, NC=nc, G_BLK=16, BLOCK_N=block_n,
                   EVEN_H=heads % 16 == 0, EVEN_R=True, Q_IN_LOOP=q_in_loop,
                   TMA=tma, PAGE_SIZE=64)
        compile_sm90(MD._mla_decode_chunked_kernel,
                     dict(args, **descs, PartO=F32, PartL=F32, num_heads=heads), cex, warps,
                     2, **({} if regs is None else dict(maxnreg=regs)))
    # MLA's rope + cache write with the kv_a layernorm on the latent (one KV "head": rope key
    # 64, latent 512), as DeepSeek-V2-Lite's layers launch it
    compile_sm90(RK._rope_kv_kernel, dict({n: BF for n in ("Q", "K", "V", "QOut", "KOut",
                                                            "KCache", "VCache", "VNormW")},
                                          Pos=I64, CosSin=F32, Slots=I64, v_norm_eps=1e-6,
                                          inv_k_scale=1.0, inv_v_scale=1.0, HQ=16, HK=1, R=64),
                 dict(D=64, DV=512, BLOCK_HQ=16, BLOCK_HK=1, BLOCK_D=64, BLOCK_DV=512,
                      IS_NEOX=False, STORE=True, FP8=False, V_NORM=True), 4, 1)
    # ... and beside W_UK's head GEMV (K 128, N 512), one launch (mla_absorb_rope.py)
    compile_sm90(MA._absorb_rope_kernel, dict({n: BF for n in ("Q", "Kr", "V", "QOut", "KOut",
                                                                "KCache", "VCache", "VNormW",
                                                                "X", "W", "QLat")},
                                              Pos=I64, CosSin=F32, Slots=I64, v_norm_eps=1e-6,
                                              inv_k_scale=1.0, inv_v_scale=1.0, HQ=16, HK=1,
                                              R=64, N=512, K=128),
                 dict(BLOCK_K=128, BLOCK_N=64, D=64, DV=512, BLOCK_HQ=16, BLOCK_HK=1,
                      BLOCK_D=64, BLOCK_DV=512, IS_NEOX=False, STORE=True, FP8=False,
                      V_NORM=True), 4, 1)


def check_prefill() -> None:
    """The contiguous-K/V prefill at its default tiles (Llama-3.1-8B: group 4, d 128: 64
    tokens x 4 heads, 64-key tiles, 8 warps, 3 stages) and an MHA / 128-row variant."""
    tiles = P.prefill_tiles()
    for group, rows, block_n in ((4, tiles.rows, tiles.block_n), (1, 128, 128)):
        _prefill(128, group, rows, block_n, sinks=False)


def _prefill(d: int, group: int, rows: int, block_n: int, sinks: bool, cache=BF) -> None:
    """The contiguous prefill kernel, head dim d, over a cache of dtype `cache`."""
    tiles = P.prefill_tiles()
    desc = f"tensordesc<bf16[{block_n}, {d}]>"
    args = dict(Q=BF, KCache=cache, VCache=cache, DescK=desc, DescV=desc, Out=BF, Sinks=BF,
                PageTable=I32, QueryStart=I32, SeqLens=I32, BlockBatch=I32, BlockTok=I32,
                scale_log2=0.1, prefix_scale_log2=0.05, v_scale=0.5, group=group)
    ptx = compile_sm90(P._prefill_kernel, args,
                       dict(D=d, DV=d, G_BLK=group, BLOCK_T=rows // group, BLOCK_N=block_n,
                            N_HBLK=1, HAS_SINKS=sinks, PAGE_SIZE=16), tiles.num_warps,
                       tiles.num_stages).asm["ptx"]
    _no_byte_loads_from_shared(ptx)


def _row_kernels() -> None:
    compile_sm90(E._rms_norm_kernel, dict(X=BF, R=BF, W=BF, Out=BF, ResOut=BF, eps=1e-6),
                 dict(H=4096, BLOCK_H=4096, HAS_RES=True, HAS_WEIGHT=True), 8, 1)
    compile_sm90(E._silu_and_mul_kernel, dict(X=BF, Out=BF), dict(I=14336, BLOCK=1024), 4, 1)
    _cache_writers(BF)
    for n, k in ((6144, 4096), (28672, 4096), (4096, 14336)):   # the 8B: qkv, gate_up, down
        _gemv(n, k)
    _gemv(28672, 4096, silu_mul=True)                              # gate_up with its SiLU
    _gemv(576, 2048)                                               # small: DeepSeek's kv_a
    _gemv(5632, 2048, silu_mul=True)                               # ... its shared experts
    _gemv(6144, 4096, norm=True)                                   # the 8B's qkv, normed
    _gemv(28672, 4096, silu_mul=True, norm=True)                   # ... its gate_up, normed
    _gemv(3648, 2048, norm=True)                                   # DeepSeek's q | kv_a, normed
    # the norms' scales in the weights (layers/norm.py SCALED_KINDS)
    _gemv(6144, 4096, norm=True, norm_weight=False)
    _gemv(28672, 4096, silu_mul=True, norm=True, norm_weight=False)
    _gemv(128256, 4096, norm=True, norm_weight=False)              # the head
    for cfg, silu_mul in ((FR.NARROW, False), (FR.TALL, False), (FR.WIDE, False),
                          (FR.MEDIUM_NARROW, False), (FR.MEDIUM_WIDE, False),
                          (FR.MEDIUM_SMALL, False),                     # 2-64 rows
                          (FR.WIDE, True), (FR.MEDIUM_WIDE, True)):     # gate_up with its SiLU
        compile_sm90(FR._few_rows_kernel, dict(X=BF, W=BF, B=BF, Out=BF, M=3, N=4096, K=4096,
                                               stride_x=4096, stride_w=4096, stride_o=4096),
                     dict(HAS_BIAS=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          BLOCK_K=cfg.block_k, EVEN_K=True, STREAM_W=True, SILU_MUL=silu_mul),
                     cfg.num_warps, cfg.num_stages)
    compile_sm90(SA._spec_accept_kernel, dict(Tokens=I32, Drafts=I32, Start=I32, Counts=I32),
                 dict(BLOCK=SA.BLOCK), 4, 1)
    compile_sm90(PN._penalties_kernel, dict(Logits=F32, Rows=I64, Slots=I64, Seen=torch.uint8,
                                            Counts=I32, Rep=F32, Pres=F32, Freq=F32, stride_rep=3,
                                            stride_pres=3, stride_freq=3, V=128256),
                 dict(BLOCK=PN.BLOCK_V), 4, 1, enable_fp_fusion=False)
    for verify in (False, True):
        compile_sm90(PN._count_tokens_kernel, dict(Counts=I32, Slots=I64, Rows=I64, Tokens=I32,
                                                   Places=I32, Accepted=I32, Chains=I64, R=3),
                     dict(VERIFY=verify, BLOCK=PN.COUNT_BLOCK), 4, 1)


def _gemv(n: int, k: int, pdl: bool = True, silu_mul: bool = False, norm: bool = False,
          norm_weight: bool = True):
    """norm: with the RMS norm and its residual in the loads (rms_norm_linear), and the norm's
    weight unless norm_weight says not (the scale in the GEMV's weight)."""
    config = G.gemv_config(n, k, norm)
    return compile_sm90(G._gemv_kernel, dict(X=BF, W=BF, B=BF, Out=BF, R=BF, G=BF, ResOut=BF,
                                             N=n // 2 if silu_mul else n, K=k, stride_w=k,
                                             eps=1e-6),
                        dict(HAS_BIAS=False, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                             EVEN_K=k % config.block_k == 0, SILU_MUL=silu_mul, NORM=norm,
                             HAS_RES=norm, NORM_WEIGHT=norm and norm_weight, PDL=pdl),
                        config.num_warps, config.num_stages)


def _cache_writers(cache) -> None:
    """rope_store_kv's and store_kv's kernels (Llama-3.1-8B heads) writing a cache of dtype
    `cache` (bf16, or FP8: scaled and saturated)."""
    ptrs = {n: BF for n in ("Q", "K", "V", "QOut", "KOut")}
    scales = dict(inv_k_scale=1.0, inv_v_scale=1.0)
    fp8 = cache == torch.float8_e4m3fn
    compile_sm90(RK._rope_kv_kernel, dict(ptrs, KCache=cache, VCache=cache, Pos=I64,
                                          CosSin=F32, Slots=I64, VNormW=BF, v_norm_eps=1e-6,
                                          HQ=32, HK=8, R=128, **scales),
                 dict(D=128, DV=128, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_D=128, BLOCK_DV=128,
                      IS_NEOX=True, STORE=True, FP8=fp8, V_NORM=False), 4, 1)
    compile_sm90(RK._store_kv_kernel, dict(K=BF, V=BF, KCache=cache, VCache=cache, Slots=I64,
                                           HK=8, **scales),
                 dict(D=128, DV=128, BLOCK_HK=8, BLOCK_D=128, BLOCK_DV=128, FP8=fp8), 4, 1)


def check_moe() -> None:
    """Each tile configuration the MoE picks (decode, mid, prefill batches); the decode tiles
    also with one block per pair (batch 1: the kernels read the int32 routing ids). Routing
    at DeepSeek-V2-Lite's shape (64 experts, top-6, softmax) and V3's (256, top-8, sigmoid
    with bias, 4 of 8 groups, renormalized)."""
    for pairs_per_expert, pair_blocks in ((4.0, True), (4.0, False), (30.0, False),
                                          (500.0, False)):
        _moe(pairs_per_expert, pair_blocks)
    _moe_gemv()
    for e, k, groups, keep, softmax in ((64, 6, 1, 1, True), (256, 8, 8, 4, False)):
        compile_sm90(RT._moe_route_kernel, dict(Logits=F32, Bias=F32, Weights=F32, Ids=I32,
                                                routed_scaling=1.0),
                     dict(E=e, BLOCK_E=e, TOP_K=k, BLOCK_K=8, N_GROUP=groups, TOPK_GROUP=keep,
                          BLOCK_G=max(2, groups), SOFTMAX=softmax, HAS_BIAS=not softmax,
                          RENORM=not softmax), 1 if e <= 256 else 4, 1)
    # the router's logits: V2-Lite (64 experts x 2048) and V3 (256 x 7168) gates
    for (e, h), norm in itertools.product(((64, 2048), (256, 7168)), (False, True)):
        block_k = min(next_pow2(h), RT.ROUTER_TILE_ELEMS)
        block_e = RT.ROUTER_TILE_ELEMS // block_k
        slice_ = -(-h // -(-e // block_e))          # the row's elements a program normalises
        compile_sm90(RT._router_logits_kernel,
                     dict(X=BF, W=F32, Out=F32, R=BF, G=BF, Normed=BF, ResOut=BF, eps=1e-6),
                     dict(H=h, E=e, BLOCK_E=block_e, BLOCK_K=block_k, EARLY=RT.EARLY_TILE,
                          SLICE=slice_ if norm else 1,
                          BLOCK_S=next_pow2(slice_) if norm else 1, NORM=norm, HAS_RES=norm),
                     4, 1)


def _moe(ppe: float, pair_blocks: bool, gpt_oss: bool = False, mxfp4: bool = False) -> None:
    """DeepSeek-V2-Lite's experts (64 x 2048 -> 1408, top-6), or with gpt_oss GPT-OSS-20b's
    (32 x 2880 -> 2880, top-4, biases, clamped SwiGLU, gate/up interleaved), bf16 or MXFP4."""
    tiles = M.moe_tiles(ppe)
    cex = dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
               BLOCK_K=max(32, tiles.block_k) if mxfp4 else tiles.block_k,
               PAIR_BLOCKS=pair_blocks, HAS_BIAS=gpt_oss, MXFP4=mxfp4)
    h, inter, e, k = (2880, 2880, 32, 4) if gpt_oss else (2048, 1408, 64, 6)
    w = torch.uint8 if mxfp4 else BF
    common = dict(Pairs=I32, BlockExpert=I32, num_pairs=6, top_k=k, num_experts=e,
                  alpha=1.702, limit=7.0)
    compile_sm90(M._moe_up_kernel, dict(common, X=BF, W13=w, Inter=BF, B13=BF, W13S=w),
                 dict(K=h, I=inter, CLAMPED=gpt_oss, INTERLEAVED=gpt_oss, **cex),
                 tiles.num_warps, tiles.num_stages)
    compile_sm90(M._moe_down_kernel, dict(common, Inter=BF, W2=w, Weights=F32, Out=BF, B2=BF,
                                          W2S=w),
                 dict(K=inter, H=h, **cex), tiles.num_warps, tiles.num_stages)
    for shared in (False, True):   # DeepSeek's shared experts' output added, or none
        compile_sm90(M._sum_topk_kernel, dict(Pairs=BF, Shared=BF, Out=BF),
                     dict(TOP_K=6, H=2048, BLOCK_H=M.SUM_BLOCK_H, HAS_SHARED=shared), 4, 1)


def _moe_gemv() -> None:
    """moe_gemv.py's one-token kernels at DeepSeek-V2-Lite's experts (64 x 2048 -> 1408,
    top-6) and default tiles: the shared experts' 2816 as two slices, their output added, or
    neither."""
    t = MG.DEFAULT_TILES
    compile_sm90(MG._up_kernel, dict(X=BF, W13=BF, Ids=I32, Inter=BF, SW13=BF, num_experts=64,
                                     I=1408, I_SHARED=2816),
                 dict(K=2048, TOP_K=6, BLOCK_N=t.up_block_n, BLOCK_K=t.up_block_k), t.up_warps,
                 t.num_stages)
    for slices, shared in ((2, False), (0, True), (0, False)):
        compile_sm90(MG._down_kernel, dict(Inter=BF, W2=BF, Ids=I32, Weights=F32, Shared=BF,
                                           SW2=BF, Out=BF, num_experts=64, H=2048),
                     dict(K=1408, TOP_K=6, N_SHARED=slices, BLOCK_N=t.down_block_n,
                          BLOCK_K=t.down_block_k, HAS_SHARED=shared), t.down_warps,
                     t.num_stages)


def _sample() -> None:
    """Llama-3's vocabulary (128256) at the default sizes."""
    sizes = S.sample_sizes()
    nc = -(-128256 // sizes.chunk)
    args = dict(Logits=F32, Temp=F32, TopK=I32, TopP=F32, Seeds=I64, Pos=I64, CandV=F32,
                CandI=I32, BestV=F32, BestI=I32, ChunkZ=F32, Overflow=I32, Out=I32, TopV=F32,
                TopI=I32, stride_l=128256, V=128256, NC=nc)
    compile_sm90(S._sample_chunk_kernel, args, dict(CHUNK=sizes.chunk, KCAP=sizes.kcap,
                                                    GROUPS=S.chunk_groups(sizes.chunk)), 8, 1)
    ncand = next_pow2(nc * sizes.kcap)
    compile_sm90(S._sample_finish_kernel, args,
                 dict(KCAP=sizes.kcap, NCAND=ncand, CAND_GROUPS=S.candidate_groups(ncand),
                      NTOP=2 * sizes.kcap, BLOCK_J=S.RANK_COLUMNS, BLOCK_NC=next_pow2(nc),
                      BLOCK_V=sizes.block_v), 8, 1)


def check_rows_and_sample() -> None:
    _row_kernels()
    _sample()


def check_per_batch() -> None:
    """Arguments that vary from batch to batch are not specialized, so serving compiles no
    new variant (common.per_batch): split counts, page-table widths and partial strides by
    value; the engine's metadata views (packed in one copy, sliced at the decode rows) by
    alignment."""
    def unspecialized(kernel, ints=(), pointers=()):
        params = {p.name: p for p in kernel.params}
        assert all(params[n].do_not_specialize for n in ints), (kernel, ints)
        assert all(params[n].do_not_specialize_on_alignment for n in pointers), (kernel, pointers)

    unspecialized(A._paged_attn_kernel, SK.SPLIT_INTS + ("stride_pt",), PT.BATCH_META)
    unspecialized(SK._merge_splits_kernel, SK.SPLIT_INTS)
    unspecialized(MD._mla_decode_chunked_kernel, SK.SPLIT_INTS + ("stride_pt",),
                  ("PageTable", "SeqLens"))
    unspecialized(P._prefill_kernel, ("stride_pt",), PT.BATCH_META)
    unspecialized(M._moe_up_kernel, ("num_pairs",))
    unspecialized(M._moe_down_kernel, ("num_pairs",))
    unspecialized(RK._rope_kv_kernel, (), ("Pos", "Slots"))
    unspecialized(MA._absorb_rope_kernel, (), ("Pos", "Slots"))
    unspecialized(HG._merged_head_gemv_kernel, HG.MERGED_PER_BATCH)
    unspecialized(RK._store_kv_kernel, (), ("Slots",))
    unspecialized(FR._few_rows_kernel, ("M",))
    for kernel in (S._sample_chunk_kernel, S._sample_finish_kernel):
        unspecialized(kernel, (), S.ROW_PARAMS)


def check_gpt_oss() -> None:
    """GPT-OSS-20b's shapes (64 query heads of 64 over 8 KV heads, 128-key window, sinks):
    decode (one variant, split or whole; the merge with sinks) and extend on the gathering
    kernel, sliding and full; the contiguous prefill with sinks; the biased, clamped, interleaved experts at
    each tile configuration, bf16 and MXFP4."""
    for decode in (True, False):
        for window in (128, 0):
            _gqa_attention(64, 8, decode, window, True)
    _gqa_decode(64, 8, sinks=True)
    _merge(64, True)
    tiles = P.prefill_tiles()
    _prefill(64, 8, tiles.rows, tiles.block_n, sinks=True)
    for pairs_per_expert, pair_blocks in ((4.0, True), (4.0, False), (30.0, False),
                                          (500.0, False)):
        _moe(pairs_per_expert, pair_blocks, gpt_oss=True)
        _moe(pairs_per_expert, pair_blocks, gpt_oss=True, mxfp4=True)


def check_fp8_kv() -> None:
    """An FP8 (e4m3) cache at Llama-3.1-8B's shapes (32 query heads of 128 over 8 KV heads):
    the cache writers, decode (one variant, split or whole) and extend on the gathering kernel,
    GPT-OSS's window and sinks on it, and the contiguous prefill over an FP8 prefix."""
    f8 = torch.float8_e4m3fn
    _cache_writers(f8)
    for decode in (True, False):
        for window, sinks in ((0, False), (128, True)):
            _gqa_attention(128, 4, decode, window, sinks, cache=f8)
    for rows in (1, A.FP8_WIDE_ROWS, A.FP8_WORDS_WIDE_ROWS):
        _gqa_decode(128, 4, sinks=rows > 1, cache=f8, rows=rows)
    tiles = P.prefill_tiles()
    _prefill(128, 4, tiles.rows, tiles.block_n, sinks=False, cache=f8)


def _gqa_attention(d: int, group: int, decode: bool, window: int, sinks: bool,
                   cache=BF) -> None:
    """The paged kernel for GQA (head dim d, `group` query heads a KV head) at its default
    tiles, over a cache of dtype `cache`."""
    tiles = A.attention_tiles(decode, False, group)
    args = dict(Q1=BF, Q2=BF, K1=cache, K2=cache, V=cache, Out=BF, Sinks=BF, PartO=F32,
                PartL=F32, PageTable=I32, QueryStart=I32, SeqLens=I32, BlockBatch=I32,
                BlockTok=I32, scale_log2=0.1, v_scale=0.5, group=group, min_split_len=64)
    cex = dict(D1=d, D2=0, DV=d, BLOCK_D1=d, BLOCK_D2=16, BLOCK_DV=d, G_BLK=tiles.g_blk,
               BLOCK_T=tiles.block_t, BLOCK_N=tiles.block_n, N_HBLK=1, HAS_D2=False,
               SHARED_V=False, DECODE=decode, EVEN_D=True, WINDOW=window, HAS_SINKS=sinks,
               PAGE_SIZE=16)
    compile_sm90(A._paged_attn_kernel, args, cex, tiles.num_warps, tiles.num_stages)


def _gqa_decode(d: int, group: int, sinks: bool, cache=BF, rows: int = 1) -> None:
    """gqa_decode.py's kernel (head dim d, `group` query heads a KV head) at the default tiles
    of a `rows`-row launch over a cache of dtype `cache`; over a 16-bit cache within 128
    registers a thread (4 programs an SM, as the generic kernel's 109: the merge's tile is
    sized for it; an FP8 cache's tiles take more in either kernel)."""
    tiles = A.attention_tiles(True, False, group, rows, fp8=cache != BF, v_words=True)
    merge_g, chunk_s = GD.merge_shape(group, tiles.g_blk, d)
    args = dict(Q=BF, K=cache, V=cache, Out=BF, PartO=F32, PartL=F32, Tickets=I32, Sinks=BF,
                PageTable=I32, SeqLens=I32, KNew=BF, VNew=BF, Pos=I32, CosSin=F32,
                Slots=torch.int64, scale_log2=0.1, v_scale=0.5, group=group, min_split_len=64,
                inv_k_scale=1.0, inv_v_scale=1.0, R=d)
    # the rope and the new tokens' cache write in the launch (the new key from registers at
    # few rows, else read back from the cache)
    for rope in (False, True):
        regs = rope and rows <= GD.NEW_KEY_IN_REGISTERS_ROWS
        cex = dict(D=d, DV=d, BLOCK_D=d, BLOCK_DV=d, G_BLK=tiles.g_blk, BLOCK_N=tiles.block_n,
                   N_HBLK=1, MERGE_G=merge_g, CHUNK_S=chunk_s, EVEN_D=True, HAS_SINKS=sinks,
                   PAGE_SIZE=16, ROPE=rope, IS_NEOX=True, FP8_STORE=cache != BF,
                   NEW_IN_REGS=regs)
        ptx = compile_sm90(GD._gqa_decode_kernel, args, cex, tiles.num_warps,
                           tiles.num_stages).asm["ptx"]
        assert cache != BF or _registers(ptx) <= 128, (rope, regs, _registers(ptx))
        _no_byte_loads_from_shared(ptx)


def _no_byte_loads_from_shared(ptx: str) -> None:
    """The e4m3 values reach the P.V product unpacked from words (paged_tiles.load_e4m3_words),
    not a byte a load from shared memory (256 `ld.shared.u8` in gqa_decode's loops before)."""
    assert not re.search(r"ld\.shared\.[ub]8", ptx)


def _registers(ptx: str) -> int:
    """Registers a thread of the kernel in `ptx` takes on sm_90 (ptxas -v)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_nv.get_ptxas(90).path, "-arch=sm_90a", "-v", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                             check=True)
    return int(re.search(r"Used (\d+) registers", res.stdout + res.stderr).group(1))


def check_pdl() -> None:
    """With PDL a kernel waits for the one before (griddepcontrol.wait) before it touches its
    tensors, then lets the next launch; the GEMV asks L2 for its first weight tile before the
    wait. Without PDL none of it is emitted (the interpreter's and older GPUs' path)."""
    ptx = _gemv(6144, 4096).asm["ptx"]     # compile_sm90 checks no access precedes the wait
    prefetch, wait = ptx.find("prefetch.global.L2"), ptx.find("griddepcontrol.wait")
    assert 0 <= prefetch < wait < ptx.find("griddepcontrol.launch_dependents"), ptx[:3000]
    plain = _gemv(6144, 4096, pdl=False).asm["ptx"]
    assert "griddepcontrol" not in plain and "prefetch" not in plain
    # MLA's per-head products at DeepSeek-V2-Lite's shape: W_UK (K 128, N 512, rows of the
    # output contiguous) and W_UV^T (K 512 contiguous, N 128): the weight tile's loads come
    # before the wait, the input's after it (one load each: the tile is read at once)
    for k, n, block_n in ((128, 512, 64), (512, 128, 16)):
        ptx = compile_sm90(HG._head_gemv_kernel, dict(X=BF, W=BF, Out=BF, N=n, K=k),
                           dict(BLOCK_K=k, BLOCK_N=block_n), 4, 1).asm["ptx"]
        wait = ptx.find("griddepcontrol.wait")
        assert 0 <= ptx.find("ld.global") < wait < ptx.rfind("ld.global")
    # ... and W_UV^T with one token's split merge inside (16 heads, 256-wide lse vectors)
    ptx = compile_sm90(HG._merged_head_gemv_kernel, dict(PartO=F32, PartL=F32, W=BF, Out=BF,
                                                         N=128),
                       dict(K=512, BLOCK_N=32, BLOCK_S=256, CHUNK_S=32), 8, 1).asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    assert 0 <= ptx.find("ld.global") < wait < ptx.rfind("ld.global")
