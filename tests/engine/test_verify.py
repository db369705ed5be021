"""The verifier keeps the target's distribution: chi-square tests over many seeds on a small
vocabulary (temperature, top-k, top-p applied to the target first), greedy acceptance, and the
logits layout of verify rows; penalties count the drafts before each verify row."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from appliance.engine.logits_processors import LogitsProcessors
from appliance.engine.plan_arrays import PlanArrays
from appliance.engine.protocol import GenerateRequest
from appliance.engine.sampler import Sampler
from appliance.engine.verify import LogitLayout, Verifier

CPU = torch.device("cpu")


def verify_arrays(first_tokens: list[int], drafts: list[list[int]], prefix: int = 10) -> PlanArrays:
    """A step of verify rows only: row b runs first_tokens[b] then drafts[b], after `prefix`
    cached tokens."""
    ids, pos, qs = [], [], [0]
    for t, d in zip(first_tokens, drafts):
        ids += [t, *d]
        pos += list(range(prefix, prefix + 1 + len(d)))
        qs.append(len(ids))
    b = len(first_tokens)
    n = np.array([len(d) for d in drafts], np.int32)
    return PlanArrays(step=0, num_decode=0, input_ids=np.array(ids, np.int32),
                      positions=np.array(pos, np.int32), query_start=np.array(qs, np.int32),
                      prefix_lens=np.full(b, prefix, np.int32),
                      seq_lens=np.full(b, prefix, np.int32) + 1 + n,
                      slot_mapping=np.zeros(len(ids), np.int32), sample=np.ones(b, np.int32),
                      num_draft=n, page_table=np.zeros((b, 1), np.int32))


def test_logit_layout_of_a_mixed_step():
    # row 0: plain decode; row 1: verify with 2 drafts; row 2: a prefill chunk of 3 tokens
    arrays = PlanArrays(step=0, num_decode=1, input_ids=np.array([4, 5, 6, 7, 1, 2, 3], np.int32),
                        positions=np.array([9, 20, 21, 22, 0, 1, 2], np.int32),
                        query_start=np.array([0, 1, 4, 7], np.int32),
                        prefix_lens=np.array([9, 20, 0], np.int32),
                        seq_lens=np.array([10, 23, 3], np.int32),
                        slot_mapping=np.zeros(7, np.int32), sample=np.ones(3, np.int32),
                        num_draft=np.array([0, 2, 0], np.int32),
                        page_table=np.zeros((3, 2), np.int32))
    lay = LogitLayout.of(arrays)
    assert lay.index.tolist() == [0, 1, 2, 3, 6]
    assert lay.start.tolist() == [0, 1, 4, 5]
    assert lay.row.tolist() == [0, 1, 1, 1, 2]
    assert lay.drafts.tolist() == [-1, 6, 7, -1, -1]
    assert lay.positions.tolist() == [10, 21, 22, 23, 3]   # == seq_lens for each row's last


def sampler_for(n_seeds: int, **sampling) -> tuple[Sampler, dict[int, GenerateRequest]]:
    sampler, params = Sampler(CPU, V), {}
    for rid in range(n_seeds):
        req = GenerateRequest(rid=rid, prompt_ids=[1], max_new_tokens=8, seed=rid, **sampling)
        sampler.add(req, [])
        params[rid] = req
    return sampler, params


def run_verify(logits_per_position: torch.Tensor, drafts: list[int], n_seeds: int,
               temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Verify rows (one per seed) whose logits rows are `logits_per_position` [1+k, V] ->
    (tokens [n, 1+k], counts [n], each row's first token [n]) as numpy."""
    k = len(drafts)
    sampler, params = sampler_for(n_seeds, temperature=temperature, top_k=top_k, top_p=top_p)
    arrays = verify_arrays([1] * n_seeds, [drafts] * n_seeds)
    layout = LogitLayout.of(arrays)
    logits = logits_per_position.repeat(n_seeds, 1)                          # [n (1+k), V]
    rows = sampler.prepare(np.arange(n_seeds), layout.per_logit_row(arrays), params,
                           layout=layout)
    tokens = sampler.sample(logits, rows).tokens                              # [n (1+k)]
    counts, first = Verifier(CPU).accept(tokens, layout)
    return tokens.view(n_seeds, k + 1).numpy(), counts.numpy(), first.numpy()


def target(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """The filtered target distribution the sample op defines (kernels/reference/sample.py)."""
    l = logits / temperature
    if top_k:
        l = l.masked_fill(l < l.topk(top_k).values[-1], float("-inf"))
    p = torch.softmax(l, -1)
    if top_p < 1.0:
        ps, order = p.sort(descending=True)
        keep = (ps.cumsum(0) - ps) < top_p
        p = torch.zeros_like(p).scatter(0, order, ps * keep)
        p = p / p.sum()
    return p.double().numpy()


def chi_square_p(observed: np.ndarray, expected_p: np.ndarray) -> float:
    """p-value of Pearson's chi-square test of counts against probabilities (cells with
    expected probability 0 must stay empty)."""
    n = observed.sum()
    live = expected_p > 0
    assert observed[~live].sum() == 0, "a token outside the target's support was emitted"
    exp = n * expected_p[live]
    stat = float(((observed[live] - exp) ** 2 / exp).sum())
    df = int(live.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


V = 6
LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5],      # position of the first draft
                       [0.0, 2.5, 1.0, 1.0, 0.2, -0.5],      # second draft
                       [1.0, 1.0, 1.0, 0.0, 0.0, 3.0]])      # bonus


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0),
                                                        (1.3, 0, 0.8)])
