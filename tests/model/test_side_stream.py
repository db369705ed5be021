"""side_by_side (appliance/model/side_stream.py): both results, in order; on CUDA the first runs
on this thread's side stream and the current stream waits for it."""
from __future__ import annotations

import threading

import pytest
import torch

from appliance.model.side_stream import side_by_side, side_stream


def test_off_cuda_the_two_run_in_turn():
    calls = []
    a, b = side_by_side(lambda: calls.append("first") or 1, lambda: calls.append("second") or 2,
                        torch.device("cpu"))
    assert (a, b) == (1, 2) and calls == ["first", "second"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_first_runs_on_the_side_stream_and_is_joined():
    dev = torch.device("cuda")
    x = torch.randn(1 << 20, device=dev)
    main = torch.cuda.current_stream(dev)
    seen = []

    def first():
        seen.append(torch.cuda.current_stream(dev))
        return (x * 2).sum()

    a, b = side_by_side(first, lambda: (x * 3).sum(), dev)
    assert seen[0] == side_stream(dev) != main
    assert torch.cuda.current_stream(dev) == main
    torch.testing.assert_close((a + b).item(), (x * 5).sum().item(), rtol=1e-4, atol=1e-2)
    others = []
    thread = threading.Thread(target=lambda: others.append(side_stream(dev)))
    thread.start()
    thread.join()
    assert others[0] != side_stream(dev)            # a thread of its own side stream
