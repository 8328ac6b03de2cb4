"""Data-parallel `xlstm-metal train` under `mlx.launch` (2 local processes, ring backend).

Each global batch is split across the ranks and gradients are averaged, so the weights after
k steps equal a single process's with the same global batch (float32). Every launch runs under
a timeout so a hung collective fails the test instead of hanging it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from xlstm_metal.cli import main
from xlstm_metal.loading import load_model, read_weights

from distributed_helpers import assert_memory_stop, free_port, launch_cmd, ring_env  # noqa: E402
from test_train_cli import make_corpus, override  # noqa: E402

ARGS = ["--config", "tiny", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--warmup", "2",
        "--log-every", "1", "--lr", "3e-3", "--no-progress", "--val-fraction", "0.1", "--eval-every", "2",
        "--save-every", "2", "--keep", "5"]


def train_args(*pairs: str) -> list[str]:
    """ARGS with each ``FLAG VALUE`` of ``pairs`` in place of that flag's value (or added): a
    command line gives an option once (a repeat is refused)."""
    return override(ARGS, *pairs)


def xlstm_cmd(*args):
    return [sys.executable, "-m", "xlstm_metal", *map(str, args)]


def assert_same_weights(a_dir: Path, b_dir: Path, rel: float = 1e-5):
    a, b = read_weights(a_dir), read_weights(b_dir)
    assert a.keys() == b.keys()
    for key in a:
        x, y = np.array(a[key], np.float64), np.array(b[key], np.float64)
        err = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
        assert err <= rel, f"{key}: relative difference {err:.2e}"


def records(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4-step run in one process and in two (mlx.launch -n 2)."""
    tmp = tmp_path_factory.mktemp("dist")
    corpus = make_corpus(tmp / "corpus")
    single, double = tmp / "single", tmp / "double"
    assert main(["train", str(corpus), "--out", str(single), *ARGS, "--steps", "4"]) == 0
    proc = subprocess.run(launch_cmd(2, xlstm_cmd("train", corpus, "--out", double, *ARGS, "--steps", "4")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, corpus, single, double, proc


@pytest.mark.slow  # three to four launches of two processes
def test_two_processes_train_the_same_weights_as_one(runs):
    tmp, corpus, single, double, proc = runs
    for step in (2, 4):
        assert_same_weights(double / f"checkpoint-{step:07d}", single / f"checkpoint-{step:07d}")
    # The optimizer state too (it decides every later step).
    opt_a = mx.load(str(double / "checkpoint-0000004" / "optimizer.safetensors"))
    opt_b = mx.load(str(single / "checkpoint-0000004" / "optimizer.safetensors"))
    assert opt_a.keys() == opt_b.keys()
    for key in opt_a:
        x, y = np.array(opt_a[key], np.float64), np.array(opt_b[key], np.float64)
        assert np.linalg.norm(x - y) <= 1e-5 * max(np.linalg.norm(y), 1e-30), key
    # Rank 0 alone writes: one metrics file with one record per step, marked with the world size.
    rec_single, rec_double = records(single), records(double)
    assert [r["world_size"] for r in rec_double] == [2] * len(rec_double)
    assert {r["world_size"] for r in rec_single} == {1}
    train_single = [r["loss"] for r in rec_single if r["kind"] == "train"]
    train_double = [r["loss"] for r in rec_double if r["kind"] == "train"]
    assert len(train_double) == 4 and np.allclose(train_double, train_single, rtol=1e-5)
    evals = [(r["step"], r["val_loss"]) for r in rec_double if r["kind"] == "eval"]
    assert [s for s, _ in evals] == [2, 4]
    assert np.allclose([v for _, v in evals], [r["val_loss"] for r in rec_single if r["kind"] == "eval"], rtol=1e-5)
    assert json.loads((double / "summary.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in double.iterdir()) == sorted(p.name for p in single.iterdir())
    assert proc.stderr.count("done: 4 steps") == 1  # only rank 0 reports


@pytest.mark.slow  # three to four launches of two processes
def test_resume_with_another_world_size(runs):
    """A one-process checkpoint continues under two processes, and a two-process one under one,
    to the weights of the uninterrupted single-process run."""
    tmp, corpus, single, double, _ = runs
    for name, source, world in (("to_two", single, 2), ("to_one", double, 1)):
        run = tmp / name
        run.mkdir()
        shutil.copytree(source / "checkpoint-0000002", run / "checkpoint-0000002")
        shutil.copy(source / "metrics.jsonl", run / "metrics.jsonl")
        cmd = xlstm_cmd("train", "--out", run, "--resume", "--no-progress")
        if world > 1:
            cmd = launch_cmd(world, cmd)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same_weights(run / "checkpoint-0000004", single / "checkpoint-0000004")
        after = [r["world_size"] for r in records(run) if r["step"] > 2]
        assert after and set(after) == {world}


@pytest.mark.slow  # three to four launches of two processes
def test_global_batch_must_split_evenly(runs):
    tmp, corpus, *_ = runs
    proc = subprocess.run(launch_cmd(2, xlstm_cmd("train", corpus, "--out", tmp / "odd",
                                                  *train_args("--steps", "4", "--batch-size", "3"))),
                          capture_output=True, text=True, timeout=300)
    # mlx.launch itself exits 0; it reports each rank's exit code.
    assert "exited with code 2" in proc.stderr
    assert "batch size (3) is the global batch and must be divisible by the number of processes (2)" in proc.stderr
    assert not (tmp / "odd").exists() or not any((tmp / "odd").iterdir())


def _start_two_ranks(tmp_path, out, *args: str, env_of=None) -> list[subprocess.Popen]:
    """`xlstm-metal train` on a corpus in tmp_path as ranks 0 and 1 of a ring (``env_of(rank,
    env)`` may change a rank's environment), writing to ``out``."""
    corpus = make_corpus(tmp_path / "corpus")
    port = free_port(2)
    procs = []
    for rank in range(2):
        env = ring_env(rank, 2, port, tmp_path)
        if env_of is not None:
            env_of(rank, env)
        procs.append(subprocess.Popen(xlstm_cmd("train", corpus, "--out", out, *train_args(*args)), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_a_dead_rank_stops_the_others_and_leaves_no_partial_checkpoint(tmp_path):
    """Kill rank 1 mid-run: rank 0 stops with a clear error naming the last checkpoint, and
    every checkpoint directory left is complete."""
    out = tmp_path / "run"
    procs = _start_two_ranks(tmp_path, out, "--steps", "500", "--save-every", "1", "--eval-every", "1000")
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-0000003").exists():
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode == 1, err[-2000:]
    assert "rank 0 of 2: training stopped at step" in err
    assert "another process has probably died" in err and "continue with --resume" in err
    assert "Traceback" not in err
    # No temporary checkpoint left; every checkpoint-* is complete and loads.
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    ckpts = sorted(p for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts and str(ckpts[-1]) in err
    for ckpt in ckpts:
        assert {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= {
            p.name for p in ckpt.iterdir()}
        load_model(ckpt)
        json.loads((ckpt / "trainer_state.json").read_text())


def _rank_pid(rank: int, marker: str) -> int | None:
    """The pid of the process mlx.launch started as ``rank`` for the run writing to ``marker``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in environ and marker.encode() in cmdline and b"xlstm_metal" in cmdline:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc (Linux)")
def test_under_mlx_launch_a_killed_rank_stops_the_run_cleanly(tmp_path):
    """The same through mlx.launch, which stops the other processes (SIGTERM) once one fails:
    they unwind with a message, and every checkpoint left is complete."""
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "launched-run"
    cmd = launch_cmd(2, xlstm_cmd("train", corpus, "--out", out, *train_args("--steps", "500", "--save-every", "1",
                                                                             "--eval-every", "1000")))
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-0000003").exists():
            assert launcher.poll() is None, launcher.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        pid = _rank_pid(1, str(out))
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    assert "Node with rank 1 was killed" in err or "Node with rank 1 exited" in err, err[-2000:]
    assert ("another process has probably died" in err or "rank 0 stopped by signal 15" in err), err[-2000:]
    assert "Traceback" not in err
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    ckpts = sorted(p for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts
    for ckpt in ckpts:
        load_model(ckpt)
        json.loads((ckpt / "trainer_state.json").read_text())


@pytest.mark.parametrize("hit", [0, 1])
def test_one_rank_at_its_hard_memory_limit_stops_every_rank_after_the_checkpoint(tmp_path, hit):
    """Rank ``hit`` alone is over its hard memory limit (XLSTM_MEM_HARD_MB=2): every rank agreed
    to stop, but only that rank raised; the other returned from job.check and trained on into
    a collective whose peer had gone (rank 0 too, the one holding the checkpoints). Now every
    rank stops at the same step once rank 0's checkpoint is written, with exit code 3 and a
    message: the rank over the limit names its usage, the others name that rank."""
    out = tmp_path / "run"

    def env_of(rank: int, env: dict) -> None:
        env["XLSTM_RUNTIME_DIR"] = str(tmp_path / "runtime")
        if rank == hit:
            env["XLSTM_MEM_HARD_MB"] = "2"  # any process is over 2 MB: stops after the first step

    procs = _start_two_ranks(tmp_path, out, "--steps", "50", "--save-every", "100", "--eval-every", "100",
                             env_of=env_of)
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=120)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    ckpt = out / "checkpoint-0000001"
    for rank, (p, err) in enumerate(zip(procs, errs)):
        assert_memory_stop(rank, hit, p.returncode, err, forbidden=("Traceback", "probably died"))
        assert (f"checkpoint {ckpt} (continue with --resume)" if rank == 0 else
                "rank 0 wrote the checkpoint (continue with --resume)") in err, err[-2000:]
    # Both stopped after step 1; rank 0's checkpoint of it is complete and the only one.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", "."))) == [ckpt.name]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 1
    load_model(ckpt)
