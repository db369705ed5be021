"""Speculative decoding through the HTTP API of the real daemon (n-gram and suffix drafts, a
daemon each): greedy output is token for token the output without speculation (the
per-request opt-out on the same daemon), alone, batched, with chunked prefill and under
preemption; the Anthropic endpoint too; drafts were really verified and accepted."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import pytest

from daemon_process import start_daemon

pytestmark = pytest.mark.slow  # spawns the daemon: skipped by -m 'not slow'

# The seeded tiny model (speed); 64-token steps chunk every prompt below; 24 pages of 16 tokens
# hold the longest batched request at full length (172 + 200 tokens, 24 pages) but no two of
# them (the two shortest need 31 pages, their shared prefix cached once), so running six at
# once preempts. With 32 pages, one .ci/run of a fresh clone saw none (below).
SETTINGS = ("model.preset=tiny-llama", "speculative.max_draft=6",
            "scheduler.max_batch_tokens=64", "kv.num_pages=24", "model.max_model_len=384")
TINY_EOS = 2  # the tiny model's end of sequence (<|im_end|>)
CODE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "def mul(a, b):\n    return a * b\n\n\n")


@pytest.fixture(scope="module", params=["ngram", "suffix"])
def daemon(tmp_path_factory, request):
    d = start_daemon(tmp_path_factory.mktemp("spec"), *SETTINGS,
                     f"speculative.method={request.param}")
    yield d
    assert d.stop() == 0, d.log.read_text()


def complete(daemon, prompt: str, speculative: bool, max_tokens: int = 120,
             http: httpx.Client | None = None, **fields) -> list[int]:
    """Greedy token ids of `prompt`; over `http` (shared by threads) when given; `fields`:
    more of the request body."""
    if http is None:
        with httpx.Client(base_url=daemon.base_url, timeout=300) as own:
            return complete(daemon, prompt, speculative, max_tokens, own, **fields)
    r = http.post("/v1/completions", json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, "speculative": speculative, **fields})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def stats(daemon) -> dict:
    with daemon.uds_client() as http:
        return http.get("/stats").json()


def drafting_resumed(daemon) -> None:
    """Any batch-wide pause of drafting run out with plain decode steps. The pause begins when
    recent verify steps emitted fewer tokens a second than plain ones (policy.py's BatchGate);
    on a loaded 2-core box that comparison is noise, and a pause of up to 1,024 steps could
    hold back every draft of the short request a test then counts acceptances of (once, in a
    fresh clone's .ci/run)."""
    for _ in range(16):
        paused = stats(daemon)["speculative"]["paused_steps"]
        if paused == 0:
            return
        complete(daemon, CODE, speculative=False, max_tokens=min(paused + 1, 256))
    pytest.fail(f"drafting still paused: {stats(daemon)['speculative']}")


def drafted(daemon, **fields) -> tuple[list[int], int]:
    """CODE * 2 completed with drafts, and the draft tokens accepted in it. A pause can also
    begin inside a request this short (BatchGate's comparison is noise on a loaded 2-core
    box; once in a fresh clone's .ci/run, a 31-token request ended inside one with nothing
    accepted): a request that accepted nothing and ended inside a pause runs once more,
    after the pause is run out."""
    for _ in range(2):
        drafting_resumed(daemon)
        before = stats(daemon)["speculative"]["accepted_tokens"]
        tokens = complete(daemon, CODE * 2, speculative=True, **fields)
        after = stats(daemon)["speculative"]
        if after["accepted_tokens"] > before or after["paused_steps"] == 0:
            break
    return tokens, after["accepted_tokens"] - before


def test_greedy_output_is_the_same_with_and_without_drafts(daemon):
    drafting_resumed(daemon)
    before = stats(daemon)["speculative"]
    for prompt in (CODE, CODE * 2 + "def div(a, b):\n"):
        assert complete(daemon, prompt, speculative=True) == \
            complete(daemon, prompt, speculative=False)
    after = stats(daemon)["speculative"]
    assert after["verify_rows"] > before["verify_rows"]
    assert after["accepted_tokens"] > before["accepted_tokens"]
    assert after["mean_accepted_length"] > 1.0


def test_penalized_requests_get_drafts_and_keep_their_greedy_output(daemon):
    """A model's default repetition penalty (Qwen3-Coder: 1.05) no longer takes a request out
    of speculation: each verify row counts the drafts before it. A mild penalty: the tiny
    model's output under 1.05 no longer repeats, so no draft source finds anything."""
    penalties = {"repetition_penalty": 1.01}
    with_drafts, accepted = drafted(daemon, **penalties)
    assert with_drafts == complete(daemon, CODE * 2, speculative=False, **penalties)
    assert with_drafts != complete(daemon, CODE * 2, speculative=False)  # the penalties count
    assert accepted > 0


def test_bias_min_tokens_and_logprobs_keep_their_output_with_drafts(daemon):
    """logit_bias, min_tokens and log-probabilities no longer take a request out of
    speculation: each logits row of a chain is processed as a plain decode at its position."""
    plain = complete(daemon, CODE * 2, speculative=False)
    common = max(set(plain), key=plain.count)
    # the end of sequence (the tiny model's id 2) biased to win at once: min_tokens holds it
    # back for 30 tokens, so each verify row must mask it by its own position
    cases = [{"logit_bias": {str(common): -100}},
             {"logit_bias": {str(TINY_EOS): 100}, "min_tokens": 30, "ignore_eos": False}]
    for fields in cases:
        with_drafts, accepted = drafted(daemon, **fields)
        assert with_drafts == complete(daemon, CODE * 2, speculative=False, **fields), fields
        assert with_drafts != plain, fields   # the feature acts
        assert accepted > 0, fields
    assert common not in complete(daemon, CODE * 2, speculative=True, **cases[0])
    ended = complete(daemon, CODE * 2, speculative=True, **cases[1])
    assert ended[:30] == plain[:30] and ended[30:] == [TINY_EOS]

    def logprobs(speculative: bool) -> dict:
        with httpx.Client(base_url=daemon.base_url, timeout=300) as http:
            r = http.post("/v1/completions", json={
                "prompt": CODE * 2, "max_tokens": 120, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "speculative": speculative, "logprobs": 2})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    drafting_resumed(daemon)
    before = stats(daemon)["speculative"]["accepted_tokens"]
    with_drafts, without = logprobs(True), logprobs(False)
    assert stats(daemon)["speculative"]["accepted_tokens"] > before
    assert with_drafts["token_ids"] == without["token_ids"] == plain
    got, want = with_drafts["logprobs"], without["logprobs"]
    assert got["tokens"] == want["tokens"]
    assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-3)
    assert [sorted(t) for t in got["top_logprobs"]] == [sorted(t) for t in want["top_logprobs"]]


def test_batched_chunked_and_preempted_requests_keep_their_greedy_output(daemon):
    prompts = [CODE * (1 + i % 3) + f"# variant {i}\n" for i in range(6)]
    expected = [complete(daemon, p, speculative=False, max_tokens=200) for p in prompts]
    drafting_resumed(daemon)
    before = stats(daemon)
    # One client made beforehand, so the six requests leave together: a client a thread (an SSL
    # context each) staggered them, and on a loaded CI box the suffix drafts (these very
    # outputs, just generated) finished the first requests before the last arrived, with no
    # preemption (once, in a fresh clone's .ci/run; here again with 0.15 s between requests)
    with httpx.Client(base_url=daemon.base_url, timeout=300,
                      limits=httpx.Limits(max_connections=len(prompts))) as http:
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: complete(daemon, p, True, 200, http), prompts))
    assert got == expected
    # stats are the engine's latest snapshot (every 0.25 s): wait for the one after the last
    # commit, when no page may be left in use
    deadline = time.monotonic() + 10
    while (after := stats(daemon))["kv"]["pages_used"] > before["kv"]["pages_used"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.1)
    assert after["speculative"]["accepted_tokens"] > before["speculative"]["accepted_tokens"]
    assert after["totals"]["preemptions"] > before["totals"]["preemptions"]


def test_anthropic_messages_opt_out_gives_the_same_text(daemon):
    client = anthropic.Anthropic(base_url=daemon.base_url, api_key="unused", max_retries=0)
    with httpx.Client(base_url=daemon.base_url) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
    texts = []
    for speculative in (True, False):
        reply = client.messages.create(
            model=model, max_tokens=60,
            messages=[{"role": "user", "content": CODE + "Repeat the code above."}],
            extra_body={"speculative": speculative, "temperature": 0})
        texts.append((reply.content[0].text if reply.content else "", reply.usage.output_tokens))
    assert texts[0] == texts[1]
