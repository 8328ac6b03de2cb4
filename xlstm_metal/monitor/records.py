"""Status records of running jobs: one JSON file per process in a per-user runtime directory.

A job writes ``<pid>.json`` about once a second (atomically: a temporary file, then
``os.replace``) and removes it on exit. Readers (``xlstm-metal top``) list the directory, skip
and delete the records of processes that no longer exist (a job killed with SIGKILL cannot
clean up), and talk back to a job through ``<pid>.cmd`` files that the job's publisher thread
polls.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

#: Version of the record layout (``record["version"]``).
RECORD_VERSION = 1
#: Commands a job accepts through its command file.
COMMANDS = ("clear_cache",)


def runtime_dir(create: bool = True) -> Path:
    """The per-user directory holding the records: ``$XLSTM_RUNTIME_DIR``, else
    ``$XDG_RUNTIME_DIR/xlstm-metal``, else ``<tmp>/xlstm-metal-<uid>`` (mode 0700)."""
    explicit = os.environ.get("XLSTM_RUNTIME_DIR")
    if explicit:
        path = Path(explicit)
    elif os.environ.get("XDG_RUNTIME_DIR") and os.access(os.environ["XDG_RUNTIME_DIR"], os.W_OK):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "xlstm-metal"
    else:
        uid = os.getuid() if hasattr(os, "getuid") else os.getlogin()
        path = Path(tempfile.gettempdir()) / f"xlstm-metal-{uid}"
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
            # A shared temporary directory: never write records into someone else's folder.
            raise PermissionError(f"{path} belongs to another user; set XLSTM_RUNTIME_DIR")
    return path


def record_path(pid: int, directory: Path | None = None) -> Path:
    return (directory or runtime_dir()) / f"{pid}.json"


def command_path(pid: int, directory: Path | None = None) -> Path:
    return (directory or runtime_dir()) / f"{pid}.cmd"


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, separators=(",", ":"), allow_nan=False))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def process_started(pid: int) -> float | None:
    """Start time of process ``pid`` (seconds since the epoch), None if it does not exist or is
    a zombie (ended, not yet reaped by its parent)."""
    if pid <= 0:  # no process (psutil raised ValueError for a negative pid)
        return None
    try:
        process = psutil.Process(pid)
        started = process.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0  # alive, owned by someone else
    try:
        # create_time answers for a zombie too: a job killed with SIGKILL whose parent has not
        # waited for it yet was listed as running, and took commands no one would read.
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        pass  # its start time answered: alive
    return started


def _alive(record: dict[str, Any]) -> bool:
    started = process_started(int(record["pid"]))
    if started is None:
        return False
    # A reused pid belongs to a process started after the record's job.
    # None: any process with the pid (pid 1 too) was a job, top's kill key signalled it
    recorded = record.get("process_started")
    return recorded is not None and (started < 0 or abs(started - float(recorded)) < 1.0)


#: Fields of a record that readers (top's table, its text and JSON) take as numbers (or null).
NUMBER_FIELDS = ("process_started", "started", "updated", "interval", "done", "total", "tokens", "tokens_per_s",
                 "prefill_tps", "decode_tps", "step", "loss", "lr", "progress", "rank", "world_size",
                 "publisher_cpu_s", "publishes")
MEMORY_FIELDS = ("usage", "rss", "mlx_active", "mlx_cache", "mlx_peak", "soft_limit", "hard_limit")


def _number(value: Any) -> bool:
    """None, or a finite int / float (a bool is no number here)."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond floats (a traceback in top)
        return False


def well_formed(record: Any) -> bool:
    """Whether ``record`` has the layout a job writes (:meth:`JobStatus.record`) where readers
    rely on it: a positive integer pid, numbers (or null) where numbers go, objects and lists
    where they go. A file that does not (corrupt, edited, another program's) is no job's record:
    a pid of -1 or a string "updated" stopped `xlstm-metal top` with a traceback."""
    if not isinstance(record, dict):
        return False
    pid = record.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False  # (pid 0 or below signals process groups: never a job's)
    if not all(_number(record.get(name)) for name in NUMBER_FIELDS):
        return False
    memory = record.get("memory")
    if memory is not None and not (isinstance(memory, dict) and all(_number(memory.get(k)) for k in MEMORY_FIELDS)
                                   and isinstance(memory.get("state"), (str, type(None)))):
        return False
    argv = record.get("argv")
    if argv is not None and not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        return False
    last = record.get("last_command")
    return last is None or (isinstance(last, dict)
                            and all(_number(last.get(k)) for k in ("at", "cache_before", "cache_after")))


