"""Session 53 hunt, the model core: kernels, configs and paths of xLSTM-Large and the 2024 xLSTM."""

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS before mlx is imported)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from xlstm_metal.config import xLSTMConfig
from xlstm_metal.errors import ConfigError
from xlstm_metal.kernels.cpu import decode_step as ds
from xlstm_metal.kernels.cpu import prefill as cp
from xlstm_metal.models.xlstm_2024 import model_from_config

from conftest import tiny_model

TINY = dict(embedding_dim=64, num_heads=2, num_blocks=1, vocab_size=97)
CFG_2024 = {"vocab_size": 61, "embedding_dim": 32, "num_blocks": 2, "slstm_at": [1],
            "mlstm_block": {"mlstm": {"num_heads": 2}},
            "slstm_block": {"slstm": {"num_heads": 2, "backend": "vanilla"}}}


@pytest.mark.parametrize("field", ["chunkwise_kernel", "sequence_kernel"])
@pytest.mark.parametrize("name", ["step", "native", "triton"])
def test_a_one_token_kernel_for_prompts_is_refused_by_field(field, name):
    # accepted, then the first prompt failed with "mlstm_step takes one time step, got S=5"
    with pytest.raises(ConfigError, match=f"'{field}': '{name}' runs one token at a time"):
        xLSTMConfig(**TINY, **{field: name})
    xLSTMConfig(**TINY, step_kernel=name)  # where it belongs
    xLSTMConfig(**TINY, step_kernel="chunkwise")  # one token through a prompt kernel is right too


def test_a_2024_model_with_a_one_token_kernel_is_refused_at_construction():
    with pytest.raises(ValueError, match="mlstm_kernel 'step' runs one token at a time"):
        model_from_config(CFG_2024, seed=0, mlstm_kernel="step")
    model = model_from_config(CFG_2024, seed=0, mlstm_kernel="parallel")
    with pytest.raises(ValueError, match="'step_fused' runs one token"):
        model.blocks[0].xlstm.set_kernel("step_fused")
    assert model.blocks[0].xlstm.kernel_name == "parallel"
    assert model(mx.array([[1, 2, 3]]))[0].shape == (1, 3, 61)


def _rel(a, b) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


