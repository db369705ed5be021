"""`tokenspeed bench throughput` with an agent's sampling settings against the real daemon: it
accepts them (top_k is its extension to OpenAI's completions) and the load runs as asked."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # the daemon fixture spawns a process
def test_throughput_with_temperature_top_p_and_top_k(daemon):
    result = daemon.cli("bench", "throughput", "--requests", "4", "--concurrency", "2",
                        "--input-len", "16", "--output-len", "6", "--temperature", "0.7",
                        "--top-p", "0.8", "--top-k", "20", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sampling"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0}
    assert summary["requests"] == 4 and summary["output_tokens"] == 4 * 6  # ignore_eos
