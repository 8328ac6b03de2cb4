"""Session 52's hunt in distributed runs (2 local processes, MLX's ring backend), started by
hand as well as by mlx.launch."""

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
                   "--parallel", "tensor"], lambda j: (j.get("done") or 0) > 20, tries=1)
    assert code != 0 and "Traceback" not in err, err[-2000:]
    assert "xlstm-metal: error: rank 0 of 2: lost the connection to rank 1 in a collective" in err, err[-2000:]
