"""/stats snapshots (docs/INTERFACES.md §5) the dashboard tests draw: a busy GPU daemon, an idle
CPU one. Fixed numbers, so the screens are the same on every run."""

from __future__ import annotations

import copy

CLAUDE_CODE_USER = "user_ab12cd34ef56ab12cd34ef56ab12cd34_account_77e1c0de_session_5f0c1a2b-9d3e-4c1f"

BUSY = {
    "model": "llama-3.1-8b", "uptime_s": 3725.0, "engine": "ok", "device": "cuda", "tp_size": 2,
    "tps_floor": 70.0,
    "kv": {"page_size": 16, "pages_total": 1000, "pages_used": 600, "pages_pinned": 100, "pages_cached": 250,
           "pages_free": 150},
    "requests": {"running": 5, "waiting": 2},
    "throughput": {"generation_tokens_per_minute": 420000.0, "prompt_tokens_per_minute": 60000.0,
                   "generation_tokens_per_minute_per_gpu": 210000.0},
    "prefix_cache": {"hit_rate": 0.9, "hit_rate_last_minute": 0.931, "last_minute_covers_s": 60.0},
    "totals": {"prompt_tokens": 1000000, "generation_tokens": 500000, "prefix_cache_hit_tokens": 900000,
               "preemptions": 4},
    "history": {"bucket_s": 5,
                "generation_tokens_per_s": [0.0] * 40 + [100.0 * i for i in range(0, 80, 4)],
                "prompt_tokens_per_s": [0.0] * 40 + [5000.0] + [1000.0] * 19},
    "gpus": {"available": True, "reason": None, "devices": [
        {"index": 0, "uuid": "GPU-a", "name": "NVIDIA H200", "utilization_pct": 87.0,
         "memory_used_bytes": 120 * 2**30, "memory_total_bytes": 141 * 2**30, "power_w": 520.4,
         "power_limit_w": 700.0},
        {"index": 1, "uuid": "GPU-b", "name": "NVIDIA H200", "utilization_pct": 85.0,
         "memory_used_bytes": 120 * 2**30, "memory_total_bytes": 141 * 2**30, "power_w": 498.0,
         "power_limit_w": 700.0}]},
    "active": [],  # the table reads `users`; `active` is per request (tokenspeed status)
    "users": [
        {"key": "5f0c1a2b-9d3e-4c1f", "user": CLAUDE_CODE_USER, "session": "5f0c1a2b-9d3e-4c1f", "requests": 2,
         "states": {"decoding": 1, "prefilling": 1}, "prefill_pct": 42.0, "context_tokens": 96000,
         "cached_tokens": 88000, "generated_tokens": 350, "decode_tps": 92.5},
        {"key": "alice", "user": "alice", "session": "", "requests": 1, "states": {"decoding": 1},
         "prefill_pct": None, "context_tokens": 12000, "cached_tokens": 0, "generated_tokens": 900,
         "decode_tps": 74.0},
        {"key": "bench-user-3", "user": "", "session": "bench-user-3", "requests": 1,
         "states": {"decoding": 1}, "prefill_pct": None, "context_tokens": 40000, "cached_tokens": 30000,
         "generated_tokens": 120, "decode_tps": 51.2},
        {"key": "", "user": "", "session": "", "requests": 1, "states": {"queued": 1}, "prefill_pct": None,
         "context_tokens": 300, "cached_tokens": 0, "generated_tokens": 0, "decode_tps": None},
    ],
    "speculative": {"draft_tokens": 1000, "accepted_tokens": 710, "mean_accepted_length": 2.4},
}

IDLE = {
    "model": "tiny-llama", "uptime_s": 75.0, "engine": "ok", "device": "cpu", "tp_size": 1, "tps_floor": 70.0,
    "kv": {"page_size": 16, "pages_total": 1024, "pages_used": 12, "pages_pinned": 12, "pages_cached": 40,
           "pages_free": 972},
    "requests": {"running": 0, "waiting": 0},
    "throughput": {"generation_tokens_per_minute": 0.0, "prompt_tokens_per_minute": 0.0,
                   "generation_tokens_per_minute_per_gpu": None},
    "prefix_cache": {"hit_rate": 0.5, "hit_rate_last_minute": None, "last_minute_covers_s": 0.0},
    "totals": {"prompt_tokens": 400, "generation_tokens": 64, "prefix_cache_hit_tokens": 200, "preemptions": 0},
    "history": {"bucket_s": 5, "generation_tokens_per_s": [0.0] * 60, "prompt_tokens_per_s": [0.0] * 60},
    "gpus": {"available": False, "reason": "no GPU: the engine runs on the CPU", "devices": []},
    "active": [], "users": [],
}


def busy() -> dict:
    return copy.deepcopy(BUSY)


def idle() -> dict:
    return copy.deepcopy(IDLE)
