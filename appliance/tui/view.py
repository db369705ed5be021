"""Pure formatting of a /stats snapshot for the dashboard (no Textual here, easy to test).

The mission's words: KV occupancy, per-user TPS against the floor, TPM (total and per GPU).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.text import Text

ANONYMOUS = "(anonymous)"
NEAR_FLOOR = 1.15  # TPS under floor x this is "near" the floor (yellow); under the floor is red
STATE_ORDER = ("prefilling", "decoding", "queued", "preempted")


# --- header ------------------------------------------------------------------------------------
def header(stats: Mapping[str, Any]) -> Text:
    """Model, devices, TP layout, uptime, TPS floor, engine status."""
    text = Text()
    text.append(str(stats.get("model", "?")), style="bold")
    text.append(f"   {devices(stats)}   TP {stats.get('tp_size', 1)}")
    text.append(f"   up {duration(stats.get('uptime_s', 0))}")
    floor = float(stats.get("tps_floor", 0) or 0)
    text.append(f"   TPS floor {floor:g}" if floor else "   TPS floor off")
    engine = stats.get("engine", "ok")
    if engine != "ok":
        text.append(f"   engine {engine}", style="bold yellow")
    return text


def devices(stats: Mapping[str, Any]) -> str:
    gpus = stats.get("gpus", {}).get("devices") or []
    if gpus:
        names = sorted({g.get("name", "GPU") for g in gpus})
        return f"{len(gpus)}× {' + '.join(names)}"
    if stats.get("device") == "cuda":
        return f"{stats.get('tp_size', 1)}× GPU"
    return "CPU"


# --- KV occupancy ------------------------------------------------------------------------------
@dataclass(frozen=True)
class KvPages:
    total: int
    requests: int  # held by running requests (and steps in flight)
    pinned: int  # held only by session pins (agents between turns)
    cached: int  # idle prefix cache: reusable, evictable
    free: int

    @classmethod
    def of(cls, kv: Mapping[str, Any]) -> KvPages:
        total, used = int(kv.get("pages_total", 0)), int(kv.get("pages_used", 0))
        pinned = min(int(kv.get("pages_pinned", 0)), used)
        cached = int(kv.get("pages_cached", 0))
        free = int(kv.get("pages_free", max(total - used - cached, 0)))
        return cls(total, used - pinned, pinned, cached, free)


KV_PARTS = (("requests", "█", "bold red"), ("pinned", "▓", "magenta"), ("cached", "▒", "yellow"),
            ("free", "░", "green"))


def kv_panel(stats: Mapping[str, Any], width: int = 40) -> Text:
    kv = stats.get("kv", {})
    pages = KvPages.of(kv)
    used = pages.requests + pages.pinned
    text = Text()
    text.append("KV occupancy ", style="bold")
    text.append(f"{pct(used, pages.total)}", style="bold")
    text.append(f"  of {pages.total:,} pages × {int(kv.get('page_size', 0))} tokens\n")
    text.append_text(kv_bar(pages, width))
    text.append("\n")
    for name, glyph, style in KV_PARTS:
        text.append(glyph, style=style)
        text.append(f" {name} {getattr(pages, name):,}   ")
    cache = stats.get("prefix_cache", {})
    text.append("\nprefix hit rate  last min ")
    text.append(ratio(cache.get("hit_rate_last_minute")), style="bold")
    text.append("   since start ")
    text.append(ratio(cache.get("hit_rate")), style="bold")
    requests = stats.get("requests", {})
    text.append(f"\nrunning {requests.get('running', 0)}   waiting {requests.get('waiting', 0)}   "
                f"preemptions {stats.get('totals', {}).get('preemptions', 0):,}")
    acceptance = speculative_acceptance(stats)
    if acceptance is not None:
        text.append(f"\nspeculative acceptance {acceptance}")
    return text


def kv_bar(pages: KvPages, width: int) -> Text:
    """One cell per total/width pages, in order requests, pinned, cached, free."""
    counts = [getattr(pages, name) for name, _, _ in KV_PARTS]
    cells = _apportion(counts, width) if pages.total > 0 else [0, 0, 0, width]
    bar = Text()
    for (_, glyph, style), n in zip(KV_PARTS, cells):
        bar.append(glyph * n, style=style)
    return bar


def speculative_acceptance(stats: Mapping[str, Any]) -> str | None:
    """Accepted / drafted tokens when the daemon speculates, and the decode steps left while
    it has paused drafting (verify steps were losing to plain ones); None (nothing shown)
    otherwise."""
    spec = stats.get("speculative")
    if not isinstance(spec, Mapping):
        return None
    drafted, accepted = spec.get("draft_tokens"), spec.get("accepted_tokens")
    if not drafted or accepted is None:
        return None
    line = f"{pct(accepted, drafted)} of drafts"
    mean, paused = spec.get("mean_accepted_length"), spec.get("paused_steps")
    line += f", {float(mean):.2f} tokens a step" if mean is not None else ""
    return line + (f", drafting paused for {int(paused)} steps" if paused else "")


# --- throughput --------------------------------------------------------------------------------
def throughput_panel(stats: Mapping[str, Any]) -> Text:
    flow = stats.get("throughput", {})
    tpm = float(flow.get("generation_tokens_per_minute", 0))
    per_gpu = flow.get("generation_tokens_per_minute_per_gpu")
    text = Text()
    text.append("TPM ", style="bold")
    text.append(f"{tpm:,.0f}", style="bold cyan")
    text.append("  generated tokens/min")
    text.append("\nTPM per GPU ", style="bold")
    text.append(f"{per_gpu:,.0f}" if per_gpu is not None else "- (no GPU)", style="bold cyan")
    prompt = float(flow.get("prompt_tokens_per_minute", 0))
    text.append(f"\ngenerated {rate(tpm / 60)} tok/s · prompt {rate(prompt / 60)} tok/s (last min)")
    return text


def history(stats: Mapping[str, Any], key: str) -> list[float]:
    return [float(v) for v in stats.get("history", {}).get(key, [])]


def history_label(stats: Mapping[str, Any], name: str, key: str) -> str:
    values = history(stats, key)
    minutes = len(values) * int(stats.get("history", {}).get("bucket_s", 0)) / 60
    peak = max(values, default=0.0)
    return f"{name} tok/s, last {minutes:g} min (peak {peak:,.0f})"


# --- GPUs --------------------------------------------------------------------------------------
def gpu_panel(stats: Mapping[str, Any], bar_width: int = 10) -> Text:
    gpus = stats.get("gpus", {})
    if not gpus.get("available"):
        reason = gpus.get("reason") or "no GPU"
        return Text(reason if reason.startswith("no GPU") else f"no GPU: {reason}", style="dim")
    text = Text()
    for i, gpu in enumerate(gpus.get("devices", [])):
        if i:
            text.append("\n")
        text.append(f"GPU{gpu.get('index', i)} {gpu.get('name', '')}", style="bold")
        util = gpu.get("utilization_pct")
        text.append("  util ")
        text.append_text(_meter(util, 100.0, bar_width))
        text.append(f" {util:3.0f}%" if util is not None else "   -")
        used, total = gpu.get("memory_used_bytes"), gpu.get("memory_total_bytes")
        text.append("  HBM ")
        text.append_text(_meter(used, total, bar_width))
        text.append(f" {used / 2**30:,.1f}/{total / 2**30:,.1f} GiB" if used is not None and total else " -")
        power, limit = gpu.get("power_w"), gpu.get("power_limit_w")
        text.append("  power ")
        text.append(f"{power:,.0f} W" if power is not None else "-")
        text.append(f" / {limit:,.0f} W" if limit is not None else "")
    return text


def _meter(value: float | None, full: float | None, width: int) -> Text:
    if value is None or not full:
        return Text("·" * width, style="dim")
    n = min(width, round(width * value / full))
    return Text.assemble(("■" * n, "cyan"), ("·" * (width - n), "dim"))


# --- users -------------------------------------------------------------------------------------
USER_COLUMNS = ("user / session", "reqs", "state", "context", "cached", "TPS", "generated")  # also sort keys
SORT_KEYS = ("TPS", "context", "cached", "user / session", "state")


def user_rows(stats: Mapping[str, Any], sort_by: str = "TPS",
              reverse: bool = False) -> list[tuple[Text | str, ...]]:
    """One row per user (session, else user), formatted and sorted by `sort_by` (a column
    name); rows without a TPS go last when sorting by TPS."""
    floor = float(stats.get("tps_floor", 0) or 0)
    users = sorted(stats.get("users", []), key=_sort_key(sort_by), reverse=reverse)
    return [(user_label(u.get("user", ""), u.get("session", "")), _number(u.get("requests", 0)),
             user_state(u), _number(u.get("context_tokens", 0)), _number(u.get("cached_tokens", 0)),
             tps_cell(u.get("decode_tps"), floor), _number(u.get("generated_tokens", 0)))
            for u in users]


def _number(value: Any) -> Text:
    return Text(f"{int(value):,}", justify="right")


def _sort_key(column: str):
    def key(user: Mapping[str, Any]):
        label = user_label(user.get("user", ""), user.get("session", ""))
        if column == "TPS":
            tps = user.get("decode_tps")
            return (tps is None, tps or 0.0, label)
        if column == "context":
            return (int(user.get("context_tokens", 0)), label)
        if column == "cached":
            return (int(user.get("cached_tokens", 0)), label)
        if column == "state":
            return (user_state(user), label)
        return (label,)
    return key


def user_label(user: str, session: str) -> str:
    """Who: Claude Code's `user_<hash>_account_<id>_session_<uuid>` becomes `user_<hash…> · <uuid…>`."""
    if user and session and f"_session_{session}" in user:
        user = user.split("_account_")[0] if "_account_" in user else user.split("_session_")[0]
        return f"{_short(user, 14)} · {_short(session, 8)}"
    if user and session:
        return f"{_short(user, 24)} · {_short(session, 8)}"
    return _short(user or session, 36) or ANONYMOUS


