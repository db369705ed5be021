"""The frontend: OpenAI (chat, completions, responses) + Anthropic APIs, SSE, /metrics and /stats
over TCP and a Unix socket.

`build_app(config, client, tokenizer)` builds the FastAPI app; `serve(config, client, tokenizer)`
runs it. May import `appliance.engine` (client, protocol) and `appliance.config` only.
"""

from appliance.server.app import build_app

__all__ = ["build_app", "serve"]


def __getattr__(name: str):
    if name == "serve":
        from appliance.server.serve import serve

        return serve
    raise AttributeError(name)
