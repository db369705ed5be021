"""Building blocks shared by the paged attention kernels (attention.py, gqa_decode.py,
prefill.py).

- `attn_tile`: one online-softmax step over a tile of keys gathered through the page table
  (`slot = page * page_size + offset`, so any page size works), scores in log2 units. Cache
  elements are cast to the query's dtype as they load, so an FP8 cache (e4m3, exact in bf16
  and fp16) is read by the same code; its scales are folded in by the callers (k_scale into
  the score scale, v_scale into the accumulator once its cached tiles are summed).
- `load_e4m3_words`: an e4m3 key or value tile read as 32-bit words and unpacked in registers
  (compiled: two `cvt.rn.f16x2.e4m3x2` a word, `E4M3_ASM`; interpreted: shifts and casts). V is
  P.V's B operand with the keys along the reduction; an 8-bit tile there was staged in shared
  memory as loaded and read back one byte a load (`ld.shared.u8`: sm_90 has no transposing
  ldmatrix for 8-bit types), 256 of them in gqa_decode's loops. Unpacked first, the fp16 tile
  is staged by a transposing ldmatrix: gqa_decode's sm_90 code 3,635 -> 3,422 instructions,
  207 -> 168 registers a thread. H200 (copy 4.27 TB/s; Llama-3.1-8B heads, graph replays, L2
  flushed), FP8 decode us, bytes -> words, each at its tiles' rule: B=256 x 2K keys 436.8 ->
  394.8 (bf16 489.5), x 1K 235.7 -> 210.4; B=64 x 2K 116.8 -> 113.0; B=16 x 2K 51.0 -> 38.0,
  x 1K 30.9 -> 23.7; B=1 x 2K 14.5 -> 14.0. The contiguous prefill over an FP8 prefix gains
  too (1 x (4096 + 256 new) 269.6 -> 254.4 us); the generic kernel's gathered extend lost
  (16 rows x (2048 + 5) 86.2 -> 94.3) and keeps the bytes (the `V_WORDS` constexpr). The
  callers check the cache with `check_e4m3_words` (rows and heads on 4-byte boundaries).
- `attn_range`: `attn_tile` over a range of keys, the tiles every row sees whole unmasked.
- `add_sink`: a head's sink logit (GPT-OSS) joining a softmax's denominator.
- `extend_block` / `block_map`: which (row, first query token) an extend program serves. The
  map is built on the device from `query_start` (no host sync, so launches can be captured in
  CUDA graphs); the grid is sized from the token and row counts alone.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.step_memo import memoized
from kernels.triton.common import interpreting

# The batch's metadata, per-batch views and slices of one packed copy: kernels that read them
# keep them unspecialized on alignment (common.per_batch)
BATCH_META = ("PageTable", "QueryStart", "SeqLens", "BlockBatch", "BlockTok")


@triton.jit
def load_rows(Base, slot, stride_s, d, D: tl.constexpr, n_ok, PRED: tl.constexpr):
    """Gathered rows Base[slot[n], d] -> [N, BLOCK_D]; predicated only when PRED."""
    ptrs = Base + slot[:, None] * stride_s + d[None, :]
    if PRED:
        return tl.load(ptrs, mask=n_ok[:, None] & (d[None, :] < D), other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _e4m3_at(words, shift: tl.constexpr):
    """The e4m3 value in bits [shift, shift + 8) of each 32-bit word, as fp16 (exact)."""
    byte = ((words >> shift) & 0xFF).to(tl.uint8)
    return byte.to(tl.float8e4nv, bitcast=True).to(tl.float16)


@triton.jit
def _e4m3_word_to_f16(words):
    """Each 32-bit word's four e4m3 values (low byte first) as four fp16 tensors, two cvt a
    word (sm_89+ PTX; not for the interpreter)."""
    return tl.inline_asm_elementwise(
        """{ .reg .b16 l, h; .reg .b32 a, b;
        mov.b32 {l, h}, $4;
        cvt.rn.f16x2.e4m3x2 a, l;
        cvt.rn.f16x2.e4m3x2 b, h;
        mov.b32 {$0, $1}, a;
        mov.b32 {$2, $3}, b; }""",
        "=h,=h,=h,=h,r", [words], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=True, pack=1)


# The interpreter runs no inline PTX: it unpacks byte by byte (`_e4m3_at`). Compiled, two cvt a
# word: gqa_decode's FP8 interior loop (128 keys, 4 warps, sm_90, compiled on the CPU) 997 -> 693
# instructions (PRMT 176 -> 0, LOP3 65 -> 0), 649 with K read as words too (168 -> 154 registers
# a thread, its 12-byte spill gone). H100 (`scripts/fp8kv_attention.py --gqa-sweep`, graph
# replays, L2 flushed, one round each), us a launch bytes -> words and cvt: B=256 x 2K keys
# 424.3 -> 413.8, B=64 x 2K 115.1 -> 111.6, B=1 x 4K 12.5 -> 12.1; through the daemon (8B, FP8
# cache, 256 requests of 1000 in / 1000 out at once) 9,728 -> 10,284 output tok/s, mostly
# run-to-run spread (docs/KERNELS.md, "Unpacked by cvt a word").
E4M3_ASM = tl.constexpr(not interpreting())


@triton.jit
def load_e4m3_words(Base, slot, stride_s, D: tl.constexpr, BLOCK_N: tl.constexpr, n_ok,
                    PRED: tl.constexpr):
    """Gathered e4m3 rows Base[slot[n], :D] -> fp16 [N, D], read as 32-bit words (module
    doc); D a power of two, rows on 4-byte boundaries (`check_e4m3_words`)."""
    w = tl.arange(0, D // 4)
    ptrs = Base.to(tl.pointer_type(tl.int32)) + slot[:, None] * (stride_s // 4) + w[None, :]
    if PRED:
        words = tl.load(ptrs, mask=n_ok[:, None], other=0)                 # [N, D/4]
    else:
        words = tl.load(ptrs)
    # word j holds elements 4j..4j+3 from its low byte up; the joins put them in that order
    if E4M3_ASM:
        e0, e1, e2, e3 = _e4m3_word_to_f16(words)
        lo = tl.join(e0, e2)
        hi = tl.join(e1, e3)
    else:
        lo = tl.join(_e4m3_at(words, 0), _e4m3_at(words, 16))
        hi = tl.join(_e4m3_at(words, 8), _e4m3_at(words, 24))
    return tl.reshape(tl.join(lo, hi), [BLOCK_N, D])


def check_e4m3_words(cache: torch.Tensor) -> None:
    """An e4m3 cache is read as 32-bit words (`load_e4m3_words`): its start, rows and heads
    must lie on 4-byte boundaries."""
    if cache.element_size() == 1 and (cache.data_ptr() % 4 or cache.stride(0) % 4
                                      or cache.stride(1) % 4):
        raise ValueError(f"an e4m3 KV cache must start and have rows and heads on 4-byte "
                         f"boundaries (strides {cache.stride()})")


@triton.jit
def attn_tile(acc, m_i, l_i, q1, q2, K1, K2, V, PageTable, n0, hi, pos, kvh, page_size,
              stride_k1s, stride_k1h, stride_k2s, stride_k2h, stride_vs, stride_vh, scale_log2,
              D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_D1: tl.constexpr,
              BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_D2: tl.constexpr, SHARED_V: tl.constexpr, MASKED: tl.constexpr,
              EVEN_D: tl.constexpr, WINDOW: tl.constexpr, V_WORDS: tl.constexpr):
    """One online-softmax step over keys [n0, n0 + BLOCK_N) for the query rows q1 [M, D1]
    (+ q2 [M, D2] when HAS_D2: MLA's rope part), keys of KV head kvh: acc [M, DV], running max
    m_i and sum l_i [M] -> updated (acc, m_i, l_i). Values are V, or the key tile itself when
    SHARED_V (MLA: the latent is both). MASKED applies the causal mask (key n visible to the row
    at position pos iff n <= pos) and the bound hi: the diagonal and last tiles only; interior
    tiles of power-of-two heads (EVEN_D) load without predicates. WINDOW > 0 (sliding-window
    attention, masked tiles only) also hides keys n <= pos - WINDOW. V_WORDS: e4m3 value and
    key tiles of power-of-two width are read by `load_e4m3_words` (keys without D2)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)                                   # [N]
    n_ok = offs_n < hi
    d1 = tl.arange(0, BLOCK_D1)
    PRED: tl.constexpr = MASKED or not EVEN_D
    if PRED:
        page = tl.load(PageTable + offs_n // page_size, mask=n_ok, other=0)  # [N]
    else:  # interior tile of power-of-two heads: no predicates
        page = tl.load(PageTable + offs_n // page_size)                      # [N]
    slot = page.to(tl.int64) * page_size + offs_n % page_size                # [N]
    if V_WORDS and K1.dtype.element_ty == tl.float8e4nv and D1 == BLOCK_D1 and not HAS_D2:
        k1 = load_e4m3_words(K1 + kvh * stride_k1h, slot, stride_k1s, D1, BLOCK_N, n_ok,
                             PRED).to(q1.dtype)
    else:                                                 # an FP8 cache: e4m3 -> exact 16-bit
        k1 = load_rows(K1 + kvh * stride_k1h, slot, stride_k1s, d1, D1, n_ok,
                       PRED).to(q1.dtype)                                  # [N, D1]
    qk = tl.dot(q1, tl.trans(k1))                                          # [M, N]
    if HAS_D2:
        d2 = tl.arange(0, BLOCK_D2)
        k2 = load_rows(K2 + kvh * stride_k2h, slot, stride_k2s, d2, D2, n_ok, PRED)  # [N, D2]
        qk += tl.dot(q2, tl.trans(k2.to(q2.dtype)))
    qk = qk * scale_log2
    if MASKED:
        vis = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]            # [M, N]
        if WINDOW > 0:
            vis = vis & (offs_n[None, :] > pos[:, None] - WINDOW)
        qk = tl.where(vis, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))                                 # [M]
    p = tl.exp2(qk - m_new[:, None])                                       # [M, N]
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if SHARED_V:
        v = k1                                                             # [N, DV]
    else:
        if V_WORDS and V.dtype.element_ty == tl.float8e4nv and DV == BLOCK_DV:
            v = load_e4m3_words(V + kvh * stride_vh, slot, stride_vs, DV, BLOCK_N, n_ok,
                                PRED).to(q1.dtype)                         # [N, DV]
        else:
            dv = tl.arange(0, BLOCK_DV)
            v = load_rows(V + kvh * stride_vh, slot, stride_vs, dv, DV, n_ok, PRED)
            v = v.to(q1.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def attn_range(acc, m_i, l_i, q1, q2, K1, K2, V, PageTable, lo, full_end, hi, pos, kvh,
               page_size, stride_k1s, stride_k1h, stride_k2s, stride_k2h, stride_vs, stride_vh,
               scale_log2, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
               BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, HAS_D2: tl.constexpr, SHARED_V: tl.constexpr,
               EVEN_D: tl.constexpr, WINDOW: tl.constexpr, V_WORDS: tl.constexpr):
    """`attn_tile` over keys [lo, hi): the tiles before full_end (every key visible to every
    row) unmasked, the rest masked -> (acc, m_i, l_i)."""
    for n0 in range(lo, full_end, BLOCK_N):
        acc, m_i, l_i = attn_tile(acc, m_i, l_i, q1, q2, K1, K2, V, PageTable, n0, hi, pos,
                                  kvh, page_size, stride_k1s, stride_k1h, stride_k2s,
                                  stride_k2h, stride_vs, stride_vh, scale_log2, D1, D2, DV,
                                  BLOCK_D1, BLOCK_D2, BLOCK_DV, BLOCK_N, HAS_D2, SHARED_V,
                                  False, EVEN_D, WINDOW, V_WORDS)
    for n0 in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = attn_tile(acc, m_i, l_i, q1, q2, K1, K2, V, PageTable, n0, hi, pos,
                                  kvh, page_size, stride_k1s, stride_k1h, stride_k2s,
                                  stride_k2h, stride_vs, stride_vh, scale_log2, D1, D2, DV,
                                  BLOCK_D1, BLOCK_D2, BLOCK_DV, BLOCK_N, HAS_D2, SHARED_V,
                                  True, EVEN_D, WINDOW, V_WORDS)
    return acc, m_i, l_i


LOG2E = tl.constexpr(1.4426950408889634)   # jit functions read only constexpr globals


@triton.jit
def add_sink(l_i, m_i, Sinks, head, row_ok):
    """A row's softmax denominator (log2 units: running max m_i, sum l_i) plus its head's sink
    logit (GPT-OSS; natural-log units, Sinks[head]) -> the new sum. A row without keys
    (m_i = -1e30) gets a huge sum (2^126, finite), so its output is 0."""
    sink = tl.load(Sinks + head, mask=row_ok, other=0.0).to(tl.float32) * LOG2E     # [M]
    return l_i + tl.exp2(tl.minimum(sink - m_i, 126.0))


@triton.jit
def extend_block(pid_q, BlockBatch, BlockTok, QueryStart):
    """An extend program's (valid, row b, first token t0, row's first query q_start, row's
    query count qlen; qlen 0 for a spare program), from the `block_map` tensors. Longest
    programs first: the block map ascends in tokens (later tokens see more keys) and programs
    start in id order, so program ids are reversed to shrink the causal tail."""
    blk = tl.num_programs(0) - 1 - pid_q
    b_raw = tl.load(BlockBatch + blk)
    valid = b_raw >= 0
    b = tl.maximum(b_raw, 0)
    t0 = tl.where(valid, tl.load(BlockTok + blk), 0)
    q_start = tl.load(QueryStart + b)
    qlen = tl.where(valid, tl.load(QueryStart + b + 1) - q_start, 0)
    return valid, b, t0, q_start, qlen


def block_map(query_start: torch.Tensor, num_tokens: int, block_t: int
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Map extend program ids to (row, first token) without a host sync.

    query_start: [B+1] -> BlockBatch [NB] (-1 for spare programs), BlockTok [NB], NB (an upper
    bound on the blocks of block_t tokens: each row may end in a partial block).

    Every layer of a step asks the same question of the same `query_start`: the answer is kept
    for the step (kernels/step_memo.py), which saves a step of an 8B model 32 x ~15 small
    launches."""
    return memoized(("block_map", num_tokens, block_t), (query_start,),
                    lambda: _block_map(query_start, num_tokens, block_t))


def _block_map(query_start: torch.Tensor, num_tokens: int, block_t: int
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    b = query_start.shape[0] - 1
    nb = triton.cdiv(num_tokens, block_t) + b
    qs = query_start.long()
    nblk = (qs[1:] - qs[:-1] + block_t - 1) // block_t                  # [B]
    cum = torch.cumsum(nblk, 0)                                         # [B]
    pid = torch.arange(nb, device=qs.device)                            # [NB]
    row = torch.searchsorted(cum, pid, right=True)                      # [NB] in [0, B]
    rowc = row.clamp(max=b - 1)
    tok = (pid - (cum[rowc] - nblk[rowc])) * block_t
    return torch.where(row < b, row, -1).to(torch.int32), tok.to(torch.int32), nb
