"""When the daemon captures decode steps as CUDA graphs (the capture itself: test_*_cuda.py)."""
import pytest
import torch

from appliance.model.runner import use_cuda_graphs

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize("device, dtype, overrides, env, want", [
    (CUDA, torch.bfloat16, {}, "", True),
    (CUDA, torch.float16, {}, "", True),
    (CUDA, torch.float32, {}, "", False),             # torch reference attention: host syncs
    (CUDA, torch.bfloat16, {"fused_moe": "torch"}, "", False),
    (CUDA, torch.bfloat16, {}, "0", False),
    (CUDA, torch.float32, {}, "1", True),
    (CPU, torch.bfloat16, {}, "1", False),
])
def test_graph_policy(monkeypatch, device, dtype, overrides, env, want):
    monkeypatch.setenv("TOKENSPEED_CUDA_GRAPHS", env)
    assert use_cuda_graphs(device, dtype, overrides) is want
