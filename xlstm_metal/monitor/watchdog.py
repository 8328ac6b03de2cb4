"""The memory watchdog: samples a job's memory from a background thread and enforces two limits.

Usage is what the job holds: on unified memory (Metal, CPUs) the larger of the process RSS and
MLX's active + cached buffers; on a discrete GPU (CUDA) MLX's active + cached device memory.
Sampling uses cheap host calls (``mx.get_active_memory`` and friends, the RSS), never a GPU sync.

- **Soft limit** (crossed): MLX's buffer cache is cleared and kept at zero until usage falls
  back below 90% of the soft limit, callbacks registered with :meth:`MemoryWatchdog.on_soft`
  run at the job's next safe point (e.g. smaller prefill pieces), and one warning is printed.
- **Hard limit** (still crossed after the soft action): the job is asked to stop. The job sees
  it at a safe point (between decode or training steps) and raises
  :class:`MemoryLimitExceeded`; the command line exits with code 3. A server instead refuses
  new requests while :meth:`MemoryWatchdog.refusing` is true (hard limit reached, not yet back
  under the soft limit).

Limits come from ``--mem-soft`` / ``--mem-hard`` (``12GB``, ``512MB``, ``80%`` of the device's
memory), else ``XLSTM_MEM_SOFT_MB`` / ``XLSTM_MEM_HARD_MB``, else ``XLSTM_MEM_SOFT_PCT`` /
``XLSTM_MEM_HARD_PCT``, else 80% / 90%. ``XLSTM_MEM_WATCHDOG=0`` turns the watchdog off,
``XLSTM_MEM_POLL_MS`` sets the sampling period (250), ``XLSTM_MEM_ACTION=warn`` only warns at
the hard limit (default ``stop``).

``--mem-log FILE.csv`` writes every sample as a CSV row (:data:`CSV_FIELDS`). A process that is
one rank of several (``mlx.launch``) adds a last column, ``rank``: the ranks on one machine
append to the same file, their rows told apart by it. An existing file is appended to only when
it is a log of ours whose columns the rows fit: a log without the ``rank`` column takes no rows
of a distributed job (it is refused: give a new file); a log with it takes a single process's
rows too, their ``rank`` empty.
"""

from __future__ import annotations

import csv
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TextIO

import mlx.core as mx
import psutil

from ..checks import probe_writable

DEFAULT_SOFT_PCT = 80.0
DEFAULT_HARD_PCT = 90.0
DEFAULT_POLL_MS = 250
#: Below this fraction of the soft limit the soft state ends (hysteresis: no flapping).
SOFT_RELEASE = 0.9
#: Exit code of a command stopped by the hard limit.
EXIT_CODE = 3
CSV_FIELDS = ("time", "elapsed_s", "usage_bytes", "rss_bytes", "mlx_active_bytes", "mlx_cache_bytes",
              "mlx_peak_bytes", "soft_bytes", "hard_bytes", "state", "event")
#: The columns of a distributed job's log: ``rank`` last (a column reader of the others is unchanged).
CSV_FIELDS_RANKED = CSV_FIELDS + ("rank",)

