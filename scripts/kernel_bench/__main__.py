"""python -m scripts.kernel_bench {run,tune,ceiling,profile} ... (from the repository root;
needs a CUDA GPU except `run --list`). See the package docstring (__init__.py)."""
from __future__ import annotations

import argparse
import sys

import torch

from . import cases, tune
from .harness import BF16, Session, measure_ceilings


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m scripts.kernel_bench",
                                 description="Benchmark and tune the Triton kernels against "
                                             "same-run ceilings.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="check every op against the torch reference and time it "
                                     "with its default tuning")
    run.add_argument("--rows", default="",
                     help=f"comma-separated ops (default: all): {', '.join(cases.TITLES)}")
    run.add_argument("--quick", action="store_true", help="fewer shapes per op")
    run.add_argument("--no-baselines", action="store_true",
                     help="skip the baselines (torch reference and SDPA timings, the per-expert "
                          "loop, split-off variants); the check against the reference stays")
    run.add_argument("--out", default="", help="folder for kernel_bench.md / .json")
    run.add_argument("--list", action="store_true", help="list the selected rows and exit")
    sweeps = sub.add_parser("tune", help="sweep one kernel family's tuning").add_subparsers(
        dest="family", required=True)
    att = sweeps.add_parser("attention", help="tiles and split counts of the generic paged "
                                              "kernel (MLA and GQA decode)")
    att.add_argument("--gqa-decode", action="store_true",
                     help="also GQA decode split counts x tiles at B=1 x 128K and 4 x 32K")
    att.add_argument("--mla-only", action="store_true", help="the MLA decode variants alone")
    att.set_defaults(sweep=lambda a, c: tune.attention(c, a.gqa_decode, a.mla_only))
    mla = sweeps.add_parser("mla", help="MLA decode: the chunked kernel's knobs")
    mla.add_argument("--top", type=int, default=6,
                     help="configs of the first shape carried to the others (default 6)")
    mla.add_argument("--no-generic", action="store_true",
                     help="skip the generic kernel's variants before the chunked sweep")
    mla.set_defaults(sweep=lambda a, c: tune.mla(c, a.top, not a.no_generic))
    sweeps.add_parser("short-decode", help="batch-1 GQA decode of short rows in a 128K-wide "
                                           "table: split tiles and tiles").set_defaults(
        sweep=lambda a, c: tune.short_decode(c))
    sweeps.add_parser("short-mla", help="batch-1 MLA decode of short rows in a 32K-wide "
                                        "table: split counts, split tiles, tiles").set_defaults(
        sweep=lambda a, c: tune.short_mla(c))
    sweeps.add_parser("stages", help="pipeline depths of the generic paged kernel"
                      ).set_defaults(sweep=lambda a, c: tune.stages(c))
    pre = sweeps.add_parser("prefill", help="contiguous-K/V prefill tiles and the "
                                            "CONTIGUOUS_MIN_NEW split")
    pre.add_argument("--no-tiles", action="store_true",
                     help="skip the 24 tile variants; only the cached-prefix rows")
    pre.set_defaults(sweep=lambda a, c: tune.prefill(c, not a.no_tiles))
    sweeps.add_parser("moe", help="fused MoE tiles").set_defaults(
        sweep=lambda a, c: tune.moe(c))
    sweeps.add_parser("moe-decode", help="fused MoE tiles at batch 1").set_defaults(
        sweep=lambda a, c: tune.moe_decode(c))
    sweeps.add_parser("splits", help="split-KV: tiles per split and split counts"
                      ).set_defaults(sweep=lambda a, c: tune.splits(c))
    sub.add_parser("ceiling", help="measure the copy and GEMM ceilings")
    sub.add_parser("profile", help="torch.profiler of the batch-1 fused MoE and MLA decode")
    return ap


def _run(args: argparse.Namespace) -> int:
    try:
        rows = cases.select([r for r in args.rows.split(",") if r], args.quick)
    except ValueError as e:
        sys.exit(f"kernel_bench run: {e}")
    if args.list:
        for op in dict.fromkeys(c.op for c in rows):
            n = sum(c.op == op for c in rows)
            print(f"{op:20s} {n:2d} rows  ({cases.TITLES[op]})")
        return 0
    _need_cuda()
    import kernels
    print(kernels.explain("decode_attention", device="cuda", dtype=BF16, head_dim=128))
    session = Session(measure_ceilings(), baselines=not args.no_baselines)
    print(session.ceilings.line(), flush=True)
    op = None
    for case in rows:
        if case.op != op:
            op = case.op
            print(f"\n== {op} ({cases.TITLES[op]})", flush=True)
        try:
            case.run(session)
        except torch.cuda.OutOfMemoryError as e:
            print(f"  OOM: {str(e)[:100]}")
        except Exception as e:  # noqa: BLE001 - report the case, keep benchmarking the rest
            print(f"  ERROR {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.empty_cache()
    if args.out:
        session.save(args.out)
    print("\n" + session.table())
    failed = session.failures()
    for r in failed:
        print(f"FAIL: {r.kernel} {r.shape}: err {r.err:.1e} against the torch reference")
    return 1 if failed else 0


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("kernel_bench: needs a CUDA GPU")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    _need_cuda()
    torch.manual_seed(0)
    ceil = measure_ceilings()
    print(ceil.line(), flush=True)
    if args.command == "tune":
        args.sweep(args, ceil)
    elif args.command == "profile":
        from .profile import profile_ops
        profile_ops()
    return 0


if __name__ == "__main__":
    sys.exit(main())
