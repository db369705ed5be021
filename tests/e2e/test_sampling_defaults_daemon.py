"""The model's sampling defaults end to end: `tokenspeed up` on a checkpoint whose
generation_config.json sets top_k 1 samples every request that leaves top_k out from the
single best token (its output is the greedy one at any temperature), through both SDKs; a
request that sends top_k 0 turns it off and samples, and so does every request of a daemon
told `model.sampling_defaults: api`."""

from __future__ import annotations

import json
import shutil

import anthropic
import openai
import pytest

from daemon_process import start_daemon

pytestmark = pytest.mark.slow  # spawns processes / > 5 s: skipped by -m 'not slow'

PROMPT = [{"role": "user", "content": "def fib(n):"}]


@pytest.fixture(scope="module")
def top_k_one(tmp_path_factory):
    """A copy of the tiny checkpoint whose generation_config.json sets top_k 1."""
    from appliance.model import tiny

    root = tmp_path_factory.mktemp("defaults")
    folder = root / "top-k-one"
    shutil.copytree(tiny.ensure_tiny_checkpoint(root / "tiny-llama"), folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "top_k": 1}))
    return folder


@pytest.fixture(scope="module")
def daemon(top_k_one):
    d = start_daemon(top_k_one.parent, f"model.path={top_k_one}")
    yield d
    assert d.stop() == 0, d.log.read_text()


def _chat(daemon, **fields) -> str:
    client = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0)
    extra = {"top_k": fields.pop("top_k")} if "top_k" in fields else {}
    out = client.chat.completions.create(model="top-k-one", messages=PROMPT, max_tokens=16,
                                         extra_body=extra, **fields)
    return out.choices[0].message.content


def test_requests_without_top_k_get_the_models(daemon):
    greedy = _chat(daemon, temperature=0)
    assert [_chat(daemon, temperature=1.0, seed=s) for s in range(3)] == [greedy] * 3
    claude = anthropic.Anthropic(base_url=daemon.base_url, api_key="unused", max_retries=0)
    reply = claude.messages.create(model="top-k-one", messages=PROMPT, max_tokens=16,
                                   extra_body={"temperature": 1.0})
    assert reply.content[0].text == greedy
    assert "top_k 1" in daemon.log.read_text()  # the start-up log says what it applies


def test_top_k_zero_sent_turns_it_off(daemon):
    greedy = _chat(daemon, temperature=0)
    sampled = [_chat(daemon, temperature=1.0, top_k=0, seed=s) for s in range(4)]
    assert any(text != greedy for text in sampled)


def test_sampling_defaults_api_ignores_the_models(top_k_one):
    d = start_daemon(top_k_one.parent, f"model.path={top_k_one}", "model.sampling_defaults=api")
    try:
        greedy = _chat(d, temperature=0)
        assert any(_chat(d, temperature=1.0, seed=s) != greedy for s in range(4))
    finally:
        assert d.stop() == 0, d.log.read_text()
