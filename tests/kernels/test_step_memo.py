"""kernels/step_memo.py: a result is kept per step on its batch tensors and recomputed when
they are new or written, and the reference ops that use it answer as without it."""
from __future__ import annotations

import torch

from kernel_testutil import make_paged
from kernels import reference as R
from kernels.step_memo import memoized


def _counting():
    calls = []

    def compute():
        calls.append(1)
        return len(calls)
    return calls, compute


def test_the_same_unwritten_inputs_reuse_the_result():
    calls, compute = _counting()
    a, b = torch.arange(4), torch.ones(3)
    assert memoized("k", (a, b), compute) == 1
    assert memoized("k", (a, b), compute) == 1
    assert memoized("other", (a, b), compute) == 2          # another key
    assert memoized("k", (a, torch.ones(3)), compute) == 3   # another second input
    b.add_(1)                                                # written in place: recomputed
    assert memoized("k", (a, b), compute) == 4
    assert len(calls) == 4


def test_inference_tensors_are_kept_too():
    calls, compute = _counting()
    with torch.inference_mode():
        a = torch.arange(4)
    memoized("k", (a,), compute)
    memoized("k", (a,), compute)
    assert len(calls) == 1


def test_decode_attention_reads_each_step_own_pages():
    """Two steps with the same seq_lens tensor but different page tables (a test's reuse; the
    engine builds both afresh) read each table's pages."""
    gen = torch.Generator().manual_seed(1)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    table, pages = make_paged([5, 9], 4, gen=gen)
    k = torch.randn(pages * 4, 2, 8, generator=gen)
    v = torch.randn(pages * 4, 2, 8, generator=gen)
    q = torch.randn(2, 4, 8, generator=gen)
    first = R.decode_attention(q, k, v, table, lens, 4, 0.3)
    swapped = table.flip(0).clone()
    swapped_lens = lens.flip(0).clone()
    again = R.decode_attention(q.flip(0), k, v, swapped, swapped_lens, 4, 0.3)
    torch.testing.assert_close(again.flip(0), first)
    other = R.decode_attention(q, k, v, swapped, lens, 4, 0.3)   # same lens, other table
    fresh = R.decode_attention(q, k, v, swapped.clone(), lens.clone(), 4, 0.3)
    torch.testing.assert_close(other, fresh)
    assert not torch.allclose(other, first)


def test_a_step_tensor_is_freed_with_its_last_reference():
    """The memo must not keep its anchor alive in a cycle (batch tensors, on a GPU device
    memory, would wait for the cyclic collector)."""
    import gc
    import weakref

    gc.disable()
    try:
        positions, table = torch.arange(8), torch.ones(4, 2)
        memoized("k", (positions, table), lambda: positions * 2)
        gone = weakref.ref(positions)
        del positions
        assert gone() is None
    finally:
        gc.enable()
