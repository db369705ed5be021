"""Kernel benchmarks: every Triton op at real model shapes, checked against the torch
reference and timed beside ceilings measured in the same run; and the sweeps behind each
kernel's default tuning.

    python -m scripts.kernel_bench run [--rows mla_decode,fused_moe] [--quick]
                                       [--no-baselines] [--out DIR] [--list]
    python -m scripts.kernel_bench tune {attention,mla,stages,prefill,moe,splits} [options]
    python -m scripts.kernel_bench ceiling | profile

(from the repository root, or scripts/bench_kernels with the same arguments). `run` exits 1
when a row fails its check against the reference. Figures and how to read them:
docs/KERNELS.md.

| module | what |
|---|---|
| `harness.py` | timing (`graph_ms`, `bench_ms`, `loop_ms`), same-run ceilings, the results table |
| `inputs.py` | synthetic paged caches, queries, expert weights, logits at model shapes |
| `cases.py` | the benchmark rows (`case_*`), `CASES`, selection by op |
| `tune.py` | the sweeps, one per kernel family; tuning passed as arguments, nothing patched |
| `profile.py` | torch.profiler of the batch-1 fused ops |
| `__main__.py` | the command line |
"""
