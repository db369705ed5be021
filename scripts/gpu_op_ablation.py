"""What each small op costs a decode step: the step replayed with that op taken out.

For each preset (dummy weights, bf16) the decode graph as the engine captures it (PDL as the
daemon runs it; over `--graph-keys`-wide page tables, the configs' max_model_len, as the
daemon captures them: split counts follow the table's width. Before this option the tables
were as wide as the rows, `--graph-keys 0`, where GQA launches of 2+ rows split fewer times
than in the daemon, and before SplitSizing.fine_cap one-row launches too) at B rows over
`--context`-token contexts, re-captured once per ablation, in
alternating rounds so drift hits all alike. An ablation replaces an op by the cheapest stand-in
of the right shape (its input passed through, or an empty tensor), so the step's time without
it says what the op adds to the chain of dependent launches: the most that fusing it away
could win. The logits of an ablated step are meaningless; only its time is kept.

    python scripts/gpu_op_ablation.py                     # both presets, B = 1, 1K context
    python scripts/gpu_op_ablation.py --presets llama-3.1-8b --context 256

Ablations (those that touch no module of a preset are skipped for it):
- norms: every RMSNorm on the hidden-state chain returns its input (and the residual);
- rope_kv: RoPE + KV-cache write (`rope_store_kv`) returns q, k as they are (GQA decode's
  rope in its own launch first, as rope_apart);
- rope_apart: not an ablation but the A/B of `rope_decode_attention`: GQA decode's rope + KV
  write in rope_store_kv's launch before the attention's, as before it (logits compared);
- new_key_from_cache: the A/B of gqa_decode.py's NEW_KEY_IN_REGISTERS_ROWS: with the rope in
  the attention's launch, the row's last split reads its new key back from the cache after a
  barrier at every row count (logits compared);
- attention: decode attention returns its query (GQA: out = q, its rope + KV write in
  rope_store_kv's launch; MLA: o_latent = q_latent);
- merge: the split-KV merge launch does nothing (the attention launch itself still splits;
  MLA's one-token merge runs inside W_UV's launch: see merge_apart);
- one_split: the attention runs as one split per (row, head block), so no merge;
- absorbed: MLA's W_UK / W_UV products return empty tensors of their shapes;
- routed: the routed experts return the shared experts' output;
- route: the choice of experts (moe_route) returns experts 0 .. k-1 at weight 1 / k, made
  before the capture: what the routing launch costs;
- small: norms + rope_kv + attention together: what is left is the GEMVs and the rest;
- generic_decode: not an ablation but the A/B of gqa_decode.py: GQA decode attention on the
  generic paged kernel (attention.py, with its merge launch, the rope in its own launch) as
  before it; its logits are compared with the step's own (summation order differs, so not
  bit for bit);
- few_rows_silu_apart: the A/B of gemv.py's FEW_ROWS_SILU: a SwiGLU MLP's gate|up at 2-64
  rows on the few-rows kernel then silu_and_mul, as before its SILU_MUL epilogue (logits
  compared: bit-equal);
- gqa_merge_launch: gqa_decode.py's kernel with the merge in a launch of its own at every
  batch size (as it runs at one row);
- gqa_last_merge: the other way round: the merge in the last split's program at one row too;
- moe_grouped: not an ablation but the A/B of moe_gemv.py: one token's routed experts on
  moe.py's grouped kernels and top-k sum launch, as before it (logits compared too);
- head_einsum: the A/B of head_gemv.py: MLA's W_UK / W_UV products by torch.einsum (cuBLAS),
  as before it (logits compared too);
- router_after_wait: the A/B of route.py's EARLY: the router's first gate tile read after the
  PDL wait (as before), not before it;
- shared_apart: the A/B of moe_gemv.py's shared slices: one token's shared experts in
  launches of their own (SwiGLUMLP, its output added by the routed experts' last launch), as
  before them (logits compared too);
- merge_apart: the A/B of head_gemv.py's merged_head_gemv: MLA's one-token split merge in a
  launch of its own before W_UV's, as before it;
- absorb_apart: the A/B of mla_absorb_rope.py: MLA's W_UK product and its rope + cache write
  in two launches, as before it;
- x_proj_apart: the A/B of MLA's q_kv_a_proj: the query's and the latent KV's projections
  as two GEMV launches over the fused weight's two row ranges, as before it;
- fold_norms: layers/norm.py's fold for every consumer kind (FOLDED_KINDS = FOLD_KINDS): each
  pre-norm layer's RMSNorm inside the first linear that reads it (rms_norm_linear: one GEMV
  launch at one token), not only the kinds folded by default (logits compared too);
- no_fold: no norm folded (FOLD_NORMS_ON empty), as before the fold;
- unscaled: the A/B of layers/norm.py's SCALED_KINDS: the norms whose scale went into their
  consumer's weight at load run as before it (their weight, now ones, read by their ops; the
  dense MLP's and the head's norms in launches of their own), the same function on the same
  weights (logits compared too);
- fold_only=KIND: the fold for one consumer kind alone (attention, mla, mlp, router, head),
  the others' norms in launches of their own: which folds win (FOLDED_KINDS' figures);
- gqa_splits=N / mla_splits=N: decode launches split to N programs an SM (SplitSizing's
  gqa_splits_per_sm / mla_splits_per_sm) instead of the default;
- coarse_cap: SplitSizing.fine_cap off: every decode launch's split count capped by pieces
  of min_split_tiles tiles (as before), not by its own fewest tiles per split;
- gqa_tiles=BLOCK_N,STAGES: gqa_decode.py's launches on those key tiles and pipeline stages
  (16 query rows, 4 warps) instead of attention_tiles' (their shared memory differs);
- gqa_merge_elems=N: gqa_decode.py's MERGE_TILE_ELEMS (fp32 partials the last split's
  program loads at once when it merges) set to N: with gqa_last_merge, how many serial loads
  the one-row merge takes;
- gqa_split_count=N: GQA decode launches split N times per (row, head block), whatever the
  rows' lengths and the SM count (MLA's as SplitSizing says);
- gqa_split_tiles=N: a GQA decode split covers at least N key tiles (1 by default), so a
  short row takes fewer splits (with gqa_last_merge a row of one split writes its output
  with no merge);
- A+B: the patches of A and B together (e.g. gqa_last_merge+gqa_splits=1).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import statistics
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_models import step_bytes  # noqa: E402
from gpu_pdl import capture, card_bandwidth, forward_ms  # noqa: E402
from gpu_spec_verify import PAGE, WIDTH_ALIGN, plan_arrays  # noqa: E402

from appliance.engine.engine import to_forward_batch  # noqa: E402
from appliance.model import ModelRunner, ModelSource  # noqa: E402
from appliance.model.layers import attention as attention_layer  # noqa: E402
from appliance.model.layers.attention import PagedAttention  # noqa: E402
from appliance.model.layers.mla import MLAttention  # noqa: E402
from appliance.model.layers.mlp import SwiGLUMLP  # noqa: E402
from appliance.model.layers.moe import DeepseekMoE, RoutedExperts, TopKRouter  # noqa: E402
from appliance.model.layers import norm as norm_layers  # noqa: E402
from appliance.model.layers.norm import RMSNorm  # noqa: E402
from kernels.reference.linear import head_matmul as reference_head_matmul  # noqa: E402
from kernels.triton import attention as gqa_attention  # noqa: E402
from kernels.triton import attention_ops, gemv, gqa_decode, moe, route  # noqa: E402
from kernels.triton import mla_decode  # noqa: E402
from kernels.triton.attention import AttentionTiles  # noqa: E402
from kernels.triton.split_kv import SplitSizing  # noqa: E402

Patch = tuple[object, str, object]


def _norms(model: torch.nn.Module) -> list[Patch]:
    out: list[Patch] = []
    for m in model.modules():
        if isinstance(m, RMSNorm):
            out += [(m, "rms_norm", lambda x, w, eps: x),
                    (m, "fused_add_rms_norm", lambda x, r, w, eps: (x, r))]
    return out


def _mla(model: torch.nn.Module) -> list[MLAttention]:
    return [m for m in model.modules() if isinstance(m, MLAttention)]


def _absorb_as(w_uk_product: Callable | None, rope: bool) -> Callable[[MLAttention], Callable]:
    """An `absorb_rope` for module m with W_UK's product by `w_uk_product` (None: m's
    head_matmul) in a launch of its own, and the rope + cache write by m's rope_store_kv
    (rope False: none, q_rope passed through)."""
    def make(m: MLAttention) -> Callable:
        def absorb(q_nope, w_uk, q_rope, *args, **kwargs):
            q_latent = (w_uk_product or m.head_matmul)(q_nope, w_uk)
            return q_latent, m.rope_store_kv(q_rope, *args, **kwargs)[0] if rope else q_rope
        return absorb
    return make


def _rope_apart(model: torch.nn.Module) -> list[Patch]:
    """GQA decode's rope + KV write in rope_store_kv's launch, not the attention's."""
    return [(attention_layer, "ROPE_IN_DECODE_ON", frozenset())] if _has(model, PagedAttention) \
        else []


