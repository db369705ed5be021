"""Kernel registry: implementations per op, chosen by priority and a `supports` predicate.

`register` adds an implementation; `select` returns the best one for the caller's features
(device, dtype and any shape features), cached per feature set; `explain` says why;
`set_overrides` forces a backend per op. Out-of-tree backends arrive through the
`tokenspeed.kernels` entry-point group (see `plugins.py`), loaded lazily on first use.
A backend that cannot serve on this machine (not importable, no CUDA device) is recorded with
`mark_unavailable`, so `listing` (`tokenspeed kernels`) can say what exists and why it is off.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

Features = Mapping[str, Any]
Predicate = Callable[[Features], bool]

# The ops of docs/INTERFACES.md §2. Plugins may add more.
OPS: tuple[str, ...] = (
    "rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope", "store_kv", "rope_store_kv",
    "decode_attention", "extend_attention", "mla_decode", "mla_extend", "mla_prefill",
    "router_logits", "moe_route", "fused_moe", "fused_moe_mxfp4", "sample",
    "apply_token_bitmask", "apply_penalties", "count_tokens", "spec_accept", "linear",
    "linear_silu_and_mul", "head_matmul", "mla_absorb_rope", "rms_norm_linear",
    "rms_norm_router_logits", "rope_decode_attention",
)
# Ops the torch reference serves on CUDA too (vectorized, no host sync): no Triton kernel until a
# measurement asks for one.
REFERENCE_ONLY: tuple[str, ...] = ("apply_token_bitmask",)


class KernelError(LookupError):
    """No usable implementation, or an override names an unknown/unsupported backend."""


@dataclass(frozen=True)
class Impl:
    op: str
    backend: str
    priority: int
    supports: Predicate
    fn: Callable[..., Any]


@dataclass(frozen=True)
class Unavailable:
    backend: str
    reason: str  # e.g. "not importable (ModuleNotFoundError: No module named 'triton')"
    ops: tuple[str, ...]  # the ops it implements (or would), when known


_lock = threading.RLock()
_impls: dict[str, dict[str, Impl]] = {}
_overrides: dict[str, str] = {}
_cache: dict[tuple, Impl] = {}
_loaders: list[Callable[[], None]] = []  # lazy loaders run once before the first lookup
_unavailable: dict[str, Unavailable] = {}


def add_lazy_loader(fn: Callable[[], None]) -> None:
    """Run `fn` once before the next lookup (used for built-in Triton and plugin backends)."""
    with _lock:
        _loaders.append(fn)
        _cache.clear()


def _run_loaders() -> None:
    while _loaders:
        with _lock:
            if not _loaders:
                return
            fn = _loaders.pop(0)
        fn()


def register(op: str, backend: str = "torch", priority: int = 0,
             supports: Predicate | None = None) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as `backend`'s implementation of `op`.

    A backend registered twice for the same op replaces the earlier one."""
    pred: Predicate = supports if supports is not None else (lambda f: True)

    def deco(fn: Callable) -> Callable:
        with _lock:
            _impls.setdefault(op, {})[backend] = Impl(op, backend, priority, pred, fn)
            _cache.clear()
        return fn
    return deco


def unregister(op: str, backend: str) -> None:
    """Remove `op`'s `backend`; an op left without implementations is no longer listed."""
    with _lock:
        impls = _impls.get(op, {})
        impls.pop(backend, None)
        if not impls:
            _impls.pop(op, None)
        _cache.clear()


def _features(device: Any, dtype: Any, extra: Features) -> dict[str, Any]:
    dev = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return {"device": dev, "dtype": dtype, **extra}


def _key(op: str, feats: Features) -> tuple:
    return (op, tuple(sorted((k, repr(v)) for k, v in feats.items())))


def _check(impl: Impl, feats: Features) -> tuple[bool, str]:
    try:
        ok = bool(impl.supports(feats))
    except Exception as e:  # a predicate that cannot judge these features refuses them
        return False, f"supports() raised {type(e).__name__}: {e}"
    return ok, "supports() holds" if ok else "supports() is false for these features"


def _candidates(op: str) -> list[Impl]:
    _run_loaders()
    with _lock:
        impls = list(_impls.get(op, {}).values())
    if not impls:
        raise KernelError(f"unknown kernel op {op!r}; known: {sorted(_impls)}")
    return sorted(impls, key=lambda i: (-i.priority, i.backend))


def _choose(op: str, feats: Features) -> Impl:
    impls = _candidates(op)
    forced = _overrides.get(op)
    if forced is not None:
        match = [i for i in impls if i.backend == forced]
        if not match:
            raise KernelError(f"override for op {op!r} names unknown backend {forced!r}; "
                              f"registered: {[i.backend for i in impls]}")
        ok, why = _check(match[0], feats)
        if not ok:
            raise KernelError(f"override {op}={forced!r} does not support {dict(feats)}: {why}")
        return match[0]
    for impl in impls:
        if _check(impl, feats)[0]:
            return impl
    raise KernelError(f"no implementation of {op!r} supports {dict(feats)}; "
                      f"candidates: {[i.backend for i in impls]}")


