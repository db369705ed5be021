"""MTP drafts through the HTTP API of the real daemon (`speculative.method=mtp`), on tiny
DeepSeek-V3 and GLM-4.5 checkpoints that carry a next-token layer (tests/model/
mtp_checkpoints.py, its layer made to repeat the target's prediction so that drafts are
accepted where the target repeats a token): greedy output token for token the output without
speculation (the per-request opt-out on the same daemon), plain and streamed, alone and
concurrent with chunked prefill; drafts verified and accepted in /metrics; every page back.
GLM once more over two gloo ranks. A checkpoint without MTP layers is a config error naming
`speculative.method`."""
from __future__ import annotations

import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from daemon_process import launch_daemon, start_daemon

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from moe_checkpoints import with_tokenizer  # noqa: E402
from mtp_checkpoints import save_with_mtp  # noqa: E402

pytestmark = pytest.mark.slow  # spawns the daemon: skipped by -m 'not slow'

PROMPTS = [[5, 9, 33, 7, 100, 21, 3], [8, 8, 8], list(range(10, 40)), [151, 2, 77, 0, 64]]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer_folder() -> Path:
    from appliance.model.tiny import ensure_tiny_checkpoint

    return Path(ensure_tiny_checkpoint(
        Path(__file__).resolve().parents[2] / ".cache" / "test" / "models" / "tiny-llama"))


@pytest.fixture(scope="module", params=[("deepseek-v3",), ("glm-4.5",),
                                        ("glm-4.5", "parallel.tp_size=2")],
                ids=["deepseek-v3", "glm-4.5", "glm-4.5-tp2"])
def daemon(request, tmp_path_factory, tokenizer_folder):
    family, *overrides = request.param
    folder = tmp_path_factory.mktemp(family)
    checkpoint = with_tokenizer(save_with_mtp(folder, family, echo=True)[0], tokenizer_folder)
    d = start_daemon(folder, f"model.path={checkpoint}", "speculative.method=mtp",
                     "speculative.max_draft=3", "scheduler.max_batch_tokens=16",
                     "kv.num_pages=128", "kv.page_size=4", *overrides)
    yield d
    assert d.stop() == 0, d.log.read_text()


def complete(daemon, prompt: list[int], speculative: bool, stream: bool = False) -> list[int]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "speculative": speculative, "stream": stream}
    with httpx.Client(base_url=daemon.base_url, timeout=300) as http:
        if not stream:
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]
        ids = []
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
        return ids


def metric(daemon, name: str) -> float:
    with daemon.uds_client() as http:
        text = http.get("/metrics").text
    return float(re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M).group(1))


def test_greedy_output_is_the_same_with_mtp_drafts(daemon):
    drafted = metric(daemon, "tokenspeed_spec_draft_tokens_total")
    accepted = metric(daemon, "tokenspeed_spec_accepted_tokens_total")
    for prompt in PROMPTS:
        want = complete(daemon, prompt, speculative=False)
        assert complete(daemon, prompt, speculative=True) == want
        assert complete(daemon, prompt, speculative=True, stream=True) == want
    assert metric(daemon, "tokenspeed_spec_draft_tokens_total") > drafted
    assert metric(daemon, "tokenspeed_spec_accepted_tokens_total") > accepted


def test_concurrent_requests_keep_their_output_and_return_every_page(daemon):
    want = [complete(daemon, p, speculative=False) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: complete(daemon, p, True), PROMPTS))
    assert got == want
    deadline = time.monotonic() + 10  # /stats is the engine's snapshot of every 0.25 s
    with daemon.uds_client() as http:
        while (used := http.get("/stats").json()["kv"]["pages_used"]) > 0:
            assert time.monotonic() < deadline, used
            time.sleep(0.1)


def test_a_checkpoint_without_mtp_layers_is_a_config_error(tmp_path):
    d = launch_daemon(tmp_path, "speculative.method=mtp")  # the tiny Llama
    assert d.proc.wait(timeout=120) == 2
    assert "speculative.method: mtp needs a checkpoint with next-token" in d.log.read_text()
