"""Attention of a speculative verify step on one GPU: extend launches of B rows of 1 + k tokens
over C cached keys, against the decode launch of the same B rows.

A verify step's attention runs the extend kernel (kernels/triton/attention.py), laid out as the
extend graphs lay it out (appliance/model/extend_graph.py: the step padded to its token bucket,
one row per token up to 257 rows). Its default tile is sized for prefill (256 query rows x
64 keys), so a row of a few tokens fills a tenth of it; this script times the default against
smaller tiles and split counts, every variant checked against the default's output first.
Llama-3.1-8B's heads (32 query, 8 KV, 128 wide), bf16 queries, bf16 or e4m3 caches
(`--kv-dtype`), 16-token pages; times from
CUDA-graph replays of one launch per layer over `--layers` caches (no host time between
launches, each layer's keys its own, as in a step).

    python scripts/gpu_verify_attention.py                  # ~1 minute on an H200
    python scripts/gpu_verify_attention.py --cases 1:4 16:4 --context 8192
    python scripts/gpu_verify_attention.py --mla            # DeepSeek-V2-Lite's MLA
    python scripts/gpu_verify_attention.py --mixed 80:96 128:64 --kv-dtype bf16 fp8

`--mla` times MLA's absorbed extend (16 heads, latent 512, rope 64, 64-token pages): the
registered op, the per-token kernel at any size (each token a decode row of the chunked
kernel; the op takes it up to MLA_PER_TOKEN_MAX_TOKENS tokens), the generic paged kernel, and
the decode launch of the same rows. A case of B=1 and a large K is a prefill chunk over C
cached keys.

`--mixed B:P[:C]` times a mixed step's attention: B decode rows and one prefill chunk of P new
tokens, all over C cached keys, laid out as an extend graph lays it out (padded to its token
bucket). The graph's step as it was, every row through the registered `extend_attention`,
against the step now (`graph_step_attention`: the decode launch over the bucket's rows beside
the extend launch, each row given keys in one of them), and the eager mixed step before it
(`decode_attention` on the B rows, then `extend_attention` on the chunk); and the graph's step
with its decode launch's tiles and split count as for the B rows alone (what the host cannot
know in a graph: its split count is sized for the bucket's rows). Each over a bf16 or an e4m3
cache (`--kv-dtype`), the outputs compared first, each timed twice (the second round in
reverse order) and the best kept. B = 0 times a chunk alone (what the graph's step pays for
its empty decode launch). `--sweep` adds the one launch at other tiles
and with V read as words, every token a decode row, and the two launches side by side over
the B rows alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.model.batch import ForwardBatch  # noqa: E402
from appliance.model.extend_graph import DEFAULT_TOKEN_BUCKETS, pad_extend_batch  # noqa: E402
from appliance.model.layers.attention import graph_step_attention  # noqa: E402
from appliance.model.side_stream import side_by_side  # noqa: E402
from kernel_bench.harness import sequence_us  # noqa: E402
from kernels.triton import attention_ops  # noqa: E402
from kernels.triton.attention import (AttentionTiles, attention_tiles,  # noqa: E402
                                      paged_attention)
from kernels.triton.gqa_decode import gqa_decode  # noqa: E402
from kernels.triton.split_kv import DEFAULT_SIZING  # noqa: E402

PAGE, HQ, HK, D = 16, 32, 8, 128
GRAPH_ROWS = 256
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}   # --kv-dtype


MLA_HEADS, MLA_LATENT, MLA_ROPE, MLA_PAGE = 16, 512, 64, 64


def verify_batch(b: int, k: int, context: int, device: torch.device,
                 page: int = PAGE) -> ForwardBatch:
    """B rows of 1 + k new tokens over `context` cached ones, each in its own pages."""
    n = 1 + k
    per_row = -(-(context + n) // page)
    i32 = dict(dtype=torch.int32, device=device)
    pages = torch.arange(b * per_row, **i32).view(b, per_row)
    positions = torch.arange(context, context + n, **i32).repeat(b)
    rows = torch.arange(b, device=device).repeat_interleave(n)
    slots = pages[rows, (positions // page).long()] * page + positions % page
    return ForwardBatch(
        input_ids=torch.zeros(b * n, **i32), positions=positions,
        query_start=torch.arange(b + 1, **i32) * n, prefix_lens=torch.full((b,), context, **i32),
        seq_lens=torch.full((b,), context + n, **i32), page_table=pages, slot_mapping=slots,
        num_decode=0, logit_index=torch.arange(b * n, **i32))


def rows_batch(new: list[int], context: int, device: torch.device,
               page: int = PAGE) -> ForwardBatch:
    """One row per entry of `new` (its new tokens) over `context` cached tokens, each row in
    its own pages; the rows of one token first (decode rows)."""
    b = len(new)
    per_row = -(-(context + max(new)) // page)
    i32 = dict(dtype=torch.int32, device=device)
    counts = torch.tensor(new, **i32)
    pages = torch.arange(b * per_row, **i32).view(b, per_row)
    rows = torch.arange(b, device=device).repeat_interleave(counts.long())
    starts = torch.cat([torch.zeros(1, **i32), counts.cumsum(0).to(torch.int32)])
    positions = context + torch.arange(int(starts[-1]), **i32) - starts[rows.long()]
    slots = pages[rows, (positions // page).long()] * page + positions % page
    return ForwardBatch(
        input_ids=torch.zeros(int(starts[-1]), **i32), positions=positions, query_start=starts,
        prefix_lens=torch.full((b,), context, **i32), seq_lens=context + counts,
        page_table=pages, slot_mapping=slots, num_decode=sum(n == 1 for n in new),
        logit_index=starts[1:] - 1)


def mixed_case(b: int, prefill: int, context: int, kv_dtype: str, layers: int,
               sweep: bool = False) -> list[str]:
    """B decode rows and one prefill row of `prefill` tokens over `context` keys: the extend
    graph's step as it was (one extend launch) against its step now (graph_step_attention)
    and the two launches in turn (module doc); with `sweep` also the one launch at other tiles
    and value reads, the chunk's tokens as decode rows, and the two launches side by side
    over the B rows alone."""
    dev = torch.device("cuda")
    batch = rows_batch([1] * b + [prefill], context, dev)
    tokens = bucket(batch.num_tokens)
    padded = pad_extend_batch(batch, tokens, GRAPH_ROWS, min(tokens, GRAPH_ROWS * 9))
    slots = int(batch.page_table.max()) * PAGE + PAGE
    cache_dtype = CACHE_DTYPES[kv_dtype]
    k_new = torch.randn(tokens, HK, D, device=dev, dtype=torch.bfloat16)
    v_new = torch.randn(tokens, HK, D, device=dev, dtype=torch.bfloat16)
    caches = []
    for _ in range(layers):   # the new tokens' K/V in the cache, as the layer stores them first
        kc = torch.randn(slots, HK, D, device=dev, dtype=torch.bfloat16)
        vc = torch.randn(slots, HK, D, device=dev, dtype=torch.bfloat16)
        kc[batch.slot_mapping.long()] = k_new[:batch.num_tokens]
        vc[batch.slot_mapping.long()] = v_new[:batch.num_tokens]
        caches.append((kc.to(cache_dtype), vc.to(cache_dtype)))
    q = torch.randn(tokens, HQ, D, device=dev, dtype=torch.bfloat16)
    scale = D ** -0.5
    nd, real = b, batch.num_tokens

    def extend_graph(layer):
        kc, vc = caches[layer]
        return attention_ops.extend_attention(q, kc, vc, padded.page_table, padded.query_start,
                                              padded.seq_lens, PAGE, scale, k_new=k_new,
                                              v_new=v_new)

    def decode_rows(layer):
        kc, vc = caches[layer]
        return attention_ops.decode_attention(q[:nd], kc, vc, batch.decode_page_table,
                                              batch.decode_seq_lens, PAGE, scale)

    def chunk(layer):
        kc, vc = caches[layer]
        return attention_ops.extend_attention(
            q[nd:real], kc, vc, batch.extend_page_table, batch.extend_query_start,
            batch.extend_seq_lens, PAGE, scale, k_new=k_new[nd:real], v_new=v_new[nd:real])

    def split(layer):
        return decode_rows(layer), chunk(layer)

    head = f"mixed B={b} + 1x{prefill} C={context} {kv_dtype} ({tokens}-token bucket)"

    def graph_step(layer):
        kc, vc = caches[layer]
        return graph_step_attention(attention_ops.decode_attention,
                                    attention_ops.extend_attention, q, k_new, v_new, kc, vc,
                                    padded, PAGE, scale)

    want_chunk = chunk(0)
    got = graph_step(0)
    errs = [(got[nd:real].float() - want_chunk.float()).abs().max().item()]
    if nd:
        want = (decode_rows(0), want_chunk)
        errs += [(got[:nd].float() - want[0].float()).abs().max().item(),
                 (extend_graph(0)[:nd].float() - want[0].float()).abs().max().item()]
    if max(errs) > 5e-2:
        return [f"| {head} | WRONG: outputs differ by {max(errs):.3g} | | |"]
    base_us = graph_us(extend_graph, layers)
    lines = [row(head, "extend op on every row (the extend graph before)", base_us, base_us)]
    launches = [("decode || extend, the graph's step (graph_step_attention)", graph_step)]
    if nd:
        tiles = attention_tiles(True, False, HQ // HK, nd, fp8=kv_dtype == "fp8", v_words=True)
        splits = DEFAULT_SIZING.decode_splits(nd * HK, padded.page_table.shape[1] * PAGE,
                                              tiles.block_n, dev, False)

        def graph_step_sized(layer):   # as if the host knew the B rows
            kc, vc = caches[layer]
            return graph_step_attention(
                lambda *a, **kw: gqa_decode(*a, num_splits=splits, tiles=tiles, **kw),
                attention_ops.extend_attention, q, k_new, v_new, kc, vc, padded, PAGE, scale)
        launches += [(f"the graph's step, decode tiles and {splits} splits as for the B rows "
                      "alone (host-sized)", graph_step_sized),
                     ("decode op + extend op on the chunk, in turn", split),
                     ("decode op alone (the B rows)", decode_rows)]
    if sweep and nd:
        launches += mixed_sweep(batch, padded, caches, q, want, scale, decode_rows, chunk)
    timed = {label: graph_us(fn, layers) for label, fn in launches}
    for label, fn in reversed(launches):   # a second round in reverse order: the best of two
        timed[label] = min(timed[label], graph_us(fn, layers))
    lines += [row(head, label, us, base_us) for label, us in timed.items()]
    print("\n".join(lines), flush=True)
    del caches
    torch.cuda.empty_cache()
    return lines


def mixed_sweep(batch: ForwardBatch, padded: ForwardBatch, caches: list, q: torch.Tensor,
                want: tuple, scale: float, decode_rows, chunk) -> list:
    """`--mixed --sweep`'s other launches of one mixed step, each checked against the decode
    rows' and the chunk's outputs (`want`) first: the one extend launch at other tiles and
    with V read as words, every real token as a decode row of gqa_decode (its own causal
    length), and decode + chunk on two streams."""
    nd, real = batch.num_decode, batch.num_tokens
    group = HQ // HK
    out = []

    def close(got: torch.Tensor) -> bool:
        return ((got[:nd].float() - want[0].float()).abs().max().item() < 5e-2
                and (got[nd:real].float() - want[1].float()).abs().max().item() < 5e-2)

    for rows in (16, 32, 64):
        for block_n in (64, 128):
            for stages in (2, 3):
                for words in (False, True):
                    tiles = AttentionTiles(g_blk=group, block_t=rows // group, block_n=block_n,
                                           num_warps=4, num_stages=stages)

                    def one(layer, tiles=tiles, words=words):
                        kc, vc = caches[layer]
                        return paged_attention(q, None, kc, None, vc, padded.page_table,
                                               padded.query_start, padded.seq_lens, PAGE, scale,
                                               tiles=tiles, v_words=words)
                    label = f"one launch {rows} rows x {block_n} keys s{stages}" + (
                        " V words" if words else "")
                    if close(one(0)):
                        out.append((label, one))
                    else:
                        print(f"{label}: WRONG", flush=True)
    row_of = torch.repeat_interleave(torch.arange(batch.num_rows, device=q.device),
                                     batch.query_start.diff().long())
    token_table = batch.page_table[row_of]                               # [real, P]
    token_lens = batch.positions + 1                                     # causal: own key last

    def per_token(layer):
        kc, vc = caches[layer]
        return attention_ops.decode_attention(q[:real], kc, vc, token_table, token_lens, PAGE,
                                              scale)
    if close(per_token(0)):
        out.append(("every token a decode row (gqa_decode)", per_token))

    def two_streams(layer):
        return side_by_side(lambda: decode_rows(layer), lambda: chunk(layer), q.device)
    out.append(("decode op || extend op on the chunk (two streams)", two_streams))
    return out


def row(head: str, label: str, us: float, base_us: float) -> str:
    """A table row: the case, the launch, us and its ratio to the case's baseline."""
    return f"| {head} | {label} | {us:.1f} | {us / base_us:.2f}x |"