_UNITS = {"": 1e9, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_LIMIT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*$")


class MemoryLimitExceeded(Exception):
    """A job stopped at its hard memory limit (command line exit code 3)."""

    exit_code = EXIT_CODE


def gb(n: float) -> str:
    """Bytes as text: GB from 0.1 GB, MB from 0.1 MB, else kB (a limit of a few kB must not read
    as "0.0 MB")."""
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def parse_limit(text: str, total: int, name: str = "limit") -> int:
    """``"12"`` / ``"12GB"`` / ``"512MB"`` / ``"1.5GiB"`` / ``"80%"`` (of ``total`` bytes) ->
    bytes. A bare number is gigabytes. ValueError naming ``name`` on anything else."""
    match = _LIMIT_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or (unit != "%" and unit not in _UNITS):
        raise ValueError(f"{name} must be a size such as 12GB, 512MB or 80% (of {gb(total)}), got {text!r}")
    value = float(match.group(1))
    if unit == "%":
        if not 0 < value <= 100:
            raise ValueError(f"{name} must be a percentage in (0, 100], got {text!r}")
        size = int(total * value / 100)
    else:
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {text!r}")
        size = int(value * _UNITS[unit])
    if size < 1:  # a positive size under one byte was a limit of 0 bytes: every sample over it
        exact = value * (total / 100 if unit == "%" else _UNITS[unit])
        raise ValueError(f"{name} must be at least 1 byte, got {text!r} ({exact:.3g} bytes)")
    return size


def device_kind() -> str:
    """"metal", "cuda" or "cpu": where MLX's default device computes."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def device_memory(kind: str | None = None) -> int:
    """Bytes of memory the limits' percentages refer to: the GPU's on CUDA, else the machine's
    (unified on Metal)."""
    kind = kind or device_kind()
    if kind == "metal":
        size = mx.device_info().get("memory_size")
        if size:
            return int(size)
    if kind == "cuda":
        info = mx.device_info()
        for key in ("total_memory", "memory_size", "memory"):
            if info.get(key):
                return int(info[key])
        try:
            import pynvml

            pynvml.nvmlInit()
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
        except Exception:  # noqa: BLE001 -- no NVML: fall back to host memory
            pass
    return int(psutil.virtual_memory().total)


@dataclass
class WatchdogConfig:
    """Limits in bytes (None: no such limit) and how the watchdog runs."""

    soft: int | None
    hard: int | None
    total: int
    enabled: bool = True
    poll_s: float = DEFAULT_POLL_MS / 1000
    action: str = "stop"                  # at the hard limit: "stop" the job, or only "warn"
    log_path: Path | None = None
    soft_source: str = "default"          # where each limit came from (named in messages)
    hard_source: str = "default"
    #: (rank, world size; None: unknown) of a process that is one rank of several (its CSV rows
    #: name the rank), else None.
    rank: tuple[int, int | None] | None = None

    @classmethod
    def from_sources(cls, soft: str | None = None, hard: str | None = None, log: str | None = None,
                     env: Mapping[str, str] | None = None, total: int | None = None) -> "WatchdogConfig":
        """Limits from flags (``soft`` / ``hard`` text), else the environment, else defaults.
        ValueError naming the flag or variable on bad values."""
        env = os.environ if env is None else env
        total = total or device_memory()
        switch = env.get("XLSTM_MEM_WATCHDOG", "1").strip().lower()
        if switch not in ("", "1", "true", "yes", "on", "0", "false", "no", "off"):  # "disabled" left it on
            raise ValueError(f"XLSTM_MEM_WATCHDOG must be 1 or 0, got {env['XLSTM_MEM_WATCHDOG']!r}")
        enabled = switch not in ("0", "false", "no", "off")
        action = env.get("XLSTM_MEM_ACTION", "stop").strip().lower() or "stop"
        action = {"abort": "stop", "exit": "stop"}.get(action, action)
        if action not in ("stop", "warn"):
            raise ValueError(f"XLSTM_MEM_ACTION must be 'stop' or 'warn', got {env['XLSTM_MEM_ACTION']!r}")
        try:
            poll_ms = float(env.get("XLSTM_MEM_POLL_MS", DEFAULT_POLL_MS))
        except ValueError:
            raise ValueError(f"XLSTM_MEM_POLL_MS must be a number of milliseconds, got "
                             f"{env['XLSTM_MEM_POLL_MS']!r}") from None
        if not 10 <= poll_ms <= 60_000:
            raise ValueError(f"XLSTM_MEM_POLL_MS must be in [10, 60000], got {poll_ms:g}")

        def limit(flag_value, flag, which, default_pct):
            if flag_value is not None:
                return parse_limit(flag_value, total, flag), f"{flag} {flag_value}"
            for var, suffix, what in ((f"XLSTM_MEM_{which}_MB", "MB", "megabytes, such as 8000"),
                                      (f"XLSTM_MEM_{which}_PCT", "%", "percent of the device's memory, such as 80")):
                text = env.get(var, "").strip()
                if text:
                    # The variable holds a number only: '500M' was refused as "got '500MMB'", a value never given.
                    if not re.fullmatch(r"[0-9]*\.?[0-9]+", text):
                        raise ValueError(f"{var} must be a number of {what} (no unit), got {env[var]!r}")
                    try:
                        return parse_limit(text + suffix, total, var), f"{var}={text}"
                    except ValueError as err:
                        raise ValueError(str(err).replace(repr(text + suffix), repr(env[var]))) from None
            return int(total * default_pct / 100), f"default {default_pct:g}% of {gb(total)}"

        soft_bytes, soft_source = limit(soft, "--mem-soft", "SOFT", DEFAULT_SOFT_PCT)
        hard_bytes, hard_source = limit(hard, "--mem-hard", "HARD", DEFAULT_HARD_PCT)
        if soft_bytes >= hard_bytes:
            if soft_source.startswith("default") and not hard_source.startswith("default"):
                # a low hard limit alone (--mem-hard or XLSTM_MEM_HARD_*) moves the default soft limit under it
                if hard_bytes < 2:  # no soft limit of at least 1 byte fits below it (it was 0 bytes: always crossed)
                    raise ValueError(f"the hard memory limit ({hard_bytes} byte, {hard_source}) leaves no room for "
                                     "a soft limit of at least 1 byte below it: give a larger one")
                soft_bytes, soft_source = max(1, int(hard_bytes * DEFAULT_SOFT_PCT / DEFAULT_HARD_PCT)), \
                    f"{DEFAULT_SOFT_PCT / DEFAULT_HARD_PCT:.0%} of the hard limit"
            else:
                raise ValueError(f"the soft memory limit ({gb(soft_bytes)}, {soft_source}) must be below the "
                                 f"hard limit ({gb(hard_bytes)}, {hard_source})")
        log_path = Path(log).expanduser() if log else None
        rank = job_rank(env)
        if log_path is not None:
            check_log_path(log_path, rank)
        return cls(soft_bytes, hard_bytes, total, enabled, poll_ms / 1000, action, log_path, soft_source,
                   hard_source, rank)


def job_rank(env: Mapping[str, str] | None = None) -> tuple[int, int | None] | None:
    """(rank, world size; None: unknown) that ``mlx.launch`` (or mpirun) gave this process when
    it is one of several, read from ``env`` (default: the environment); None for a process on
    its own (a launch of one process included)."""
    from ..distributed.comm import launch_rank  # here: importing the watchdog stays light

    rank = launch_rank(os.environ if env is None else env)
    return None if rank is None or rank[1] == 1 else rank


def _rank_text(rank: tuple[int, int | None]) -> str:
    return f"rank {rank[0]} of {rank[1] or 'several'}"


def log_fields(path: Path) -> tuple[str, ...] | None:
    """The columns of the memory log ``path`` (:data:`CSV_FIELDS` or :data:`CSV_FIELDS_RANKED`);
    None where there is no file. ValueError for a file that cannot be read or is not a memory
    log of ours."""
    try:
        with open(path, newline="") as fh:
            header = fh.readline().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--mem-log {path} exists and cannot be read: {err}") from None
    for fields in (CSV_FIELDS, CSV_FIELDS_RANKED):
        if header == ",".join(fields):
            return fields
    raise ValueError(f"--mem-log {path} exists and is not a memory log of ours; give a new file")


def check_log_path(path: Path, rank: tuple[int, int | None] | None = None) -> None:
    """ValueError unless ``path`` can take the CSV of a process of ``rank`` (see
    :func:`job_rank`): an existing file is appended to only when it is one of ours whose columns
    the rows fit (see the module docstring), so nothing the user had is lost and every row has
    the header's columns."""
    if path.is_dir():
        raise ValueError(f"--mem-log {path} is a directory")
    if not path.parent.is_dir():
        what = "is a file, not a directory" if path.parent.exists() else "does not exist"
        raise ValueError(f"--mem-log: directory {path.parent} {what}")
    if not path.exists() and (reason := probe_writable(path.parent)) is not None:
        raise ValueError(f"--mem-log: directory {path.parent} is not writable ({reason})")
    if log_fields(path) == CSV_FIELDS and rank is not None:
        raise ValueError(f"--mem-log {path} is the memory log of a process on its own (no rank column); this "
                         f"process is {_rank_text(rank)}, whose rows name their rank: give a new file")


def _open_log(path: Path, rank: tuple[int, int | None] | None) -> tuple[TextIO, tuple[str, ...]]:
    """``path`` opened for appending rows, and the columns they take (the file's). A new file
    gets the header of ``rank``'s rows whole before any row can follow it (the ranks of one job
    start together and may all find no file): the header goes into a file of its own, which is
    then linked in as ``path`` unless another process made ``path`` first."""
    if not path.exists():
        import secrets

        text = ",".join(CSV_FIELDS_RANKED if rank is not None else CSV_FIELDS) + "\r\n"  # as csv.writer writes
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
        with open(tmp, "x", newline="") as fh:
            fh.write(text)
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process made it: its header is checked below
            except OSError:  # no hard links on this file system: create it, header first
                try:
                    with open(path, "x", newline="") as fh:
                        fh.write(text)
                except FileExistsError:
                    pass
        finally:
            os.unlink(tmp)
    check_log_path(path, rank)
    return open(path, "a", newline="", buffering=1), log_fields(path)


@dataclass(frozen=True)
class MemorySample:
    """One sample, in bytes. ``usage`` is what the limits are compared with."""

    time: float
    usage: int
    rss: int
    active: int
    cache: int
    peak: int


_RSS_WARNED = False


def process_rss(process: psutil.Process) -> int:
    """RSS; 0 (warned once) where unreadable (the error ended the watchdog's thread)."""
    global _RSS_WARNED
    try:
        return process.memory_info().rss
    except (psutil.Error, OSError) as err:
        if not _RSS_WARNED:
            _RSS_WARNED = True
            print(f"xlstm-metal: warning: cannot read the process's RSS ({type(err).__name__}); usage is MLX's "
                  "memory alone", file=sys.stderr, flush=True)
        return 0


def default_sampler(unified: bool) -> Callable[[], MemorySample]:
    """Cheap host calls only: MLX's allocator counters and the process RSS."""
    process = psutil.Process()

    def sample() -> MemorySample:
        active, cache, peak = mx.get_active_memory(), mx.get_cache_memory(), mx.get_peak_memory()
        rss = process_rss(process)
        usage = max(rss, active + cache) if unified else active + cache
        return MemorySample(time.time(), usage, rss, active, cache, peak)

    return sample


class MemoryWatchdog:
    """Compares samples with the limits; see the module docstring.

    Args:
        config: the limits.
        sampler: returns a :class:`MemorySample` (default: :func:`default_sampler`).
        hard_action: "stop" (commands: stop at a safe point) or "refuse" (servers: refuse
            requests while :meth:`refusing`).
        warn: where warnings go (default: stderr).
        clear_cache: what the soft action calls (default: ``mx.clear_cache``; MLX's allocator
            is thread-safe, so the sampler thread may call it).

    :meth:`sample` is called by the job's background thread every ``config.poll_s`` seconds;
    the other methods are cheap flag reads for the job's own threads.
    """

    def __init__(self, config: WatchdogConfig, *, sampler: Callable[[], MemorySample] | None = None,
                 hard_action: str = "stop", warn: TextIO | None = None,
                 clear_cache: Callable[[], None] | None = None):
        self.config = config
        self.hard_action = hard_action
        self._sampler = sampler or default_sampler(device_kind() != "cuda")
        self._mlx_limits = sampler is None  # set MLX's limits only when watching MLX itself
        self._warn = warn
        self._clear_cache = clear_cache or mx.clear_cache
        self._lock = threading.Lock()
        self.last: MemorySample | None = None
        self.samples = 0
        self.soft_events = 0
        self.hard_events = 0
        self._soft = False
        self._hard = False            # hard limit reached; latched for "stop"
        self._refusing = False
        self._warned_soft = self._warned_hard = False
        self._soft_callbacks: list[Callable[[], None]] = []
        self._soft_pending = False
        #: True while the job has something to do at its next safe point (soft callbacks to
        #: run, or a stop): the one attribute a safe point reads.
        self.pending = False
        self._t0 = time.time()
        self._log = self._log_writer = None
        self._cache_limit: int | None = None
        self._memory_limit: int | None = None
        self._log_rank: list[str] = []  # the rank column's value, where the log has one
        if config.enabled and config.log_path is not None:
            self._log, fields = _open_log(config.log_path, config.rank)
            self._log_writer = csv.writer(self._log)
            if fields == CSV_FIELDS_RANKED:
                self._log_rank = [str(config.rank[0]) if config.rank is not None else ""]
        if config.enabled and config.hard is not None and self._mlx_limits:
            # MLX's own guideline: evaluation waits for in-flight work before growing past it.
            current = mx.get_memory_limit()
            if not current or config.hard < current:
                self._memory_limit = mx.set_memory_limit(config.hard)

    # ------------------------------------------------------------------ sampling thread
    def sample(self) -> MemorySample:
        """Take one sample, act on the limits, log a CSV row; returns the sample."""
        s = self._sampler()
        event = []
        cfg = self.config
        if cfg.soft is not None and s.usage >= cfg.soft and not self._soft:
            self._soft = True
            self.soft_events += 1
            event.append("soft")
            self._soft_action(s)
            if cfg.hard is not None and s.usage >= cfg.hard:
                s = self._sampler()  # did clearing the cache bring it back under the hard limit?
        elif self._soft and s.usage < (cfg.soft or 0) * SOFT_RELEASE:
            self._soft = False
            event.append("under_soft")
            if self._cache_limit is not None:
                mx.set_cache_limit(self._cache_limit)
                self._cache_limit = None
        if cfg.hard is not None and s.usage >= cfg.hard:
            if not self._hard:
                self.hard_events += 1
                event.append("hard")
                self._on_hard(s)
            self._hard = True
        elif self._hard and (self.hard_action != "stop" or cfg.action == "warn"):
            self._hard = False
        if self._refusing and cfg.soft is not None and s.usage < cfg.soft:
            self._refusing = False
            event.append("accepting")
        self.pending = self._soft_pending or self.stop_requested
        with self._lock:
            self.last = s
            self.samples += 1
        if self._log_writer is not None:
            self._log_writer.writerow([f"{s.time:.3f}", f"{s.time - self._t0:.3f}", s.usage, s.rss, s.active, s.cache,
                                       s.peak, cfg.soft or "", cfg.hard or "",
                                       "hard" if self._hard else "soft" if self._soft else "ok", "+".join(event),
                                       *self._log_rank])
        return s

    def _print(self, text: str) -> None:
        print(f"xlstm-metal: {text}", file=self._warn or sys.stderr, flush=True)

    def _soft_action(self, s: MemorySample) -> None:
        self._clear_cache()
        if self._mlx_limits and self._cache_limit is None:
            self._cache_limit = mx.set_cache_limit(0)  # no new cached buffers while near the limit
        self._soft_pending = bool(self._soft_callbacks)
        if not self._warned_soft:
            self._warned_soft = True
            self._print(f"warning: memory {self.usage_text(s)} reached the soft limit {gb(self.config.soft)} "
                        f"({self.config.soft_source}): cleared MLX's cache"
                        + (", smaller prefill pieces" if self._soft_callbacks else "") + " (warned once)")

    def _on_hard(self, s: MemorySample) -> None:
        if self.hard_action == "refuse":
            self._refusing = True
            self._print(f"warning: memory {self.usage_text(s)} reached the hard limit {gb(self.config.hard)} "
                        f"({self.config.hard_source}): refusing new requests until under the soft limit")
        elif self.config.action == "warn" and not self._warned_hard:
            self._warned_hard = True
            self._print(f"warning: memory {self.usage_text(s)} reached the hard limit {gb(self.config.hard)} "
                        f"({self.config.hard_source}); XLSTM_MEM_ACTION=warn: continuing")

    # ------------------------------------------------------------------ job threads
    def on_soft(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` at the job's next safe point after each soft-limit crossing."""
        self._soft_callbacks.append(callback)

    @property
    def soft_pending(self) -> bool:
        """The soft limit was crossed and its callbacks have not run yet."""
        return self._soft_pending

    def run_soft_callbacks(self, force: bool = False) -> None:
        """Run the soft-limit callbacks if the soft limit was crossed since they last ran (or
        with ``force``: another process of a distributed run crossed its own, and all processes
        must change alike)."""
        if self._soft_pending or force:
            self._soft_pending = False
            self.pending = self.stop_requested
            for callback in self._soft_callbacks:
                callback()

    def over_soft_limit(self) -> bool:
        """Usage at or above the soft limit (until it falls below 90% of it)."""
        return self._soft

    def over_hard_limit(self) -> bool:
        return self._hard

    def refusing(self) -> bool:
        """For servers: the hard limit was reached and usage is not yet back under the soft
        limit; answer new requests with 503 meanwhile."""
        return self._refusing

    @property
    def stop_requested(self) -> bool:
        """The hard limit was reached and the action is to stop."""
        return self._hard and self.hard_action == "stop" and self.config.action == "stop"

    def usage_text(self, s: MemorySample | None = None) -> str:
        s = s or self.last
        if s is None:
            return "unknown"
        return f"{gb(s.usage)} (RSS {gb(s.rss)}, MLX active {gb(s.active)}, cache {gb(s.cache)})"

    def error(self, note: str = "") -> MemoryLimitExceeded:
        """The exception a job raises at the hard limit: names the limit and the usage."""
        return MemoryLimitExceeded(
            f"memory {self.usage_text()} reached the hard limit {gb(self.config.hard)} ({self.config.hard_source}); "
            f"stopped cleanly{'; ' + note if note else ''}")

    def close(self) -> None:
        """Close the CSV and give MLX its previous limits back."""
        if self._log is not None:
            self._log.close()
            self._log = self._log_writer = None
        if self._cache_limit is not None:
            mx.set_cache_limit(self._cache_limit)
            self._cache_limit = None
        if self._memory_limit is not None:
            mx.set_memory_limit(self._memory_limit)
            self._memory_limit = None
