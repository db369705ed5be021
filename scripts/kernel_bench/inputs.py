"""Synthetic inputs at real model shapes: paged caches with shuffled pages, queries, logits.

Shapes: Llama-3.1-8B (32 q heads, 8 kv heads, head_dim 128) and DeepSeek-V2-Lite (16 heads,
kv_lora_rank 512, rope 64). Page tables give each row its own pages in a random order."""
from __future__ import annotations

import torch
import triton

from .harness import BF16, DEV

MLA_LATENT, MLA_ROPE = 512, 64          # DeepSeek-V2-Lite's compressed cache rows
MLA_SCALE = (128 + 64) ** -0.5          # its qk_nope + qk_rope head dims


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


def gqa_extend_inputs(seq: int, qlen: int, page_size: int, hq: int = 32, hk: int = 8,
                      d: int = 128):
    """One row of qlen new tokens ending a seq-long sequence: table, k/v caches, q [qlen, Hq,
    D], query_start, seq_lens."""
    table, num_pages = paged_table(1, seq, page_size)
    kc = torch.randn(num_pages * page_size, hk, d, dtype=BF16, device=DEV)
    vc = torch.randn_like(kc)
    q = torch.randn(qlen, hq, d, dtype=BF16, device=DEV)
    qs = torch.tensor([0, qlen], dtype=torch.int32, device=DEV)
    sl = torch.tensor([seq], dtype=torch.int32, device=DEV)
    return table, kc, vc, q, qs, sl


def new_token_kv(cache: torch.Tensor, table: torch.Tensor, seq: int, qlen: int,
                 page_size: int) -> torch.Tensor:
    """The cache rows of positions [seq - qlen, seq) of row 0: the K (or V) of an extend
    step's new tokens as the model hands them over, [qlen, H, D] contiguous."""
    n = torch.arange(seq - qlen, seq, device=DEV)
    return cache[table[0].long()[n // page_size] * page_size + n % page_size].contiguous()


def mla_inputs(batch: int, ctx: int, page_size: int, heads: int, tokens: int | None = None,
               table_ctx: int | None = None):
    """Paged MLA inputs: table, cache [S, L+R], q_latent / q_rope [tokens (default: batch),
    H, L / R], seq_lens (all ctx); table_ctx as gqa_inputs'."""
    table, num_pages = paged_table(batch, max(ctx, table_ctx or 0), page_size)
    cache = torch.randn(num_pages * page_size, MLA_LATENT + MLA_ROPE, dtype=BF16, device=DEV)
    t = tokens if tokens is not None else batch
    ql = torch.randn(t, heads, MLA_LATENT, dtype=BF16, device=DEV)
    qr = torch.randn(t, heads, MLA_ROPE, dtype=BF16, device=DEV)
    sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    return table, cache, ql, qr, sl


def mla_cache_bytes(batch: int, ctx: int) -> int:
    """Bytes of compressed cache an MLA decode reads."""
    return batch * ctx * (MLA_LATENT + MLA_ROPE) * 2


def causal_flops(qlen: int, seq: int, heads: int, dqk: int, dv: int) -> float:
    """Exact FLOPs of causal attention for qlen queries that end a seq-long sequence."""
    visible = qlen * (seq - qlen) + qlen * (qlen + 1) / 2
    return 2.0 * heads * visible * (dqk + dv)


def moe_weights(experts: int = 64, hidden: int = 2048, inter: int = 1408
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2-Lite's routed experts: w13 [E, 2I, H], w2 [E, H, I]."""
    w13 = torch.randn(experts, 2 * inter, hidden, dtype=BF16, device=DEV) * 0.02
    w2 = torch.randn(experts, hidden, inter, dtype=BF16, device=DEV) * 0.02
    return w13, w2


def sample_logits(batch: int, vocab: int, peaked: bool) -> torch.Tensor:
    """N(0, 16) logits; peaked: 8 random tokens per row lifted by 16 (the top 128 then hold
    nearly all the mass, as in most LLM steps; at N(0, 16) alone they often do not)."""
    logits = torch.randn(batch, vocab, device=DEV) * 4
    if peaked:
        lift = torch.rand(batch, vocab, device=DEV).topk(8, 1).indices
        logits.scatter_add_(1, lift, torch.full(lift.shape, 16.0, device=DEV))
    return logits
