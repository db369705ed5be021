"""Multi-head latent attention (MLA), DeepSeek-V2 §2.1 / DeepSeek-V3: absorbed or decompressed.

Per token t (hidden h_t), per head i, with L = kv_lora_rank, R = qk_rope_head_dim,
Dn = qk_nope_head_dim, Dv = v_head_dim:

    c_t      = RMSNorm(W_DKV h_t)            latent KV, [L]      (kv_a_proj_with_mqa, first L)
    k^R_t    = RoPE(W_KR h_t)                shared rope key, [R] (kv_a_proj_with_mqa, last R)
    q_t      = W_UQ RMSNorm(W_DQ h_t)  or  W_Q h_t                (q_b_proj∘q_a_proj, or q_proj)
    q_t,i    = [q^C_t,i (Dn) ; RoPE(q^R_t,i) (R)]
    k^C_t,i  = W_UK,i c_t,   v_t,i = W_UV,i c_t                   (kv_b_proj = [W_UK,i ; W_UV,i]_i)

Only [c_t ; k^R_t] is cached: one tensor `kv_cache[num_slots, L + R]` per layer, the same on
every attention-TP rank (the latent is shared by all heads). Attention never materialises
k^C or v: since q^C·k^C = (W_UK,i^T q^C_t,i)·c_s, the query is absorbed into the latent
space (q_latent = W_UK,i^T q^C, [L]); the `mla_decode` / `mla_extend` ops attend over the
cache with scores q_latent·c + q^R·k^R and return the softmax-weighted latent o_latent [L];
W_UV,i brings it back to [Dv], then o_proj. Heads are sharded over "attn_tp": q/q_b and
kv_b are column-parallel in whole heads, o_proj row-parallel (its output Partial).

Prefill chunks of at least DECOMPRESS_MIN_TOKENS new tokens a row take the other form: every
key of their rows (cached prefix + new tokens) is read from the cache and projected by kv_b
to per-head k^C and v, and `mla_prefill` attends as multi-head attention with the shared rope
key. Each key then costs one projection, but each (query, key) pair H * (Dn + R + Dv)
multiply-adds instead of H * (2L + R): on an H200 the whole path ran 1.6-5x faster than the
absorbed one from 128 new tokens over 16K keys to an 8K prompt (docs/KERNELS.md).

RoPE: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... of the R rope dims (GPT-J
style, `is_neox=False`). HF's DeepseekV2 returns the rotated pairs interleaved and
DeepseekV3 (rope_interleave=True) returns them de-interleaved ([evens ; odds]); since the
same permutation is applied to q^R and k^R, q^R·k^R is identical either way, and we keep the
interleaved layout. V3 with rope_interleave=False uses NeoX halves. YaRN (V2/V3 checkpoints)
scales the inverse frequencies, multiplies cos/sin by the attention factor
mscale(factor, mscale) / mscale(factor, mscale_all_dim) and the softmax scale by
mscale(factor, mscale_all_dim)^2, as HF transformers and the DeepSeek reference code do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from appliance.model.batch import ForwardBatch
from appliance.model.context import BuildContext
from appliance.model.layers.attention import select_optional
from appliance.model.layers.linear import ColumnParallelLinear, Part, RowParallelLinear
from appliance.model.layers.norm import HeadRMSNorm, RMSNorm
from appliance.model.layers.rotary import RopeConfig, RotaryEmbedding, rope_config
from appliance.model.layers.yarn import (YarnConfig, YarnRotaryEmbedding, context_length,
                                         yarn_config, yarn_mscale)
from appliance.model.placement import Partial, Placed, Replicate

# HF's DeepseekV2/V3 build q_a_layernorm and kv_a_layernorm with the RMSNorm default eps (not
# config.rms_norm_eps), as the DeepSeek reference code does.
LATENT_NORM_EPS = 1e-6
# Prefill chunks of at least this many new tokens a row attend decompressed (mla_prefill).
# H200, DeepSeek-V2-Lite, one row over 16K keys, whole attention path, both forms with
# split-KV extend (its first sizing; scripts/bench_kernels.py mla_prefill rows): 64 new
# tokens 325 vs 293 us absorbed, 128: 330 vs 516, 256: 399 vs 1095, 1024: 768 vs 3572; 8K
# over 8K: 1279 vs 6472.
# The absorbed cost grows ~3.5 us a token, the decompressed one is flat: they cross near 75.
DECOMPRESS_MIN_TOKENS = 80
# ... and at most this many keys in all (per-head keys and values: 8 KB a key at
# DeepSeek-V2-Lite's 16 heads x 256 dims in bf16, transient): more stays absorbed
DECOMPRESS_MAX_KEYS = 65536


def key_slots(page_table: torch.Tensor, seq_lens: torch.Tensor, num_keys: int,
              page_size: int) -> torch.Tensor:
    """Cache slots of every key of every row, packed row after row: page_table [B, P],
    seq_lens [B] with num_keys = sum(seq_lens) (known on the host) -> [num_keys] int64."""
    ends = torch.cumsum(seq_lens.long(), 0)                                # [B]
    key = torch.arange(num_keys, device=page_table.device)                 # [N]
    row = torch.searchsorted(ends, key, right=True)                        # [N]
    pos = key - (ends - seq_lens.long())[row]                              # [N] in its row
    return page_table.long()[row, pos // page_size] * page_size + pos % page_size


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MLAConfig:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool
    max_position_embeddings: int
    rope_is_neox: bool
    rope: RopeConfig | None  # default / linear / llama3 rope (layers/rotary.py)
    yarn: YarnConfig | None  # YaRN rope (layers/yarn.py)

    @staticmethod
    def from_hf(hf: dict, rope_is_neox: bool = False) -> "MLAConfig":
        yarn = yarn_config(hf)
        return MLAConfig(
            hidden_size=int(hf["hidden_size"]), num_heads=int(hf["num_attention_heads"]),
            q_lora_rank=int(hf["q_lora_rank"]) if hf.get("q_lora_rank") else None,
            kv_lora_rank=int(hf["kv_lora_rank"]),
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
            qk_rope_head_dim=int(hf["qk_rope_head_dim"]), v_head_dim=int(hf["v_head_dim"]),
            attention_bias=bool(hf.get("attention_bias", False)),
            max_position_embeddings=context_length(hf), rope_is_neox=rope_is_neox,
            rope=None if yarn is not None else rope_config(hf), yarn=yarn)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            m = yarn_mscale(self.yarn.factor, self.yarn.mscale_all_dim)
            scale *= m * m
        return scale


def mla_rotary(cfg: MLAConfig, ctx: BuildContext) -> RotaryEmbedding:
    """The rope of MLA's R rope dims (one per model, shared by the layers)."""
    if cfg.yarn is not None:
        return YarnRotaryEmbedding(cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.yarn,
                                   ctx.device, ctx.dtype, cfg.rope_is_neox)
    return RotaryEmbedding(cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope,
                           ctx.device, ctx.dtype, is_neox=cfg.rope_is_neox)


