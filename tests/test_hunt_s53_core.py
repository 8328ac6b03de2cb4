"""Session 53 hunt: the model core."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from xlstm_metal.config import xLSTMConfig
from xlstm_metal.errors import ConfigError
from xlstm_metal.kernels import get_mlstm_kernel
from xlstm_metal.kernels.cpu import decode_step as ds, prefill as cp
from xlstm_metal.kernels.slstm import slstm_sequence, slstm_step
from xlstm_metal.models.xlstm_2024 import model_from_config

from conftest import tiny_model

CFG = {"vocab_size": 200, "embedding_dim": 32, "num_blocks": 2, "slstm_at": [1], "mlstm_block": {},
       "slstm_block": {}}


def _rel(a, b) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


@pytest.mark.parametrize("field", ["chunkwise_kernel", "sequence_kernel"])
@pytest.mark.parametrize("name", ["step", "native", "triton"])
def test_one_token_kernels_for_prompts_are_refused(field, name):
    # the first prompt failed: "mlstm_step takes one time step, got S=5"
    tiny = dict(embedding_dim=64, num_heads=2, num_blocks=1, vocab_size=97)
    with pytest.raises(ConfigError, match=f"'{field}': '{name}' runs one token at a time"):
        xLSTMConfig(**tiny, **{field: name})
    xLSTMConfig(**tiny, step_kernel=name)
    with pytest.raises(ConfigError, match=r"'num_hidden_layers' \(4\) and 'num_blocks' \(1\) differ"):
        xLSTMConfig.from_dict({**tiny, "num_hidden_layers": 4, "hidden_size": 64})  # transformers: 4 blocks
    with pytest.raises(ValueError, match="mlstm_kernel 'step' runs one token"):
        model_from_config(CFG, seed=0, mlstm_kernel="step")


class _Hook(nn.Module):  # a user's wrapper
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def __call__(self, x, state=None):
        y, state = self.layer(x, state)
        return 1.5 * y, state


def test_a_wrapped_layer_runs_in_every_path():
    # no attribute 'projection_cell'; nn.quantize after fusing: no sub-module '_fused_projection'
    x = mx.random.randint(0, 97, (2, 9), key=mx.random.key(3))
    model, reference = tiny_model(), tiny_model()
    reference.blocks[0].mlstm_layer.out_proj.weight *= 1.5
    with ds.switched(False), cp.switched(False):
        ref, ref_state = reference(x)
    model.blocks[0].mlstm_layer = _Hook(model.blocks[0].mlstm_layer)
    for fuse in (False, True):
        if fuse:
            model.fuse_projections()
        assert _rel(model(x)[0], ref) < 1e-5
        logits, state = model.prefill(x[:, :5], chunk_size=3)
        for t in range(5, 9):
            logits, state = model(x[:, t:t + 1], state)
        assert _rel(logits[:, -1], ref[:, -1]) < 1e-4
        assert _rel(state[1][0], ref_state[1][0]) < 1e-4
    nn.quantize(model, group_size=32, bits=8)
    assert isinstance(model.blocks[1].mlstm_layer.q, nn.QuantizedLinear)
    model = model_from_config(CFG, seed=0)  # the 2024 xLSTM's: no attribute 'zero_state'
    model.blocks[0].xlstm = _Hook(model.blocks[0].xlstm)
    assert _rel(model(x[:, 4:], model(x[:, :4])[1])[0], model(x)[0][:, 4:]) < 1e-5 and "_Hook" in model.wiring()


def test_narrow_integer_ids_run():
    # "Converting 200 to int8 would result in overflow"
    ids = mx.array([[1, 5, 120, 3]])
    large = tiny_model(vocab_size=200)
    for model in (large, model_from_config(CFG, seed=0)):
        for dtype in (mx.int8, mx.uint8, mx.int16):
            assert _rel(model(ids.astype(dtype))[0], model(ids)[0]) == 0.0
    assert bool(mx.isnan(large(mx.array([[-1, 3]], dtype=mx.int8))[0][0, 0]).all())


@pytest.mark.parametrize("name", ["chunkwise", "parallel", "sequence", "step", "chunkwise_scan", "chunkwise_fused"])
def test_kernels_refuse_other_shapes(name):
    # gates [B, NH, S, 1]: sequence and step gave an h [B, NH, S, B, DV]
    S = 1 if name == "step" else 5
    q, v, g = mx.ones((2, 2, S, 4)), mx.ones((2, 2, S, 6)), mx.zeros((2, 2, S))
    kernel = get_mlstm_kernel(name)
    with pytest.raises(ValueError, match=r"got .* i \(2, 2, \d, 1\)"):
        kernel(q, q, v, g[..., None], g, chunk_size=4)
    nxai = (mx.ones((2, 2, 4, 6)), mx.ones((2, 2, 4, 1)), mx.ones((2, 2, 1, 1)))
    with pytest.raises(ValueError, match=r"m \(2, 2, 1\); got .* \(2, 2, 1, 1\)"):
        kernel(q, q, v, g, g, nxai, chunk_size=4)


def test_slstm_kernels_refuse_other_shapes():
    # one head's R ran for both heads silently
    wx, R = mx.ones((2, 4, 2, 4, 3)), mx.full((2, 3, 12), 0.1)
    state = tuple(mx.ones((2, 2, 3)) for _ in range(4))
    for bad in ((R[:1], None), (R, state[:3])):
        for kernel, x in ((slstm_sequence, wx), (slstm_step, wx[:, 0])):
            with pytest.raises(ValueError, match=r"R \(2, 3, 12\)"):
                kernel(x, *bad)
    assert _rel(slstm_sequence(wx, R, state)[0][:, 0], slstm_step(wx[:, 0], R, state)[0]) == 0.0
