"""GPU telemetry for `/stats`: utilisation, HBM used/total and power of the engine's GPUs, read
through NVML (nvidia-ml-py). The dashboard talks only to the daemon, so the daemon reads them.

The GPUs are the ones the engine ranks run on, named by UUID (EngineInfo.devices), so the
readings are right whatever CUDA_VISIBLE_DEVICES says. No GPU, no NVML, or an NVML error gives
`{"available": false, "reason": ...}`, never an exception.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

READ_EVERY_S = 1.0  # NVML's own counters move about this often; dashboards poll faster


class GpuTelemetry:
    def __init__(self, uuids: Sequence[str]) -> None:
        self._uuids = list(uuids)
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._names: list[str] = []
        self._reason = self._open()
        self._last: dict[str, Any] | None = None
        self._last_at = 0.0

    def read(self) -> dict[str, Any]:
        """{"available": true, "devices": [...]} or {"available": false, "reason": ...}."""
        if self._reason is not None:
            return {"available": False, "reason": self._reason, "devices": []}
        now = time.monotonic()
        if self._last is None or now - self._last_at >= READ_EVERY_S:
            self._last, self._last_at = self._read_devices(), now
        return self._last

    def _open(self) -> str | None:
        """Why there are no readings, or None once every GPU has an NVML handle."""
        if not self._uuids:
            return "no GPU: the engine runs on the CPU"
        try:
            import pynvml
        except ImportError as e:
            return f"nvidia-ml-py is not importable ({e})"
        try:
            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByUUID(uuid) for uuid in self._uuids]
            self._names = [_text(pynvml.nvmlDeviceGetName(h)) for h in self._handles]
        except pynvml.NVMLError as e:
            return f"NVML: {e}"
        self._nvml = pynvml
        return None

    def _read_devices(self) -> dict[str, Any]:
        devices = [{"index": rank, "uuid": uuid, "name": name, **self._readings(handle)}
                   for rank, (uuid, name, handle)
                   in enumerate(zip(self._uuids, self._names, self._handles))]
        return {"available": True, "reason": None, "devices": devices}

    def _readings(self, handle: Any) -> dict[str, float | None]:
        """Each figure alone: a GPU may not support one (e.g. power on some boards) -> None."""
        nvml = self._nvml

        def get(read):
            try:
                return read()
            except nvml.NVMLError:
                return None

        memory = get(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        power_mw = get(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        limit_mw = get(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        utilization = get(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        return {
            "utilization_pct": None if utilization is None else float(utilization.gpu),
            "memory_used_bytes": None if memory is None else int(memory.used),
            "memory_total_bytes": None if memory is None else int(memory.total),
            "power_w": None if power_mw is None else power_mw / 1000.0,
            "power_limit_w": None if limit_mw is None else limit_mw / 1000.0,
        }


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
