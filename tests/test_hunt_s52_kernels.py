"""Kernels on odd shapes and values, and configs that crashed deep inside instead of naming a field."""

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS before mlx is imported)

import mlx.core as mx
import numpy as np
import pytest

from xlstm_metal.config_2024 import xLSTMLMConfig
from xlstm_metal.errors import ConfigError
from xlstm_metal.kernels import get_mlstm_kernel, mlstm_sequence

from test_kernels import make_inputs, rel_err, run

CHUNKWISE = ["chunkwise", "chunkwise_scan", "chunkwise_fused"]


@pytest.mark.parametrize("name", CHUNKWISE + ["parallel"])
@pytest.mark.parametrize("S", [1, 2, 3, 5])
def test_odd_shapes_extreme_gates_and_row_states_match_the_steps(name, S):
    """DQK=1 != DV=3, chunks of 1/2/3 (ragged), per-row states far apart, saturated gates."""
    q, k, v, i, f, (C, n, m) = make_inputs(S, B=3, NH=2, S=S, DQK=1, DV=3, with_state=True)
    rng = np.random.default_rng(S)
    i = rng.choice([-1e4, -50.0, 0.0, 50.0, 1e3], size=i.shape).astype(np.float32)
    f = rng.choice([-1e4, -80.0, 0.0, 80.0, 1e4], size=f.shape).astype(np.float32)
    m = np.array([-200.0, 300.0, 0.0], np.float32)[:, None, None] + m
    inputs = (q, k, v, i, f, (C, n, m))
    ref = run(mlstm_sequence, inputs)
    for chunk in (1, 2, 3):
        h, state = run(get_mlstm_kernel(name), inputs, chunk_size=chunk)
        assert np.all(np.isfinite(h)) and rel_err(h, ref[0]) <= 1e-4
        for a, b in zip(state, ref[1]):
            assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("name", CHUNKWISE)
@pytest.mark.parametrize("chunk", [0, -2, 2.5, True])
def test_chunk_size_is_refused_by_name(name, chunk):
    # 0 was a ZeroDivisionError, -2 an MLX padding error, 2.5 a std::bad_cast
    x, g = mx.ones((1, 1, 5, 2)), mx.ones((1, 1, 5))
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        get_mlstm_kernel(name)(x, x, x, g, g, chunk_size=chunk)
    h, _ = get_mlstm_kernel(name)(x, x, x, g, g, chunk_size=np.int64(2))  # a numpy integer is one
    assert h.shape == (1, 1, 5, 2)


def test_a_2024_model_with_chunk_size_0_is_refused_by_name():
    from xlstm_metal.models.xlstm_2024 import model_from_config

    model = model_from_config({"vocab_size": 50, "embedding_dim": 32, "num_blocks": 1, "mlstm_block": {}},
                              chunk_size=0, seed=0)
    with pytest.raises(ValueError, match="chunk_size"):
        model(mx.array([[1, 2, 3]]))


def _cfg(**fields):
    return {"vocab_size": 50, "embedding_dim": 32, "num_blocks": 2, "mlstm_block": {"mlstm": {}},
            "slstm_block": {"slstm": {"backend": "vanilla"}}, "slstm_at": [1], **fields}


@pytest.mark.parametrize("fields, message", [
    # each crashed later: AttributeError (null), ZeroDivisionError / LinearHeadwise ValueError
    # (width 0 rounded down), ValueError when the model was built, "'int' object is not iterable"
    ({"slstm_block": {"slstm": None}}, "slstm_block.slstm must be a mapping"),
    ({"mlstm_block": {"mlstm": None}}, "mlstm_block.mlstm must be a mapping"),
    ({"slstm_block": {"slstm": {}, "feedforward": {"proj_factor": 0.5, "round_proj_up_dim_up": False}}},
     "slstm_block.feedforward: proj_factor 0.5 .* width 0"),
    ({"mlstm_block": {"mlstm": {"proj_factor": 0.5, "round_proj_up_dim_up": False}}},
     "mlstm_block.mlstm: proj_factor 0.5 .* width 0"),
    ({"slstm_block": {"slstm": {}, "feedforward": {"act_fn": "tanh"}}}, "feedforward.act_fn 'tanh'"),
    ({"slstm_at": 1}, "slstm_at must be a list"),
    ({"slstm_at": None}, "slstm_at must be a list"),
])
def test_2024_configs_that_crashed_deep_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError, match=message):
        xLSTMLMConfig.from_dict(_cfg(**fields))


def test_unusual_but_valid_2024_configs_still_load():
    # a width rounded down that stays >= 1, an unused mLSTM block of width 0, every activation
    cfg = xLSTMLMConfig.from_dict(_cfg(mlstm_block={"mlstm": {"proj_factor": 2.0, "round_proj_up_dim_up": False}}))
    assert cfg.mlstm_inner_dim == 64
    cfg = xLSTMLMConfig.from_dict(_cfg(slstm_at="all", mlstm_block={"mlstm": {
        "proj_factor": 0.5, "round_proj_up_dim_up": False}}))
    assert cfg.block_map == ["s", "s"]
    for act in ("gelu", "relu", "relu^2", "sigmoid", "swish", "selu"):
        xLSTMLMConfig.from_dict(_cfg(slstm_block={"slstm": {}, "feedforward": {"act_fn": act}}, slstm_at=(1,)))
