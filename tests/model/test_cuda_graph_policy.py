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


def test_decode_inputs_stage_a_batch_into_its_bucket():
    """Staging copies the rows' fields and page table into the static buffers and pads the
    rest of the bucket (no cache write, one key from page 0); the bucket's view reads it."""
    from appliance.model.batch import ForwardBatch
    from appliance.model.cuda_graph import DecodeInputs

    inputs = DecodeInputs(max_batch=4, max_pages=3, device=CPU)
    inputs.full.page_table.fill_(9)  # stale entries of an earlier, wider step
    i32 = dict(dtype=torch.int32)
    batch = ForwardBatch(
        input_ids=torch.tensor([5, 6], **i32), positions=torch.tensor([7, 2], **i32),
        query_start=torch.tensor([0, 1, 2], **i32), prefix_lens=torch.tensor([7, 2], **i32),
        seq_lens=torch.tensor([8, 3], **i32), page_table=torch.tensor([[1, 2], [3, 0]], **i32),
        slot_mapping=torch.tensor([15, 26], **i32), num_decode=2)
    inputs.stage(batch, bs=3)
    view = inputs.view(3)
    assert view.input_ids.tolist()[:2] == [5, 6] and view.positions.tolist()[:2] == [7, 2]
    assert view.prefix_lens.tolist()[:2] == [7, 2]
    assert view.seq_lens.tolist() == [8, 3, 1] and view.slot_mapping.tolist() == [15, 26, -1]
    assert view.page_table.tolist() == [[1, 2, 9], [3, 0, 9], [0, 9, 9]]
    assert view.query_start.tolist() == [0, 1, 2, 3] and view.num_decode == 3
    one = ForwardBatch(  # one row: its page table goes in the fields' launch
        input_ids=torch.tensor([4], **i32), positions=torch.tensor([9], **i32),
        query_start=torch.tensor([0, 1], **i32), prefix_lens=torch.tensor([9], **i32),
        seq_lens=torch.tensor([10], **i32), page_table=torch.tensor([[6, 7]], **i32),
        slot_mapping=torch.tensor([29], **i32), num_decode=1)
    inputs.stage(one, bs=1)
    assert inputs.view(1).page_table.tolist() == [[6, 7, 9]]
    assert inputs.view(1).seq_lens.tolist() == [10] and inputs.view(1).input_ids.tolist() == [4]
