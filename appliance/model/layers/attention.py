"""Paged attention over this rank's heads: write new K/V into the paged cache, then attend.

Rows [0, num_decode) of a ForwardBatch are decodes (one query token each) and use the
`decode_attention` kernel; the remaining rows are prefill chunks over a cached prefix and
use `extend_attention`, which also gets the new tokens' K/V. A mixed step runs the two
launches side by side (appliance/model/side_stream.py); an extend graph's step, whose rows are
known on the device only, through `graph_step_attention` over an FP8 cache, else every row
through `extend_attention`. The cache of one layer is a pair of tensors `k_cache[num_pages *
page_size, kv_heads_local, head_dim]`, `v_cache[..., v_head_dim]`, allocated by the runner and
handed over with `bind_kv_cache`. When the layer is given its RotaryEmbedding and a
`rope_store_kv` kernel exists, rotation and the cache write are one op.

GPT-OSS options (off by default, and then the kernels are called exactly as before):
`window` > 0 attends only the last `window` positions (sliding-window layers: the kernels
never read a slot before the window), `sinks=True` gives the layer a learned logit per head
(`sinks[Hq_local]`, checkpoint tensor `<attention module>.sinks`, split with the heads) that
joins each softmax's denominator.

FP8 KV cache (`ctx.kv_dtype` float8_e4m3fn, YAML `kv.dtype: fp8_e4m3`): the caches hold
K / k_scale and V / v_scale in e4m3 (kernels/reference/kv_cache.py), written by the same store
ops and read by the same attention ops, which get the scales as keywords (only then: a 16-bit
cache calls them as before) and are selected for `kv_dtype`. The scales are 1.0 unless the
checkpoint calibrated them (`set_kv_scales`, appliance/model/kv_scales.py).
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from appliance.model.batch import ForwardBatch
from appliance.model.context import BuildContext
from appliance.model.layers.rotary import RotaryEmbedding
from appliance.model.placement import WeightSharding, WeightSource
from appliance.model.side_stream import side_by_side


# Devices whose decode-only steps rotate and store the new tokens inside the attention launch
# (`rope_decode_attention`: one launch a layer fewer). CPU keeps its own decode kernels.
ROPE_IN_DECODE_ON = frozenset({"cuda"})


def select_optional(op: str, **features):
    """kernels.select, or None when no implementation of `op` exists."""
    try:
        return kernels.select(op, **features)
    except LookupError:  # kernels.KernelError: no implementation registered
        return None


def _fused_rope_decode(window: int, feats: dict):
    """The `rope_decode_attention` kernel for these features, or None: without a sliding
    window, and a fused kernel, not the reference's composition of the two ops (the layer
    calls those itself; on CPU only the reference exists)."""
    op = "rope_decode_attention"
    if window:
        return None
    try:
        if kernels.selected_backend(op, **feats) == "torch":
            return None
    except LookupError:
        return None
    return kernels.select(op, **feats)


# An extend graph lays a step out on the device only: every row goes through the extend launch,
# a decode row as a row of one token, unless the cache is FP8: then `graph_step_attention` also
# runs the decode launch beside it and takes the decode rows from there. The extend kernel's
# tiles are sized for chunks (16-64 query rows a program) and read e4m3 values byte by byte:
# over an FP8 cache 80 decode rows + a 96-token chunk in its one launch took 1.76x the decode
# launch of the 80 rows alone (231.2 against 131.6 us), over bf16 1.05x. H100, Llama-3.1-8B's
# heads, 2K keys, a graph's launch a layer, us, one launch -> two (scripts/
# gpu_verify_attention.py --mixed): FP8, 80 decode rows + a 96-token chunk 231.2 -> 186.6,
# 200 + 56 524.5 -> 400.0, 32 + 224 159.6 -> 166.0, a chunk alone 78.6 -> 83.2 (the empty
# decode launch and the select); bf16 257.9 -> 265.5, 611.3 -> 597.4, 159.4 -> 153.7, 78.1 ->
# 82.8: no gain over a 16-bit cache, which keeps the one launch.


class PagedAttention(nn.Module):
    """softmax(q k^T * scale) v over the paged cache, GQA (kv heads shared by q-head groups)."""

    reads_fp8_kv = True   # the runner refuses an FP8 cache for KV layers without this
    # extend steps read their row layout on the device only: they can be captured in CUDA
    # graphs (appliance/model/extend_graph.py); KV layers without this run them eagerly
    captures_extend = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 ctx: BuildContext, v_head_dim: int | None = None, window: int = 0,
                 sinks: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.scale, self.page_size, self.window = scale, ctx.page_size, window
        self.sinks = (nn.Parameter(torch.empty(num_heads), requires_grad=False) if sinks
                      else None)
        self.total_heads = num_heads * ctx.layout.size("attn_tp")
        self.kv_dtype = ctx.kv_dtype or ctx.dtype
        self.quantized_kv = self.kv_dtype != ctx.dtype
        self.k_scale = self.v_scale = 1.0
        cache = dict(kv_dtype=self.kv_dtype) if self.quantized_kv else {}
        feats = dict(device=ctx.device, dtype=ctx.dtype, head_dim=head_dim,
                     num_heads=num_heads, num_kv_heads=num_kv_heads, page_size=ctx.page_size,
                     **cache)
        if window or sinks:
            feats.update(sliding_window=window, sinks=sinks)
        self.store_kv = kernels.select("store_kv", device=ctx.device, dtype=ctx.dtype, **cache)
        self.rope_store_kv = select_optional("rope_store_kv", device=ctx.device, dtype=ctx.dtype,
                                             **cache)
        self.decode_attention = kernels.select("decode_attention", **feats)
        self.rope_decode_attention = _fused_rope_decode(window, feats)
        self.extend_attention = kernels.select("extend_attention", **feats)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def kv_cache_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-slot shapes of this layer's cache tensors: (k, v)."""
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.v_head_dim)

    def bind_kv_cache(self, caches: tuple[torch.Tensor, ...]) -> None:
        self.k_cache, self.v_cache = caches

    def set_kv_scales(self, k_scale: float, v_scale: float) -> None:
        """An FP8 cache's scales (cache = K / k_scale, V / v_scale), from the checkpoint."""
        self.k_scale, self.v_scale = float(k_scale), float(v_scale)

    def _scales(self) -> dict:
        """The cache format's keywords of the store and attention ops; none for 16-bit."""
        return dict(k_scale=self.k_scale, v_scale=self.v_scale) if self.quantized_kv else {}

    def weight_shardings(self, prefix: str) -> list[WeightSharding]:
        """The sinks, if any: the parent attention module's `sinks`, split like its heads."""
        if self.sinks is None:
            return []
        name = prefix.rsplit(".", 1)[0] + ".sinks"
        return [WeightSharding(f"{prefix}.sinks", "column", "attn_tp",
                               (WeightSource(name, (self.total_heads,)),), dim=0)]

    def _options(self) -> dict:
        """The GPT-OSS and FP8-cache keywords of the attention kernels; none for plain
        attention over a 16-bit cache."""
        opts: dict = self._scales()
        if self.window:
            opts["window"] = self.window
        if self.sinks is not None:
            opts["sinks"] = self.sinks
        return opts

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                positions: torch.Tensor | None = None, rotary: RotaryEmbedding | None = None
                ) -> torch.Tensor:
        # q: [T, Hq, D], k: [T, Hk, D], v: [T, Hk, Dv] -> [T, Hq, Dv]
        if self.k_cache is None:
            raise RuntimeError("PagedAttention: no KV cache bound (ModelRunner allocates it)")
        nd, rows = batch.num_decode, batch.num_rows
        opts = self._options()
        if (nd == rows and rotary is not None and self.rope_decode_attention is not None
                and q.device.type in ROPE_IN_DECODE_ON):
            return self.rope_decode_attention(
                q, k, v, positions, rotary.cos_sin, rotary.rotary_dim, rotary.is_neox,
                self.k_cache, self.v_cache, batch.slot_mapping, batch.page_table,
                batch.seq_lens, self.page_size, self.scale, **opts)
        if rotary is not None and self.rope_store_kv is not None:
            q, k = self.rope_store_kv(q, k, v, positions, rotary.cos_sin, rotary.rotary_dim,
                                      rotary.is_neox, self.k_cache, self.v_cache,
                                      batch.slot_mapping, **self._scales())
        else:
            if rotary is not None:
                q, k = rotary(positions, q, k)
            self.store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping, **self._scales())
        if nd == rows:  # decodes only
            return self.decode_attention(q, self.k_cache, self.v_cache, batch.page_table,
                                         batch.seq_lens, self.page_size, self.scale, **opts)
        if batch.graph_bucket and self.quantized_kv:   # module comment above the class
            return graph_step_attention(self.decode_attention, self.extend_attention, q, k, v,
                                        self.k_cache, self.v_cache, batch, self.page_size,
                                        self.scale, **opts)
        # the new tokens' K/V go along too: a kernel may read them contiguously (prefill.py)
        if nd == 0:  # prefill chunks only
            return self.extend_attention(q, self.k_cache, self.v_cache, batch.page_table,
                                         batch.query_start, batch.seq_lens, self.page_size,
                                         self.scale, k_new=k, v_new=v, **opts)
        # mixed: decode rows first, then prefill chunks, side by side
        dec, ext = side_by_side(
            lambda: self.decode_attention(q[:nd], self.k_cache, self.v_cache,
                                          batch.decode_page_table, batch.decode_seq_lens,
                                          self.page_size, self.scale, **opts),
            lambda: self.extend_attention(q[nd:], self.k_cache, self.v_cache,
                                          batch.extend_page_table, batch.extend_query_start,
                                          batch.extend_seq_lens, self.page_size, self.scale,
                                          k_new=k[nd:], v_new=v[nd:], **opts),
            q.device)
        return torch.cat([dec, ext])


