"""The frontend: OpenAI (chat, completions, responses) + Anthropic APIs, SSE, /metrics and /stats
over TCP and a Unix socket.

`build_app(config, client, tokenizer)` builds the FastAPI app; `serve(config, client, tokenizer)`
runs it. May import `appliance.engine` (client, protocol) and `appliance.config` only.
"""

__all__ = ["build_app", "serve"]


def __getattr__(name: str):
    """Imported on first use: `tokenspeed up` imports the server's small modules (the
    listening sockets, the warming-up answers) before it starts the engine ranks, and the
    app's (FastAPI and every API: ~1 s on a GPU box) while they start."""
    if name == "serve":
        from appliance.server.serve import serve

        return serve
    if name == "build_app":
        from appliance.server.app import build_app

        return build_app
    raise AttributeError(name)
