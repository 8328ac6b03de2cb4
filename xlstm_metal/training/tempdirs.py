"""A process's temporary folders, and the removal of those killed processes left.

``xlstm-metal train`` keeps the run's tokenizer in ``<temp dir>/xlstm-train-tok-<pid>-<random>``
(:data:`PREFIX`), and a rank of a distributed run the files it received from rank 0 in
``<temp dir>/xlstm-dist-<pid>-<random>`` (:data:`DIST_PREFIX`), and removes them when it ends,
also on Ctrl-C and SIGTERM. SIGKILL cannot be caught: such a process leaves its folder. So every
folder holds ``.lock``, flock-ed by its process for the folder's whole life (the kernel releases
a flock when its process dies, however it dies), and a new process first removes the folders of
its prefix that no live process holds: those whose lock is free and whose process (the pid in
the name) is gone, or is another process started since (a reused pid). A folder with a live
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
#: The folder of files a rank received from rank 0 (cli/train.py, distributed.share_path).
DIST_PREFIX = "xlstm-dist-"
LOCK = ".lock"


def name_pattern(prefix: str) -> re.Pattern:
    """The exact names of the folders of ``prefix`` (tempfile.mkdtemp's 8 random characters
    after the pid); group 1 is the pid."""
    return re.compile(re.escape(prefix) + r"([1-9][0-9]*)-[a-z0-9_]{8}")


#: The exact names of the tokenizer folders.
NAME = name_pattern(PREFIX)


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


def claim_dir(prefix: str, base: str | os.PathLike | None = None) -> tuple[Path, int]:
    """A new, empty folder ``<prefix><pid>-<random>`` in ``base`` (default: the system temp
    dir) and the descriptor of its ``.lock``, flock-ed: pass both to :func:`release_dir` at the
    end. Folders of ``prefix`` that killed processes left are removed first."""
    base = Path(base if base is not None else tempfile.gettempdir())
    remove_stale_dirs(prefix, base)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))
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


def release_dir(path: Path, fd: int) -> None:
    """Remove the folder of :func:`claim_dir`, then drop its lock."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)


def remove_stale_dirs(prefix: str, base: str | os.PathLike | None = None) -> list[Path]:
    """Remove the folders of ``prefix`` in ``base`` (default: the system temp dir) that no live
    process holds; returns them. Errors (a folder vanishing meanwhile, one not ours) leave it."""
    base = Path(base if base is not None else tempfile.gettempdir())
    pattern = name_pattern(prefix)
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
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
                    continue  # a live process holds it
            # Free: its process died, unless it still runs (before it took the lock).
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


def claim_tokenizer_dir(base: str | os.PathLike | None = None) -> tuple[Path, int]:
    """:func:`claim_dir` for a training run's tokenizer (``xlstm-train-tok-<pid>-<random>``)."""
    return claim_dir(PREFIX, base)


def release_tokenizer_dir(path: Path, fd: int) -> None:
    """Remove the folder of :func:`claim_tokenizer_dir`, then drop its lock."""
    release_dir(path, fd)


def remove_stale_tokenizer_dirs(base: str | os.PathLike | None = None) -> list[Path]:
    """:func:`remove_stale_dirs` for the tokenizer folders."""
    return remove_stale_dirs(PREFIX, base)
