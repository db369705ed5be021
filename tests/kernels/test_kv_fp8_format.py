"""The FP8 (e4m3) KV cache format of the torch reference (kernels/reference/kv_cache.py): x /
scale saturated to +-448, read back as x * scale, against e4m3's rounding error; the reference
writer and attention ops over an FP8 cache. The Triton kernels: test_kernels_fp8_kv.py."""
import torch

from kernel_testutil import make_paged, rel_err
from kernels import reference as R
from kernels.reference.kv_cache import FP8_KV_DTYPE, FP8_MAX, dequantize, quantize

F8 = FP8_KV_DTYPE
# e4m3 keeps 3 mantissa bits: rounding to nearest is off by at most half a step, 2^-4 of the
# value, for normal numbers (|x| >= 2^-6); below that the step is the subnormal 2^-9
REL_STEP, SUBNORMAL_STEP = 2.0 ** -4, 2.0 ** -9


def test_round_trip_within_e4m3_error():
    gen = torch.Generator().manual_seed(0)
    unit = torch.randn(4096, generator=gen) * torch.logspace(-4, 1.5, 4096)  # |x| < 448 / scale
    for scale in (1.0, 0.05, 3.0):
        x = unit * scale
        back = dequantize(quantize(x, F8, scale), scale)
        bound = REL_STEP * x.abs() + SUBNORMAL_STEP / 2 * scale
        assert ((back - x).abs() <= bound).all(), scale
        assert (back - x).abs().max() > 0                      # it did quantize


def test_saturates_instead_of_nan():
    x = torch.tensor([1e4, -1e4, 447.0, 500.0, float("inf")])
    q = quantize(x, F8, 1.0)
    assert torch.equal(q.float(), torch.tensor([448.0, -448.0, 448.0, 448.0, 448.0]))
    assert torch.equal(dequantize(quantize(torch.tensor([900.0]), F8, 2.0), 2.0),
                       torch.tensor([896.0]))                  # 448 * 2: in range with the scale


def test_sixteen_bit_cache_is_a_plain_cast():
    x = torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(quantize(x, torch.bfloat16), x)
    assert torch.equal(dequantize(x), x.float())


def test_reference_store_and_attention_read_the_format():
    """store_kv writes quantize(k, k_scale); decode / extend attention over the FP8 cache equal
    attention over its dequantized float32 copy."""
    gen = torch.Generator().manual_seed(1)
    seq_lens, page_size, hq, hk, d = [9, 21], 4, 4, 2, 8
    table, num_pages = make_paged(seq_lens, page_size, gen=gen)
    slots = num_pages * page_size
    kc, vc = torch.zeros(slots, hk, d, dtype=F8), torch.zeros(slots, hk, d, dtype=F8)
    k, v = torch.randn(slots, hk, d, generator=gen) * 4, torch.randn(slots, hk, d, generator=gen)
    R.store_kv(k, v, kc, vc, torch.arange(slots), 0.5, 0.25)
    assert torch.equal(kc.view(torch.uint8), quantize(k, F8, 0.5).view(torch.uint8))
    kf, vf = dequantize(kc, 0.5), dequantize(vc, 0.25)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(2, hq, d, generator=gen)
    got = R.decode_attention(q, kc, vc, table, sl, page_size, 0.3, k_scale=0.5, v_scale=0.25)
    assert rel_err(got, R.decode_attention(q, kf, vf, table, sl, page_size, 0.3)) < 1e-6
    qs = torch.tensor([0, 3, 8], dtype=torch.int32)
    q = torch.randn(8, hq, d, generator=gen)
    got = R.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3, k_scale=0.5, v_scale=0.25)
    assert rel_err(got, R.extend_attention(q, kf, vf, table, qs, sl, page_size, 0.3)) < 1e-6
