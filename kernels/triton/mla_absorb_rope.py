"""`mla_absorb_rope` on CUDA: MLA's W_UK product beside its rope and cache write, one launch.

After the fused q | kv_a projection an MLA layer runs two kernels that do not depend on each
other: the query's absorption into the latent space (q_nope x W_UK, head_gemv.py) and the
rope of q^R and k^R with the cache write of the token's normed latent (rope_kv.py). In a
batch-1 decode each is a few microseconds of latency for little work, and the chain of
programmatic dependent launches ran them one after the other. Here one launch runs both: its
first H x blocks programs are head_gemv's (their weight tile read before the PDL wait), the
last two rope_kv's: one rotates the query's rope part, the other the rope key and writes the
cache (the latent normed), so neither waits for the other's loads. More tokens (or shapes
head_gemv does not take) run the two ops one after the other.

H200, DeepSeek-V2-Lite's B=1 decode graph (1K keys; `scripts/gpu_op_ablation.py --ablations
absorb_apart`, 3 rounds): two launches 1,937 us a step, one 1,917 (one rope program); in a
later call 1,954 -> 1,928 with the token's rope in two programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.registry import register
from kernels.triton.common import PRIORITY, check, per_batch
from kernels.triton.head_gemv import (head_gemv_applies, head_gemv_launch, head_gemv_program,
                                      head_matmul)
from kernels.triton.pdl import pdl_begin, pdl_launch
from kernels.triton.rope_kv import _store_ok, rope_kv_launch, rope_kv_token, rope_store_kv


@triton.jit(**per_batch(pointers=("Pos", "Slots")))
def _absorb_rope_kernel(X, W, QLat, N, K, stride_xh, stride_xk, stride_wh, stride_wk,
                        stride_wn, stride_oh, col_blocks,
                        Q, Kr, V, Pos, CosSin, QOut, KOut, KCache, VCache, Slots, VNormW,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
                        stride_kcs, stride_kch, stride_vcs, stride_vch, inv_k_scale,
                        inv_v_scale, v_norm_eps, HQ, HK, R,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                        DV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_NEOX: tl.constexpr,
                        STORE: tl.constexpr, FP8: tl.constexpr, V_NORM: tl.constexpr,
                        PDL: tl.constexpr):
    """Programs [0, HQ * col_blocks): W_UK's head GEMV, (head, column block) each; then two a
    token: its q's rope, and its k's rope with the cache write."""
    pid = tl.program_id(0)
    gemv_programs = HQ * col_blocks
    if pid < gemv_programs:
        head_gemv_program(pid // col_blocks, pid % col_blocks, X, W, QLat, N, K, stride_xh,
                          stride_xk, stride_wh, stride_wk, stride_wn, stride_oh, BLOCK_K,
                          BLOCK_N, PDL)
    else:
        pdl_begin(PDL)
        tok = ((pid - gemv_programs) // 2).to(tl.int64)
        part = (pid - gemv_programs) % 2                      # 0: q's rope; 1: k's + cache
        rope_kv_token(tok, Q, Kr, V, Pos, CosSin, QOut, KOut, KCache, VCache, Slots, VNormW,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                      stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs, stride_kcs,
                      stride_kch, stride_vcs, stride_vch, inv_k_scale, inv_v_scale, v_norm_eps,
                      HQ, HK, R, D, DV, BLOCK_HQ, BLOCK_HK, BLOCK_D, BLOCK_DV, IS_NEOX, STORE,
                      FP8, V_NORM, part == 0, part == 1)


@register("mla_absorb_rope", backend="triton", priority=PRIORITY, supports=_store_ok)
def mla_absorb_rope(q_nope: torch.Tensor, w_uk: torch.Tensor, q_rope: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin: torch.Tensor, rotary_dim: int, is_neox: bool,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    k_scale: float = 1.0, v_scale: float = 1.0,
                    v_norm_weight: torch.Tensor | None = None, v_norm_eps: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's contract (kernels/reference/mla.py): one token in one launch (module
    doc), more by head_matmul and rope_store_kv."""
    check(k_cache.dtype == v_cache.dtype, "mla_absorb_rope: k_cache and v_cache dtypes differ")
    check(q_nope.shape[:2] == q_rope.shape[:2], "mla_absorb_rope: q_nope and q_rope heads differ")
    if not (q_nope.shape[0] == 1 and head_gemv_applies(q_nope, w_uk)):
        q_rot, _ = rope_store_kv(q_rope, k, v, positions, cos_sin, rotary_dim, is_neox, k_cache,
                                 v_cache, slot_mapping, k_scale, v_scale, v_norm_weight,
                                 v_norm_eps)
        return head_matmul(q_nope, w_uk), q_rot
    gemv_args, gemv_cex, col_blocks, q_latent = head_gemv_launch(q_nope, w_uk)
    rope_args, rope_cex, q_rot, _ = rope_kv_launch(
        q_rope, k, v, positions, cos_sin, rotary_dim, is_neox, k_cache, v_cache, slot_mapping,
        True, k_scale, v_scale, v_norm_weight, v_norm_eps)
    _absorb_rope_kernel[(q_nope.shape[1] * col_blocks + 2,)](
        *gemv_args, col_blocks, *rope_args, **gemv_cex, **rope_cex, num_warps=4,
        **pdl_launch(q_nope.device))
    return q_latent, q_rot
