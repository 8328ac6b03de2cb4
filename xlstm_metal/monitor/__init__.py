"""Monitoring of running jobs: status records, the memory watchdog, and `xlstm-metal top`.

For code that runs a job (a subcommand does this through the command line's wrapper)::

    from xlstm_metal.monitor import current_job, job_status, MemoryLimitExceeded

    job = current_job()                       # the running job, or a no-op stand-in
    job.update(phase="decode", done=n, total=N, tokens=n, decode_tps=tps)
    job.check()                               # safe point: may raise MemoryLimitExceeded
    job.watchdog.refusing()                   # servers: answer 503 while True

For readers: :func:`read_jobs` lists the records, :func:`send_command` asks a job to clear its
MLX cache.
"""

from .job import (FIELDS, JobStatus, add_job_arguments, current_job, job_from_args, job_status, note_on_sigterm,
                  partial_output)
from .records import read_jobs, runtime_dir, send_command
from .watchdog import EXIT_CODE, MemoryLimitExceeded, MemoryWatchdog, WatchdogConfig, parse_limit

__all__ = [
    "EXIT_CODE", "FIELDS", "JobStatus", "MemoryLimitExceeded", "MemoryWatchdog", "WatchdogConfig",
    "add_job_arguments", "current_job", "job_from_args", "job_status", "note_on_sigterm", "parse_limit",
    "partial_output", "read_jobs", "runtime_dir", "send_command",
]