def graph_step_attention(decode_attention, extend_attention, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         batch: ForwardBatch, page_size: int, scale: float, **opts
                         ) -> torch.Tensor:
    """An extend graph's step (any mix of rows, laid out on the device), through the two ops:
    the decode launch over every row, those that are not decodes (`graph_decode_mask`) given
    no keys, beside the extend launch over every row, the decode rows given none; each decode
    row then takes the decode launch's output. Over an FP8 cache the one extend launch cost
    1.1-1.25x the decode and extend launches in turn (the comment above PagedAttention;
    docs/KERNELS.md, "Mixed steps")."""
    rows = batch.num_rows
    # the step's row split, made (by the first layer) on this stream before the fork
    decodes, decode_lens, extend_lens = (batch.graph_decode_mask, batch.graph_decode_lens,
                                         batch.graph_extend_lens)
    dec, ext = side_by_side(
        lambda: decode_attention(q[:rows], k_cache, v_cache, batch.page_table, decode_lens,
                                 page_size, scale, **opts),
        lambda: extend_attention(q, k_cache, v_cache, batch.page_table, batch.query_start,
                                 extend_lens, page_size, scale, k_new=k, v_new=v, **opts),
        q.device)
    head = ext[:rows]
    torch.where(decodes[:, None, None], dec, head, out=head)
    return ext
