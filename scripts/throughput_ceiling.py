"""The roofline ceiling on output tokens/s of a throughput load (`tokenspeed bench throughput`:
N requests of I prompt and O output tokens at concurrency C) for a dense preset, from this
GPU's measured copy bandwidth and bf16 GEMM rate (the kernel benchmarks' own ceilings).

The load's work, counted from the model's shape:
- linear layers: 2 FLOPs per weight per token (every prompt and output token; the LM head only
  where a token is sampled), at the GEMM rate; never less than reading the weights once per
  step (a decode step of C rows, O - 1 of them a request);
- attention: every decode step reads each row's cached keys and values (contexts I + 1 ..
  I + O - 1) at the copy bandwidth; prefill attention's FLOPs (causal, I^2 / 2 a request) at
  the GEMM rate.
The phases run one after the other in a step (a GEMM is compute-bound at large batch while
decode attention is bandwidth-bound; they do not overlap), so the ceiling adds their times:
no engine gets above it, and an engine at 100% of both peaks in every kernel reaches it.

Also the floor on the median TTFT of C requests that arrive at once (the bench's first wave):
the median request waits for half the burst's prompts to go through the layers at the GEMM
rate. It bounds that burst, not the whole load's p50: the later requests arrive as earlier
ones end, at times as spread as the first wave's prefills made them, and start at once (H200,
8B, 512 x 1000/1000 at 256: burst floor 2.52 s, measured p50 over all 512 requests 1.61 s).

    python scripts/throughput_ceiling.py                        # on the GPU: measures the peaks
    python scripts/throughput_ceiling.py --copy-gbs 4220 --gemm-tflops 797   # anywhere
    python scripts/throughput_ceiling.py --kv-bytes 1   # an FP8 KV cache
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.model.presets import PRESETS  # noqa: E402


@dataclass(frozen=True)
class DenseShape:
    """What the roofline needs of a dense decoder."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, preset: str) -> "DenseShape":
        config = PRESETS[preset]
        if any(key in config for key in ("num_experts", "n_routed_experts", "num_local_experts")):
            raise ValueError(f"{preset}: a MoE preset (this ceiling counts dense layers only)")
        heads = config["num_attention_heads"]
        return cls(config["num_hidden_layers"], config["hidden_size"],
                   config["intermediate_size"], heads, config["num_key_value_heads"],
                   config.get("head_dim", config["hidden_size"] // heads), config["vocab_size"])

    def layer_weights(self) -> int:
        """Weights of one layer's linear maps (q, k, v, o; gate, up, down)."""
        q_and_o = 2 * self.hidden * self.heads * self.head_dim
        k_and_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_and_o + k_and_v + 3 * self.hidden * self.intermediate

    def kv_elements_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Load:
    requests: int
    concurrency: int
    input_len: int
    output_len: int


@dataclass(frozen=True)
class Ceiling:
    """Seconds each phase needs at the peaks, and the output tokens/s they allow."""

    linear_s: float
    decode_attention_s: float
    prefill_attention_s: float
    output_tokens: int
    burst_ttft_p50_s: float  # C prompts at once: the median one's prefill done

    @property
    def seconds(self) -> float:
        return self.linear_s + self.decode_attention_s + self.prefill_attention_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def ceiling(shape: DenseShape, load: Load, copy_gbs: float, gemm_tflops: float,
            weight_bytes: int = 2, kv_bytes: int = 2) -> Ceiling:
    """The roofline of `load` on `shape` at `copy_gbs` (GB/s) and `gemm_tflops` (TFLOP/s)."""
    n, i, o = load.requests, load.input_len, load.output_len
    body = shape.layers * shape.layer_weights()
    head = shape.hidden * shape.vocab
    # every token through the layers; the head on each request's O sampled positions
    linear_flops = 2 * (body * n * (i + o) + head * n * o)
    decode_steps = n * (o - 1) / min(load.concurrency, n)
    weight_read_s = decode_steps * (body + head) * weight_bytes / (copy_gbs * 1e9)
    linear_s = max(linear_flops / (gemm_tflops * 1e12), weight_read_s)
    # decode row j (1 .. O-1) of a request reads I + j cached tokens
    cached_reads = n * ((o - 1) * i + (o - 1) * o / 2)
    kv_s = cached_reads * shape.kv_elements_per_token() * kv_bytes / (copy_gbs * 1e9)
    # QK^T and PV over a causal I x I block, every layer and head
    attention_flops = shape.layers * shape.heads * 4 * shape.head_dim * i * i / 2
    prompt_flops = 2 * body * i + attention_flops + 2 * head
    burst_ttft = min(load.concurrency, n) / 2 * prompt_flops / (gemm_tflops * 1e12)
    return Ceiling(linear_s, kv_s, n * attention_flops / (gemm_tflops * 1e12), n * o,
                   burst_ttft)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=1000)
    parser.add_argument("--kv-bytes", type=int, default=2, help="bytes a cached element: 2 bf16, 1 FP8")
    parser.add_argument("--copy-gbs", type=float, help="copy bandwidth (default: measured)")
    parser.add_argument("--gemm-tflops", type=float, help="bf16 GEMM rate (default: measured)")
    args = parser.parse_args()
    copy_gbs, gemm_tflops = args.copy_gbs, args.gemm_tflops
    if copy_gbs is None or gemm_tflops is None:
        import torch
        if not torch.cuda.is_available():
            print("throughput_ceiling: no GPU to measure; pass --copy-gbs and --gemm-tflops",
                  file=sys.stderr)
            return 1
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from kernel_bench.harness import measure_ceilings
        measured = measure_ceilings()
        print(f"card: {torch.cuda.get_device_name()}")
        copy_gbs = copy_gbs or measured.copy_gbs
        gemm_tflops = gemm_tflops or measured.gemm_tflops
    load = Load(args.requests, args.concurrency, args.input_len, args.output_len)
    result = ceiling(DenseShape.of(args.preset), load, copy_gbs, gemm_tflops,
                     kv_bytes=args.kv_bytes)
    print(f"{args.preset}, {load.requests} requests of {load.input_len} in / {load.output_len} "
          f"out at concurrency {load.concurrency}, KV {args.kv_bytes} B/element; copy "
          f"{copy_gbs:.0f} GB/s, bf16 GEMM {gemm_tflops:.0f} TFLOP/s")
    print(f"linear layers     {result.linear_s:7.2f} s")
    print(f"decode attention  {result.decode_attention_s:7.2f} s")
    print(f"prefill attention {result.prefill_attention_s:7.2f} s")
    print(f"ceiling           {result.output_tokens_per_s:7.0f} output tok/s "
          f"({result.output_tokens} tokens in {result.seconds:.2f} s)")
    print(f"TTFT p50 floor    {result.burst_ttft_p50_s:7.2f} s  (of a burst of {load.concurrency} "
          "prompts arriving at once, the first wave)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