def _rope_kv(model: torch.nn.Module) -> list[Patch]:
    return _rope_apart(model) + [
        (m, "rope_store_kv", lambda q, k, *a, **kw: (q, k)) for m in model.modules()
        if isinstance(m, PagedAttention) and m.rope_store_kv is not None] + [
        (m, "absorb_rope", _absorb_as(None, rope=False)(m)) for m in _mla(model)]


def _attention(model: torch.nn.Module) -> list[Patch]:
    out: list[Patch] = _rope_apart(model)   # the stand-in replaces decode_attention alone
    for m in model.modules():
        if isinstance(m, PagedAttention):
            out.append((m, "decode_attention", lambda q, *a, **kw: q))
        elif isinstance(m, MLAttention):   # o_latent = q_latent, still projected by W_UV
            out.append((m, "mla_decode", lambda q, *a, w_uv=None, m=m, **kw:
                        q if w_uv is None else m.head_matmul(q, w_uv)))
    return out


def _merge(model: torch.nn.Module) -> list[Patch]:
    return [(mod, "merge_splits", lambda *a, **kw: None)
            for mod in (gqa_attention, gqa_decode, mla_decode)]


def _one_split(model: torch.nn.Module) -> list[Patch]:
    return [(SplitSizing, "decode_splits", lambda self, *a, **kw: 1)]


