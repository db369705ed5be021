"""Multi-token-prediction layers (appliance/model/mtp.py), DeepSeek-V3 and GLM-4.5, on tiny
checkpoints that carry one (mtp_checkpoints.py): loaded from `model.layers.{L}.*`, and their
forward == the formula computed in plain torch around transformers' own decoder layer (the
same tensors, read from the HF folder): over a prompt in one chunk and in two (the second
chunk attends to the MTP cache the first wrote), and one chained draft step after it."""
from __future__ import annotations

import pytest
import torch

from appliance.model import ForwardBatch, ModelRunner
from mtp_checkpoints import FAMILIES, save_with_mtp

PROMPT = [5, 9, 33, 7, 100, 21, 3, 8, 8, 151, 2, 77]
NEXT = 64  # the token that follows the prompt (any: the MTP layer is told it)
PAGE = 4


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Reference:
    """The formula on transformers' model of L + 1 layers: layers [0, L) and the final norm
    are the target, layer L is the MTP layer's block."""

    def __init__(self, full, mtp_tensors: dict[str, torch.Tensor], layers: int, eps: float):
        self.hf, self.t, self.layers, self.eps = full, mtp_tensors, layers, eps

    def _run(self, layer, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        pos = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        out = layer(x, attention_mask=mask, position_ids=pos,
                    position_embeddings=self.hf.model.rotary_emb(x, pos))
        return out[0] if isinstance(out, tuple) else out

    def target_hidden(self, ids: list[int]) -> torch.Tensor:
        x = self.hf.model.embed_tokens(torch.tensor([ids]))
        for layer in self.hf.model.layers[:self.layers]:
            x = self._run(layer, x)
        return self.hf.model.norm(x)[0]                                        # [T, H]

    def mtp(self, next_ids: list[int], hidden: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [T, V], z [T, H]) of the MTP layer over positions 0..T-1."""
        p = f"model.layers.{self.layers}."
        emb = _rms(self.hf.model.embed_tokens(torch.tensor(next_ids)), self.t[p + "enorm.weight"],
                   self.eps)
        prior = _rms(hidden, self.t[p + "hnorm.weight"], self.eps)
        u = torch.cat([emb, prior], -1) @ self.t[p + "eh_proj.weight"].T
        y = self._run(self.hf.model.layers[self.layers], u[None])[0]
        z = _rms(y, self.t[p + "shared_head.norm.weight"], self.eps)
        return self.hf.lm_head(z), z


def _batch(ids: list[int], start: int, pages: list[int], decode: bool = False) -> ForwardBatch:
    n = len(ids)
    pos = list(range(start, start + n))
    i32 = dict(dtype=torch.int32)
    return ForwardBatch(
        input_ids=torch.tensor(ids, **i32), positions=torch.tensor(pos, **i32),
        query_start=torch.tensor([0, n], **i32), prefix_lens=torch.tensor([start], **i32),
        seq_lens=torch.tensor([start + n], **i32), page_table=torch.tensor([pages], **i32),
        slot_mapping=torch.tensor([pages[p // PAGE] * PAGE + p % PAGE for p in pos], **i32),
        num_decode=1 if decode else 0)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def built(request, tmp_path_factory):
    import transformers
    from safetensors.torch import load_file

    mtp, full = save_with_mtp(tmp_path_factory.mktemp(request.param), request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(full, torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    cfg = FAMILIES[request.param][1]
    ref = Reference(hf, load_file(mtp / "model.safetensors"), cfg["num_hidden_layers"],
                    cfg["rms_norm_eps"])
    return mtp, ref


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[12], [7, 5]], ids=["one-chunk", "two-chunks"])
def test_mtp_forward_is_the_formula(built, chunks):
    folder, ref = built
    runner = ModelRunner(str(folder), kv_num_pages=16, page_size=PAGE)
    assert runner.num_mtp_layers == 1
    pages = [3, 7, 1, 12]   # any pages: the MTP layer uses the target's page table and slots
    following = PROMPT[1:] + [NEXT]
    want_h = ref.target_hidden(PROMPT)
    want_logits, want_z = ref.mtp(following, want_h)
    start = 0
    for n in chunks:
        batch = _batch(PROMPT[start:start + n], start, pages)
        _, hidden = runner.forward_hidden(batch)
        torch.testing.assert_close(hidden, want_h[start:start + n], atol=1e-4, rtol=1e-4)
        logits, z = runner.forward_next_token(0, torch.tensor(following[start:start + n]),
                                              hidden, batch, torch.arange(n))
        torch.testing.assert_close(logits, want_logits[start:start + n], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(z, want_z[start:start + n], atol=1e-4, rtol=1e-4)
        start += n
    # a chained draft: the layer again at the next position, on its own state and its draft
    draft = int(want_logits[-1].argmax())
    step = _batch([draft], len(PROMPT), pages, decode=True)
    logits, _ = runner.forward_next_token(0, step.input_ids, z[-1:], step, torch.arange(1))
    chained, _ = ref.mtp(following + [draft], torch.cat([want_h, want_z[-1:]]))
    torch.testing.assert_close(logits[0], chained[-1], atol=1e-3, rtol=1e-3)