def user_state(user: Mapping[str, Any]) -> str:
    """queued / prefill N% / decoding, with counts when a user has several requests."""
    states: Mapping[str, int] = user.get("states", {})
    parts = []
    for state in [*STATE_ORDER, *sorted(set(states) - set(STATE_ORDER))]:
        n = states.get(state, 0)
        if not n:
            continue
        prefill = user.get("prefill_pct")
        label = f"prefill {prefill:.0f}%" if state == "prefilling" and prefill is not None else state
        parts.append(label if n == 1 else f"{n}× {label}")
    return ", ".join(parts) or "-"


def tps_cell(tps: float | None, floor: float) -> Text:
    """TPS now, green above the floor, yellow near it, red below (plain when the floor is off)."""
    if tps is None:
        return Text("-", style="dim", justify="right")
    style = ""
    if floor > 0:
        style = "bold red" if tps < floor else "yellow" if tps < floor * NEAR_FLOOR else "green"
    return Text(f"{tps:,.1f}", style=style, justify="right")


# --- small helpers -----------------------------------------------------------------------------
def rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def ratio(value: float | None) -> str:
    return f"{100.0 * value:.1f}%" if value is not None else "-"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _short(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _apportion(counts: Sequence[int], width: int) -> list[int]:
    """Cells per part summing to `width` (largest remainders), so the bar never overflows."""
    total = sum(counts)
    if total <= 0:
        return [0] * (len(counts) - 1) + [width]
    exact = [width * c / total for c in counts]
    cells = [int(x) for x in exact]
    by_remainder = sorted(range(len(counts)), key=lambda i: exact[i] - cells[i], reverse=True)
    for i in by_remainder[: width - sum(cells)]:
        cells[i] += 1
    return cells
