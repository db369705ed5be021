"""Request bodies decoded as strict JSON (msgspec): the API routes use `JsonBodyRoute`.

Python's `json` module accepts what these APIs must refuse: `NaN` and `Infinity`, encoded
surrogates in the UTF-8 bytes and lone surrogate escapes (`"\\ud800"`), which pass validation and
then break the tokenizer or the engine message (a 500). msgspec refuses all of them, and is
faster on large bodies. FastAPI turns the `JSONDecodeError` raised here into its `json_invalid`
validation error, which the app answers with a 400 in the API's shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
from fastapi import Request, Response
from fastapi.routing import APIRoute

_decoder = msgspec.json.Decoder()


def strict_loads(text: str | bytes) -> Any:
    """A body, or JSON inside a string field (Claude Code's `metadata.user_id`, a tool call's
    `arguments`: Python's json would let a lone surrogate escape through to the tokenizer or the
    engine message), decoded strictly; ValueError for anything else."""
    try:
        return _decoder.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except msgspec.DecodeError as e:
        raise ValueError(str(e)) from None


class JsonBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = strict_loads(await self.body())
            except ValueError as e:
                raise json.JSONDecodeError(f"{e} (expected strict JSON in UTF-8)", "", 0) from None
        return self._json


class JsonBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_json_handler(request: Request) -> Response:
            return await handler(JsonBodyRequest(_as_json(request.scope), request.receive))

        return strict_json_handler


def _as_json(scope: dict[str, Any]) -> dict[str, Any]:
    """The scope with its body declared JSON: these routes take nothing else, and a client that
    sends a JSON body under another content type (`curl -d` says form data) would otherwise be
    told its JSON object is not one."""
    headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