def test_verified_tokens_follow_the_target_distribution(temperature, top_k, top_p):
    drafts = [5, 1]  # deterministic drafts, one likely and then another
    n = 6000
    toks, counts, _ = run_verify(LOGITS, drafts, n, temperature, top_k, top_p)
    p = [target(LOGITS[j], temperature, top_k, top_p) for j in range(3)]
    # the first emitted token is distributed as p0 (accept the draft with p0(d), else the
    # residual), whatever the draft was
    first = np.bincount(toks[:, 0], minlength=V)
    assert chi_square_p(first, p[0]) > 1e-3
    accept = p[0][drafts[0]]
    assert abs((counts > 1).mean() - accept) < 4 * np.sqrt(accept * (1 - accept) / n)
    # given the first draft was accepted, the second token is distributed as p1
    second = np.bincount(toks[counts > 1, 1], minlength=V)
    assert chi_square_p(second, p[1]) > 1e-3
    # both accepted: the bonus token is distributed as p2
    bonus = np.bincount(toks[counts == 3, 2], minlength=V)
    assert chi_square_p(bonus, p[2]) > 1e-3
    # the test can fail: the same counts against another distribution are rejected
    assert chi_square_p(first, np.full(V, 1.0 / V)) < 1e-6


def test_a_rejected_draft_is_never_the_emitted_token():
    toks, counts, _ = run_verify(LOGITS, [0, 1], 3000, 1.0)
    rejected_first = counts == 1
    assert rejected_first.any() and (toks[rejected_first, 0] != 0).all()
    rejected_second = counts == 2
    assert rejected_second.any() and (toks[rejected_second, 1] != 1).all()


def test_greedy_accepts_the_longest_prefix_equal_to_the_argmax():
    # argmax per position: 0, 1, 5
    for drafts, want in [([0, 1], [0, 1, 5]), ([0, 2], [0, 1]), ([3, 1], [0])]:
        toks, counts, first = run_verify(LOGITS, drafts, 3, 0.0)
        assert (counts == len(want)).all()
        assert all(toks[i, :counts[i]].tolist() == want for i in range(3))
        assert (first == 0).all()


def test_verify_matches_plain_sampling_at_each_position():
    # a verify row's tokens are what a plain decode samples at the same (seed, position)
    n = 64
    toks, counts, _ = run_verify(LOGITS, [5, 1], n, 1.0)
    sampler, params = sampler_for(n, temperature=1.0)
    for j in range(3):
        # plain decode rows whose KV length after the step is the verify row's position j + 1
        arrays = verify_arrays([1] * n, [[]] * n, prefix=10 + j)
        plain = sampler.sample(LOGITS[j].repeat(n, 1),
                               sampler.prepare(np.arange(n), arrays, params)).tokens
        live = counts > j
        assert (toks[live, j] == plain.numpy()[live]).all()


PENALIZED = GenerateRequest(rid=0, prompt_ids=[1, 2], max_new_tokens=8, repetition_penalty=1.5,
                            presence_penalty=0.5, frequency_penalty=0.25)


def _penalized_after(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
    """`logits` [V] processed as a plain decode of PENALIZED after it generated `generated`."""
    plain = LogitsProcessors(CPU, logits.shape[0])
    plain.add(PENALIZED, [])
    one_row = verify_arrays([0], [[]])
    for token in generated:
        counting = plain.apply(torch.zeros(1, logits.shape[0]), plain.plan(np.zeros(1, np.int64), one_row))
        plain.count(torch.tensor([token], dtype=torch.int32), counting)
    out = logits.clone().unsqueeze(0)
    plain.apply(out, plain.plan(np.zeros(1, np.int64), one_row))
    return out[0]


def test_penalties_count_the_drafts_before_each_verify_row():
    """Logits row j of a penalized chain is penalized as a plain decode after drafts 0 .. j-1
    (repeated drafts counted as often as they occur); the statistics then count only the
    tokens the step emits."""
    drafts, vocab = [3, 3, 1, 5], 12
    arrays = verify_arrays([4], [drafts])
    layout = LogitLayout.of(arrays)
    logits = torch.randn(len(drafts) + 1, vocab, generator=torch.Generator().manual_seed(3)) * 3
    verify = LogitsProcessors(CPU, vocab)
    verify.add(PENALIZED, [])
    rids = np.zeros(len(drafts) + 1, np.int64)
    step = verify.plan(rids, layout.per_logit_row(arrays), layout=layout)
    got = logits.clone()
    counting = verify.apply(got, step)
    for j in range(len(drafts) + 1):
        torch.testing.assert_close(got[j], _penalized_after(drafts[:j], logits[j]), rtol=0, atol=0)
    # the step emits 3, 3 and then 7 where the third draft missed; 9 and 8 are not emitted
    sampled = torch.tensor([3, 3, 7, 9, 8], dtype=torch.int32)
    verify.count(sampled, counting, torch.tensor([3], dtype=torch.int32))
    zeros = torch.zeros(1, vocab)
    verify.apply(zeros, verify.plan(np.zeros(1, np.int64), verify_arrays([0], [[]])))
    torch.testing.assert_close(zeros[0], _penalized_after([3, 3, 7], torch.zeros(vocab)), rtol=0, atol=0)
    assert zeros[0, 3] == -1.0 and zeros[0, 7] == -0.75 and zeros[0, 9] == 0.0
