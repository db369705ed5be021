"""scripts/sample_noise_sass.py compiles the sampler's noise for sm_90 on the CPU: the float32
estimate has no float64 instruction, the exact noise has its float64 logs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia", reason="no Triton NVIDIA backend")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_estimate_has_no_float64_and_fewer_instructions():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample_noise_sass.py")],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {line[:18].strip(): line[18:].split() for line in out.splitlines()
            if line.startswith(("no noise", "float32 estimate", "float64 (exact)"))}
    estimate, exact = rows["float32 estimate"], rows["float64 (exact)"]
    assert float(estimate[1]) == 0 and float(exact[1]) > 30
    assert 0 < float(estimate[0]) < float(exact[0])
