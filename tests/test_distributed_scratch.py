"""The folders of files a rank of `xlstm-metal train` received from rank 0
(``<temp dir>/xlstm-dist-<pid>-<random>``): every rank made one, used or not, and a rank killed
with SIGKILL (or forced out by SIGTERM while stuck) left its own. Now only a rank that receives
files makes one, every rank removes its own when it ends, and a run removes those that ranks
killed with SIGKILL left (training.tempdirs, as for the tokenizer folders) while live ones stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xlstm_metal.training import tempdirs
from xlstm_metal.training.tempdirs import DIST_PREFIX

from conftest import start_claiming_process  # noqa: E402
from distributed_helpers import free_port, launch_cmd, ring_env  # noqa: E402
from test_train_cli import make_corpus  # noqa: E402

TRAIN = ["--config", "tiny", "--vocab-size", "300", "--seq-len", "16", "--batch-size", "2", "--steps", "1",
         "--warmup", "1", "--eval-every", "1", "--eval-batches", "1", "--val-fraction", "0.1", "--no-progress"]

def hold_folder(base: Path) -> tuple[subprocess.Popen, Path]:
    """A process holding an xlstm-dist folder (with a shared-file folder in it) as a rank does."""
    return start_claiming_process('path, fd = module.claim_dir(module.DIST_PREFIX, base)\n'
                                  '(path / "shared-abcdefgh").mkdir()', base)


def private_tmp(tmp_path: Path) -> Path:
    """A temp dir of the test's own (TMPDIR) where the ranks make their folders, sharing the
    usual one's cache of MLX's compiled CPU kernels (``<temp dir>/mlx``): without it every
    launch compiles them again, a minute and more."""
    base = tmp_path / "tmp"
    base.mkdir()
    cache = Path(tempfile.gettempdir()) / "mlx"
    cache.mkdir(exist_ok=True)
    (base / "mlx").symlink_to(cache, target_is_directory=True)
    return base


def dist_folders(base: Path) -> set[str]:
    try:
        return {name for name in os.listdir(base) if name.startswith(DIST_PREFIX)}
    except OSError:
        return set()


def watch(procs: list[subprocess.Popen], base: Path, timeout: float = 300) -> set[str]:
    """Wait for ``procs``; returns the xlstm-dist folders seen in ``base`` meanwhile."""
    seen, deadline = set(), time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "the run did not end"
            seen |= dist_folders(base)
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return seen


def test_only_a_receiving_rank_makes_a_folder_and_a_killed_ranks_is_removed(tmp_path):
    """Rank 1 runs elsewhere (another working directory: the relative data path is not there)
    and receives rank 0's corpus; rank 0 sees its own files. Before the run, a rank killed with
    SIGKILL left its folder, and a live one holds another."""
    base = private_tmp(tmp_path)
    killed, killed_dir = hold_folder(base)
    live, live_dir = hold_folder(base)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert killed_dir.is_dir()  # SIGKILL: nothing ran to remove it
        older = base / f"{DIST_PREFIX}abcdefgh"  # an older version's name (no pid): not ours to judge
        older.mkdir()
        here, elsewhere = tmp_path / "rank0", tmp_path / "rank1"
        here.mkdir()
        elsewhere.mkdir()
        make_corpus(here / "corpus")
        out = tmp_path / "run"
        port = free_port(2)
        procs = []
        for rank, cwd in enumerate((here, elsewhere)):
            env = {**ring_env(rank, 2, port, tmp_path), "TMPDIR": str(base), "XLSTM_RUNTIME_DIR": str(tmp_path / "rt")}
            procs.append(subprocess.Popen([sys.executable, "-m", "xlstm_metal", "train", "corpus", "--out", out, *TRAIN],
                                          cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        seen = watch(procs, base)
        errs = [p.stderr.read().decode() for p in procs]
        for p, err in zip(procs, errs):
            assert p.returncode == 0, err[-3000:]
        assert (out / "checkpoint-0000001").is_dir()
        # Rank 1 received the corpus into a folder of its own, which is gone with the run.
        assert any(name.startswith(f"{DIST_PREFIX}{procs[1].pid}-") for name in seen), seen
        assert not any(name.startswith(f"{DIST_PREFIX}{procs[0].pid}-") for name in seen), seen  # rank 0: none
        assert not killed_dir.exists()  # the SIGKILLed rank's: removed by the run
        assert dist_folders(base) == {live_dir.name, older.name}  # the live one and the other name stay
        assert (live_dir / "shared-abcdefgh").is_dir()
    finally:
        for proc in (killed, live):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def test_ranks_that_see_rank0s_files_make_no_folder(tmp_path):
    """One machine, one working directory (mlx.launch): no rank needs a copy, none makes a folder."""
    base = private_tmp(tmp_path)
    make_corpus(tmp_path / "corpus")
    cmd = [sys.executable, "-m", "xlstm_metal", "train", tmp_path / "corpus", "--out", tmp_path / "run", *TRAIN]
    launcher = subprocess.Popen(launch_cmd(2, cmd), env={**os.environ, "TMPDIR": str(base),
                                                         "XLSTM_RUNTIME_DIR": str(tmp_path / "rt")},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = watch([launcher], base)
    err = launcher.stderr.read().decode()
    assert launcher.returncode == 0 and "exited with code" not in err, err[-3000:]
    assert (tmp_path / "run" / "checkpoint-0000001").is_dir(), err[-3000:]
    assert seen == set() and dist_folders(base) == set()


def test_the_folder_is_made_on_first_use_and_removed_at_the_end(tmp_path, monkeypatch):
    """The folder behind train's scratch (distributed.share_path makes one folder per path it
    receives in it, with tempfile.mkdtemp): none until share_path asks for it; locked while held;
    gone, with everything in it, when the run ends; made again by a later run in the process."""
    from xlstm_metal.cli.train import _Scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    scratch = _Scratch()
    assert scratch.path is None and list(tmp_path.iterdir()) == []
    used = Path(tempfile.mkdtemp(dir=scratch, prefix="shared-")) / "corpus"
    assert scratch.path.parent == tmp_path and scratch.path.name.startswith(f"{DIST_PREFIX}{os.getpid()}-")
    assert (scratch.path / tempdirs.LOCK).is_file() and used.parent.parent == scratch.path
    second = Path(tempfile.mkdtemp(dir=scratch, prefix="shared-"))
    assert second.parent == scratch.path  # one folder for the run's paths
    scratch.end()
    assert scratch.path is None and list(tmp_path.iterdir()) == []
    again = Path(tempfile.mkdtemp(dir=scratch, prefix="shared-"))
    assert again.parent == scratch.path and scratch.path.parent == tmp_path
    scratch.end()
    assert list(tmp_path.iterdir()) == []
