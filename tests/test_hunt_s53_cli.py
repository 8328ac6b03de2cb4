"""Session 53, what the hunts left: a rank that joins the ring and exits 0 while the other loads
the model ended the survivor with a traceback (now one line naming the lost rank, exit 1, from
the command's catch-all); a profile applied to a model with a user's wrapped layer."""

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


def test_a_profile_reaches_the_neuron_inside_a_users_wrapper():
    """apply_profile on an xLSTM-Large whose block 0 mlstm_layer a user wrapped: "no attribute
    'parallel_kernel_cell'"; now the profile's settings reach the neuron inside the wrapper as
    they reach the plain block's."""
    import mlx.nn as nn

    from conftest import tiny_model
    from test_hunt_s53_core import _Hook
    from xlstm_metal.profiles import apply_profile, load_profile

    model = tiny_model(2)
    inner = model.blocks[0].mlstm_layer
    model.blocks[0].mlstm_layer = _Hook(inner)
    profile = load_profile("exact-fp32").replace(name="mine", chunk_size=8, eps=2e-6)
    assert apply_profile(model, profile) is model
    for layer in (inner, model.blocks[1].mlstm_layer):
        assert (layer.parallel_kernel_cell.chunk_size, layer.parallel_kernel_cell.eps) == (8, 2e-6)
        assert layer.recurrent_kernel_cell.eps == 2e-6
    assert isinstance(model.blocks[0].mlstm_layer, _Hook) and isinstance(inner.q, nn.Linear)


@pytest.mark.parametrize("recompute", ["mlstm", "ffn"])
def test_training_recompute_runs_a_users_wrapped_layer(recompute):
    """Training with recompute mlstm / ffn over a block whose mlstm_layer a user wrapped:
    "no attribute 'fused'"; now the block's output and its gradient equal the plain run's."""
    import mlx.core as mx

    from conftest import tiny_model
    from test_hunt_s53_core import _Hook
    from xlstm_metal.training.trainer import _block_runner

    block = tiny_model(1).blocks[0]
    block.mlstm_layer = _Hook(block.mlstm_layer)
    x = mx.random.normal((2, 8, block.norm_mlstm.weight.shape[0]), key=mx.random.key(0))
    run = _block_runner(block, recompute)
    assert mx.allclose(run(x), block(x)[0], atol=1e-6)
    grad = mx.grad(lambda x: run(x).sum())(x)
    assert mx.allclose(grad, mx.grad(lambda x: block(x)[0].sum())(x), atol=1e-5)