def _gqa_sizing(method: str, value: int) -> Callable[[torch.nn.Module], list[Patch]]:
    """SplitSizing.`method` (decode_splits, tiles_per_split: `mla` their last argument)
    answers `value` for GQA launches, as before for MLA's."""
    default = getattr(SplitSizing, method)

    def gqa_value(self, *args):
        return default(self, *args) if args[-1] else value
    return lambda model: [(SplitSizing, method, gqa_value)]


def _products_by(product: Callable) -> Callable[[torch.nn.Module], list[Patch]]:
    """MLA's W_UK and W_UV products by `product(x, w)`, each in a launch of its own: W_UK's
    beside rope_store_kv, W_UV's after the decode (its merge in a launch of its own)."""
    def patches(model: torch.nn.Module) -> list[Patch]:
        out: list[Patch] = []
        for m in _mla(model):
            decode = m.mla_decode
            out += [(m, "absorb_rope", _absorb_as(product, rope=True)(m)),
                    (m, "mla_decode", lambda *a, w_uv=None, decode=decode, **kw:
                     product(decode(*a, **kw), w_uv))]
        return out
    return patches


def _empty_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:2], w.shape[2])


def _route(model: torch.nn.Module) -> list[Patch]:
    made: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def fixed(logits, top_k, *args):   # experts 0 .. k-1 at weight 1/k, made once per shape
        key = (logits.shape[0], top_k, logits.device)
        if key not in made:
            ids = torch.arange(top_k, dtype=torch.int32, device=logits.device)
            made[key] = (torch.full((logits.shape[0], top_k), 1 / top_k, device=logits.device),
                         ids.expand(logits.shape[0], -1).contiguous())
        return made[key]
    return [(m, "route", fixed) for m in model.modules() if isinstance(m, TopKRouter)]