def bucket(tokens: int) -> int:
    return next((t for t in DEFAULT_TOKEN_BUCKETS if t >= tokens), tokens)


def graph_us(fn, layers: int, replays: int = 20) -> float:
    """Microseconds a launch: fn(layer) for each layer in a CUDA graph, replayed."""
    return sequence_us([lambda layer=layer: fn(layer) for layer in range(layers)], replays)


Variant = tuple[str, "AttentionTiles | None", "int | None"]


def case(b: int, k: int, context: int, variants: list[Variant], layers: int,
         kv_dtype: str = "bf16") -> list[str]:
    """B rows of 1 + k tokens over `context` keys: each variant's launch, `layers` caches of
    `kv_dtype` elements."""
    dev = torch.device("cuda")
    batch = verify_batch(b, k, context, dev)
    tokens = bucket(batch.num_tokens)
    padded = pad_extend_batch(batch, tokens, GRAPH_ROWS, min(tokens, GRAPH_ROWS * 9))
    slots = int(batch.page_table.max()) * PAGE + PAGE
    cache_dtype = CACHE_DTYPES[kv_dtype]
    caches = [tuple(torch.randn(slots, HK, D, device=dev, dtype=torch.bfloat16).to(cache_dtype)
                    for _ in range(2)) for _ in range(layers)]
    q = torch.randn(tokens, HQ, D, device=dev, dtype=torch.bfloat16)
    qd = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16)
    lens = batch.seq_lens - k
    scale = D ** -0.5

    def extend(layer, tiles, splits):
        kc, vc = caches[layer]
        return paged_attention(q, None, kc, None, vc, padded.page_table, padded.query_start,
                               padded.seq_lens, PAGE, scale, num_splits=splits, tiles=tiles)

    def decode(layer):
        kc, vc = caches[layer]
        return paged_attention(qd, None, kc, None, vc, batch.page_table, None, lens, PAGE, scale)

    decode_us = graph_us(decode, layers)
    real = batch.num_tokens
    want = extend(0, *variants[0][1:])[:real].float()
    head = f"B={b} k={k} C={context} {kv_dtype} ({tokens}-token bucket)"
    lines = [row(head, "decode launch of the B rows", decode_us, decode_us)]
    for label, tiles, splits in variants:
        err = (extend(0, tiles, splits)[:real].float() - want).abs().max().item()
        if err > 2e-2:
            lines.append(f"| {head} | {label} | WRONG (max error {err:.3g}) | |")
            continue
        us = graph_us(lambda layer: extend(layer, tiles, splits), layers)
        lines.append(row(head, label, us, decode_us))
    print("\n".join(lines), flush=True)
    del caches
    torch.cuda.empty_cache()
    return lines


