"""Kernel-level times of one call of each fused op (torch.profiler), to see fixed costs:
the batch-1 fused MoE and MLA decode at DeepSeek-V2-Lite's shapes."""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from kernels import reference as R
from kernels.triton import attention_ops as TA
from kernels.triton import moe as TM

from .harness import BF16, DEV
from .inputs import MLA_SCALE, mla_inputs, moe_weights


def profile_ops() -> None:
    w13, w2 = moe_weights()
    x = torch.randn(1, 2048, dtype=BF16, device=DEV)
    wts, ids = R.moe_route(torch.randn(1, 64, device=DEV), 6, "softmax", False, None, 1, 1, 1.0)
    table, cache, ql, qr, sl = mla_inputs(1, 8192, 16, 16)
    calls = {"fused_moe T=1": lambda: TM.fused_moe(x, w13, w2, wts, ids),
             "mla_decode B=1 ctx=8K": lambda: TA.mla_decode(ql, qr, cache, table, sl, 16,
                                                            MLA_SCALE)}
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(f"\n-- profile {name} (5 calls)")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                     max_name_column_width=50))
