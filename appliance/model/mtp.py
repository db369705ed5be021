"""Multi-token-prediction (MTP, "next-token") layers: DeepSeek-V3's and GLM-4.5's.

A checkpoint with `num_nextn_predict_layers` > 0 stores each such layer after the decoder as
`model.layers.{num_hidden_layers + i}.*`: a full decoder layer (the model's own attention and
MoE) plus `enorm`, `hnorm`, `eh_proj` [H, 2H] and `shared_head.norm`; the embedding and the LM
head are the main model's (the copies some checkpoints store there, `embed_tokens` and
`shared_head.head`, are not loaded). For the target's hidden state h_t at position t and the
token x_{t+1} that follows it, the layer predicts x_{t+2}:

    z_t = shared_head.norm(decoder(eh_proj(cat(enorm(embed(x_{t+1})), hnorm(h_t))), pos t))
    logits = lm_head(z_t)

What the serving engines that reach DeepSeek's published acceptance do (vLLM's and SGLang's
MTP, checked against DeepSeek's shipped modeling code): the embedding comes first in the
concatenation; h_t is the target's hidden state *after* its final norm; the decoder layer runs
at the target's position t and writes its own KV cache at t's slot (so it reuses the target's
page table and slots, one step behind); a chain of several drafts reuses the layer, feeding
its normed output z (the hidden state it predicts from) and the draft it just made.

The layers run outside the main model's placement chain, so they declare a chain of their own
(`next_token_chain`: embedding -> enorm -> decoder layer -> shared_head.norm) from which the
placement compiler installs their collectives; hnorm reads the replicated target state and
eh_proj is replicated, so neither needs one.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from appliance.model.batch import ForwardBatch
from appliance.model.context import BuildContext
from appliance.model.layers.linear import ReplicatedLinear
from appliance.model.layers.norm import RMSNorm
from appliance.model.placement import Placed


def mtp_layer_count(hf: dict, checkpoint_tensors: frozenset[str] | None) -> int:
    """The MTP layers to build: the config's, unless the checkpoint (its tensor names; None:
    dummy weights) holds none of them (a checkpoint saved by transformers drops them)."""
    n = int(hf.get("num_nextn_predict_layers") or 0)
    first = f"model.layers.{int(hf['num_hidden_layers'])}.eh_proj.weight"
    if n and checkpoint_tensors is not None and first not in checkpoint_tensors:
        return 0
    return n


def add_next_token_parts(layer: nn.Module, hidden: int, eps: float, ctx: BuildContext) -> None:
    """Give a decoder layer the MTP parts, under the checkpoint's names."""
    layer.enorm = RMSNorm(hidden, eps, ctx.device, ctx.dtype)
    layer.hnorm = RMSNorm(hidden, eps, ctx.device, ctx.dtype)
    layer.eh_proj = ReplicatedLinear(2 * hidden, hidden, bias=False)
    layer.shared_head = nn.Module()
    layer.shared_head.norm = RMSNorm(hidden, eps, ctx.device, ctx.dtype)


class NextTokenLayers:
    """Mixin for a causal LM (the Llama skeleton: `model.embed_tokens`, `model.norm`,
    `lm_head`) with MTP layers in `mtp_layers`."""

    mtp_layers: nn.ModuleList

    def norm_consumers(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """None: the final norm's output is the MTP layers' input too (`forward_hidden`), so
        its scale stays in the norm, not in the head's weight (layers/norm.py)."""
        return iter(())

    def build_next_token_layers(self, hf: dict, layers: list[nn.Module], ctx: BuildContext
                                ) -> None:
        """`layers`: decoder layers (one per MTP layer) that `add_next_token_parts` completes."""
        eps = float(hf.get("rms_norm_eps", 1e-6))
        for layer in layers:
            add_next_token_parts(layer, int(hf["hidden_size"]), eps, ctx)
        self.mtp_layers = nn.ModuleList(layers)
        first = int(hf["num_hidden_layers"])
        # the checkpoint's names of their tensors (compiler.plan_weights)
        self.checkpoint_prefixes = {f"mtp_layers.{i}.": f"model.layers.{first + i}."
                                    for i in range(len(layers))}

    def side_chains(self) -> Iterator[list[tuple[str, Placed]]]:
        """Each MTP layer's hidden-state chain, for the placement compiler."""
        for i, layer in enumerate(self.mtp_layers):
            yield list(next_token_chain(f"mtp_layers.{i}", layer, self.model.embed_tokens))

    def forward_hidden(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, V_local or V] as `forward`, hidden [T, H]: every token's state after
        the final norm, what the MTP layers read)."""
        hidden_states, residual = self.model(batch.input_ids, batch.positions, batch)
        hidden, _ = self.model.norm(hidden_states, residual)                  # [T, H]
        return self.lm_head(batch.at_logit_tokens(hidden)), hidden

    def forward_next_token(self, layer_idx: int, input_ids: torch.Tensor, hidden: torch.Tensor,
                           batch: ForwardBatch, rows: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP layer `layer_idx` over the batch (input_ids [T]: the token after each position;
        hidden [T, H]: the state at each position) -> (logits [R, V] and the normed state
        z [R, H] of the tokens `rows` [R] name). Writes the layer's KV cache at the batch's
        slots."""
        layer = self.mtp_layers[layer_idx]
        embedded, _ = layer.enorm(self.model.embed_tokens(input_ids))          # [T, H]
        prior, _ = layer.hnorm(hidden)                                           # [T, H]
        x = layer.eh_proj(torch.cat([embedded, prior], dim=-1))                 # [T, H]
        x, residual = layer(batch.positions, x, None, batch)
        z, _ = layer.shared_head.norm(x[rows], residual[rows])                  # [R, H]
        return self.lm_head(z), z


def next_token_chain(prefix: str, layer: nn.Module, embed_tokens: Placed
                     ) -> Iterator[tuple[str, Placed]]:
    """embedding -> enorm -> the decoder layer's chain -> shared_head.norm (module doc)."""
    yield "model.embed_tokens", embed_tokens
    yield f"{prefix}.enorm", layer.enorm
    yield from layer.placement_chain(prefix)
    yield f"{prefix}.shared_head.norm", layer.shared_head.norm