def mla_case(b: int, k: int, context: int, layers: int) -> list[str]:
    """MLA's absorbed extend over B rows of 1 + k tokens, padded into its graph bucket: the
    registered op against the generic kernel (checked first) and the rows' decode launch."""
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    batch = verify_batch(b, k, context, dev, MLA_PAGE)
    tokens = bucket(batch.num_tokens)
    padded = pad_extend_batch(batch, tokens, GRAPH_ROWS, min(tokens, GRAPH_ROWS * 9))
    slots = int(batch.page_table.max()) * MLA_PAGE + MLA_PAGE
    caches = [torch.randn(slots, MLA_LATENT + MLA_ROPE, device=dev, dtype=bf16)
              for _ in range(layers)]
    ql = torch.randn(tokens, MLA_HEADS, MLA_LATENT, device=dev, dtype=bf16)
    qr = torch.randn(tokens, MLA_HEADS, MLA_ROPE, device=dev, dtype=bf16)
    scale = (128 + MLA_ROPE) ** -0.5
    lens = batch.seq_lens - k

    def registered(layer):
        return attention_ops.mla_extend(ql, qr, caches[layer], padded.page_table,
                                        padded.query_start, padded.seq_lens, MLA_PAGE, scale)

    def per_token(layer):
        return attention_ops.mla_extend_per_token(ql, qr, caches[layer], padded.page_table,
                                                  padded.query_start, padded.seq_lens, MLA_PAGE,
                                                  scale)

    def generic(layer):
        c = caches[layer]
        return paged_attention(ql, qr, c[:, None, :MLA_LATENT], c[:, None, MLA_LATENT:], None,
                               padded.page_table, padded.query_start, padded.seq_lens,
                               MLA_PAGE, scale)

    def decode(layer):
        return attention_ops.mla_decode(ql[:b], qr[:b], caches[layer], batch.page_table,
                                        lens, MLA_PAGE, scale)

    real = batch.num_tokens
    want = generic(0)[:real].float()
    head = f"MLA B={b} k={k} C={context} ({tokens}-token bucket)"
    decode_us = graph_us(decode, layers)
    lines = [row(head, "decode launch of the B rows", decode_us, decode_us)]
    for label, fn in (("registered op", registered), ("per-token kernel", per_token),
                      ("generic kernel", generic)):
        err = (fn(0)[:real].float() - want).abs().max().item()
        if err > 2e-2:
            lines.append(f"| {head} | {label} | WRONG (max error {err:.3g} vs generic) | |")
            continue
        us = graph_us(fn, layers)
        lines.append(row(head, label, us, decode_us))
    print("\n".join(lines), flush=True)
    del caches
    torch.cuda.empty_cache()
    return lines


