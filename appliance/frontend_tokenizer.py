"""The frontend's tokenizer (chat templates, prompts' ids, streamed text): transformers'
AutoTokenizer, loaded without letting transformers import torch.

The frontend only tokenizes, but with torch installed `from transformers import AutoTokenizer`
imports it (transformers' configuration module reads torch for its rope helpers), and with it
sympy and torchvision: on the GPU boxes 11-14 s of a core (`scripts/gpu_startup SAMPLE=1`),
the last thing a warm start waited for (H100 boxes: the engine ready 4.4-5.1 s before the
frontend). Here transformers' availability checks (importlib.util.find_spec) find no
torch while the tokenizer loads, so it loads as a torch-less install would: the same classes,
files and templates; only `return_tensors="pt"`, which the server never asks, is gone. Loaded
before anything in the frontend imports torch (the frontend imports none: tests/model/
test_model_files.py); in a process that already has torch (the tests), it loads as it is.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from appliance.config import ConfigError

log = logging.getLogger(__name__)

# What transformers would import beside the tokenizer: torch and the packages that need it.
HIDDEN_FROM_TRANSFORMERS = ("torch", "torchvision", "torchaudio")
# transformers says so once at import, a warning a torch-less install needs; not this one
_NO_TORCH_ADVICE = "PyTorch was not found"


def load_tokenizer(folder: str, hidden: tuple[str, ...] = HIDDEN_FROM_TRANSFORMERS):
    """The folder's tokenizer as AutoTokenizer loads it, the `hidden` modules kept out (those
    not imported yet); one that needs them after all loads again with them. ConfigError with
    transformers' reason when it cannot be loaded."""
    try:
        with hidden_modules(hidden), _quiet_no_torch_advice():
            tokenizer = _auto_tokenizer(folder)
    except Exception as without:  # transformers raises many kinds
        try:
            tokenizer = _auto_tokenizer(folder)
        except Exception as e:  # the message is what matters
            raise ConfigError(f"cannot load the tokenizer from {folder}: {e}") from None
        log.warning("the tokenizer in %s loads only with %s importable (%s): the daemon takes "
                    "seconds longer to start", folder, " / ".join(hidden), without)
    # The frontend checks a prompt against the context window itself (a 400): without this,
    # transformers warns in the daemon's log that "running this sequence through the model"
    # would fail, for a prompt that never runs.
    tokenizer.model_max_length = sys.maxsize
    return tokenizer


def _auto_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@contextmanager
def hidden_modules(names: tuple[str, ...]) -> Iterator[None]:
    """While inside, each of `names` not imported yet cannot be: `import NAME` raises
    ImportError and importlib.util.find_spec(NAME) is None (a None entry in sys.modules)."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


@contextmanager
def _quiet_no_torch_advice() -> Iterator[None]:
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NO_TORCH_ADVICE)

    logger = logging.getLogger("transformers")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
