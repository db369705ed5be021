"""Ceilings measured on this GPU, printed beside our figures: device copy bandwidth, bf16 GEMM
rate, the batch-1 decode bound they imply for Llama-3.1-8B, and HF transformers eager decode at
batch 1 on the same shape (random weights) as the baseline an engine must beat."""

from __future__ import annotations

import time

import torch


def copy_bandwidth_gbs() -> float:
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    return 2 * src.numel() * src.element_size() / seconds / 1e9  # read + write


def gemm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 / (start.elapsed_time(end) / 1e3 / 10) / 1e12


def hf_eager_decode_tps(new_tokens: int = 128) -> tuple[float, float]:
    """Batch-1 decode tokens/s of transformers eager on the Llama-3.1-8B shape; weight GB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from appliance.model.presets import PRESETS

    config = LlamaConfig(**{k: v for k, v in PRESETS["llama-3.1-8b"].items() if k != "architectures"})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    prompt = torch.randint(0, config.vocab_size, (1, 128), device="cuda")
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    model.generate(prompt, **{**kwargs, "min_new_tokens": 8, "max_new_tokens": 8})
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(prompt, **kwargs)
    torch.cuda.synchronize()
    tps = new_tokens / (time.perf_counter() - started)
    del model
    torch.cuda.empty_cache()
    return tps, weight_gb


def main() -> None:
    bw = copy_bandwidth_gbs()
    tflops = gemm_tflops()
    hf_tps, weight_gb = hf_eager_decode_tps()
    print(f"device                          {torch.cuda.get_device_name()}")
    print(f"copy bandwidth (read+write)     {bw:8.0f} GB/s")
    print(f"bf16 GEMM 8192^3                {tflops:8.0f} TFLOP/s")
    print(f"llama-3.1-8b weights            {weight_gb:8.2f} GB")
    print(f"batch-1 decode bound (bw/wts)   {bw / weight_gb:8.1f} tok/s")
    print(f"HF transformers eager, batch 1  {hf_tps:8.1f} tok/s")


if __name__ == "__main__":
    main()