def _shared_apart(model: torch.nn.Module) -> list[Patch]:
    return [(m, "fold_shared", False) for m in model.modules()
            if isinstance(m, DeepseekMoE) and m.shared_experts is not None]


def _x_proj_apart(model: torch.nn.Module) -> list[Patch]:
    def apart(self, x):   # the fused weight's two row ranges, one GEMV launch each, as before
        proj = self.q_kv_a_proj
        q_rows = proj.local_sizes[0]
        b = proj.bias
        return (proj._matmul(x, proj.weight[:q_rows], None if b is None else b[:q_rows]),
                proj._matmul(x, proj.weight[q_rows:], None if b is None else b[q_rows:]))
    return [(MLAttention, "_project_x", apart)] if any(
        isinstance(m, MLAttention) and m.fused_x_proj for m in model.modules()) else []


def _routed(model: torch.nn.Module) -> list[Patch]:
    return _shared_apart(model) + [
        (m, "forward", lambda x, w, ids, shared=None: shared if shared is not None
         else torch.zeros_like(x)) for m in model.modules() if isinstance(m, RoutedExperts)]


def _has(model: torch.nn.Module, kind: type) -> bool:
    return any(isinstance(m, kind) for m in model.modules())


def _generic_decode(model: torch.nn.Module) -> list[Patch]:
    def generic(q, k_cache, v_cache, page_table, seq_lens, page_size, scale, num_splits=None,
                sinks=None, k_scale=1.0, v_scale=1.0):
        return gqa_attention.paged_attention(q, None, k_cache, None, v_cache, page_table, None,
                                             seq_lens, page_size, scale, num_splits,
                                             sinks=sinks, k_scale=k_scale, v_scale=v_scale)
    # the rope in its own launch: the generic kernel takes no new tokens
    return _rope_apart(model) + [(attention_ops, "gqa_decode", generic)] \
        if _has(model, PagedAttention) else []


def _absorb_apart(model: torch.nn.Module) -> list[Patch]:
    return [(m, "absorb_rope", _absorb_as(None, rope=True)(m)) for m in _mla(model)]


def _knob(module: object, name: str, value: object, kind: type
          ) -> Callable[[torch.nn.Module], list[Patch]]:
    """`module.name` set to `value` in models that have a `kind` module."""
    return lambda model: [(module, name, value)] if _has(model, kind) else []


def _split_count(field: str, value: object) -> Callable[[torch.nn.Module], list[Patch]]:
    default = SplitSizing.decode_splits

    def decode_splits(self, *args, **kwargs):
        return default(dataclasses.replace(self, **{field: value}), *args, **kwargs)
    return lambda model: [(SplitSizing, "decode_splits", decode_splits)]


