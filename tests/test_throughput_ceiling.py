"""scripts/throughput_ceiling.py: the roofline of a throughput load, checked by hand on a
small shape."""
from __future__ import annotations

import pytest

from scripts.throughput_ceiling import Ceiling, DenseShape, Load, ceiling

SHAPE = DenseShape(layers=2, hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10)


def test_each_phase_by_hand():
    # per layer: q,o 2*4*4=32, k,v 2*4*2=16, mlp 3*4*8=96 -> 144; 2 layers 288; head 40
    assert SHAPE.layer_weights() == 144
    load = Load(requests=2, concurrency=2, input_len=3, output_len=4)
    got = ceiling(SHAPE, load, copy_gbs=1e-9, gemm_tflops=1e-12)  # 1 B/s and 1 FLOP/s
    linear_flops = 2 * (288 * 2 * 7 + 40 * 2 * 4)
    weight_read = 3 * (288 + 40) * 2                  # 3 decode steps of both rows
    assert got.linear_s == pytest.approx(max(linear_flops, weight_read))
    # rows read 4, 5, 6 cached tokens; 2 * 2 layers * 1 head * 2 dims * 2 bytes a token
    assert got.decode_attention_s == pytest.approx(2 * 15 * 16)
    assert got.prefill_attention_s == pytest.approx(2 * 2 * 2 * 4 * 2 * 9 / 2)
    assert got.output_tokens == 8
    # the median of 2 prompts at once waits for 1: its layers, attention and head (one token)
    assert got.burst_ttft_p50_s == pytest.approx(2 * 288 * 3 + 2 * 2 * 4 * 2 * 9 / 2 + 2 * 40)
    assert got.output_tokens_per_s == pytest.approx(8 / got.seconds)


def test_reading_the_weights_bounds_small_batches():
    load = Load(requests=1, concurrency=1, input_len=1, output_len=100)
    got = ceiling(SHAPE, load, copy_gbs=1.0, gemm_tflops=1e6)
    assert got.linear_s == pytest.approx(99 * (288 + 40) * 2 / 1e9)


def test_fp8_kv_halves_decode_attention_and_moe_is_refused():
    load = Load(512, 256, 1000, 1000)
    shape = DenseShape.of("llama-3.1-8b")
    bf16 = ceiling(shape, load, 4220, 797)
    fp8 = ceiling(shape, load, 4220, 797, kv_bytes=1)
    assert fp8.decode_attention_s == pytest.approx(bf16.decode_attention_s / 2)
    assert isinstance(bf16, Ceiling) and 11_000 < bf16.output_tokens_per_s < 13_000
    with pytest.raises(ValueError, match="MoE"):
        DenseShape.of("qwen3-coder-30b-a3b")
