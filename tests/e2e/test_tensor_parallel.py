"""TP=2 and TP=4 (gloo on CPU) produce the same greedy tokens as TP=1, through the HTTP API."""

from __future__ import annotations

import httpx
import pytest
from daemon_process import start_daemon

PROMPTS = ["The quick brown fox", "def quicksort(xs):", "Once upon a time, in a land far away,"]


def _greedy_texts(daemon) -> list[str]:
    texts = []
    with httpx.Client(base_url=daemon.base_url, timeout=120) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        for prompt in PROMPTS:
            body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True}
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            texts.append(response.json()["choices"][0]["text"])
    return texts


def _run(folder, *overrides: str) -> list[str]:
    daemon = start_daemon(folder, *overrides)
    try:
        return _greedy_texts(daemon)
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()


@pytest.fixture(scope="module")
def tp1_llama(tmp_path_factory) -> list[str]:
    return _run(tmp_path_factory.mktemp("tp1"))


@pytest.mark.parametrize("tp", [2, 4])
def test_llama_tp_matches_tp1(tp, tp1_llama, tmp_path):
    assert _run(tmp_path, f"parallel.tp_size={tp}") == tp1_llama
