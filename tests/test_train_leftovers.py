"""What `xlstm-metal train` leaves behind: the temporary tokenizer folders
(``<temp dir>/xlstm-train-tok-<pid>-<random>``) of runs killed with SIGKILL, which no handler
can remove, are removed by the next run; those of live runs and anything else stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from xlstm_metal.training import tempdirs
from xlstm_metal.training.tempdirs import claim_tokenizer_dir, release_tokenizer_dir, remove_stale_tokenizer_dirs

from conftest import start_claiming_process  # noqa: E402


def start_run(base: Path) -> tuple[subprocess.Popen, Path]:
    """A run's claim of a tokenizer folder, in a process of its own that then waits."""
    return start_claiming_process('path, fd = module.claim_tokenizer_dir(base)\n'
                                  '(path / "tokenizer.json").write_text("{}")', base)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_folder(base: Path, pid: int, suffix: str, lock: bool = True) -> Path:
    path = base / f"xlstm-train-tok-{pid}-{suffix}"
    path.mkdir()
    (path / "tokenizer.json").write_text("{}")
    if lock:
        (path / ".lock").touch()
    return path


def test_sigkilled_runs_folder_is_removed_and_live_ones_stay(tmp_path):
    killed, killed_dir = start_run(tmp_path)
    live, live_dir = start_run(tmp_path)
    try:
        assert killed_dir.parent == tmp_path and killed_dir.name.startswith(f"xlstm-train-tok-{killed.pid}-")
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert killed_dir.is_dir()  # SIGKILL: nothing ran to remove it

        gone = dead_pid()
        stale_no_lock = fake_folder(tmp_path, gone, "nolock00", lock=False)  # before the lock existed
        # A live process holding the pid since: started after the folder was last changed (reused).
        reused = fake_folder(tmp_path, live.pid, "reused00")
        os.utime(reused, (time.time() - 3600, time.time() - 3600))
        # A live process started before the folder, its lock not taken (yet): kept.
        unlocked_live = fake_folder(tmp_path, os.getppid(), "unlock00")
        others = [tmp_path / "xlstm-train-tok-abcdefgh",  # an older version's name: no pid
                  tmp_path / f"xlstm-train-tok-{gone}-abcdefgh.bak", tmp_path / f"xlstm-train-tok-{gone}-abc",
                  tmp_path / f"xlstm-other-{gone}-abcdefgh"]
        for path in others:
            path.mkdir()
        (tmp_path / f"xlstm-train-tok-{gone}-file0000").write_text("a file, not a folder")

        own, fd = claim_tokenizer_dir(tmp_path)  # the next run
        try:
            assert own.name.startswith(f"xlstm-train-tok-{os.getpid()}-") and (own / ".lock").is_file()
            assert not killed_dir.exists() and not stale_no_lock.exists() and not reused.exists()
            assert live_dir.is_dir() and (live_dir / "tokenizer.json").is_file() and unlocked_live.is_dir()
            assert all(path.is_dir() for path in others)
            assert (tmp_path / f"xlstm-train-tok-{gone}-file0000").is_file()
            # Another run's cleanup keeps this one's folder (its lock is held) and the live one's.
            assert remove_stale_tokenizer_dirs(tmp_path) == []
            assert own.is_dir() and live_dir.is_dir()
        finally:
            release_tokenizer_dir(own, fd)
        assert not own.exists()
    finally:
        live.kill()
        live.wait(timeout=30)
    # The live run ends the same way, SIGKILL: its folder goes with the next cleanup.
    assert live_dir.is_dir()
    assert remove_stale_tokenizer_dirs(tmp_path) == [live_dir] and not live_dir.exists()


def test_a_training_run_removes_a_killed_runs_folder_and_its_own(tmp_path, monkeypatch):
    from test_train_cli import make_corpus

    from xlstm_metal.cli import main

    base = tmp_path / "tmp"
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    stale = fake_folder(base, dead_pid(), "k1ll3d00")
    claimed = []

    def claim(*args):
        claimed.append(claim_tokenizer_dir(*args))
        path, fd = claimed[-1]
        assert not stale.exists()  # removed before the run made its own
        assert path.parent == base and path.name.startswith(f"xlstm-train-tok-{os.getpid()}-")
        return path, fd

    monkeypatch.setattr(tempdirs, "claim_tokenizer_dir", claim)
    corpus = make_corpus(tmp_path / "corpus")
    assert main(["train", str(corpus), "--out", str(tmp_path / "run"), "--config", "tiny", "--vocab-size", "300",
                 "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--eval-every", "2",
                 "--eval-batches", "1", "--val-fraction", "0.1", "--no-progress"]) == 0
    assert len(claimed) == 1
    assert (tmp_path / "run" / "checkpoint-0000002" / "tokenizer.json").is_file()
    assert not (tmp_path / "run" / "checkpoint-0000002" / ".lock").exists()
    assert list(base.glob("xlstm-train-tok-*")) == []  # the run's own folder is gone too


@pytest.mark.parametrize("name", ["xlstm-train-tok-0-abcdefgh", "xlstm-train-tok-12-ABCDEFGH",
                                  "xlstm-train-tok-12-abcdefg", "xlstm-train-tok-12-abcdefghi",
                                  "xlstm-train-tok--12-abcdefgh", "xlstm-train-tok-12-abcdefgh/"])
def test_only_the_exact_name_matches(name):
    assert tempdirs.NAME.fullmatch(name) is None
    assert tempdirs.NAME.fullmatch("xlstm-train-tok-12-abc_efg9")
