"""Host -> device transfers: several tensors of mixed dtypes packed into one copy come back
with the same dtypes, shapes and values (the layout keeps every view aligned)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from appliance.engine.transfer import pack, to_device_packed, unpack


def _hosts() -> list[torch.Tensor]:
    return [torch.tensor([0.7, 1.0, 0.0], dtype=torch.float32),           # temperature
            torch.tensor([50, -1, 0], dtype=torch.int32),                 # top_k
            torch.tensor([0.9, 1.0, 0.5], dtype=torch.float32),           # top_p
            torch.tensor([2 ** 61 + 5, 7, -3], dtype=torch.int64),        # seeds
            torch.tensor([[1, 2], [3, 4]], dtype=torch.int16),            # an odd dtype, 2-D
            torch.tensor([12, 900, 4096], dtype=torch.int64)]             # positions


def test_pack_unpack_round_trip():
    hosts = _hosts()
    packed = pack(hosts)
    assert packed.dtype == torch.uint8
    assert packed.numel() == sum(h.numel() * h.element_size() for h in hosts)
    for got, want in zip(unpack(packed, hosts), hosts):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        assert got.data_ptr() % want.element_size() == 0                 # aligned view


def test_one_element_views_of_strided_arrays_pack():
    """numpy's column of a one-row array: C-contiguous by numpy's and torch's rules, whatever
    its stride, which a byte view refused (a verify step with one penalized draft did this)."""
    pairs = np.array([[3, 40]], np.int64)
    hosts = [torch.from_numpy(np.ascontiguousarray(pairs[:, 0])), torch.from_numpy(pairs[:, 1])]
    assert hosts[0].stride() == (2,)
    got = unpack(pack(hosts), hosts)
    assert [g.tolist() for g in got] == [[3], [40]]


def test_cpu_device_returns_the_tensors():
    hosts = _hosts()
    assert all(a is b for a, b in zip(to_device_packed(hosts, torch.device("cpu")), hosts))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_copy_to_cuda():
    hosts = _hosts()
    for got, want in zip(to_device_packed(hosts, torch.device("cuda")), hosts):
        assert got.is_cuda and got.dtype == want.dtype and torch.equal(got.cpu(), want)
