"""The contiguous-K/V prefill kernel (kernels/triton/prefill.py) against the torch reference.

Tiny shapes through Triton's CPU interpreter when no GPU is present (TRITON_INTERPRET=1, set in
conftest; 16-row programs, 16-key tiles). The new tokens' K/V are the cache's own rows at those
positions (as the model writes them just before attending), so the reference, which reads only
the cache, is the ground truth: cached prefixes of 0 to 3 pages plus a partial one, rows with no
new tokens, new-token runs of 1 to 3 tiles with partial tiles, GQA groups 1 to 8, and K/V given
as views of one packed qkv tensor (row stride wider than the heads)."""
import dataclasses
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: Triton backend untested")

from kernel_testutil import make_paged, rel_err  # noqa: E402
from kernels import reference as R  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET unset", allow_module_level=True)

from kernels.triton import attention_ops as A  # noqa: E402
from kernels.triton.prefill import contiguous_ok, prefill_attention, prefill_tiles  # noqa: E402

TOL = 1e-4 if DEV == "cpu" else 2e-2   # interpreter computes in fp32; the GPU dot in bf16


def _batch(seq_lens, qlens, page_size, hq, hk, d, dv, packed=False, seed=0):
    """A paged cache, the batch's queries, and k_new / v_new = the cache rows of each row's
    last qlen positions; packed: q, k_new, v_new are views of one [T, (Hq+2Hk)*D] tensor."""
    gen = torch.Generator().manual_seed(seed)
    table, num_pages = make_paged(seq_lens, page_size, gen=gen)
    kc = torch.randn(num_pages * page_size, hk, d, generator=gen).to(DEV)
    vc = torch.randn(num_pages * page_size, hk, dv, generator=gen).to(DEV)
    slots = []
    for b, (n, m) in enumerate(zip(seq_lens, qlens)):
        pos = torch.arange(n - m, n)
        slots.append(table[b, pos // page_size].long() * page_size + pos % page_size)
    slots = torch.cat(slots).to(DEV)
    t = sum(qlens)
    if packed:
        qkv = torch.randn(t, hq * d + hk * d + hk * dv, generator=gen).to(DEV)
        q = qkv[:, :hq * d].view(t, hq, d)
        k_new = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
        v_new = qkv[:, (hq + hk) * d:].view(t, hk, dv)
        k_new.copy_(kc[slots])
        v_new.copy_(vc[slots])
    else:
        q = torch.randn(t, hq, d, generator=gen).to(DEV)
        k_new, v_new = kc[slots].clone(), vc[slots].clone()
    qs = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32,
                      device=DEV)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    return q, kc, vc, k_new, v_new, table.to(DEV), qs, sl


CASES = [  # seq_lens, qlens, page_size, hq, hk, packed
    ([30, 9, 50], [30, 1, 17], 16, 4, 2, False),    # no prefix, 1 new token, 33-key prefix
    ([45], [45], 1, 2, 2, True),                    # 3 tiles of new tokens, MHA, packed qkv
    ([20, 33], [0, 20], 4, 8, 1, False),            # an empty row; MQA (group 8)
    ([70, 5], [3, 5], 16, 8, 2, True),              # 67-key prefix, 3 new tokens; packed
    ([64, 48], [32, 48], 16, 16, 2, False),         # whole-tile prefix; group 8, 2 head rows
]


@pytest.mark.parametrize("seq_lens,qlens,page_size,hq,hk,packed", CASES)
def test_prefill_matches_reference(seq_lens, qlens, page_size, hq, hk, packed):
    q, kc, vc, k_new, v_new, table, qs, sl = _batch(seq_lens, qlens, page_size, hq, hk, 16,
                                                    32, packed)
    assert contiguous_ok(q, k_new, v_new)
    ref = R.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3)
    out = prefill_attention(q, kc, vc, k_new, v_new, table, qs, sl, page_size, 0.3)
    assert out.shape == ref.shape and rel_err(out, ref) < TOL
    # the registered op takes this kernel when given the new K/V of a mostly-new batch (the
    # page table's width bounds the keys), the generic one otherwise
    via_op = A.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3, k_new=k_new,
                                v_new=v_new)
    generic = A.extend_attention(q, kc, vc, table, qs, sl, page_size, 0.3)
    mostly_new = q.shape[0] >= A.CONTIGUOUS_MIN_NEW * table.shape[1] * page_size
    assert A.use_contiguous(q, k_new, v_new, table, page_size) == mostly_new
    assert torch.equal(via_op, out if mostly_new else generic)
    assert rel_err(generic, ref) < TOL


def test_wider_tiles_and_more_rows_per_program():
    """32-key tiles and 32-row programs: diagonal tiles that start before the program's
    first token, and programs spanning a row's end."""
    q, kc, vc, k_new, v_new, table, qs, sl = _batch([90, 40], [70, 40], 8, 4, 1, 16, 16,
                                                    seed=1)
    ref = R.extend_attention(q, kc, vc, table, qs, sl, 8, 0.25)
    for kw in (dict(block_n=32), dict(rows=32), dict(rows=32, block_n=32)):
        tiles = dataclasses.replace(prefill_tiles(), **kw)
        out = prefill_attention(q, kc, vc, k_new, v_new, table, qs, sl, 8, 0.25, tiles=tiles)
        assert rel_err(out, ref) < TOL


def test_unsupported_inputs_fall_back_or_raise():
    """Head dim 24 (not a power of two): not this kernel's; the op serves it with the generic
    kernel, and the kernel itself refuses with a clear error."""
    q, kc, vc, k_new, v_new, table, qs, sl = _batch([12], [12], 4, 2, 1, 24, 24)
    assert not contiguous_ok(q, k_new, v_new)
    ref = R.extend_attention(q, kc, vc, table, qs, sl, 4, 0.3)
    out = A.extend_attention(q, kc, vc, table, qs, sl, 4, 0.3, k_new=k_new, v_new=v_new)
    assert rel_err(out, ref) < TOL
    with pytest.raises(ValueError, match="power-of-two"):
        prefill_attention(q, kc, vc, k_new, v_new, table, qs, sl, 4, 0.3)


def test_block_map_is_computed_once_per_query_start_and_again_after_a_write():
    """Each layer of a step asks for the same map: the same tensors come back; a write into
    query_start (a reused buffer) makes it computed again, and a second tile height has its own."""
    from kernels.triton.paged_tiles import block_map

    qs = torch.tensor([0, 5, 12, 13], dtype=torch.int32)
    first = block_map(qs, 13, 4)
    assert block_map(qs, 13, 4) is first
    assert block_map(qs, 13, 8) is not first and block_map(qs, 13, 4) is first
    rows, toks, nb = first
    assert nb == 4 + 3 and rows.tolist() == [0, 0, 1, 1, 2, -1, -1]
    assert toks.tolist()[:5] == [0, 4, 0, 4, 0]
    qs.copy_(torch.tensor([0, 1, 2, 13], dtype=torch.int32))
    rows, toks, _ = block_map(qs, 13, 4)
    assert rows.tolist() == [0, 1, 2, 2, 2, -1, -1] and toks.tolist()[:5] == [0, 0, 0, 4, 8]


def test_block_map_of_an_inference_tensor():
    """The model runner's tensors are inference tensors (no write count): still kept per tensor."""
    from kernels.triton.paged_tiles import block_map

    with torch.inference_mode():
        qs = torch.tensor([0, 5, 12, 13], dtype=torch.int32)
        first = block_map(qs, 13, 4)
        assert block_map(qs, 13, 4) is first
        assert first[0].tolist() == [0, 0, 1, 1, 2, -1, -1]
