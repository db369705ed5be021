"""scripts/profile_report.py's outside-the-graph table: from a chrome trace, the GPU ops a
step runs beside its CUDA graph (launched by anything but a cudaGraphLaunch), per step."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import profile_report as P  # noqa: E402

NEG = ("void at::native::vectorized_elementwise_kernel<4, at::native::neg_kernel_cuda("
       "at::TensorIteratorBase&)::{lambda()#2}>(int, at::native::neg_kernel_cuda)")


def _event(cat: str, name: str, correlation: int, dur: float = 1.0) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "dur": dur, "args": {"correlation": correlation}}


def test_ops_outside_graph_launches_per_step(tmp_path):
    events = []
    for step in range(2):  # two steps: a copy and a lookup before the graph, a sampler after
        graph = 100 + step
        events += [_event("cuda_runtime", "cudaGraphLaunch", graph),
                   _event("kernel", "_gemv_kernel", graph, 90.0),
                   _event("kernel", "_rms_norm_kernel", graph, 2.0),
                   _event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 10 * step + 1, 1.0),
                   _event("kernel", NEG, 10 * step + 2, 0.5),
                   _event("kernel", "_sample_chunk_kernel", 10 * step + 3, 2.5)]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "dur": 5.0, "args": {}})
    ops, steps = P.outside_graph_ops({"traceEvents": events})
    assert steps == 2
    assert ops == {"Memcpy HtoD": (2, 2.0), "neg_kernel_cuda": (2, 1.0),
                   "_sample_chunk_kernel": (2, 5.0)}
    folder = tmp_path / "timing"
    folder.mkdir()
    (folder / "trace-rows1.json").write_text(json.dumps({"traceEvents": events}))
    (folder / "trace-rows128.json").write_text(json.dumps({"traceEvents": events[-2:]}))
    lines = P.outside_graph_lines(folder, top=2)
    assert lines[0].startswith("outside the CUDA graph, a step of the window at >= 1 decode rows: "
                               "3.0 GPU ops, 4.0 us of GPU time")
    assert "_sample_chunk_kernel" in lines[2] and len(lines) == 4  # title, header, top 2
    assert not any("128" in line for line in lines)  # a window without graph launches: none
