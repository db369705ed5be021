"""Ceilings measured on this GPU, printed beside our figures: device copy bandwidth, bf16 GEMM
rate (kernel_bench.harness.measure_ceilings, the kernel benchmarks' own), the batch-1 decode
bound they imply for Llama-3.1-8B, and HF transformers eager decode at batch 1 on the same
shape (random weights) as the baseline an engine must beat.

    python scripts/bench_ceiling.py
"""

from __future__ import annotations

import time

import torch
from kernel_bench.harness import measure_ceilings


def hf_eager_decode_tps(new_tokens: int = 128) -> tuple[float, float]:
    """Batch-1 decode tokens/s of transformers eager on the Llama-3.1-8B shape; weight GB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from appliance.model.presets import PRESETS

    config = LlamaConfig(**{k: v for k, v in PRESETS["llama-3.1-8b"].items()
                            if k != "architectures"})
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
    ceil = measure_ceilings()
    bw, tflops = ceil.copy_gbs, ceil.gemm_tflops
    hf_tps, weight_gb = hf_eager_decode_tps()
    print(f"device                          {torch.cuda.get_device_name()}")
    print(f"copy bandwidth (read+write)     {bw:8.0f} GB/s")
    print(f"bf16 GEMM 8192^3                {tflops:8.0f} TFLOP/s")
    print(f"llama-3.1-8b weights            {weight_gb:8.2f} GB")
    print(f"batch-1 decode bound (bw/wts)   {bw / weight_gb:8.1f} tok/s")
    print(f"HF transformers eager, batch 1  {hf_tps:8.1f} tok/s")


if __name__ == "__main__":
    main()
