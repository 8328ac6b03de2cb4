"""Session 52's hunt in distributed runs (2 local processes, MLX's ring backend), started by
hand as well as by mlx.launch."""

import json
import re

import pytest

from test_distributed_inference import kill_rank_1_during, tiny_checkpoint  # noqa: E402


def test_tensor_parallel_rank_ends_when_its_peer_is_killed_without_mlx_launch(tmp_path):
    """Two ranks of a tensor-parallel `generate` started by hand (no mlx.launch to SIGTERM the
    survivor), rank 1 killed mid-decode: rank 0 waited forever in the collective (MLX's
    scheduler never finishes the failed task). Its ring watch now ends it within seconds, with
    a line naming the lost rank and a non-zero exit code."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    code, _, err = kill_rank_1_during(
        tmp_path, ["generate", "-m", str(ckpt), "-p", "the quick", "-n", "1000000", "--temp", "0",
                   "--parallel", "tensor"], lambda j: (j.get("done") or 0) > 20, tries=1, watched=True)
    assert code != 0 and "Traceback" not in err, err[-2000:]
    # the ring watch's line, or (where MLX's own error path runs first: on CUDA, H100 S53) the
    # generation's, which also says how far it got
    assert re.search(r"xlstm-metal: error: rank 0 of 2: (lost the connection to rank 1 in a collective|"
                     r"the generation stopped after \d+ tokens: lost the connection to rank 1 )", err), err[-2000:]


def test_ranks_that_loaded_different_models_are_refused(tmp_path):
    """Two ranks given different checkpoints of one shape (or one checkpoint split two ways):
    rank 0 printed the garbage of two mixed models with exit code 0. Now every rank stops
    before splitting, exit 2, one line naming what differs."""
    from test_hunt_s51_distributed import _run_ranks, xlstm_cmd  # noqa: E402

    first = tiny_checkpoint(tmp_path / "first")
    second = tmp_path / "second"
    second.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (second / name).write_bytes((first / name).read_bytes())
    from conftest import tiny_model  # noqa: E402
    from xlstm_metal.loading import save_model

    vocab = json.loads((first / "config.json").read_text())["vocab_size"]
    save_model(tiny_model(3, vocab_size=vocab), tmp_path / "other")
    (second / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    args = ["-p", "the quick", "-n", "4", "--temp", "0"]
    results = _run_ranks(tmp_path, [xlstm_cmd("generate", "-m", first, *args),
                                    xlstm_cmd("generate", "-m", second, *args)], timeout=60)
    for rank, (code, err) in enumerate(results):
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert f"rank {rank} of 2: the processes would split different models (tensor parallel): rank 1 loaded " \
               "another model than rank 0" in err, err[-2000:]
    assert "the values of backbone." in results[1][1]
    results = _run_ranks(tmp_path, [xlstm_cmd("generate", "-m", first, *args, "--parallel", mode)
                                    for mode in ("tensor", "pipeline")], timeout=60)
    for code, err in results:
        assert code == 2 and "Traceback" not in err, err[-2000:]
    assert "this rank's split is 'pipeline', rank 0's 'tensor'" in results[1][1]


def test_a_rank_whose_peers_never_join_stops_at_the_join_timeout(tmp_path):
    """One process of a 2-process host file started alone (or its peer failed before joining):
    MLX's ring init waited forever, holding the GIL. It now ends after XLSTM_RING_JOIN_TIMEOUT
    seconds with one line; a bad timeout value is refused, exit 2."""
    import subprocess
    import sys
    import time

    from distributed_helpers import free_port, ring_env  # noqa: E402

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    cmd = [sys.executable, "-m", "xlstm_metal", "generate", "-m", str(ckpt), "-p", "the", "-n", "2"]
    env = ring_env(0, 2, free_port(2), tmp_path)
    started = time.monotonic()
    proc = subprocess.run(cmd, env={**env, "XLSTM_RING_JOIN_TIMEOUT": "1"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and time.monotonic() - started < 30, proc.stderr[-2000:]
    assert "xlstm-metal: error: rank 0 of 2: not every process joined the ring within 1 s" in proc.stderr
    proc = subprocess.run(cmd, env={**env, "XLSTM_RING_JOIN_TIMEOUT": "soon"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "XLSTM_RING_JOIN_TIMEOUT must be a positive number of seconds, got 'soon'" in proc.stderr