def variants() -> list[Variant]:
    """The kernel's default first (what the check compares against), then the tiles before
    SHORT_EXTEND_TILES (256 rows, 8 warps, 3 stages; splits sized on every block), then
    other tiles x split counts."""
    group = HQ // HK
    out: list[Variant] = [("default (this tree)", None, None)]
    old = AttentionTiles(g_blk=group, block_t=256 // group, block_n=64, num_warps=8,
                         num_stages=3)
    out.append(("256 rows w8 s3 (before), splits 2", old, 2))
    out.append(("256 rows w8 s3 (before), splits 1", old, 1))
    for rows, warps, stages in ((16, 4, 2), (32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3),
                                (128, 8, 3), (256, 8, 3)):
        tiles = AttentionTiles(g_blk=group, block_t=rows // group, block_n=64,
                               num_warps=warps, num_stages=stages)
        for splits in (1, 2, 4, 8, 16, 32):
            out.append((f"{rows} rows w{warps} s{stages} splits {splits}", tiles, splits))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", metavar="B:K[:C]",
                        default=["1:1", "1:4", "1:8", "4:4", "16:4", "64:4", "1:255:16384",
                                 "1:511:16384"],
                        help="B rows of 1 + K tokens over C cached keys (default --context)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--top", type=int, default=4, help="fastest variants shown per case")
    parser.add_argument("--layers", type=int, default=8, help="caches a graph cycles through")
    parser.add_argument("--default-only", action="store_true",
                        help="time the kernel's default and the tiles before it, no sweep")
    parser.add_argument("--mixed", nargs="+", metavar="B:P[:C]", default=None,
                        help="mixed steps: B decode rows + a chunk of P tokens (module doc)")
    parser.add_argument("--kv-dtype", nargs="+", choices=["bf16", "fp8"], default=["bf16"],
                        help="the caches' element types (--cases and --mixed)")
    parser.add_argument("--sweep", action="store_true",
                        help="--mixed: also other tiles, V as words, per-token decode, "
                        "two streams")
    parser.add_argument("--mla", action="store_true",
                        help="MLA (DeepSeek-V2-Lite's shapes): the registered op, the generic "
                        "kernel and decode; cases default to 1:1 1:2 1:4 1:8 4:1 4:4 16:1")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_verify_attention: needs a CUDA device", file=sys.stderr)
        return 1
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"context {args.context}", flush=True)
    table = ["| case | launch | us | vs decode |", "|---|---|---|---|"]
    if args.mixed:
        table[0] = "| case | launch | us | vs one extend launch |"
        for spec in args.mixed:
            b, p, *rest = (int(v) for v in spec.split(":"))
            if b < 0 or p < 2:
                parser.error(f"--mixed {spec}: B >= 0 decode rows and a chunk of 2 tokens")
            for kv_dtype in args.kv_dtype:
                table += mixed_case(b, p, rest[0] if rest else args.context, kv_dtype,
                                    args.layers, args.sweep)
        print("\n" + "\n".join(table))
        return 0
    if args.mla:
        cases = args.cases if args.cases != parser.get_default("cases") else [
            "1:1", "1:2", "1:4", "1:8", "4:1", "4:4", "16:1"]
        for spec in cases:
            b, k, *rest = (int(v) for v in spec.split(":"))
            table += mla_case(b, k, rest[0] if rest else args.context, args.layers)
        print("\n" + "\n".join(table))
        return 0
    for spec in args.cases:
        b, k, *rest = (int(v) for v in spec.split(":"))
        chosen = variants()[:3] if args.default_only else variants()
        for kv_dtype in args.kv_dtype:
            lines = case(b, k, rest[0] if rest else args.context, chosen, args.layers, kv_dtype)
            timed = [line for line in lines[4:] if "WRONG" not in line]
            timed.sort(key=lambda line: float(line.split("|")[3]))
            table += lines[:4] + timed[:args.top] + [line for line in lines if "WRONG" in line]
    print("\n" + "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
