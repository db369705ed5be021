"""Images, files and audio in a request to a text-only model: each becomes a short text
placeholder instead of a 400.

Why: agents resend a conversation's whole history every turn. An image the user pasted, or a
screenshot or PDF a tool returned (Claude Code's Read, Codex's view_image), refused once would be
refused on every later turn, ending the session. With a placeholder the model is told something
was there that it cannot see, and the conversation goes on. The first placeholder of each kind is
logged once per process, so an operator can see that it happens.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


def omitted(kind: str) -> str:
    """The text that stands for one `kind` ("image", "document", "file", "audio") of input."""
    _log_first(kind)
    return f"[{kind} omitted: this model reads text only]"


# OpenAI content-part types (chat and Responses) -> the kind of input their placeholder names
MEDIA_PARTS = {"image_url": "image", "input_image": "image", "input_audio": "audio",
               "file": "file", "input_file": "file"}


def document_text(source: dict[str, Any]) -> str:
    """An Anthropic document block's text: a plain-text source's data, a content source's text
    blocks; any other source (a PDF, a URL) is the placeholder."""
    kind = source.get("type")
    if kind == "text" and isinstance(source.get("data"), str):
        return source["data"]
    if kind == "content" and isinstance(source.get("content"), (str, list)):
        content = source["content"]
        if isinstance(content, str):
            return content
        texts = [b["text"] for b in content
                 if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)]
        if len(texts) == len(content):
            return "\n".join(texts)
    return omitted("document")


@functools.lru_cache(maxsize=None)
def _log_first(kind: str) -> None:
    log.warning("a request carries %s input; this model reads text only, so each is replaced by "
                "a placeholder (logged once)", kind)
