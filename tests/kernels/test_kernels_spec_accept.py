"""spec_accept: the torch reference against its definition, the Triton kernel against the
reference (through the interpreter without a GPU)."""
import os

import pytest
import torch

from kernels import reference as R

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def definition(tokens, drafts, start):
    out = []
    for b in range(len(start) - 1):
        n = 0
        while tokens[start[b] + n] == drafts[start[b] + n]:
            n += 1
        out.append(n + 1)
    return out


def random_case(rows, max_draft, seed):
    g = torch.Generator().manual_seed(seed)
    per_row = torch.randint(0, max_draft + 1, (rows,), generator=g) + 1
    start = torch.cat([torch.zeros(1, dtype=torch.long), per_row.cumsum(0)])
    n = int(start[-1])
    tokens = torch.randint(0, 3, (n,), generator=g, dtype=torch.int32)  # small ids: matches
    drafts = torch.where(torch.rand(n, generator=g) < 0.7, tokens,
                         torch.randint(0, 3, (n,), generator=g, dtype=torch.int32))
    drafts[start[1:] - 1] = -1  # a row's last position checks nothing
    return tokens, drafts, start.int()


@pytest.mark.parametrize("rows, max_draft, seed", [(1, 0, 0), (5, 3, 1), (64, 8, 2),
                                                   (7, 20, 3)])
def test_reference_matches_the_definition(rows, max_draft, seed):
    tokens, drafts, start = random_case(rows, max_draft, seed)
    got = R.spec_accept(tokens, drafts, start)
    assert got.dtype == torch.int32
    assert got.tolist() == definition(tokens.tolist(), drafts.tolist(), start.tolist())


@pytest.mark.skipif(DEV == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="no GPU and TRITON_INTERPRET unset")
@pytest.mark.parametrize("rows, max_draft, seed", [(1, 0, 0), (5, 3, 1), (33, 8, 2),
                                                   (3, 40, 4)])
def test_triton_matches_the_reference(rows, max_draft, seed):
    pytest.importorskip("triton")
    from kernels.triton import spec_accept as T
    tokens, drafts, start = (x.to(DEV) for x in random_case(rows, max_draft, seed))
    assert torch.equal(T.spec_accept(tokens, drafts, start).cpu(),
                       R.spec_accept(tokens, drafts, start).cpu())