# --------------------------------------------------------------------------- attention
class MLAttention(Placed):
    """DeepSeek MLA over this rank's heads; input Replicate, output Partial over attn_tp.

    Weights load by the HF checkpoint's names (q_proj | q_a_proj, q_a_layernorm, q_b_proj,
    kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj); q_proj | q_a_proj and
    kv_a_proj_with_mqa are one fused linear, q_kv_a_proj."""

    # Extend steps replay CUDA graphs (appliance/model/extend_graph.py) when they attend
    # absorbed: that path reads its rows on the device. A graph is captured absorbed, so steps
    # whose chunks attend decompressed (keys gathered by a host-sized index) run eagerly.
    captures_extend = True

    def __init__(self, cfg: MLAConfig, rotary_emb: RotaryEmbedding, ctx: BuildContext) -> None:
        super().__init__()
        tp = ctx.layout.size("attn_tp")
        if cfg.num_heads % tp:
            raise ValueError(f"num_attention_heads {cfg.num_heads} is not divisible by the "
                             f"attention TP size {tp}")
        self.cfg, self.rotary_emb, self.page_size = cfg, rotary_emb, ctx.page_size
        self.num_heads = cfg.num_heads // tp  # local heads
        self._build_projections(cfg, ctx)
        self.scale = cfg.softmax_scale()
        feats = dict(device=ctx.device, dtype=ctx.dtype, num_heads=self.num_heads,
                     kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim,
                     page_size=ctx.page_size)
        self.store_kv = kernels.select("store_kv", device=ctx.device, dtype=ctx.dtype)
        self.rope_store_kv = select_optional("rope_store_kv", device=ctx.device, dtype=ctx.dtype)
        self.mla_decode = kernels.select("mla_decode", **feats)
        self.mla_extend = kernels.select("mla_extend", **feats)
        self.mla_prefill = kernels.select("mla_prefill", **feats)
        self.head_matmul = kernels.select("head_matmul", device=ctx.device, dtype=ctx.dtype)
        self.absorb_rope = kernels.select("mla_absorb_rope", device=ctx.device, dtype=ctx.dtype)
        self.decompress_min_tokens = DECOMPRESS_MIN_TOKENS
        self.decompress_max_keys = DECOMPRESS_MAX_KEYS
        self.kv_cache: torch.Tensor | None = None
        self.input_placement, self.output_placement = Replicate("attn_tp"), Partial("attn_tp")
        self.folds_norm = self.fused_x_proj  # forward_normed: the norm inside q_kv_a_proj's op
        self.fold_kind = "mla"  # folds by default if in norm.FOLDED_KINDS

    def _build_projections(self, cfg: MLAConfig, ctx: BuildContext) -> None:
        h, dqk, layout = cfg.num_heads, cfg.qk_head_dim, ctx.layout
        lat_r = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        # The query's first projection (q_proj, or q_a_proj) and the latent KV's read the same
        # x: one fused weight [q part | kv_a], so a batch-1 decode reads both in one GEMV
        # launch. kv_a (and q_a) is one unit, so whole on every rank. Fused where both parts
        # have the same bias (q_proj never has one); else two linears.
        q_part = (Part("q_proj", h * dqk, dqk) if cfg.q_lora_rank is None
                  else Part("q_a_proj", cfg.q_lora_rank, cfg.q_lora_rank))
        q_bias = cfg.attention_bias and cfg.q_lora_rank is not None
        kv_part = Part("kv_a_proj_with_mqa", lat_r, lat_r)
        self.fused_x_proj = q_bias == cfg.attention_bias
        if self.fused_x_proj:
            self.q_kv_a_proj = ColumnParallelLinear(cfg.hidden_size, [q_part, kv_part], q_bias,
                                                    layout, "attn_tp")
        else:
            self.q_in_proj = ColumnParallelLinear(cfg.hidden_size, [q_part], False, layout,
                                                  "attn_tp")
            self.kv_a_proj = ColumnParallelLinear(cfg.hidden_size, [kv_part], True, layout,
                                                  "attn_tp")
        if cfg.q_lora_rank is not None:
            self.q_a_layernorm = HeadRMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, ctx.device,
                                             ctx.dtype, "attn_tp")
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, [Part("q_b_proj", h * dqk, dqk)],
                                                 False, layout, "attn_tp")
        self.kv_a_layernorm = HeadRMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS, ctx.device,
                                          ctx.dtype, "attn_tp")
        # [W_UK,i ; W_UV,i] stacked per head: [H * (Dn + Dv), L]; used only as W_UK / W_UV
        kv_b = cfg.qk_nope_head_dim + cfg.v_head_dim
        self.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, [Part("kv_b_proj", h * kv_b, kv_b)],
                                              False, layout, "attn_tp")
        self.o_proj = RowParallelLinear(h * cfg.v_head_dim, cfg.hidden_size, cfg.attention_bias,
                                        layout, "attn_tp", unit=cfg.v_head_dim)

    # ---- KV cache (allocated by the runner)
    def kv_cache_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-slot shape of this layer's one cache tensor: latent c (L) | rope key (R)."""
        return ((self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim,),)

    def bind_kv_cache(self, caches: tuple[torch.Tensor, ...]) -> None:
        (self.kv_cache,) = caches

    # ---- weights
    def w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of kv_b_proj: W_UK [H, Dn, L] and W_UV [H, Dv, L] (this rank's heads)."""
        c = self.cfg
        w = self.kv_b_proj.weight.view(self.num_heads, c.qk_nope_head_dim + c.v_head_dim,
                                       c.kv_lora_rank)                               # [H, Dn+Dv, L]
        return w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]

    # ---- forward
    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        # positions: [T]; hidden_states: [T, Hd] -> [T, Hd] (partial sums over attn_tp)
        return self._attend_projected(positions, *self._project_x(hidden_states), batch)

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None,
                       positions: torch.Tensor, batch: ForwardBatch
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward over norm(x, residual), the norm inside q_kv_a_proj's op (fused_x_proj
        only) -> (out, residual)."""
        projected, residual = norm.into(self.q_kv_a_proj, x, residual)
        q, kv = projected.split(self.q_kv_a_proj.local_sizes, dim=-1)
        return self._attend_projected(positions, q, kv, batch), residual

    def _attend_projected(self, positions: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                          batch: ForwardBatch) -> torch.Tensor:
        # q: q_proj's or q_a_proj's output [T, Q], kv: kv_a's [T, L + R] -> [T, Hd]
        if self.kv_cache is None:
            raise RuntimeError("MLAttention: no KV cache bound (ModelRunner allocates it)")
        t, c = q.shape[0], self.cfg
        q_nope, q_rope = self._query(q)                             # [T, H, Dn], [T, H, R]
        latent, k_rope = self._latent_kv(kv)                        # [T, L], [T, R]
        # tokens [0, split) attend in the absorbed form; the rest (prefill chunks) decompressed
        split = batch.num_decode if self.decompress_extend(batch) else t
        if split == t:  # decodes only (the CUDA-graph path) or short chunks: no copy
            q_latent, q_rope = self._absorb_rope_and_store(positions, q_nope, q_rope, latent,
                                                           k_rope, batch.slot_mapping)
            out = self._attend(q_latent, q_rope, batch, self.w_uk_uv()[1].transpose(1, 2))
            return self.o_proj(out.reshape(t, self.num_heads * c.v_head_dim))
        q_rope = self._rope_and_store(positions, q_rope, latent, k_rope, batch.slot_mapping)
        if split == 0:
            out = self._attend_decompressed(q_nope, q_rope, batch)          # [T, H, Dv]
        else:
            out = torch.cat([self._attend_absorbed(q_nope[:split], q_rope[:split], batch),
                             self._attend_decompressed(q_nope[split:], q_rope[split:],
                                                       batch)])                # [T, H, Dv]
        return self.o_proj(out.reshape(t, self.num_heads * c.v_head_dim))

    def decompress_extend(self, batch: ForwardBatch) -> bool:
        """The prefill chunks attend decompressed (`mla_prefill`) when they bring on average
        at least `decompress_min_tokens` new tokens a row: each key then costs one W_UK / W_UV
        projection (2 * L * H * (Dn + Dv) FLOPs) but every (query, key) pair H * (Dn + R + Dv)
        multiply-adds instead of H * (2L + R). The keys and values are transient memory,
        so batches over `decompress_max_keys` keys stay absorbed, as does a graph bucket."""
        if batch.graph_bucket:
            return False
        rows = batch.num_rows - batch.num_decode
        new = batch.num_tokens - batch.num_decode
        return (rows > 0 and new >= self.decompress_min_tokens * rows
                and batch.extend_keys <= self.decompress_max_keys)

    def replays_extend(self, batch: ForwardBatch) -> bool:
        """Whether `batch` may replay an extend graph: it attends absorbed, as captured."""
        return not self.decompress_extend(batch)

    def _attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor,
                         batch: ForwardBatch) -> torch.Tensor:
        # the first n tokens: q_nope [n, H, Dn], q_rope [n, H, R] -> [n, H, Dv]
        w_uk, w_uv = self.w_uk_uv()
        q_latent = self.head_matmul(q_nope, w_uk)                     # [n, H, L]
        return self._attend(q_latent, q_rope, batch, w_uv.transpose(1, 2))   # [n, H, Dv]

    def _attend_decompressed(self, q_nope: torch.Tensor, q_rope: torch.Tensor,
                             batch: ForwardBatch) -> torch.Tensor:
        # the prefill chunks' tokens: q_nope [Te, H, Dn], q_rope [Te, H, R] -> [Te, H, Dv].
        # Every key of every chunk's row (cached prefix + new tokens), packed row after row,
        # is read from the cache and projected to per-head keys and values by kv_b_proj.
        c = self.cfg
        seq_lens = batch.extend_seq_lens                                     # [Be]
        slots = key_slots(batch.extend_page_table, seq_lens, batch.extend_keys, self.page_size)
        kv = self.kv_cache[slots]                                            # [N, L + R]
        kv_b = self.kv_b_proj(kv[:, :c.kv_lora_rank])                        # [N, H*(Dn+Dv)]
        kv_b = kv_b.view(-1, self.num_heads, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv_b.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        return self.mla_prefill(q_nope, q_rope, k_nope, kv[:, c.kv_lora_rank:], v,
                                batch.extend_query_start, seq_lens, self.scale)

    def _project_x(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, Hd] -> (q_proj's or q_a_proj's output [T, Q], kv_a's [T, L + R])
        if self.fused_x_proj:
            q, kv = self.q_kv_a_proj(x).split(self.q_kv_a_proj.local_sizes, dim=-1)
            return q, kv
        return self.q_in_proj(x), self.kv_a_proj(x)

    def _query(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q_proj's (or q_a_proj's) output [T, Q] -> (q_nope [T, H, Dn], q_rope [T, H, R])
        if self.cfg.q_lora_rank is not None:
            q_a = self.q_a_layernorm(q[:, None, :])[:, 0]                    # [T, Lq]
            q = self.q_b_proj(q_a)                                           # [T, H * Dqk]
        q = q.view(q.shape[0], self.num_heads, self.cfg.qk_head_dim)         # [T, H, Dqk]
        return q.split([self.cfg.qk_nope_head_dim, self.cfg.qk_rope_head_dim], dim=-1)

    def _latent_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # kv_a's output [T, L + R] -> (latent c before its norm [T, L], un-rotated rope key [T, R])
        latent, k_rope = kv.split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        return latent, k_rope

    def _cache_as_kv(self, latent: torch.Tensor, k_rope: torch.Tensor
                     ) -> tuple[torch.Tensor, ...]:
        # The cache seen as a one-head K/V pair, "k" = rope key [S, 1, R], "v" = latent
        # [S, 1, L], and the token's (k, v): (k_cache, v_cache, k [T, 1, R], v [T, 1, L])
        lat = self.cfg.kv_lora_rank
        return (self.kv_cache[:, None, lat:], self.kv_cache[:, None, :lat], k_rope[:, None, :],
                latent[:, None, :])

    def _absorb_rope_and_store(self, positions: torch.Tensor, q_nope: torch.Tensor,
                               q_rope: torch.Tensor, latent: torch.Tensor,
                               k_rope: torch.Tensor, slots: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        # q_nope: [T, H, Dn] -> (q_latent = q_nope x W_UK per head [T, H, L], rotated q_rope
        # [T, H, R]), the cache written as _rope_and_store writes it: the two are independent,
        # so the op runs them in one launch at one token (mla_absorb_rope)
        k_cache, v_cache, k, v = self._cache_as_kv(latent, k_rope)
        rot, norm = self.rotary_emb, self.kv_a_layernorm
        return self.absorb_rope(q_nope, self.w_uk_uv()[0], q_rope, k, v, positions, rot.cos_sin,
                                rot.rotary_dim, rot.is_neox, k_cache, v_cache, slots,
                                v_norm_weight=norm.weight, v_norm_eps=norm.eps)

    def _rope_and_store(self, positions: torch.Tensor, q_rope: torch.Tensor,
                        latent: torch.Tensor, k_rope: torch.Tensor, slots: torch.Tensor
                        ) -> torch.Tensor:
        # q_rope: [T, H, R], latent: [T, L] (before its norm), k_rope: [T, R] -> rotated
        # q_rope [T, H, R]; kv_cache[slots] = [kv_a_layernorm(latent) | rotated k_rope] (slots
        # < 0 are padding, skipped). Only the cache keeps the normed latent.
        k_cache, v_cache, k, v = self._cache_as_kv(latent, k_rope)
        rot, norm = self.rotary_emb, self.kv_a_layernorm
        if self.rope_store_kv is not None:  # rotate, norm and write in one kernel
            q_rope, _ = self.rope_store_kv(q_rope, k, v, positions, rot.cos_sin, rot.rotary_dim,
                                           rot.is_neox, k_cache, v_cache, slots,
                                           v_norm_weight=norm.weight, v_norm_eps=norm.eps)
            return q_rope
        q_rope, k = rot(positions, q_rope, k)
        self.store_kv(k, norm(v), k_cache, v_cache, slots)
        return q_rope

    def _attend(self, q_latent: torch.Tensor, q_rope: torch.Tensor, batch: ForwardBatch,
                w_uv_t: torch.Tensor) -> torch.Tensor:
        # q_latent: [n, H, L], q_rope: [n, H, R], w_uv_t: W_UV^T [H, L, Dv] -> the latent
        # output projected, [n, H, Dv]: the decode rows' tokens (n = num_decode), or all T
        nd = batch.num_decode
        extend = batch.num_rows > nd and q_latent.shape[0] > nd
        if nd > 0 and not extend:  # decode rows only: the op projects (its merge inside)
            return self._decode(q_latent, q_rope, batch, w_uv_t)
        if nd == 0 and extend:     # extend rows only
            return self.head_matmul(self._extend(q_latent, q_rope, batch), w_uv_t)
        out = q_latent.new_empty(q_latent.shape)                             # [n, H, L]
        if nd > 0:  # decode rows own tokens [0, nd), one each
            out[:nd] = self._decode(q_latent[:nd], q_rope[:nd], batch)
        if extend:
            out[nd:] = self._extend(q_latent[nd:], q_rope[nd:], batch)
        return self.head_matmul(out, w_uv_t)

    def _decode(self, q_latent: torch.Tensor, q_rope: torch.Tensor, batch: ForwardBatch,
                w_uv_t: torch.Tensor | None = None) -> torch.Tensor:
        return self.mla_decode(q_latent, q_rope, self.kv_cache, batch.decode_page_table,
                               batch.decode_seq_lens, self.page_size, self.scale, w_uv=w_uv_t)

    def _extend(self, q_latent: torch.Tensor, q_rope: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        return self.mla_extend(q_latent, q_rope, self.kv_cache, batch.extend_page_table,
                               batch.extend_query_start, batch.extend_seq_lens, self.page_size,
                               self.scale)
