"""The machine as `xlstm-metal top` shows it: CPU, RAM, NVIDIA GPUs (NVML), MLX's device."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import psutil


class Machine:
    """Takes machine snapshots; NVML is initialised once, when nvidia-ml-py and a driver exist."""

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 -- no nvidia-ml-py, no driver, no GPU: no GPU rows
            self._nvml = None
        self._mlx = _mlx_info()
        psutil.cpu_percent(None)  # the first call only starts the measurement
        self._cpu_since = time.monotonic()

    def gpus(self) -> list[dict[str, Any]]:
        """Per NVIDIA GPU: index, name, utilisation %, memory used / total (bytes), temperature,
        power (W), and the memory each process uses (``processes``: pid -> bytes)."""
        nv = self._nvml
        if nv is None:
            return []
        rows = []
        try:
            count = nv.nvmlDeviceGetCount()
        except Exception:  # noqa: BLE001
            return []
        for index in range(count):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                name = nv.nvmlDeviceGetName(handle)
                util = nv.nvmlDeviceGetUtilizationRates(handle)
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                row: dict[str, Any] = {
                    "index": index, "name": name.decode() if isinstance(name, bytes) else str(name),
                    "utilization": float(util.gpu), "memory_used": int(mem.used), "memory_total": int(mem.total),
                }
            except Exception:  # noqa: BLE001 -- a GPU that stops answering is skipped this round
                continue
            for key, call in (("temperature_c", lambda h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                              ("power_w", lambda h: nv.nvmlDeviceGetPowerUsage(h) / 1000)):
                try:
                    row[key] = call(handle)
                except Exception:  # noqa: BLE001 -- not every GPU reports these
                    row[key] = None
            try:
                row["processes"] = {int(p.pid): int(p.usedGpuMemory or 0)
                                    for p in nv.nvmlDeviceGetComputeRunningProcesses(handle)}
            except Exception:  # noqa: BLE001
                row["processes"] = {}
            rows.append(row)
        return rows

    def snapshot(self) -> dict[str, Any]:
        wait = 0.25 - (time.monotonic() - self._cpu_since)
        if wait > 0:  # a CPU percentage over less than a quarter second is noise (or 0)
            time.sleep(wait)
        vm = psutil.virtual_memory()
        swap = psutil.swap_memory()
        try:
            load = list(os.getloadavg())
        except (AttributeError, OSError):
            load = None
        return {
            "host": socket.gethostname(),
            "cpu_percent": psutil.cpu_percent(None), "cpu_count": psutil.cpu_count(), "load_avg": load,
            "ram_total": vm.total, "ram_used": vm.total - vm.available, "ram_percent": vm.percent,
            "swap_used": swap.used, "swap_total": swap.total,
            "gpus": self.gpus(),
            "mlx": self._mlx,
        }


def _mlx_info() -> dict[str, Any] | None:
    """MLX's default device and what it reports about it (on Metal: memory size, recommended
    working set); None when MLX is not importable."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    info = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in mx.device_info().items()}
    gpu = mx.default_device() == mx.gpu
    backend = "metal" if gpu and mx.metal.is_available() else "cuda" if gpu else "cpu"
    return {"version": mx.__version__, "device": backend, **info}