class _Hook(nn.Module):
    """A user's wrapper around a block's mLSTM layer (as one recording its outputs would be)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def __call__(self, x, state=None):
        y, state = self.layer(x, state)
        return 1.5 * y, state


def test_a_wrapped_mlstm_layer_runs_in_every_path():
    """Every forward, prefill, fuse_projections() and nn.quantize failed with AttributeError
    ('_Hook' object has no attribute 'projection_cell')."""
    x = mx.array(np.random.default_rng(3).integers(0, 97, (2, 9)), dtype=mx.int32)
    model, reference = tiny_model(), tiny_model()
    out_proj = reference.blocks[0].mlstm_layer.out_proj
    out_proj.weight = 1.5 * out_proj.weight  # what the hook does
    model.blocks[0].mlstm_layer = _Hook(model.blocks[0].mlstm_layer)
    with ds.switched(False), cp.switched(False):
        ref, ref_state = reference(x)
    assert _rel(ref, tiny_model()(x)[0]) > 1e-2
    for fuse in (False, True):
        if fuse:
            model.fuse_projections()
            assert model.blocks[1].mlstm_layer.fused
        assert _rel(model(x)[0], ref) < 1e-5
        logits, state = model.prefill(x[:, :5], chunk_size=3)
        for t in range(5, 9):
            logits, state = model(x[:, t:t + 1], state)
        assert _rel(logits[:, -1], ref[:, -1]) < 1e-4
        assert max(_rel(a, b) for s, r in zip(state, ref_state) for a, b in zip(s, r)) < 1e-4
    # nn.quantize of the fused model ("no sub-module named '_fused_projection'" even unwrapped)
    nn.quantize(model, group_size=32, bits=8)
    quantized = tiny_model()
    nn.quantize(quantized, group_size=32, bits=8)
    quantized.blocks[0].mlstm_layer = _Hook(quantized.blocks[0].mlstm_layer)
    assert isinstance(model.blocks[0].mlstm_layer.layer.q, nn.QuantizedLinear)
    assert _rel(model(x)[0], quantized(x)[0]) < 1e-5 and _rel(model(x)[0], ref) > 1e-3


def test_narrow_integer_ids_of_a_larger_vocabulary_run():
    """int8 ids of a 200-row table (int16 ids of the 7B's 50,304) failed in the out-of-table
    check: "Converting 200 to int8 would result in overflow"."""
    ids = mx.array([[1, 5, 120, 3]])
    model = tiny_model(vocab_size=200)
    ref = model(ids)[0]
    for dtype in (mx.int8, mx.uint8, mx.int16):
        for c_paths in (True, False):
            with ds.switched(c_paths), cp.switched(c_paths):
                assert _rel(model(ids.astype(dtype))[0], ref) == 0.0
                assert _rel(model.prefill(ids.astype(dtype))[0], ref[:, -1]) < 1e-5
    assert bool(mx.isnan(model(mx.array([[-1, 2]], dtype=mx.int8))[0][0, 0]).all())  # outside: NaN
    model = model_from_config({**CFG_2024, "vocab_size": 200}, seed=0)
    assert _rel(model(ids.astype(mx.int8))[0], model(ids)[0]) == 0.0


@pytest.mark.parametrize("name", ["chunkwise", "parallel", "sequence", "step", "chunkwise_scan", "chunkwise_fused"])
def test_kernels_refuse_inputs_and_states_of_other_shapes(name):
    """Gates [B, NH, S, 1] (NX-AI's 2024 layout) gave the sequence and step kernels an h of shape
    [B, NH, S, B, DV] without an error; NX-AI's 2024 state layout failed in an MLX broadcast."""
    from xlstm_metal.kernels import get_mlstm_kernel

    S = 1 if name == "step" else 5
    q, v, g = mx.ones((2, 2, S, 4)), mx.ones((2, 2, S, 6)), mx.zeros((2, 2, S))
    kernel = get_mlstm_kernel(name)
    with pytest.raises(ValueError, match=r"i, f \[B, NH, S\]; got .* i \(2, 2, %d, 1\)" % S):
        kernel(q, q, v, g[..., None], g, chunk_size=4)
    nxai = (mx.ones((2, 2, 4, 6)), mx.ones((2, 2, 4, 1)), mx.ones((2, 2, 1, 1)))
    with pytest.raises(ValueError, match=r"m \(2, 2, 1\); got \(2, 2, 4, 6\), \(2, 2, 4, 1\), \(2, 2, 1, 1\)"):
        kernel(q, q, v, g, g, nxai, chunk_size=4)
    h, (C, n, m) = kernel(q, q, v, g, g, (nxai[0], nxai[1][..., 0], nxai[2][..., 0]), chunk_size=4)
    assert h.shape == v.shape and C.shape == (2, 2, 4, 6)


def test_slstm_kernels_refuse_an_r_or_state_of_other_shapes():
    # one head's R broadcast over both heads without an error; a state of 3 arrays failed unpacking
    from xlstm_metal.kernels.slstm import slstm_sequence, slstm_step

    wx, R = mx.ones((2, 4, 2, 4, 3)), mx.full((2, 3, 12), 0.1)
    state = tuple(mx.ones((2, 2, 3)) for _ in range(4))
    for bad_R, bad_state in ((R[:1], None), (R, state[:3]), (R, tuple(s[:1] for s in state))):
        for kernel, x in ((slstm_sequence, wx), (slstm_step, wx[:, 0])):
            with pytest.raises(ValueError, match=r"R \[NH, DH, 4 DH\] = \(2, 3, 12\)"):
                kernel(x, bad_R, bad_state)
    h, _ = slstm_sequence(wx, R, state)
    assert _rel(h[:, 0], slstm_step(wx[:, 0], R, state)[0]) == 0.0