def select(op: str, device: Any = "cpu", dtype: Any = None, **features: Any) -> Callable[..., Any]:
    """The highest-priority implementation of `op` whose `supports(features)` holds."""
    feats = _features(device, dtype, features)
    key = _key(op, feats)
    with _lock:
        hit = _cache.get(key)
    if hit is None:
        hit = _choose(op, feats)
        with _lock:
            _cache[key] = hit
    return hit.fn


def selected_backend(op: str, device: Any = "cpu", dtype: Any = None, **features: Any) -> str:
    feats = _features(device, dtype, features)
    return _choose(op, feats).backend


def explain(op: str, device: Any = "cpu", dtype: Any = None, **features: Any) -> str:
    """Human-readable account of every candidate for `op` and why it was taken or refused."""
    feats = _features(device, dtype, features)
    impls = _candidates(op)
    forced = _overrides.get(op)
    lines = [f"op {op!r} for {dict(feats)}"]
    if forced is not None:
        lines.append(f"  override: backend {forced!r} forced by set_overrides")
    try:
        chosen: str | None = _choose(op, feats).backend
    except KernelError as e:
        chosen = None
        lines.append(f"  no choice: {e}")
    for impl in impls:
        ok, why = _check(impl, feats)
        if impl.backend == chosen:
            verdict = "SELECTED"
        elif forced is not None and impl.backend != forced:
            verdict = "skipped (override)"
        elif ok:
            verdict = "skipped (lower priority)"
        else:
            verdict = "refused"
        lines.append(f"  - {impl.backend} (priority {impl.priority}): {verdict}; {why}")
    off = unavailable()
    registered = {impl.backend for impl in impls}
    lines += [f"  - {u.backend}: unavailable on this machine: {u.reason}" for u in off.values()
              if u.backend in registered or op in u.ops]
    return "\n".join(lines)


def set_overrides(overrides: Mapping[str, str] | None) -> None:
    """Force a backend per op ({"decode_attention": "torch"}); None or {} clears them.

    Raises KernelError naming the op or backend when either is unknown."""
    new = dict(overrides or {})
    _run_loaders()
    for op, backend in new.items():
        with _lock:
            known = _impls.get(op)
        if not known:
            raise KernelError(f"kernels.override: unknown op {op!r}; known: {sorted(_impls)}")
        if backend not in known:
            raise KernelError(f"kernels.override.{op}: unknown backend {backend!r}; "
                              f"registered: {sorted(known)}")
    with _lock:
        _overrides.clear()
        _overrides.update(new)
        _cache.clear()


def overrides() -> dict[str, str]:
    """The backends forced by `set_overrides`, op -> backend (a copy)."""
    with _lock:
        return dict(_overrides)


def backends(op: str) -> list[str]:
    """Registered backends of `op`, best priority first."""
    return [i.backend for i in _candidates(op)]


def registered_ops() -> list[str]:
    _run_loaders()
    with _lock:
        return sorted(_impls)


def mark_unavailable(backend: str, reason: str, ops: tuple[str, ...] = ()) -> None:
    """Record that `backend` cannot serve on this machine (it stays registered if it was:
    selection still goes by each implementation's `supports`)."""
    with _lock:
        _unavailable[backend] = Unavailable(backend, reason, tuple(ops))


def unavailable() -> dict[str, Unavailable]:
    """Backends that cannot serve on this machine, by name (a copy)."""
    _run_loaders()
    with _lock:
        return dict(_unavailable)


def listing() -> str:
    """Every op with each implementation, best first, unavailable ones marked; then why each
    unavailable backend is. What `tokenspeed kernels` prints."""
    off = unavailable()
    ops = sorted(set(registered_ops()) | {op for u in off.values() for op in u.ops})
    width = max(map(len, ops), default=0)
    lines = ["implementations of each op, best first:"]
    for op in ops:
        with _lock:
            impls = sorted(_impls.get(op, {}).values(), key=lambda i: (-i.priority, i.backend))
        names = [f"{i.backend} (priority {i.priority}{', unavailable' if i.backend in off else ''})"
                 for i in impls]
        names += [f"{u.backend} (unavailable)" for u in off.values()
                  if op in u.ops and u.backend not in {i.backend for i in impls}]
        lines.append(f"  {op:<{width}}  {', '.join(names)}")
    if off:
        lines.append("unavailable on this machine:")
        lines += [f"  {u.backend}: {u.reason}" for u in sorted(off.values(), key=lambda u: u.backend)]
    return "\n".join(lines)
