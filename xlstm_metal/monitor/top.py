"""`xlstm-metal top`: snapshots of the jobs and the machine, as NDJSON, text, or a live terminal UI."""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable

from .machine import Machine
from .records import read_jobs, send_command

HISTORY = 60              # samples of history kept per job (sparklines)
SPARK = "▁▂▃▄▅▆▇█"
MIN_INTERVAL, MAX_INTERVAL = 0.2, 60.0
SORT_KEYS = ("pid", "command", "tokens_per_s", "memory", "progress")
DESCENDING = ("tokens_per_s", "memory", "progress")  # sorted largest first
COLUMNS = ("PID", "COMMAND", "RANK", "MODEL", "PHASE", "PROGRESS", "TOK/S", "TOK/S HISTORY", "MEMORY", "MEM HISTORY",
           "MLX ACT/PEAK/CACHE", "RSS", "STEP", "LOSS", "LR", "DEVICE", "UP")


class Monitor:
    """Polls the records and the machine; keeps a short history per job."""

    def __init__(self, directory: Path | None = None, machine: Machine | None = None):
        self.directory = directory
        self.machine = machine or Machine()
        self.history: dict[int, dict[str, deque]] = {}

    def poll(self, interval: float) -> dict[str, Any]:
        """One snapshot: ``{"time", "interval", "machine", "jobs": [record, ...]}``; each job's
        record gains ``gpu_memory`` (bytes, from NVML) where the driver reports the process."""
        jobs = read_jobs(self.directory)
        machine = self.machine.snapshot()
        gpu_by_pid: dict[int, int] = {}
        for gpu in machine["gpus"]:
            for pid, used in gpu.pop("processes", {}).items():
                gpu_by_pid[pid] = gpu_by_pid.get(pid, 0) + used
        seen = set()
        for job in jobs:
            pid = job["pid"]
            seen.add(pid)
            if pid in gpu_by_pid:
                job["gpu_memory"] = gpu_by_pid[pid]
            h = self.history.setdefault(pid, {"tokens_per_s": deque(maxlen=HISTORY), "memory": deque(maxlen=HISTORY)})
            h["tokens_per_s"].append(float(job.get("tokens_per_s") or 0.0))
            h["memory"].append(float((job.get("memory") or {}).get("usage") or 0))
        for pid in set(self.history) - seen:
            del self.history[pid]
        return {"time": time.time(), "interval": interval, "machine": machine, "jobs": jobs}


# ---------------------------------------------------------------------- formatting
def sparkline(values: Iterable[float], width: int = 16, floor: float | None = 0.0) -> str:
    """Block characters for the last ``width`` values, scaled from ``floor`` (None: their
    minimum, for series such as memory that move little around a large level) to their max."""
    vals = list(values)[-width:]
    if not vals:
        return ""
    top = max(vals)
    low = min(vals) if floor is None else floor
    if top - low <= 0.01 * abs(top):  # flat (or all zero)
        return SPARK[0 if top <= 0 else 3] * len(vals)
    steps = len(SPARK) - 1
    return "".join(SPARK[max(0, min(steps, int((v - low) / (top - low) * steps + 0.5)))] for v in vals)


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}B"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def rank_text(job: dict[str, Any]) -> str:
    """"rank/world size" of a process of a distributed run (mlx.launch), "-" for one on its own."""
    rank = job.get("rank")
    if rank is None:
        return "-"
    return f"{rank}/{job.get('world_size') or '?'}"


def job_cells(job: dict[str, Any], history: dict[str, deque] | None = None) -> tuple[str, ...]:
    """One row of the jobs table (see :data:`COLUMNS`)."""
    mem = job.get("memory") or {}
    done, total = job.get("done"), job.get("total")
    unit = job.get("unit") or ""
    if done is not None and total:
        progress = f"{done:,}/{total:,} {unit} ({100 * done / total:.0f}%)"
    elif done is not None:
        progress = f"{done:,} {unit}"
    else:
        progress = "-"
    model = str(job.get("model") or "-")
    if len(model) > 28:
        model = "…" + model[-27:]
    usage = size(mem.get("usage"))
    if mem.get("state") in ("soft", "hard"):
        usage += f" {mem['state'].upper()}"
    if job.get("gpu_memory"):
        usage += f" (GPU {size(job['gpu_memory'])})"
    history = history or {}
    return (
        str(job["pid"]), str(job.get("command") or "-"), rank_text(job), model, str(job.get("phase") or "-"), progress,
        _num(job.get("tokens_per_s"), ",.1f"), sparkline(history.get("tokens_per_s", ())), usage,
        sparkline(history.get("memory", ()), floor=None),
        f"{size(mem.get('mlx_active'))}/{size(mem.get('mlx_peak'))}/{size(mem.get('mlx_cache'))}",
        size(mem.get("rss")), _num(job.get("step"), ","), _num(job.get("loss"), ".4f"), _num(job.get("lr"), ".2e"),
        str(job.get("device_name") or job.get("device") or "-"),
        duration(time.time() - float(job.get("started") or time.time())) + (" stale" if job.get("age_s", 0) > 10 * float(job.get("interval") or 1) else ""),
    )


