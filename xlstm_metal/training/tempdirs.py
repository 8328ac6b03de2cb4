"""A training run's temporary tokenizer folder, and the removal of those killed runs left.

``xlstm-metal train`` keeps the run's tokenizer in ``<temp dir>/xlstm-train-tok-<pid>-<random>``
and removes it when it ends, also on Ctrl-C and SIGTERM. SIGKILL cannot be caught: such a run
leaves its folder. So every folder holds ``.lock``, flock-ed by its run for the run's whole life
(the kernel releases a flock when its process dies, however it dies), and a new run first
removes the folders that no live run holds: those whose lock is free and whose process (the pid
in the name) is gone, or is another process started since (a reused pid). A folder with a live
owner, a folder of another user, or any other name is never touched.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

PREFIX = "xlstm-train-tok-"
#: The exact names of the folders (tempfile.mkdtemp's 8 random characters after the pid).
NAME = re.compile(re.escape(PREFIX) + r"([1-9][0-9]*)-[a-z0-9_]{8}")
LOCK = ".lock"


def _owner_alive(pid: int, made: float) -> bool:
    """Whether process ``pid`` runs and is the one that made a folder last changed at ``made``
    (a process started after that holds a reused pid). Unsure: alive."""
    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except (psutil.Error, OSError):
        return True
    return started <= made + 1.0


def claim_tokenizer_dir(base: str | os.PathLike | None = None) -> tuple[Path, int]:
    """A new, empty folder ``xlstm-train-tok-<pid>-<random>`` in ``base`` (default: the system
    temp dir) and the descriptor of its ``.lock``, flock-ed: pass both to
    :func:`release_tokenizer_dir` at the end. Folders killed runs left are removed first."""
    base = Path(base if base is not None else tempfile.gettempdir())
    remove_stale_tokenizer_dirs(base)
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path, fd


def release_tokenizer_dir(path: Path, fd: int) -> None:
    """Remove the folder of :func:`claim_tokenizer_dir`, then drop its lock."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)


def remove_stale_tokenizer_dirs(base: str | os.PathLike | None = None) -> list[Path]:
    """Remove the tokenizer folders in ``base`` (default: the system temp dir) that no live run
    holds; returns them. Errors (a folder vanishing meanwhile, one not ours) leave it."""
    base = Path(base if base is not None else tempfile.gettempdir())
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        match = NAME.fullmatch(name)
        if match is None:
            continue
        pid, path = int(match.group(1)), base / name
        if pid == os.getpid():
            continue
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        fd = None
        try:
            try:
                fd = os.open(path / LOCK, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                pass  # made just now (the lock follows) or by hand: the pid decides
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run holds it
            # Free: its run died, unless its process still runs (before it took the lock).
            if _owner_alive(pid, info.st_mtime):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except OSError:
            continue
        finally:
            if fd is not None:
                os.close(fd)
    return removed
