"""OpenAI's `logprobs` shapes, from the engine's per-token log-probabilities.

The values are the model's raw distribution (log-softmax of its logits before temperature,
penalties, bias or a grammar: appliance/engine/logprobs.py), as vLLM returns by default. A
token's text is its id decoded alone (a byte-level piece of a multi-byte character reads as
U+FFFD) and its `bytes` that text's UTF-8, as vLLM does.
"""

from __future__ import annotations

from typing import Any

from appliance.engine.protocol import TokenLogprobs


class TokenText:
    """Each id's text, decoded once per request."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id])
        return text


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class ChatLogprobs:
    """`choices[i].logprobs` of a chat completion: {"content": [{token, logprob, bytes,
    top_logprobs}]}, gathered per token and handed out with the text they produced."""

    def __init__(self, tokenizer: Any) -> None:
        self._text = TokenText(tokenizer)
        self._pending: list[dict[str, Any]] = []

    def add(self, token_id: int, lp: TokenLogprobs) -> None:
        entry = _token(self._text(token_id), lp.logprob)
        entry["top_logprobs"] = [_token(self._text(t), v) for t, v in zip(lp.top_ids, lp.top_logprobs)]
        self._pending.append(entry)

    def take(self) -> dict[str, Any] | None:
        """The entries since the last take (None when there are none)."""
        if not self._pending:
            return None
        content, self._pending = self._pending, []
        return {"content": content}


class CompletionLogprobs:
    """`choices[i].logprobs` of a legacy completion: parallel lists `tokens`, `token_logprobs`,
    `top_logprobs` ({token text: logprob}) and `text_offset` (where each token's text starts in
    the completion's text)."""

    def __init__(self, tokenizer: Any) -> None:
        self._text = TokenText(tokenizer)
        self._offset = 0
        self._pending = self.empty()

    @staticmethod
    def empty() -> dict[str, list[Any]]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token_id: int, lp: TokenLogprobs) -> None:
        text = self._text(token_id)
        self._pending["tokens"].append(text)
        self._pending["token_logprobs"].append(lp.logprob)
        self._pending["top_logprobs"].append({self._text(t): v for t, v in zip(lp.top_ids, lp.top_logprobs)})
        self._pending["text_offset"].append(self._offset)
        self._offset += len(text)

    def take(self) -> dict[str, list[Any]] | None:
        if not self._pending["tokens"]:
            return None
        taken, self._pending = self._pending, self.empty()
        return taken
