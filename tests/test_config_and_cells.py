"""Config parsing/validation and each cell, neuron and block on its own."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_config, tiny_model
from mlx.utils import tree_flatten

from xlstm_metal.cells.mlstm import (
    mLSTMOutputCell,
    mLSTMParallelKernelCell,
    mLSTMProjectionCell,
    mLSTMRecurrentKernelCell,
)
from xlstm_metal.cells.norms import MultiHeadLayerNorm, RMSNorm, soft_cap
from xlstm_metal.config import ConfigError, xLSTMConfig
from xlstm_metal.kernels import mlstm_sequence
from xlstm_metal.models.xlstm_large import xLSTMLarge
from xlstm_metal.neurons.mlstm import mLSTMNeuron

SEVEN_B = dict(hidden_size=4096, num_heads=8, num_hidden_layers=32, vocab_size=50304)


def test_aliases_defaults_and_standard_fields():
    hf = {"model_type": "xlstm", "torch_dtype": "bfloat16", "quantization_config": {"bits": 4},
          "_name_or_path": "NX-AI/xLSTM-7b"}
    config = xLSTMConfig.from_dict({**SEVEN_B, **hf})
    assert (config.embedding_dim, config.num_blocks) == (4096, 32)
    assert (config.qk_head_dim, config.v_head_dim, config.ffn_dim) == (256, 512, 10944)
    assert config.gate_soft_cap == 15.0 and config.output_logit_soft_cap == 30.0
    assert config.extra["quantization_config"] == {"bits": 4}  # kept aside, written back
    out = config.to_dict()
    assert out["hidden_size"] == out["embedding_dim"] == 4096 and out["torch_dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="unknown config field.*'some_future_field'"):
        xLSTMConfig.from_dict({**SEVEN_B, "some_future_field": 1})


def test_seven_b_parameter_count():
    # Built lazily: MLX never materialises the random init, so this costs no memory.
    model = xLSTMLarge(xLSTMConfig.from_dict(SEVEN_B))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == 6_865_424_896


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_heads=3), "qk_dim = int\\(embedding_dim \\* qk_dim_factor\\) = 2048 is not divisible by num_heads = 3"),
        (dict(vocab_size=0), "'vocab_size' must be a positive integer"),
        (dict(weight_mode="sparse"), "weight_mode must be"),
        (dict(mode="bogus"), "mode must be one of \\('train', 'train_with_padding', 'inference'\\), got 'bogus'"),
        (dict(inference_state_dtype="int8"), "inference_state_dtype must be one of"),
        (dict(chunkwise_kernel="magic"), "chunkwise_kernel': unknown mLSTM kernel 'magic'"),
    ],
)
def test_validation_names_the_problem(fields, message):
    with pytest.raises(ConfigError, match=message):
        xLSTMConfig.from_dict({**SEVEN_B, **fields})


def test_missing_required_fields():
    with pytest.raises(ConfigError, match="missing required field\\(s\\): num_heads, vocab_size"):
        xLSTMConfig.from_dict({"hidden_size": 64, "num_blocks": 1})


def test_norms_and_soft_cap():
    x = mx.array(np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32) * 5)
    norm = RMSNorm(8, eps=1e-6)
    norm.weight = mx.arange(8, dtype=mx.float32)
    xn = np.array(x)
    expected = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6) * np.arange(8)
    np.testing.assert_allclose(np.array(norm(x)), expected, rtol=1e-5, atol=1e-5)

    mh = MultiHeadLayerNorm(2, 4)
    h = x.reshape(2, 3, 2, 4)
    hn = np.array(h)
    centered = hn - hn.mean(-1, keepdims=True)
    expected = (centered / np.sqrt(hn.var(-1, keepdims=True) + 1e-6)).reshape(2, 3, 8)
    np.testing.assert_allclose(np.array(mh(h)), expected, rtol=1e-5, atol=1e-5)

    np.testing.assert_allclose(np.array(soft_cap(mx.array([0.0, 1.0, 1e4]), 15.0)), [0.0, 15 * np.tanh(1 / 15), 15.0], rtol=1e-6)
    assert soft_cap(x, None) is x


def test_projection_cell_shapes_and_cap():
    config = tiny_config()
    cell = mLSTMProjectionCell(config)
    layers = nn.Module()
    for name, layer in mLSTMProjectionCell.make_layers(config).items():
        setattr(layers, name, layer)
    layers.igate_preact.bias = mx.full((2,), 1000.0)
    q, k, v, o, i, f = cell(layers, mx.ones((3, 5, 64)))
    assert q.shape == k.shape == (3, 2, 5, 16) and v.shape == (3, 2, 5, 32)
    assert o.shape == (3, 5, 64) and i.shape == f.shape == (3, 2, 5)
    assert float(mx.max(i)) <= 15.0 + 1e-4  # soft-capped


def test_kernel_cells_dispatch_and_agree():
    config = tiny_config()
    rng = np.random.default_rng(1)
    q, k = (mx.array(rng.standard_normal((1, 2, 9, 16)).astype(np.float32)) for _ in range(2))
    v = mx.array(rng.standard_normal((1, 2, 9, 32)).astype(np.float32))
    i, f = (mx.array(rng.standard_normal((1, 2, 9)).astype(np.float32) * 3) for _ in range(2))
    ref_h, _ = mlstm_sequence(q, k, v, i, f)
    for cell in (mLSTMParallelKernelCell(config), mLSTMParallelKernelCell(config, kernel="parallel"), mLSTMRecurrentKernelCell(config)):
        h, (C, n, m) = cell(q, k, v, i, f)
        assert C.shape == (1, 2, 16, 32) and n.shape == (1, 2, 16) and m.shape == (1, 2, 1)
        np.testing.assert_allclose(np.array(h), np.array(ref_h), rtol=1e-4, atol=1e-5)
    assert mLSTMParallelKernelCell(config).parameters() == {}


def test_output_cell_applies_gate_after_norm():
    config = tiny_config()
    cell = mLSTMOutputCell()
    layers = nn.Module()
    for name, layer in mLSTMOutputCell.make_layers(config).items():
        setattr(layers, name, layer)
    h = mx.array(np.random.default_rng(2).standard_normal((1, 2, 4, 32)).astype(np.float32))
    closed = cell(layers, h, mx.full((1, 4, 64), -1e4))  # sigmoid(-1e4) = 0: output is the bias-free zero
    np.testing.assert_allclose(np.array(closed), 0.0, atol=1e-6)
    open_ = cell(layers, h, mx.full((1, 4, 64), 1e4))
    expected = layers.out_proj(layers.multihead_norm(h.transpose(0, 2, 1, 3)))
    np.testing.assert_allclose(np.array(open_), np.array(expected), rtol=1e-5, atol=1e-6)


def test_neuron_parameters_carry_checkpoint_names_once():
    neuron = mLSTMNeuron(tiny_config())
    names = sorted(k for k, _ in tree_flatten(neuron.parameters()))
    assert names == sorted([
        "q.weight", "k.weight", "v.weight", "ogate_preact.weight", "igate_preact.weight", "igate_preact.bias",
        "fgate_preact.weight", "fgate_preact.bias", "multihead_norm.weight", "out_proj.weight",
    ])
    # The cells read their layers from the neuron, so an update through the neuron reaches them.
    neuron.update({"q": {"weight": mx.zeros((32, 64))}})
    q = neuron.project(mx.ones((1, 3, 64)))[0]
    assert float(mx.abs(q).sum()) == 0.0


def test_model_wiring_text():
    text = tiny_model().wiring()
    assert "blocks.1: mLSTMBlock" in text and "parallel_kernel=mLSTMParallelKernelCell(chunkwise)" in text
    assert "recurrent_kernel=mLSTMRecurrentKernelCell(step/sequence)" in text


def test_forward_is_one_lazy_graph():
    """No host sync inside a forward: tracing under mx.compile fails on any eval/item/tolist."""
    model = tiny_model()
    ids = mx.array(np.arange(40, dtype=np.int32).reshape(2, 20) % 97)

    def forward(ids, state):
        return model(ids, state)

    compiled = mx.compile(forward)
    state = model.make_state(2)
    logits, new_state = compiled(ids, state)  # prefill (chunkwise)
    step_logits, _ = compiled(ids[:, :1], new_state)  # one step
    ref, ref_state = model(ids)
    np.testing.assert_allclose(np.array(logits), np.array(ref), rtol=1e-5, atol=1e-5)
    assert step_logits.shape == (2, 1, 97)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(ids[0])


def test_last_only_logits_equal_the_last_position():
    model = tiny_model()
    ids = mx.array(np.arange(30, dtype=np.int32).reshape(2, 15) % 97)
    full, full_state = model(ids)
    last, last_state = model(ids, last_only=True)
    assert last.shape == (2, 1, 97)
    np.testing.assert_allclose(np.array(last), np.array(full[:, -1:]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.array(last_state[-1][0]), np.array(full_state[-1][0]))
