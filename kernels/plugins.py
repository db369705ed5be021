"""Out-of-tree kernel backends through the `tokenspeed.kernels` entry-point group.

A distribution declares, e.g. in its pyproject.toml:

    [project.entry-points."tokenspeed.kernels"]
    mybackend = "my_pkg.tokenspeed_kernels"          # a module: importing it registers
    other = "my_pkg.plugin:register_all"             # a callable: called with no arguments

Entry points are loaded lazily, once, before the first kernel lookup. A plugin that fails
to load is reported with a warning and skipped: it must never take the appliance down.
"""
from __future__ import annotations

import importlib.metadata as md
import types
import warnings

from kernels import registry

GROUP = "tokenspeed.kernels"
loaded: list[str] = []   # names of entry points loaded so far
failed: dict[str, str] = {}


def _entry_points() -> list[md.EntryPoint]:
    eps = md.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=GROUP))
    return list(eps.get(GROUP, []))  # Python < 3.10


def load_plugins() -> None:
    """Load every entry point of the group not yet loaded."""
    for ep in _entry_points():
        if ep.name in loaded or ep.name in failed:
            continue
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, types.ModuleType):
                obj()
            loaded.append(ep.name)
        except Exception as e:  # noqa: BLE001 - report and keep going
            failed[ep.name] = f"{type(e).__name__}: {e}"
            registry.mark_unavailable(ep.name, f"plugin {ep.value} failed to load ({failed[ep.name]})")
            warnings.warn(f"tokenspeed kernel plugin {ep.name!r} ({ep.value}) failed: {e}",
                          RuntimeWarning, stacklevel=2)
