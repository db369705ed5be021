"""Verify rows: a row's next token plus its drafts in one step returns logits at every one of
its tokens (ForwardBatch.logit_index), equal to HF transformers' logits at those positions,
next to plain decode and prefill rows in the same batch. Llama (GQA extend attention) and
DeepSeek-V2 (MLA, absorbed extend)."""
from __future__ import annotations

import pytest
import torch

from appliance.model import ForwardBatch, ModelRunner
from helpers import save_tiny_hf_model
from test_deepseek import CONFIGS, save_tiny_deepseek

PS = 4


def hf_logits(folder, ids: list[int]) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]                       # [len, V]


def batch_of(rows: list[tuple[list[int], int, list[int]]], num_decode: int,
             logit_index: list[int] | None) -> ForwardBatch:
    """rows: (new token ids, tokens already cached, pages); the decodes first."""
    ids, pos, qs, slots, prefix, seq, table = [], [], [0], [], [], [], []
    width = max(len(p) for _, _, p in rows)
    for new, cached, pages in rows:
        for j, t in enumerate(new):
            p = cached + j
            ids.append(t)
            pos.append(p)
            slots.append(pages[p // PS] * PS + p % PS)
        qs.append(len(ids))
        prefix.append(cached)
        seq.append(cached + len(new))
        table.append(pages + [0] * (width - len(pages)))
    i32 = dict(dtype=torch.int32)
    return ForwardBatch(
        input_ids=torch.tensor(ids, **i32), positions=torch.tensor(pos, **i32),
        query_start=torch.tensor(qs, **i32), prefix_lens=torch.tensor(prefix, **i32),
        seq_lens=torch.tensor(seq, **i32), page_table=torch.tensor(table, **i32),
        slot_mapping=torch.tensor(slots, **i32), num_decode=num_decode,
        logit_index=None if logit_index is None else torch.tensor(logit_index, **i32))


@pytest.fixture(scope="module", params=["llama", "deepseek-v2"])
def model_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        return save_tiny_hf_model(folder, "llama", seed=3)
    version, over = CONFIGS["v2-noqlora"]
    return save_tiny_deepseek(folder, version, seed=3, **over)


def test_verify_row_logits_equal_the_reference_at_every_token(model_folder):
    runner = ModelRunner(model_folder, kv_num_pages=64, page_size=PS)
    a = [5, 9, 33, 7, 100, 21, 3, 44, 12]          # verifies: next token 50, drafts 51 52 53
    b = [8, 8, 8, 17, 90]                            # plain decode of token 60
    c = list(range(10, 23))                          # a prefill chunk (first 6 tokens)
    pages = {"a": [0, 1, 2, 3], "b": [4, 5], "c": [6, 7, 8, 9]}
    # step 1: prefill a and b whole
    runner.forward(batch_of([(a, 0, pages["a"]), (b, 0, pages["b"])], 0, None))
    verify = [50, 51, 52, 53]
    rows = [([60], len(b), pages["b"]), (verify, len(a), pages["a"]), (c[:6], 0, pages["c"])]
    # logits: b's one token, all four of a's, c's last
    logits = runner.forward(batch_of(rows, num_decode=1, logit_index=[0, 1, 2, 3, 4, 10]))
    assert logits.shape == (6, runner.vocab_size)
    ref_a = hf_logits(model_folder, a + verify)[len(a):]                  # [4, V]
    ref_b = hf_logits(model_folder, b + [60])[-1]
    ref_c = hf_logits(model_folder, c[:6])[-1]
    torch.testing.assert_close(logits[1:5], ref_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[0], ref_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[5], ref_c, rtol=1e-4, atol=1e-4)


def test_a_model_that_ignores_logit_index_is_a_clear_error(model_folder, monkeypatch):
    runner = ModelRunner(model_folder, kv_num_pages=16, page_size=PS)
    monkeypatch.setattr(ForwardBatch, "logit_token_index",
                        property(lambda self: self.last_token_index))
    batch = batch_of([([1, 2, 3], 0, [0])], 0, logit_index=[0, 1, 2])
    with pytest.raises(ValueError, match="returned 1 logits rows for 3"):
        runner.forward(batch)


def test_a_mixed_step_lays_out_its_rows_once_for_every_layer(tmp_path, monkeypatch):
    """The CPU attention's per-step layouts (decode rows, extend rows) are computed by the
    first layer and reused by the others (kernels/step_memo.py): every layer is handed the
    same views of the batch (ForwardBatch.decode_* / extend_*)."""
    from kernels.cpu import paged_attention as cpu

    folder = save_tiny_hf_model(tmp_path, "llama", seed=3, num_hidden_layers=3)
    runner = ModelRunner(folder, kv_num_pages=16, page_size=PS)
    calls = {"_decode_layout": 0, "_extend_layout": 0}
    for name in calls:
        real = getattr(cpu, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(cpu, name, counted)
    runner.forward(batch_of([([5, 9, 33], 0, [0]), ([8, 8], 0, [1])], 0, None))
    calls.update(dict.fromkeys(calls, 0))
    runner.forward(batch_of([([60], 2, [1]), ([50, 51, 52], 3, [0, 2])], 1, [0, 1, 2, 3]))
    assert calls == {"_decode_layout": 1, "_extend_layout": 1}


def test_logit_tokens_gather_only_when_some_token_is_not_one():
    """One token a row and no logit_index (a decode step, as its CUDA graph is captured):
    every token is a logit token in order, so the tensor itself (no index launch); a prefill
    row, or verify rows, gather."""
    x = torch.arange(12.0).view(6, 2)
    decode = batch_of([([5], 3, [0]), ([6], 7, [1, 2])], 2, None)
    assert decode.at_logit_tokens(x[:2]).data_ptr() == x.data_ptr()
    mixed = batch_of([([5], 3, [0]), ([1, 2, 3], 0, [3])], 1, None)
    assert mixed.at_logit_tokens(x[:4]).tolist() == [[0.0, 1.0], [6.0, 7.0]]
    verify = batch_of([([5, 6], 3, [0, 1])], 0, [0, 1])
    assert verify.at_logit_tokens(x[:2]).tolist() == [[0.0, 1.0], [2.0, 3.0]]