def machine_text(m: dict[str, Any]) -> str:
    load = " ".join(f"{x:.2f}" for x in m["load_avg"]) if m.get("load_avg") else "-"
    lines = [f"{m['host']}  CPU {m['cpu_percent']:.0f}% of {m['cpu_count']} cores (load {load})  "
             f"RAM {size(m['ram_used'])}/{size(m['ram_total'])} ({m['ram_percent']:.0f}%)  "
             f"swap {size(m['swap_used'])}/{size(m['swap_total'])}"]
    for g in m.get("gpus", []):
        extra = "".join(f"  {v:.0f}{u}" for v, u in ((g.get("temperature_c"), "°C"), (g.get("power_w"), " W"))
                        if v is not None)
        lines.append(f"GPU {g['index']} {g['name']}: util {g['utilization']:.0f}%  memory "
                     f"{size(g['memory_used'])}/{size(g['memory_total'])}{extra}")
    mlx = m.get("mlx")
    if mlx:
        text = f"MLX {mlx['version']} {mlx['device']}: {mlx.get('device_name', '')}"
        if mlx.get("memory_size"):
            text += f", memory {size(mlx['memory_size'])}"
        if mlx.get("max_recommended_working_set_size"):
            text += f", recommended working set {size(mlx['max_recommended_working_set_size'])}"
        lines.append(text)
    return "\n".join(lines)


def sort_jobs(jobs: list[dict[str, Any]], key: str, reverse: bool = False) -> list[dict[str, Any]]:
    def value(job):
        if key == "memory":
            return (job.get("memory") or {}).get("usage") or 0
        if key in ("tokens_per_s", "progress"):
            return job.get(key) or 0
        # pid, or command: any JSON in a record (a number beside a text failed to sort)
        return job["pid"] if key == "pid" else str(job.get(key) or "")
    return sorted(jobs, key=value, reverse=reverse)


NO_JOBS = "no jobs running (xlstm-metal generate, chat, serve, train, bench, convert, tune, mad and evolve show up here)"


#: Columns left out of a narrow text snapshot, first to go first (the rest are what a row is
#: read for: which job, how far, how fast, how much memory).
DROP_ORDER = ("DEVICE", "MLX ACT/PEAK/CACHE", "RSS", "LR", "UP", "MODEL", "LOSS", "STEP", "PHASE")


def fit_columns(keep: list[int], rows: list[tuple[str, ...]], width: int) -> list[int]:
    """The column indices of ``keep`` that fit ``width`` side by side (two spaces apart) at
    their full width, dropping :data:`DROP_ORDER` first; a terminal too narrow for even the
    rest gets the rest (truncated)."""
    from rich.cells import cell_len

    def need(cols):
        return sum(max(cell_len(COLUMNS[i]), *(cell_len(r[i]) for r in rows)) for i in cols) + 2 * (len(cols) - 1)

    keep = list(keep)
    for name in DROP_ORDER:
        if need(keep) <= width:
            break
        keep = [i for i in keep if COLUMNS[i] != name]
    return keep


def render_text(snapshot: dict[str, Any], width: int | None = None) -> str:
    """The snapshot as plain text (``top --once``; a single snapshot has no history columns).
    ``width``: the terminal's, else 200 columns."""
    from rich.console import Console
    from rich.table import Table

    if width is None:
        width = shutil.get_terminal_size((200, 24)).columns if sys.stdout.isatty() else 200
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(machine_text(snapshot["machine"]), highlight=False)
    if not snapshot["jobs"]:
        console.print(NO_JOBS, highlight=False)
    else:
        table = Table(box=None, pad_edge=False, header_style="bold")
        rows = [job_cells(job) for job in snapshot["jobs"]]
        distributed = any(job.get("rank") is not None for job in snapshot["jobs"])
        keep = fit_columns([i for i, col in enumerate(COLUMNS) if "HISTORY" not in col and (col != "RANK" or distributed)],
                           rows, width)
        for i in keep:
            table.add_column(COLUMNS[i], no_wrap=True, overflow="ellipsis")
        for cells in rows:
            table.add_row(*(cells[i] for i in keep))
        console.print(table)
    return console.export_text()


def kill_job(pid: int, directory: Path | None = None) -> None:
    """SIGTERM to a job listed by top (the job unwinds and removes its record).
    ProcessLookupError unless ``pid`` is a running job now: the live view asks first, and while
    it asked the job may have ended and its pid gone to another process, which was signalled."""
    if pid not in {job["pid"] for job in read_jobs(directory)}:
        raise ProcessLookupError(f"no running xlstm-metal job with pid {pid}")
    os.kill(pid, signal.SIGTERM)


def clear_cache(pid: int, directory: Path | None = None) -> None:
    send_command(pid, "clear_cache", directory)
