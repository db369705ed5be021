"""The OpenAI-compatible API: `/v1/chat/completions` and `/v1/completions`.

| module | what |
|---|---|
| `protocol` | request bodies (pydantic) |
| `template` | chat messages and tools -> the dicts a HF chat template expects |
| `common` | what the endpoints share: unsupported options, sampling, usage, finish reasons, stream errors |
| `chat` | `POST /v1/chat/completions` |
| `completions` | `POST /v1/completions` |

A new endpoint of this API (e.g. `/v1/responses`) is a module here whose router joins `ROUTERS`.
"""

from appliance.server.openai import chat, completions

ROUTERS = (chat.router, completions.router)