ABLATIONS: dict[str, Callable[[torch.nn.Module], list[Patch]]] = {
    "norms": _norms, "rope_kv": _rope_kv, "rope_apart": _rope_apart, "attention": _attention,
    "merge": _merge,
    "one_split": _one_split, "absorbed": _products_by(_empty_product), "routed": _routed,
    "small": lambda m: _norms(m) + _rope_kv(m) + _attention(m),
    "generic_decode": _generic_decode,
    "gqa_merge_launch": _knob(gqa_decode, "LAST_MERGE_MIN_ROWS", 1 << 30, PagedAttention),
    "gqa_last_merge": _knob(gqa_decode, "LAST_MERGE_MIN_ROWS", 1, PagedAttention),
    "new_key_from_cache": _knob(gqa_decode, "NEW_KEY_IN_REGISTERS_ROWS", 0, PagedAttention),
    "moe_grouped": _knob(moe, "moe_gemv_applies", lambda *args: False, RoutedExperts),
    "few_rows_silu_apart": _knob(gemv, "FEW_ROWS_SILU", False, SwiGLUMLP),
    "head_einsum": _products_by(reference_head_matmul),
    "coarse_cap": _split_count("fine_cap", False),
    "router_after_wait": _knob(route, "EARLY_TILE", False, RoutedExperts),
    "shared_apart": _shared_apart,
    "route": _route,
    "x_proj_apart": _x_proj_apart,
    "merge_apart": _knob(mla_decode, "MERGE_INTO_PROJECTION", False, MLAttention),
    "absorb_apart": _absorb_apart,
    "fold_norms": lambda model: _fold_only(*norm_layers.FOLD_KINDS)(model),
    "no_fold": _knob(norm_layers, "FOLD_NORMS_ON", frozenset(), RMSNorm),
    "unscaled": lambda model: [(m, "_scale_target", ()) for m in model.modules()
                               if isinstance(m, RMSNorm) and m.unit_scale],
}


def _fold_only(*kinds: str) -> Callable[[torch.nn.Module], list[Patch]]:
    """The norms folded on every device, into the consumers of `kinds` alone."""
    unknown = set(kinds) - norm_layers.FOLD_KINDS
    if unknown:
        raise ValueError(f"no fold kind {', '.join(sorted(unknown))}")
    return lambda model: [(norm_layers, "FOLD_NORMS_ON", frozenset({"cuda", "cpu"})),
                          (norm_layers, "FOLDED_KINDS", frozenset(kinds))] if _has(model, RMSNorm) else []


def _gqa_tiles(block_n: int, stages: int) -> Callable[[torch.nn.Module], list[Patch]]:
    tiles = AttentionTiles(g_blk=16, block_t=1, block_n=block_n, num_warps=4,
                           num_stages=stages)
    patch = (attention_ops, "gqa_decode", functools.partial(gqa_decode.gqa_decode, tiles=tiles))
    return lambda model: [patch] if _has(model, PagedAttention) else []


def plan(name: str) -> Callable[[torch.nn.Module], list[Patch]]:
    """An ABLATIONS entry, `gqa_splits=N` / `mla_splits=N`, `gqa_tiles=BLOCK_N,STAGES`, or
    several of those joined by '+'."""
    if "+" in name:
        parts = [plan(part) for part in name.split("+")]
        return lambda model: [patch for part in parts for patch in part(model)]
    if name.startswith("gqa_tiles="):
        block_n, stages = (int(x) for x in name.partition("=")[2].split(","))
        return _gqa_tiles(block_n, stages)
    if name.startswith("fold_only="):
        return _fold_only(name.partition("=")[2])
    if name.startswith("gqa_split_count="):
        return _gqa_sizing("decode_splits", int(name.partition("=")[2]))
    if name.startswith("gqa_split_tiles="):
        return _gqa_sizing("tiles_per_split", int(name.partition("=")[2]))
    if name.startswith("gqa_merge_elems="):
        return _knob(gqa_decode, "MERGE_TILE_ELEMS", int(name.partition("=")[2]),
                     PagedAttention)
    kind, _, count = name.partition("_splits=")
    if kind in ("gqa", "mla") and count:
        return _split_count(f"{kind}_splits_per_sm", int(count))
    return ABLATIONS[name]


def _checked(name: str) -> str:
    try:
        plan(name)
        return name
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown ablation {name!r}: {', '.join(ABLATIONS)}, gqa_splits=N, mla_splits=N, "
            f"fold_only={'|'.join(sorted(norm_layers.FOLD_KINDS))}, "
            "gqa_tiles=BLOCK_N,STAGES, gqa_merge_elems=N, gqa_split_count=N, "
            "gqa_split_tiles=N") from None


