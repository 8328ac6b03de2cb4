"""Job status publishing: what every xlstm-metal command tells `xlstm-metal top`.

One background thread per job samples memory for the watchdog (every ``XLSTM_MEM_POLL_MS``),
writes the job's status record (every ``XLSTM_STATUS_INTERVAL`` seconds, default 1) and runs
commands sent by ``top`` (clear MLX's cache). The job's own code only assigns fields::

    from xlstm_metal.monitor import current_job, job_status

    with job_status("generate", model="path/to/ckpt") as job:   # the CLI does this for you
        job.update(phase="prefill", total=200)
        for n, chunk in enumerate(stream, 1):
            job.update(phase="decode", done=n, tokens=n, decode_tps=chunk.generation_tps)
            job.check()            # safe point: soft callbacks; MemoryLimitExceeded at the hard limit

Inside a command, deeper code reaches the job with :func:`current_job` (a no-op job when none
runs, e.g. in library use). ``update`` is a dict update (about a microsecond); ``check`` reads
two flags; neither touches the GPU, the file system or the host-device boundary.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import mlx.core as mx
import psutil

from .records import RECORD_VERSION, atomic_write_json, record_path, runtime_dir, take_command
from .watchdog import MemoryLimitExceeded, MemoryWatchdog, WatchdogConfig, device_kind, process_rss

#: Fields :meth:`JobStatus.update` accepts.
FIELDS = frozenset({
    "phase",          # load | prefill | decode | train | eval | save | idle | bench | convert | serve ...
    "done", "total",  # progress, in ``unit``
    "unit",           # "tokens" (default), "steps", "requests", "tensors", "trials", ...
    "tokens",         # tokens processed so far (the publisher derives tokens_per_s from it)
    "tokens_per_s",   # set explicitly when the job measures it itself (overrides the derived rate)
    "prefill_tps", "decode_tps",
    "step", "loss", "lr",
    "model", "device", "message",
})
DEFAULT_INTERVAL = 1.0
#: Bounds of the record interval (seconds): at 0 or below the publisher thread never waited (it
#: rewrote the record ~1,000 times a second), and nan / inf failed in the first record's JSON.
MIN_INTERVAL, MAX_INTERVAL = 0.01, 3600.0
#: tokens_per_s is measured over this many records.
RATE_WINDOW = 4
#: Tokens between the agreements of a distributed run's processes on a memory stop (a collective
#: and a host sync each: not per token).
AGREE_EVERY_TOKENS = 16
#: Seconds a job may leave a SIGTERM unhandled (its main thread stuck in native code, e.g. an MLX
#: collective waiting for a process that died) before the publisher thread ends the process.
SIGTERM_GRACE_S = 5.0


class JobStatus:
    """Publishes one job's status record and runs its memory watchdog.

    Args:
        command: the subcommand ("generate", "train", ...).
        model: what the job works on (checkpoint path, shape, ...).
        watchdog: limits (default: from the environment, see :mod:`.watchdog`); None or
            ``enabled=False`` turns the watchdog off.
        hard_action: "stop" (raise :class:`MemoryLimitExceeded` at :meth:`check`) or "refuse"
            (servers: see :meth:`refusing`).
        interval: seconds between records (default ``$XLSTM_STATUS_INTERVAL`` or 1).
        directory: where records go (default :func:`records.runtime_dir`).
    """

    def __init__(self, command: str, model: str | None = None, *, watchdog: WatchdogConfig | None = None,
                 hard_action: str = "stop", interval: float | None = None, directory: Path | None = None,
                 argv: list[str] | None = None):
        self.command = command
        self.pid = os.getpid()
        self.argv = list(sys.argv if argv is None else argv)
        if self.argv and self.argv[0].endswith(("xlstm_metal/__main__.py", "xlstm_metal\\__main__.py")):
            self.argv[0] = "xlstm-metal"  # `python -m xlstm_metal` reads as the command it is
        self.interval = _record_interval(interval)
        try:
            self.directory: Path | None = directory or runtime_dir()
        except OSError as err:  # the job runs on without a record (and with its watchdog)
            print(f"xlstm-metal: warning: no status record for `xlstm-metal top`: {err}", file=sys.stderr)
            self.directory = None
        self.path = record_path(self.pid, self.directory) if self.directory else None
        self.fields: dict[str, Any] = {"phase": "load", "model": model, "unit": "tokens"}
        self.watchdog = MemoryWatchdog(watchdog, hard_action=hard_action) if watchdog and watchdog.enabled else None
        self._device = device_kind()
        info = mx.device_info()
        self._device_name = str(info.get("device_name") or info.get("name") or self._device)
        self._process = psutil.Process()
        self._started = time.time()
        self._process_started = self._process.create_time()
        self._owner = threading.get_ident()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rates: deque[tuple[float, int]] = deque([(time.monotonic(), 0)], maxlen=RATE_WINDOW + 1)
        self._last_command: dict[str, Any] | None = None
        self._publisher_cpu = 0.0
        self._publishes = 0
        self._old_sigterm: Any = None
        self._wakeup: tuple[int, int] | None = None  # (read, write) pipe of signal.set_wakeup_fd
        self._sigterm_at: float | None = None
        self._count_lock = threading.Lock()
        self._active = 0

    # ------------------------------------------------------------------ job side (cheap)
    def update(self, **fields: Any) -> None:
        """Set status fields (see :data:`FIELDS`); the next record carries them."""
        if not FIELDS.issuperset(fields):
            raise TypeError(f"unknown status field(s): {', '.join(sorted(set(fields) - FIELDS))}")
        self.fields.update(fields)

    def check(self, note: str = "") -> None:
        """A safe point (call between steps, on the job's main thread): runs soft-limit
        callbacks; raises :class:`MemoryLimitExceeded` when the hard limit asks the job to stop
        (``note`` is added to the message, e.g. where a checkpoint went)."""
        wd = self.watchdog
        if wd is None or not wd.pending:
            return
        wd.run_soft_callbacks()
        if wd.stop_requested and threading.get_ident() == self._owner:
            raise wd.error(note)

    def check_all(self, note: str = "", group: Any = None) -> None:
        """A safe point that every process of a distributed run reaches together (``group``,
        default: the joined ``mlx.launch`` world): one collective, so call it on every rank at
        the same point. When the hard limit asks any process to stop, every one raises
        :class:`MemoryLimitExceeded` (the one over its limit naming its usage, the others naming
        that rank), so none is left waiting in a later collective for a process that has gone;
        soft-limit callbacks run on every process when any crossed its soft limit (they must
        change all alike, e.g. prefill pieces). A process on its own: :meth:`check`."""
        from ..distributed.comm import joined_world

        group = group or joined_world()
        if group is None or group.size() == 1:
            return self.check(note)
        wd = self.watchdog
        mine = [int(wd is not None and wd.stop_requested), int(wd is not None and wd.soft_pending)]
        flags = mx.distributed.all_gather(mx.array([mine], dtype=mx.int32), group=group).tolist()
        n, rank = group.size(), group.rank()
        if wd is not None and any(soft for _, soft in flags):
            wd.run_soft_callbacks(force=True)
        over = [r for r, (stop, _) in enumerate(flags) if stop]
        if not over:
            return
        if rank in over:
            raise MemoryLimitExceeded(f"rank {rank} of {n}: {wd.error(note)}")
        who = (f"rank {over[0]} reached its hard memory limit" if len(over) == 1 else
               f"ranks {', '.join(map(str, over))} reached their hard memory limits")
        raise MemoryLimitExceeded(f"rank {rank} of {n}: {who}: every process stopped cleanly"
                                  f"{'; ' + note if note else ''}")

    def stopping(self) -> bool:
        """True once the hard limit asks the job to stop (lets a job save before :meth:`check`)."""
        return self.watchdog is not None and self.watchdog.stop_requested

    def refusing(self) -> bool:
        """For servers (``hard_action="refuse"``, which `serve` gets): the hard limit was reached
        and usage is not yet back under the soft limit; answer new requests with 503 meanwhile."""
        return self.watchdog is not None and self.watchdog.refusing()

    def on_soft(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` at the next :meth:`check` after the soft limit is crossed."""
        if self.watchdog is not None:
            self.watchdog.on_soft(callback)

    def track_requests(self, responses: Iterable[Any]) -> Iterator[Any]:
        """Servers: pass one request's stream of generated pieces (one token each) through,
        counting requests (``done``) and tokens, from any handler thread; the phase is
        "serve" while a request streams, "idle" otherwise."""
        fields = self.fields
        with self._count_lock:
            self._active += 1
            fields.update(phase="serve", done=(fields.get("done") or 0) + 1, unit="requests")
        try:
            for piece in responses:
                with self._count_lock:
                    fields["tokens"] = (fields.get("tokens") or 0) + 1
                yield piece
        finally:
            with self._count_lock:
                self._active -= 1
                if not self._active:
                    fields["phase"] = "idle"

    def shrink_prefill_on_soft(self, runner: Any, floor: int = 128) -> None:
        """At the soft limit, halve ``runner.prefill_chunk_size`` (not below ``floor``): the
        next prompt is fed in smaller pieces."""
        def shrink() -> None:
            runner.prefill_chunk_size = max(floor, runner.prefill_chunk_size // 2)
        self.on_soft(shrink)

    def track_generation(self, chunks: Iterable[Any], total: int | None = None) -> Iterator[Any]:
        """Pass a runner's stream of GenerationChunks through, publishing progress and speed;
        after each chunk is handed on, a safe point (:meth:`check`).

        In a distributed run (every rank generates the same tokens) the ranks agree instead
        (:meth:`check_all`) every :data:`AGREE_EVERY_TOKENS` tokens and at the end: a stop
        stops all of them at the same token, where one rank stopping alone left the others
        waiting in the next step's collective."""
        from ..distributed.comm import joined_world

        base = self.fields.get("tokens") or 0  # cumulative over chat turns: a steady rate
        self.update(phase="prefill", done=0, total=total, unit="tokens")
        fields, wd, group = self.fields, self.watchdog, joined_world()
        agree_at = AGREE_EVERY_TOKENS if group is not None else None
        try:
            for chunk in chunks:  # per token: one dict update and one flag read (update() minus its checks)
                n = chunk.generation_tokens
                fields.update(phase="decode", done=n, tokens=base + n, prefill_tps=chunk.prompt_tps,
                              decode_tps=chunk.generation_tps)
                yield chunk
                if agree_at is not None:
                    if n >= agree_at:  # the same token on every rank
                        agree_at = n + AGREE_EVERY_TOKENS
                        self.check_all(group=group)
                elif wd is not None and wd.pending:
                    self.check()
            if group is not None:
                self.check_all(group=group)  # a stop asked for since the last agreement
        finally:  # also when the consumer stops early (Ctrl-C in chat)
            fields["phase"] = "idle"

    # ------------------------------------------------------------------ publisher thread
    def record(self) -> dict[str, Any]:
        """The status record as published now."""
        # JSON has no inf / nan (a prompt fed in no measurable time has an infinite rate).
        fields = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in self.fields.items()}
        now, mono = time.time(), time.monotonic()
        tokens = fields.get("tokens")
        if tokens is not None and self._rates and tokens < self._rates[-1][1]:
            self._rates.clear()  # the counter restarted
        self._rates.append((mono, tokens or 0))
        if fields.get("tokens_per_s") is None and tokens is not None:  # a job counting no tokens has no rate
            # Over the last few records: a training step longer than the interval still shows a rate.
            (t0, n0), (t1, n1) = self._rates[0], self._rates[-1]
            fields["tokens_per_s"] = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        wd = self.watchdog
        s = wd.last if wd is not None else None
        if s is None:
            rss = process_rss(self._process)
            active, cache, peak = mx.get_active_memory(), mx.get_cache_memory(), mx.get_peak_memory()
            usage = max(rss, active + cache) if self._device != "cuda" else active + cache
        else:
            rss, active, cache, peak, usage = s.rss, s.active, s.cache, s.peak, s.usage
        done, total = fields.get("done"), fields.get("total")
        from ..distributed.comm import process_rank  # here: importing the monitor stays light

        rank, world_size = process_rank() or (None, 1)  # the ranks of one mlx.launch job tell apart by it
        return {
            "version": RECORD_VERSION, "pid": self.pid, "process_started": self._process_started,
            "host": socket.gethostname(), "command": self.command, "argv": self.argv,
            "rank": rank, "world_size": world_size,
            "started": self._started, "updated": now, "interval": self.interval,
            **fields,
            "progress": (done / total) if done is not None and total else None,
            "device": fields.get("device") or self._device, "device_name": self._device_name,
            "memory": {
                "usage": usage, "rss": rss, "mlx_active": active, "mlx_cache": cache, "mlx_peak": peak,
                "soft_limit": wd.config.soft if wd else None, "hard_limit": wd.config.hard if wd else None,
                "state": ("hard" if wd.over_hard_limit() else "soft" if wd.over_soft_limit() else "ok") if wd else "off",
                "samples": wd.samples if wd else 0, "soft_events": wd.soft_events if wd else 0,
                "hard_events": wd.hard_events if wd else 0,
            },
            "last_command": self._last_command,
            "publisher_cpu_s": self._publisher_cpu, "publishes": self._publishes,
        }

    def publish(self) -> None:
        """Write the record now (atomically)."""
        if self.path is None:
            return
        atomic_write_json(self.path, self.record())
        self._publishes += 1

    def _run_command(self) -> None:
        if self.directory is None:
            return
        cmd = take_command(self.pid, self.directory)
        if cmd is None:
            return
        name = cmd.get("command")
        entry: dict[str, Any] = {"command": name, "at": time.time()}
        if name == "clear_cache":
            before = mx.get_cache_memory()
            mx.clear_cache()  # MLX's allocator is thread-safe
            entry.update(cache_before=before, cache_after=mx.get_cache_memory(), ok=True)
        else:
            entry.update(ok=False, error=f"unknown command {name!r}")
        self._last_command = entry

    def _loop(self) -> None:
        cpu0 = time.thread_time()
        poll = self.watchdog.config.poll_s if self.watchdog else self.interval
        tick = min(poll, self.interval)
        failed = False
        next_publish = time.monotonic() + self.interval
        while not self._stop.wait(tick):
            self._check_sigterm()
            try:
                if self.watchdog is not None:
                    self.watchdog.sample()
                if time.monotonic() >= next_publish:
                    next_publish += self.interval
                    self._run_command()
                    self._publisher_cpu = time.thread_time() - cpu0
                    self.publish()
                    failed = False
            except OSError as err:  # e.g. the runtime directory vanished: keep the job running
                if not failed:  # (not every 10 intervals)
                    print(f"xlstm-metal: status record not written: {err}", file=sys.stderr)
                failed = True
                next_publish = time.monotonic() + 10 * self.interval
                with contextlib.suppress(OSError, AttributeError):  # removed by a tmp cleaner?
                    self.path.parent.mkdir(mode=0o700)

    # ------------------------------------------------------------------ lifetime
    def start(self) -> "JobStatus":
        global _CURRENT
        if self.watchdog is not None:
            self.watchdog.sample()  # know the memory state before the first step
        try:
            self.publish()
        except OSError as err:  # (it ended the job)
            print(f"xlstm-metal: warning: no status record for `xlstm-metal top`: {err}", file=sys.stderr)
            self.path = self.directory = None
        self._thread = threading.Thread(target=self._loop, name="xlstm-status", daemon=True)
        self._thread.start()
        atexit.register(self._remove)
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            # SIGTERM (kill, top's kill key) unwinds like Ctrl-C does, so the record is removed.
            self._old_sigterm = signal.signal(signal.SIGTERM, _terminate)
            self._watch_signals()
        _CURRENT = self
        return self

    def _remove(self) -> None:
        if self.path is None:
            return
        for path in (self.path, self.path.with_suffix(".cmd")):
            try:
                path.unlink()
            except OSError:  # (NotADirectoryError ended the job)
                pass

    def close(self) -> None:
        global _CURRENT
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._remove()
        atexit.unregister(self._remove)
        if self.watchdog is not None:
            self.watchdog.close()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        self._unwatch_signals()
        if _CURRENT is self:
            _CURRENT = None

    def __enter__(self) -> "JobStatus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


    # ------------------------------------------------------------------ SIGTERM while stuck
    # Python runs a signal handler only when the main thread executes Python code. A main thread
    # blocked in native code (an MLX collective whose peer died under mlx.launch) would defer
    # the handler forever: SIGTERM, which ends the process by default, no longer would, and
    # mlx.launch waits for it forever. The C-level handler writes the signal number to the
    # wakeup fd at once, so the publisher thread sees the SIGTERM and ends the process when the
    # Python handler has not run within SIGTERM_GRACE_S.
    def _watch_signals(self) -> None:
        try:
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
        except (OSError, AttributeError):
            return
        try:
            old = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        except (ValueError, OSError):
            old = None
        if old != -1:  # someone else reads the wakeup fd (or it cannot be set): leave it to them
            if old is not None:
                signal.set_wakeup_fd(old)
            os.close(read)
            os.close(write)
            return
        self._wakeup = (read, write)

    def _unwatch_signals(self) -> None:
        if self._wakeup is None:
            return
        try:
            current = signal.set_wakeup_fd(-1)
            if current not in (-1, self._wakeup[1]):
                signal.set_wakeup_fd(current)  # someone replaced ours since: keep theirs
        except ValueError:  # not the main thread: leave the fd set, harmless once we stop reading
            return
        for fd in self._wakeup:
            os.close(fd)
        self._wakeup = None

    def _check_sigterm(self) -> None:
        if self._wakeup is None:
            return
        try:
            data = os.read(self._wakeup[0], 512)
        except (BlockingIOError, OSError):
            data = b""
        if signal.SIGTERM in data and self._sigterm_at is None:
            self._sigterm_at = time.monotonic()
        if self._sigterm_at is None or _TERM_HANDLED or signal.getsignal(signal.SIGTERM) is not _terminate:
            return
        if time.monotonic() - self._sigterm_at >= SIGTERM_GRACE_S:
            if _TERM_NOTE:
                print(_TERM_NOTE, file=sys.stderr)
            print(f"xlstm-metal: SIGTERM: the main thread did not return from native code within "
                  f"{SIGTERM_GRACE_S:g} s (waiting on another process?); exiting", file=sys.stderr, flush=True)
            self._remove()
            for path in list(_PARTIAL):  # the main thread's cleanup will never run: do it here
                shutil.rmtree(path, ignore_errors=True)
            os._exit(128 + signal.SIGTERM)


def _record_interval(interval: float | None) -> float:
    """``interval``, else ``$XLSTM_STATUS_INTERVAL``, else 1 s; ValueError naming its source
    outside [MIN_INTERVAL, MAX_INTERVAL] (a command line reports it as a usage error)."""
    if interval is not None:
        source, text = "interval", interval
    else:
        source, text = "XLSTM_STATUS_INTERVAL", os.environ.get("XLSTM_STATUS_INTERVAL", "").strip() or DEFAULT_INTERVAL
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:  # also nan
        raise ValueError(f"{source} must be a number of seconds in [{MIN_INTERVAL:g}, {MAX_INTERVAL:g}], got {text!r}")
    return value


#: Set when :func:`_terminate` ran (the main thread took the SIGTERM).
_TERM_HANDLED = False
#: Printed (stderr) when SIGTERM ends the process; see :func:`note_on_sigterm`.
_TERM_NOTE: str | None = None
#: Directories being written, removed if SIGTERM forces the process out; see :func:`partial_output`.
_PARTIAL: list[Path] = []


def _terminate(signum, _frame):
    global _TERM_HANDLED
    _TERM_HANDLED = True
    if _TERM_NOTE:
        print(_TERM_NOTE, file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def note_on_sigterm(note: str) -> None:
    """Print ``note`` (stderr) when SIGTERM ends this process, whether the main thread takes the
    signal (it unwinds: SystemExit) or is stuck in native code and the job's thread ends the
    process after SIGTERM_GRACE_S. Installs the unwinding handler if SIGTERM still has its default."""
    global _TERM_NOTE
    _TERM_NOTE = note
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)


@contextlib.contextmanager
def partial_output(path: Path) -> Iterator[Path]:
    """Mark the directory ``path`` as being written for the block: a process that SIGTERM forces
    out while the main thread is stuck in native code removes it (an unwinding main thread
    removes its own partial output)."""
    _PARTIAL.append(path)
    try:
        yield path
    finally:
        _PARTIAL.remove(path)


class _NoJob:
    """What :func:`current_job` returns outside a job: every call is a no-op."""

    watchdog = None
    command = None

    def update(self, **fields: Any) -> None:
        pass

    def check(self, note: str = "") -> None:
        pass

    def check_all(self, note: str = "", group: Any = None) -> None:
        pass

    def stopping(self) -> bool:
        return False

    def refusing(self) -> bool:
        return False

    def on_soft(self, callback: Callable[[], None]) -> None:
        pass

    def shrink_prefill_on_soft(self, runner: Any, floor: int = 128) -> None:
        pass

    def track_generation(self, chunks: Iterable[Any], total: int | None = None) -> Iterable[Any]:
        return chunks

    def track_requests(self, responses: Iterable[Any]) -> Iterable[Any]:
        return responses


_CURRENT: JobStatus | None = None
_NO_JOB = _NoJob()


def current_job() -> JobStatus | _NoJob:
    """The job this process is running (a no-op stand-in when none)."""
    return _CURRENT or _NO_JOB


@contextlib.contextmanager
def job_status(command: str, model: str | None = None, *, watchdog: WatchdogConfig | None | str = "env",
               hard_action: str = "stop", interval: float | None = None) -> Iterator[JobStatus]:
    """Publish a status record (and run the memory watchdog) for the duration of the block.

    ``watchdog="env"`` reads the limits from the environment; pass a :class:`WatchdogConfig`
    or None (off). Re-entrant: inside a running job this yields that job (``model`` updates it).
    """
    if _CURRENT is not None:
        if model is not None:
            _CURRENT.update(model=model)
        yield _CURRENT
        return
    config = WatchdogConfig.from_sources() if watchdog == "env" else watchdog
    with JobStatus(command, model, watchdog=config, hard_action=hard_action, interval=interval) as job:
        yield job


# ---------------------------------------------------------------------- command line
def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The memory watchdog's flags (every job command has them)."""
    group = parser.add_argument_group(
        "memory watchdog", "Stops the job cleanly (exit code 3) at the hard limit; at the soft limit clears "
        "MLX's cache and shrinks prefill pieces. Sizes: 12GB, 512MB, or N% of the device's memory.")
    group.add_argument("--mem-soft", metavar="SIZE",
                       help="soft limit (default: $XLSTM_MEM_SOFT_MB / _PCT, else 80%%)")
    group.add_argument("--mem-hard", metavar="SIZE",
                       help="hard limit (default: $XLSTM_MEM_HARD_MB / _PCT, else 90%%)")
    group.add_argument("--mem-log", metavar="FILE.csv",
                       help="write every memory sample to this CSV (appends to one of ours). Under mlx.launch "
                            "it has a last column, rank: the ranks on one machine append to the one file, their "
                            "rows told apart by it (a log without that column is refused: give a new file)")
    group.add_argument("--no-mem-watchdog", action="store_true", help="turn the watchdog off (XLSTM_MEM_WATCHDOG=0)")


def job_from_args(args: argparse.Namespace) -> JobStatus:
    """A (not yet started) job for a parsed command line; ValueError on bad limits."""
    env = dict(os.environ)
    if getattr(args, "no_mem_watchdog", False):
        env["XLSTM_MEM_WATCHDOG"] = "0"
    config = WatchdogConfig.from_sources(getattr(args, "mem_soft", None), getattr(args, "mem_hard", None),
                                         getattr(args, "mem_log", None), env=env)
    given = [f"--{name.replace('_', '-')}" for name in ("mem_soft", "mem_hard", "mem_log") if getattr(args, name, None)]
    if given and not config.enabled:  # an off watchdog sets no limit and writes no log
        why = "--no-mem-watchdog" if getattr(args, "no_mem_watchdog", False) else \
            f"XLSTM_MEM_WATCHDOG={os.environ.get('XLSTM_MEM_WATCHDOG', '')}"
        raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} the memory watchdog, which "
                         f"{why} turns off: leave out one or the other")
    model = next((str(getattr(args, name)) for name in ("model", "init_from", "config", "shape", "source", "input", "arch")
                  if getattr(args, name, None)), "packaged model" if args.command in ("generate", "chat") else None)
    return JobStatus(args.command, model, watchdog=config,
                     hard_action="refuse" if args.command == "serve" else "stop")
