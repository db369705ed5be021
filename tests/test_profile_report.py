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


def test_mixed_against_decode_only_steps_by_decode_rows(tmp_path):
    """Per band of 16 decode rows: decode-only steps' median GPU time beside mixed steps' of at
    most 256 tokens; bands with only one kind, bigger chunks and profiled steps left out."""
    fields = ("time_s", "step", "decode_rows", "prefill_rows", "prefill_tokens", "gpu_ms",
              "profiled")
    rows = [(1.0, 1, 80, 0, 0, 11.0, 0), (2.0, 2, 90, 0, 0, 12.0, 0), (3.0, 3, 85, 0, 0, 13.0, 0),
            (4.0, 4, 82, 1, 100, 14.5, 0), (5.0, 5, 95, 1, 60, 13.5, 0),
            (6.0, 6, 88, 1, 300, 30.0, 0),            # 388 tokens: a chunk past the graphs'
            (7.0, 7, 84, 1, 64, 99.0, 1),             # profiled
            (8.0, 8, 20, 0, 0, 5.0, 0)]               # no mixed step in its band
    path = tmp_path / "steps.csv"
    path.write_text(",".join(fields) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    lines = P.band_lines(path, [("all", 0.0, float("inf"))])
    assert len(lines) == 3                               # title, header, the 80-95 band
    assert lines[2].split() == ["all", "80-95", "3", "12.00", "2", "14.00", "80", "+2.00"]
    assert P.band_lines(tmp_path / "missing.csv", []) == []