def _read(path: Path) -> str:
    """A regular file's text; OSError for any other (a FIFO's read waited forever)."""
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(f"{path} is not a file")
        return fh.read().decode()


def _no_constant(name: str) -> None:  # (a NaN made `top --json` print invalid JSON)
    raise ValueError(name)


def read_jobs(directory: Path | None = None, clean: bool = True) -> list[dict[str, Any]]:
    """The records of running jobs, sorted by pid. Records of dead processes are skipped and,
    with ``clean``, deleted together with their command files; unreadable files are skipped."""
    directory = directory or runtime_dir(create=False)
    jobs = []
    try:
        entries = list(directory.glob("*.json"))
    except OSError:
        return []
    now = time.time()
    for path in entries:
        try:
            record = json.loads(_read(path), parse_constant=_no_constant)
        except (OSError, ValueError):
            continue  # vanished between listing and reading, or not JSON
        if not well_formed(record) or path.stem != str(record["pid"]):
            continue  # not one of ours (a corrupt or foreign file): never read, signalled or deleted
        pid = record["pid"]
        if not _alive(record):
            if clean:
                for stale in (path, command_path(pid, directory)):
                    try:
                        stale.unlink()
                    except OSError:
                        pass
            continue
        record["age_s"] = max(0.0, now - (record.get("updated") or now))  # (null: a TypeError)
        jobs.append(record)
    if clean:
        _clean_temporaries(directory, now)
    return sorted(jobs, key=lambda r: r["pid"])


#: A temporary file of :func:`atomic_write_json` older than this whose job is gone is removed.
TEMP_MAX_AGE_S = 30.0


def _clean_temporaries(directory: Path, now: float) -> None:
    """Remove ``.<pid>.json.*.tmp`` / ``.<pid>.cmd.*.tmp`` files that a process killed between
    writing and renaming (SIGKILL) left behind, once job ``pid`` no longer runs."""
    try:
        temporaries = list(directory.glob(".*.tmp"))
    except OSError:
        return
    for path in temporaries:
        pid, _, rest = path.name[1:].partition(".")
        if not pid.isdigit() or not rest.startswith(("json.", "cmd.")):
            continue
        try:
            if now - path.stat().st_mtime < TEMP_MAX_AGE_S or process_started(int(pid)) is not None:
                continue
            path.unlink()
        except OSError:
            pass


def send_command(pid: int, command: str, directory: Path | None = None) -> Path:
    """Ask job ``pid`` to run ``command`` (one of :data:`COMMANDS`); its publisher thread picks
    the file up within one poll interval and reports ``last_command`` in its record.
    ProcessLookupError where no record of ``pid`` is there or its process is gone."""
    if command not in COMMANDS:
        raise ValueError(f"unknown job command {command!r} (known: {', '.join(COMMANDS)})")
    # Not created here: where there is no runtime directory there is no job to ask.
    directory = directory or runtime_dir(create=False)
    record = record_path(pid, directory)
    try:
        alive = _alive(json.loads(_read(record)))
    except (FileNotFoundError, NotADirectoryError):  # no record (a file in the directory's place: none)
        alive = False
    except (OSError, ValueError, KeyError, TypeError):
        alive = process_started(pid) is not None  # a record being replaced, or unreadable: the process decides
    if not alive:  # a job killed with SIGKILL leaves its record: the request would reach no one
        raise ProcessLookupError(f"no running xlstm-metal job with pid {pid}")
    path = command_path(pid, directory)
    atomic_write_json(path, {"command": command, "sent": time.time(), "from_pid": os.getpid()})
    return path


def take_command(pid: int, directory: Path) -> dict[str, Any] | None:
    """The pending command of job ``pid`` (the file is removed), or None."""
    path = command_path(pid, directory)
    try:
        data = json.loads(_read(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        data = None
    try:
        path.unlink()
    except OSError:
        pass
    return data if isinstance(data, dict) else None
