"""Helpers for kernel tests: random paged caches and naive attention in float64."""
from __future__ import annotations

import torch


def make_paged(seq_lens: list[int], page_size: int, extra_pages: int = 3,
               gen: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """A page table [B, P] that gives each row distinct pages in a random order; padding 0."""
    need = [(n + page_size - 1) // page_size for n in seq_lens]
    num_pages = sum(need) + extra_pages
    perm = torch.randperm(num_pages, generator=gen)
    width = max(max(need), 1) + 1
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n].to(torch.int32)
        at += n
    return table, num_pages


def slots_of(table_row: torch.Tensor, n: int, page_size: int) -> list[int]:
    return [int(table_row[i // page_size]) * page_size + i % page_size for i in range(n)]


def naive_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    q_pos: list[int], scale: float) -> torch.Tensor:
    """q: [M, Hq, D], keys: [N, Hk, D], values: [N, Hk, Dv]; query m sees keys 0..q_pos[m].
    Dense masked softmax in float64, head by head -> [M, Hq, Dv]."""
    m_, hq, _ = q.shape
    g = hq // keys.shape[1]
    out = torch.zeros(m_, hq, values.shape[-1], dtype=torch.float64)
    for h in range(hq):
        k = keys[:, h // g].double()                       # [N, D]
        v = values[:, h // g].double()                     # [N, Dv]
        s = q[:, h].double() @ k.T * scale                 # [M, N]
        mask = torch.arange(k.shape[0])[None, :] > torch.tensor(q_pos)[:, None]
        s = s.masked_fill(mask, float("-inf"))
        p = torch.exp(s - s.max(dim=1, keepdim=True).values)
        out[:, h] = (p / p.sum(dim=1, keepdim=True)) @ v
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
