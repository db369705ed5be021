#!/usr/bin/env python3
"""What the sampler's Gumbel noise costs a token, read from the machine code, no GPU needed.

Triton compiles three small kernels for sm_90 (H100 / H200) here on the CPU: each loads a
block of logits and reduces their max, the first as they are, the second plus the float32
noise estimate (`_gumbel_estimate`), the third plus the exact float64 noise (`_gumbel`, the
reference's). The wheel's nvdisasm lists their SASS; the table gives, per token, the
instructions and the float64 ones among them (DFMA / DADD / DMUL: half the float32 rate on an
H100 / H200), and each kernel's registers. Static counts, not a timing: `kernel_bench run
--rows sample` on a GPU times the whole sampler.

    .venv/bin/python scripts/sample_noise_sass.py [--block 4096] [--warps 8]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.triton import sample as S  # noqa: E402

FLOAT64_OPS = ("DFMA", "DADD", "DMUL")
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


@triton.jit
def _max_plain(L, Out, key, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Out + tl.program_id(0), tl.max(tl.load(L + idx), 0))


@triton.jit
def _max_estimate(L, Out, key, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    noise = S._gumbel_estimate(key.to(tl.uint32), idx)
    tl.store(Out + tl.program_id(0), tl.max(tl.load(L + idx) + noise, 0))


@triton.jit
def _max_exact(L, Out, key, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    noise = S._gumbel(key.to(tl.uint32), idx)
    tl.store(Out + tl.program_id(0), tl.max(tl.load(L + idx) + noise, 0))


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    return str(Path(nvidia.__file__).parent / "bin" / name)


def sass_of(fn, block: int, warps: int) -> tuple[collections.Counter, int]:
    """(SASS opcode counts, registers a thread) of `fn` compiled for sm_90."""
    src = ASTSource(fn=fn, signature={"L": "*fp32", "Out": "*fp32", "key": "i32",
                                      "BLOCK": "constexpr"}, constexprs={"BLOCK": block})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    ops = collections.Counter(m.group(1) for m in map(INSTRUCTION.search, sass.splitlines())
                              if m)
    return ops, int(re.search(r"REG:(\d+)", usage).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=4096, help="tokens a program (the sampler's "
                    "chunk)")
    ap.add_argument("--warps", type=int, default=8)
    args = ap.parse_args()
    per_token = args.block / (32 * args.warps)       # tokens a thread
    rows = [(name, *sass_of(fn, args.block, args.warps)) for name, fn in
            (("no noise", _max_plain), ("float32 estimate", _max_estimate),
             ("float64 (exact)", _max_exact))]
    base = sum(rows[0][1].values())
    print(f"sm_90, {args.block} tokens a program, {args.warps} warps: {per_token:g} a thread")
    print(f"{'kernel':18} {'instr/token':>12} {'float64/token':>14} {'registers':>10}")
    for name, ops, regs in rows:
        extra = (sum(ops.values()) - base) / per_token
        f64 = sum(ops[o] for o in FLOAT64_OPS) / per_token
        print(f"{name:18} {extra:12.1f} {f64:14.1f} {regs:10d}")
    print("(instructions a token beyond the no-noise kernel's)")


if __name__ == "__main__":
    main()
