"""The FP8 KV cache on CUDA (skipped without CUDA; scripts/gpu_fp8kv runs it): Llama-3.1-8B's
shape (2 layers, dummy bf16 weights) with `kv_dtype=float8_e4m3fn`.

- The Triton kernels (registry's choice for an FP8 cache) == the torch reference kernels on the
  same mixed batches over the same FP8 cache format.
- CUDA-graph decode steps captured over the FP8 cache give the eager logits (and replay), and
  the warm-up batches run over it; so do the extend graphs' steps (prefill, mixed, verify).
- The FP8 cache's logits stay near the bf16 cache's (e4m3's error: test_fp8_kv_cache.py).
"""
from __future__ import annotations

import pytest
import torch

import kernels
from helpers import assert_steps_match, check_extend_replay, check_graph_replay
from test_llama_cuda import OPS, PROMPTS, build, cuda, dummy, record, to_cuda
from test_verify_rows import PS, batch_of

F8 = torch.float8_e4m3fn


@cuda
def test_triton_equals_reference_over_fp8_cache():
    fast = build(dummy("llama-3.1-8b", 2), torch.bfloat16, None, kv_num_pages=64,
                 page_size=16, kv_dtype=F8)
    assert all(kernels.selected_backend(op, device="cuda", dtype=torch.bfloat16,
                                        kv_dtype=F8) == "triton" for op in OPS)
    steps = record(fast, PROMPTS, 6)
    del fast
    ref = build(dummy("llama-3.1-8b", 2), torch.bfloat16, "torch", kv_num_pages=64,
                page_size=16, kv_dtype=F8)
    assert any(b.num_decode and b.num_rows > b.num_decode for b, _ in steps)  # mixed batches
    # The Triton prefill reads a chunk's own K/V unquantized from the layer, the reference reads
    # them back from the FP8 cache: they differ by e4m3's rounding (~6% an element at worst; on
    # the H200 a prefill batch's logits came 7.2% of the largest apart, past bf16's 4%)
    assert_steps_match(ref, steps, tol=0.12)


@cuda
def test_cuda_graphs_and_warm_up_over_fp8_cache():
    runner = build(dummy("llama-3.1-8b", 2), torch.bfloat16, None, kv_num_pages=128,
                   page_size=16, kv_dtype=F8)
    runner.warm_up(512, 1024)
    check_graph_replay(runner, record(runner, PROMPTS, 8))


@cuda
def test_cuda_graph_extend_equals_eager_over_fp8_cache():
    """Mixed steps in an extend graph attend their decode rows through the decode launch beside
    the extend launch (graph_step_attention); over an FP8 cache as over bf16."""
    runner = build(dummy("llama-3.1-8b", 2), torch.bfloat16, None, kv_num_pages=256,
                   page_size=PS, kv_dtype=F8)
    runner.enable_cuda_graphs(max_batch=4, max_model_len=1024, max_extend_tokens=128)
    a, pages = list(range(30, 50)), list(range(100, 106))
    verify = batch_of([([7], 3, [106]), ([50, 51, 52, 53], len(a), pages)], num_decode=1,
                      logit_index=[0, 1, 2, 3, 4])
    prefill = batch_of([(a, 0, pages)], 0, None)
    # 0.12: an eager chunk's Triton prefill may read its own K/V unquantized from the layer,
    # the graph's launch reads them back from the FP8 cache (H100: one row of a 32-token
    # prefill step at 7.1e-2), as test_triton_equals_reference_over_fp8_cache says
    replays = check_extend_replay(runner, PROMPTS, 6, [to_cuda(prefill), to_cuda(verify)],
                                  tol=0.12)
    assert replays >= 5


@cuda
def test_fp8_logits_near_bf16_cache():
    bf16 = build(dummy("llama-3.1-8b", 2), torch.bfloat16, None, kv_num_pages=64,
                 page_size=16)
    steps = record(bf16, PROMPTS, 4)
    del bf16
    fp8 = build(dummy("llama-3.1-8b", 2), torch.bfloat16, None, kv_num_pages=64,
                page_size=16, kv_dtype=F8)
    errs = []
    for batch, want in steps:
        got = fp8.forward(batch)
        errs.append(((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item())
    print("FP8 against bf16 cache, relative logit error per step:", errs)
    assert max(errs) < 0.15 and sum(errs) / len(errs) < 0.08
    assert max(errs) > 0
