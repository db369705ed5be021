"""DeepSeek on CUDA: the model on the Triton kernels (MLA decode/extend over the latent
cache, fused MoE, rope, norms) equals the model on the torch reference kernels, on the same
batches (decodes and chunked prefills mixed). Skipped without CUDA.

Run as a script on a GPU box it also prints batch-1 / batch-32 decode speed of the full
DeepSeek-V2-Lite shape (dummy bf16 weights, eager PyTorch; --graphs: decode steps as CUDA
graphs, as the engine runs them; --profile: kernel times of 8 batch-1 steps):
    python tests/model/test_deepseek_cuda.py [--bench [--graphs] [--profile]]
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kernels  # noqa: E402
from appliance.model import ForwardBatch, ModelRunner, ModelSource  # noqa: E402
from appliance.model.presets import preset_config  # noqa: E402
from helpers import check_graph_replay, greedy_generate  # noqa: E402

PROMPTS = [list(range(7, 7 + 40)), [3, 1, 4, 1, 5], list(range(500, 600))]
OPS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope", "store_kv", "mla_decode",
       "mla_extend", "moe_route", "fused_moe", "head_matmul")


def v2_lite(layers: int) -> ModelSource:
    cfg = preset_config("deepseek-v2-lite", num_hidden_layers=layers)
    return ModelSource(load_format="dummy", hf_config=cfg, seed=5)


def build(source: ModelSource, dtype: torch.dtype, backend: str | None, **kw) -> ModelRunner:
    """A runner whose kernels are `backend`'s for every op (None: the registry's choice)."""
    kernels.set_overrides({op: backend for op in OPS} if backend else {})
    return ModelRunner(source, device="cuda", dtype=dtype, **kw)


def record(runner: ModelRunner, prompts: list[list[int]], max_new: int
           ) -> list[tuple[ForwardBatch, torch.Tensor]]:
    """Greedy-decode with mixed chunked batches; every (batch, logits) of the way."""
    steps: list[tuple[ForwardBatch, torch.Tensor]] = []
    forward = runner.forward

    def spy(batch: ForwardBatch) -> torch.Tensor:
        logits = forward(batch)
        steps.append((batch, logits.clone()))
        return logits

    runner.forward = spy
    try:
        greedy_generate(runner, prompts, max_new, chunk=32, admit_per_step=1)
    finally:
        del runner.forward
    return steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# float32 is not here: the Triton MLA and MoE kernels serve 16-bit dtypes only.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_equals_reference(dtype):
    source = v2_lite(layers=3)  # layer 0 dense, 1-2 MoE; real widths (64 experts, 16 heads)
    fast = build(source, dtype, None, kv_num_pages=64, page_size=16)
    assert kernels.selected_backend("fused_moe", device="cuda", dtype=dtype) == "triton"
    steps = record(fast, PROMPTS, 6)
    del fast
    ref = build(source, dtype, "torch", kv_num_pages=64, page_size=16)
    assert any(b.num_decode and b.num_rows > b.num_decode for b, _ in steps)  # mixed batches
    tol = 4e-2
    for batch, got in steps:
        want = ref.forward(batch)                                        # [B, V]
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err < tol, f"relative error {err:.2e} on a batch of {batch.num_rows} rows"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager():
    """MLA decode, routing and fused MoE replay as CUDA graphs (no host sync inside)."""
    runner = build(v2_lite(layers=3), torch.bfloat16, None, kv_num_pages=128, page_size=16)
    check_graph_replay(runner, record(runner, PROMPTS, 8))


def _batch_to(batch: ForwardBatch, device: torch.device | str) -> ForwardBatch:
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return ForwardBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                           for k, v in fields.items()})


def tp_replay_worker(rank: int, world: int, port: int, steps_file: str, out_file: str) -> None:
    """One NCCL rank: build the TP-sharded model and replay the recorded batches."""
    import os

    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=torch.device("cuda", rank))
    try:
        runner = ModelRunner(v2_lite(layers=3), device=f"cuda:{rank}", dtype=torch.bfloat16,
                             tp_rank=rank, tp_size=world, kv_num_pages=64, page_size=16)
        logits = [runner.forward(_batch_to(b, runner.device)).cpu()
                  for b in torch.load(steps_file, weights_only=False)]
        if rank == 0:
            torch.save(logits, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_equals_tp1(tmp_path):
    """The V2-Lite shape at TP=2 over NCCL (heads, dense MLP, expert intermediate split)
    gives the TP=1 logits on the same batches (bf16 tolerance)."""
    import torch.multiprocessing as mp

    from helpers import free_port

    one = build(v2_lite(layers=3), torch.bfloat16, None, kv_num_pages=64, page_size=16)
    steps = record(one, PROMPTS, 6)
    del one
    torch.save([_batch_to(b, "cpu") for b, _ in steps], tmp_path / "steps.pt")
    mp.spawn(tp_replay_worker, args=(2, free_port(), str(tmp_path / "steps.pt"),
                                     str(tmp_path / "tp2.pt")), nprocs=2, join=True)
    for (batch, want), got in zip(steps, torch.load(tmp_path / "tp2.pt")):
        err = (got - want.cpu()).abs().max().item() / want.abs().max().item()
        assert err < 4e-2, f"TP=2 relative error {err:.2e} on a batch of {batch.num_rows} rows"


def bench(batch: int, prompt_len: int = 128, steps: int = 32) -> float:
    """Decode tokens/s of the full V2-Lite shape at `batch` concurrent requests."""
    runner = bench.runner
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(prompt_len)] for i in range(batch)]
    greedy_generate(runner, prompts, 2)                                  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    greedy_generate(runner, prompts, steps + 1)                          # 1 prefill + steps
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    greedy_generate(runner, prompts, 1)                                  # the prefill alone
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t1
    return batch * steps / (t1 - t0 - prefill)


def profile_decode(runner: ModelRunner, steps: int = 8) -> None:
    """Per-step kernel times of batch-1 decode: a profile of 1 prefill + `steps` decodes minus
    one of the prefill alone, per kernel name; their sum against the step's wall time."""
    from torch.profiler import ProfilerActivity, profile
    prompt = [[(7 * j) % 1000 + 10 for j in range(128)]]

    def kernel_us(new_tokens: int) -> tuple[dict[str, float], float]:
        greedy_generate(runner, prompt, new_tokens)                      # warm
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            greedy_generate(runner, prompt, new_tokens)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        return {e.key: e.self_device_time_total for e in prof.key_averages()}, wall

    (full, wall_full), (pre, wall_pre) = kernel_us(steps + 1), kernel_us(1)
    per = {k: (v - pre.get(k, 0.0)) / steps for k, v in full.items()}
    busy = sum(per.values())
    step_us = (wall_full - wall_pre) / steps * 1e6
    print(f"\nbatch-1 decode step: {step_us:.0f} us wall, {busy:.0f} us of kernels "
          f"({len(per)} kernel names)")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:30]:
        print(f"  {v:8.1f} us  {k[:90]}")


if __name__ == "__main__":
    print(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]) if "--bench" not in sys.argv
          else "")
    if "--bench" in sys.argv:
        t = time.perf_counter()
        bench.runner = build(v2_lite(27), torch.bfloat16, None, kv_num_pages=1024, page_size=64)
        if "--graphs" in sys.argv:
            bench.runner.enable_cuda_graphs(max_batch=32, max_model_len=4096)
        print(f"V2-Lite bf16 dummy built in {time.perf_counter() - t:.1f}s on "
              f"{torch.cuda.get_device_name()}, CUDA graphs {'--graphs' in sys.argv}")
        for b in (1, 32):
            print(f"batch {b}: {bench(b):.1f} decode tok/s")
        if "--profile" in sys.argv:
            profile_decode(bench.runner)
