"""The suffix tree through its binding (`_core.SuffixTree`), against brute force over the raw
sequences: a draft continues the longest suffix of the context that occurred before, with a most
frequent next token, and is a continuation that occurred; dropping old sequences keeps the
tokens held, the node count and the memory bounded."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_core = pytest.importorskip("appliance._core")


def followers(seqs, needle, depth):
    """Next token -> occurrences of `needle` followed by it (within the indexed depth)."""
    out = {}
    n = len(needle)
    if n + 1 > depth:
        return out
    for s in seqs:
        for i in range(len(s) - n):
            if s[i:i + n] == needle:
                out[s[i + n]] = out.get(s[i + n], 0) + 1
    return out


def occurs(seqs, needle):
    n = len(needle)
    return any(s[i:i + n] == needle for s in seqs for i in range(len(s) - n + 1))


def check_draft(seqs, context, d, depth, k):
    longest = min(len(context), max(1, depth - k))
    expect = max((p for p in range(1, longest + 1) if followers(seqs, context[-p:], depth)),
                 default=0)
    assert d.match_len == expect
    if expect == 0:
        assert d.tokens == []
        return
    assert 1 <= len(d.tokens) <= k
    assert occurs(seqs, context[-expect:] + d.tokens)
    f = followers(seqs, context[-expect:], depth)
    assert f[d.tokens[0]] == max(f.values())
    assert all(a >= b for a, b in zip(d.probs, d.probs[1:]))
    assert d.score == pytest.approx(sum(d.probs), rel=1e-5)


tokens = st.lists(st.integers(0, 3), max_size=25)
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), tokens),
    st.tuples(st.just("extend"), st.lists(st.integers(0, 3), max_size=6)),
    st.tuples(st.just("propose"), st.lists(st.integers(0, 3), max_size=10), st.integers(1, 6),
              st.booleans()),
), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(depth=st.integers(2, 10), cap=st.sampled_from([0, 30, 60]), ops=ops)
def test_drafts_against_brute_force(depth, cap, ops):
    tree = _core.SuffixTree(depth, cap)
    live: list[list[int]] = []
    for op in ops:
        if op[0] == "add" or (op[0] == "extend" and not live):
            new = op[1]
            while cap and live and sum(map(len, live)) + len(new) > cap:
                live.pop(0)
            tree.add(np.asarray(new, dtype=np.int32))
            live.append(list(new))
        elif op[0] == "extend":
            while cap and len(live) > 1 and sum(map(len, live)) + len(op[1]) > cap:
                live.pop(0)
            tree.extend(op[1])  # a plain list works too
            live[-1] += op[1]
        else:
            _, context, k, own_tail = op
            if own_tail and live and live[-1]:
                context = live[-1][-10:]  # the open sequence's own tail, as drafting does
            check_draft(live, context, tree.propose(context, k, 0.0, 100.0), depth, k)
        tree.check_invariants()
        assert tree.num_tokens == sum(map(len, live))
        assert tree.num_sequences == len(live)
        assert tree.num_nodes <= 2 * tree.num_tokens + 1


def test_adaptive_length_and_probability_floor():
    tree = _core.SuffixTree(16)
    tree.add([1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 7, 0, 1, 2])
    # "1 2" continues as "3 4" twice, then 5 or 7 once each: the latest, 7, up to the end.
    d = tree.propose([9, 1, 2], 8, 0.0, 100.0)
    assert d.match_len == 2 and d.tokens == [3, 4, 7, 0, 1, 2]
    assert d.probs == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    assert tree.propose([9, 1, 2], 8, 0.6, 100.0).tokens == [3, 4]  # stops below 0.6
    assert tree.propose([9, 1, 2], 8, 0.0, 1.5).tokens == [3, 4, 7]  # ceil(1.5 * 2) tokens
    assert tree.propose([9, 1, 2], 0, 0.0, 1.0).tokens == []


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="max_depth"):
        _core.SuffixTree(1)
    with pytest.raises(ValueError, match="max_tokens"):
        _core.SuffixTree(8, -1)
    tree = _core.SuffixTree(8)
    with pytest.raises(RuntimeError, match="open sequence"):
        tree.extend([1])
    tree.add([1, 2, 1])
    with pytest.raises(ValueError, match="min_prob"):
        tree.propose([1], 4, 1.5, 1.0)
    with pytest.raises(ValueError, match="tokens_per_match"):
        tree.propose([1], 4, 0.1, 0.0)
    with pytest.raises(ValueError, match="max_draft"):
        tree.propose([1], -1, 0.1, 1.0)
    with pytest.raises(ValueError, match="1-D"):
        tree.propose(np.zeros((2, 2), dtype=np.int32), 4, 0.1, 1.0)


def test_memory_stays_bounded():
    rng = np.random.default_rng(0)
    tree = _core.SuffixTree(32, 20_000)
    sizes = []
    for i in range(300):
        tree.add(rng.integers(0, 5000, size=int(rng.integers(50, 300)), dtype=np.int32))
        assert tree.num_tokens <= 20_000
        assert tree.num_nodes <= 2 * tree.num_tokens + 1
        sizes.append(tree.memory_bytes)
    assert max(sizes[150:]) <= 1.5 * max(sizes[:150])
    tree.check_invariants()
