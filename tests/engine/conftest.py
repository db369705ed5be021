"""An Engine (rank 0's loop) on a fake runner, with its outgoing messages captured; helpers
to run it to the end and read what it sent."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from appliance.config import load_config
from appliance.engine import protocol
from appliance.engine.channel import FrontendChannel
from appliance.engine.engine import Engine
from appliance.engine.plan_arrays import PlanChannel

REPO = Path(__file__).resolve().parents[2]


class FakeRunner:
    """A model runner whose logits are `logits_fn(last input id of each row)`."""

    device = torch.device("cpu")
    num_pages, page_size, max_model_len = 256, 4, 512

    def __init__(self, vocab_size: int, logits_fn: Callable[[torch.Tensor], torch.Tensor],
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.logits_fn = logits_fn

    def forward(self, batch) -> torch.Tensor:
        last = batch.input_ids[batch.logit_token_index].long()   # [N]: each row's last token,
        return self.logits_fn(last).float()                      # or every token of a verify row


@pytest.fixture(scope="session")
def tiny_tokenizer_path() -> str:
    """The tiny model's folder (its tokenizer: 1000 ids, eos <|im_end|> = 2)."""
    folder = REPO / ".cache" / "test" / "models" / "tiny-llama"
    if not (folder / "tokenizer_config.json").is_file():
        from appliance.model.tiny import ensure_tiny_checkpoint

        ensure_tiny_checkpoint(folder)
    return str(folder)


@pytest.fixture
def make_engine(tmp_path, monkeypatch) -> Iterator[Callable[..., Engine]]:
    """`make_engine(runner, tokenizer=None, overrides=())`: an Engine whose `sent` list holds
    every message it sent; `tokenizer` (a tokenizer folder) lets it take grammar constraints;
    `overrides`: config `--set` items."""
    monkeypatch.setattr(Engine, "_send", lambda self, message: self.sent.append(message))
    frontend = FrontendChannel(tmp_path)
    engines: list[Engine] = []

    def make(runner, tokenizer: str | None = None, overrides: tuple[str, ...] = ()) -> Engine:
        config = load_config(None, ["device=cpu", *overrides])
        eng = Engine(config, runner, PlanChannel(None), frontend.endpoints, tokenizer=tokenizer)
        eng.sent = []
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.compiler.close()
        eng._inbox.close(linger=0)
        eng._outbox.close(linger=0)
        eng._ctx.term()
    frontend.close()


def run_to_end(engine: Engine, max_steps: int = 2000) -> None:
    """Step until nothing runs, is in flight or waits for its grammar."""
    for _ in range(max_steps):
        engine._admit_compiled()
        if not engine.step():
            if not engine.compiling:
                return
            time.sleep(0.001)
    raise AssertionError("the engine did not go idle")


def outputs(engine: Engine, rid: int) -> list[protocol.TokenOutput]:
    return [o for m in engine.sent if isinstance(m, protocol.Outputs) for o in m.items if o.rid == rid]


def rejected(engine: Engine) -> dict[int, str]:
    return {m.rid: m.message for m in engine.sent if isinstance(m, protocol.Rejected)}
