"""Pure formatting of a /stats snapshot for the dashboard (no Textual here, easy to test)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich.text import Text

ANONYMOUS = "(anonymous)"


def kv_bar(kv: Mapping[str, Any], width: int = 40) -> Text:
    """`█` used, `▒` cached (reusable prefix pages), `░` free, then the counts."""
    total = max(int(kv.get("pages_total", 0)), 0)
    used, cached = int(kv.get("pages_used", 0)), int(kv.get("pages_cached", 0))
    free = int(kv.get("pages_free", max(total - used - cached, 0)))
    n_used, n_cached = _cells(used, total, width), _cells(cached, total, width)
    n_cached = min(n_cached, width - n_used)
    bar = Text()
    bar.append("█" * n_used, style="bold red")
    bar.append("▒" * n_cached, style="yellow")
    bar.append("░" * (width - n_used - n_cached), style="green")
    bar.append(f"  used {used}  cached {cached}  free {free}  of {total} pages"
               f" ({_pct(used, total)} used)")
    return bar


def summary(stats: Mapping[str, Any]) -> str:
    requests, throughput = stats.get("requests", {}), stats.get("throughput", {})
    totals = stats.get("totals", {})
    hit = _pct(totals.get("prefix_cache_hit_tokens", 0), totals.get("prompt_tokens", 0))
    return (f"model {stats.get('model', '?')}   up {_duration(stats.get('uptime_s', 0))}\n"
            f"requests running {requests.get('running', 0)}   waiting {requests.get('waiting', 0)}\n"
            f"generated {throughput.get('generation_tokens_per_minute', 0):,.0f} tok/min   "
            f"prompt {throughput.get('prompt_tokens_per_minute', 0):,.0f} tok/min   "
            f"prefix-cache hits {hit}   preemptions {totals.get('preemptions', 0)}")


def request_rows(stats: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows = sorted(stats.get("active", []), key=lambda a: a.get("rid", 0))
    return [(str(a.get("rid", "")), a.get("user") or ANONYMOUS, f"{a.get('prompt_tokens', 0):,}",
             f"{a.get('generated_tokens', 0):,}", f"{a.get('decode_tps', 0.0):.1f}") for a in rows]


@dataclass
class UserLoad:
    requests: int = 0
    generated: int = 0
    decode_tps: float = 0.0


def user_rows(stats: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Per user: active requests, tokens generated so far, summed decode TPS (busiest first)."""
    users: dict[str, UserLoad] = {}
    for active in stats.get("active", []):
        load = users.setdefault(active.get("user") or ANONYMOUS, UserLoad())
        load.requests += 1
        load.generated += int(active.get("generated_tokens", 0))
        load.decode_tps += float(active.get("decode_tps", 0.0))
    ordered = sorted(users.items(), key=lambda item: (-item[1].decode_tps, item[0]))
    return [(user, str(load.requests), f"{load.generated:,}", f"{load.decode_tps:.1f}")
            for user, load in ordered]


def _cells(value: int, total: int, width: int) -> int:
    return 0 if total <= 0 else min(width, round(width * value / total))


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"
