"""The Anthropic Messages API: `/v1/messages` and `/v1/messages/count_tokens`.

| module | what |
|---|---|
| `protocol` | request bodies (pydantic) |
| `template` | messages, system prompt and tools -> the dicts a HF chat template expects |
| `messages` | `POST /v1/messages` (streamed as content-block events, or not), `POST /v1/messages/count_tokens` |
"""

from appliance.server.anthropic import messages

ROUTERS = (messages.router,)
