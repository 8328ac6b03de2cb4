"""Session 53: a rank that joins the ring and exits 0 while the other loads the model ended the
survivor with a traceback (the lost peer's RuntimeError from the model check): now one line
naming the lost rank and exit 1, from the command's catch-all."""

import sys

import pytest

from distributed_helpers import run_two_ranks  # noqa: E402
from test_distributed_inference import tiny_checkpoint  # noqa: E402
from test_hunt_s51_distributed import xlstm_cmd  # noqa: E402


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_a_rank_that_leaves_during_loading_ends_the_other_with_one_line(tmp_path, mode):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    joins_and_leaves = [sys.executable, "-c", "import mlx.core as mx; mx.distributed.init(strict=True, backend='ring')"]
    generate = xlstm_cmd("generate", "-m", ckpt, "-p", "the quick", "-n", "4", "--temp", "0", "--parallel", mode)
    (code, out, err), (left, _, left_err) = run_two_ranks(tmp_path, [generate, joins_and_leaves], timeout=120)
    assert left == 0, left_err[-2000:]
    assert code == 1 and "Traceback" not in err and out == "", err[-2000:]
    assert "xlstm-metal: error: rank 0 of 2: " in err and "lost the connection to rank 1" in err, err[-2000:]
