"""`serve()` with the fake engine, as a process:
python -m tests.server.fake_daemon PORT SOCKET GRACE_S [CHECK_S] (the socket file's and the
descriptors' watch).

Prints the aborted request ids as JSON on exit, so tests can see what the drain did.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tokenizers import Tokenizer

from appliance.config import AppConfig, ModelConfig, ServerConfig
from appliance.server import serve as serve_module
from appliance.server import fd_limit, socket_file

from .fake_engine import FakeEngineClient


class RawTokenizer:
    """The tiny tokenizer through `tokenizers` alone: encode/decode without importing transformers
    (and torch), so this process starts fast. Enough for /v1/completions."""

    def __init__(self, path: Path) -> None:
        self._tok = Tokenizer.from_file(str(path))
        self.eos_token_id = self._tok.token_to_id("<|im_end|>")

    def __len__(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **_: object) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def main() -> int:
    port, socket_path, grace = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    logging.basicConfig(level=logging.INFO)
    tokenizer = RawTokenizer(Path(__file__).resolve().parents[2] / ".cache" / "test" / "models" /
                             "tiny-llama" / "tokenizer.json")
    config = AppConfig(model=ModelConfig(preset="tiny-llama"),
                       server=ServerConfig(host="127.0.0.1", port=port, socket=socket_path))
    fake = FakeEngineClient(tokenizer, reply="tok " * 400, delay_s=0.05)
    serve_module.GRACE_S = grace
    if len(sys.argv) > 4:
        socket_file.CHECK_S = fd_limit.CHECK_S = float(sys.argv[4])
    code = serve_module.serve(config, fake, tokenizer)
    print("ABORTED " + json.dumps(sorted(fake.aborted)), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