_MISSING = object()
GRAPH_KEYS = 32768     # configs/llama-3.1-8b.yaml's and deepseek-v2-lite.yaml's max_model_len


@contextlib.contextmanager
def patched(patches: list[Patch]) -> Iterator[None]:
    """The patches applied (attribute set on its object), then undone in reverse order."""
    saved = [(obj, name, obj.__dict__.get(name, _MISSING)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, old in reversed(saved):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def measure(preset: str, rows: int, context: int, rounds: int, names: list[str],
            bw: float, graph_keys: int = 0) -> list[str]:
    row_pages = -(-(context + 1) // PAGE)
    rows_width = -(-row_pages // WIDTH_ALIGN) * WIDTH_ALIGN * PAGE  # as the scheduler aligns it
    width = max(graph_keys, rows_width)                             # the graphs' table width
    runner = ModelRunner(ModelSource(preset=preset, load_format="dummy"), device="cuda",
                         dtype=torch.bfloat16, kv_num_pages=rows * row_pages + 16,
                         page_size=PAGE)
    arrays = plan_arrays(rows, 0, context, runner.vocab_size, np.random.default_rng(0))
    model = runner.model
    plans = {"none": []} | {n: plan(n)(model) for n in names}
    plans = {n: p for n, p in plans.items() if p or n == "none"}
    times: dict[str, list[float]] = {n: [] for n in plans}
    logits: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        for name, patches in plans.items():
            with patched(patches):
                capture(runner, True, rows, width)
                batch = to_forward_batch(arrays, runner.device)
                logits.setdefault(name, runner.forward(batch).float().cpu())
                times[name].append(forward_ms(runner, batch) * 1e3)
    compared = ("rope_apart", "new_key_from_cache", "few_rows_silu_apart", "generic_decode",
                "moe_grouped", "head_einsum", "shared_apart", "x_proj_apart", "merge_apart",
                "absorb_apart", "fold_norms", "no_fold", "unscaled")
    for name in logits:   # the A/Bs
        if name in compared or name.startswith("fold_only="):
            diff = (logits[name] - logits["none"]).abs().max().item()
            print(f"{preset}: logits, {name} against the registered kernels: max |diff| "
                  f"{diff:.3g} (max |logit| {logits['none'].abs().max().item():.3g})",
                  flush=True)
    base = statistics.median(times["none"])
    layers = sum(isinstance(m, (PagedAttention, MLAttention)) for m in model.modules())
    bound = step_bytes(preset, rows, context) / bw * 1e6
    lines = []
    for name, ts in times.items():
        t = statistics.median(ts)
        lines.append(f"| {preset} | {name} | {t:.0f} | {base - t:+.0f} | "
                     f"{(base - t) / layers:+.2f} | {bound / t:.1%} | "
                     f"{' '.join(f'{x:.0f}' for x in ts)} |")
        print(lines[-1], flush=True)
    del runner, model
    torch.cuda.empty_cache()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["llama-3.1-8b", "deepseek-v2-lite"])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--graph-keys", type=int, default=GRAPH_KEYS,
                        help="the decode graphs' page-table width in keys (module doc); 0: as "
                             "wide as the rows")
    parser.add_argument("--ablations", nargs="+", default=list(ABLATIONS),
                        metavar="NAME", type=_checked)
    args = parser.parse_args()
    bw = card_bandwidth("gpu_op_ablation")
    if bw is None:
        return 1
    lines = []
    for preset in args.presets:
        lines += measure(preset, args.rows, args.context, args.rounds, args.ablations, bw,
                         args.graph_keys)
    print(f"\nB={args.rows}, context {args.context} tokens, graphs over "
          f"{args.graph_keys or 'row-wide'}-key tables, PDL on; forward: CUDA-graph replay "
          "(us); saved: against `none` (a step, a layer); bound: copy bandwidth over the "
          "step's bytes")
    print("| preset | ablation | forward us | saved | a layer | share of bound | rounds |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
