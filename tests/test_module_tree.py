"""The module tree is what runs: quantized layers, adapters and swapped modules are used by every
kernel path (eager, compiled, fused, prefill, step), for xLSTM-Large and the 2024 xLSTM."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map_with_path

from xlstm_metal import benchmark as bm
from xlstm_metal.models.xlstm_2024 import create_xlstm_model

from conftest import tiny_model

IDS = mx.array([[3, 17, 42, 5, 88, 1, 23, 64, 9, 30, 71, 2]], dtype=mx.int32)


def _np(x):
    return np.array(x.astype(mx.float32))


def _close(a, b, rtol=1e-4):
    a, b = _np(a), _np(b)
    scale = max(np.abs(b).max(), 1e-6)
    assert np.abs(a - b).max() <= rtol * scale, f"max abs diff {np.abs(a - b).max():.3g}, scale {scale:.3g}"


def _not_gates(path: str, module: nn.Module) -> bool:
    return hasattr(module, "to_quantized") and not path.endswith(("igate_preact", "fgate_preact"))


def _quantized_pair(make, bits: int, group_size: int, predicate=None):
    """(quantized model, float model holding the quantize->dequantize'd weights)."""
    model = make()
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return model, _dequantized_twin(make, model)


def _dequantized_twin(make, model: nn.Module) -> nn.Module:
    """``make()`` (the float model ``model`` was quantized from) holding each of ``model``'s
    quantized layers' weights dequantized: in its scales' dtype, a float format's (uint8 scales)
    in float32."""
    reference = make()
    quantized = {path: m for path, m in _leaf_modules(model) if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    assert quantized, "nothing was quantized"
    for path, m in _leaf_modules(reference):
        if path in quantized:
            q = quantized[path]
            m.weight = mx.dequantize(q.weight, q.scales, q.get("biases"), group_size=q.group_size, bits=q.bits,
                                     mode=q.mode, dtype=mx.float32 if q.mode != "affine" else None)
    mx.eval(model.parameters(), reference.parameters())
    return reference


def _leaf_modules(model: nn.Module):
    found = []
    tree_map_with_path(lambda path, m: found.append((path, m)), model.leaf_modules(), is_leaf=nn.Module.is_module)
    return found


def _decode(model, ids, state=None):
    """Logits [B, S, V] fed one token at a time (the step kernel)."""
    out = []
    for t in range(ids.shape[1]):
        logits, state = model(ids[:, t : t + 1], state)
        out.append(logits)
    return mx.concatenate(out, axis=1), state


def _large():
    return tiny_model(seed=11)


def _xlstm_2024():
    return create_xlstm_model(vocab_size=97, num_layers=2, signature=(1, 1), inp_dim=64, head_dim=16, head_num=4, seed=5)


# ------------------------------------------------------------------------ quantized: every path
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64)])
def test_quantized_xlstm_large_equals_dequantized_float_in_every_path(bits, group_size):
    model, reference = _quantized_pair(_large, bits, group_size)
    assert isinstance(model.blocks[0].mlstm_layer.q, nn.QuantizedLinear)
    expected, expected_state = reference(IDS)
    logits, state = model(IDS)
    _close(logits, expected)
    # The quantized model really differs from the float weights it came from.
    assert np.abs(_np(logits) - _np(_large()(IDS)[0])).max() > 1e-4

    _close(_decode(model, IDS)[0], expected)                                   # step kernel
    _close(model.prefill(IDS, chunk_size=5)[0], expected[:, -1])              # prefill pieces
    compiled = mx.compile(lambda ids: model(ids)[0], inputs=model.state)
    _close(compiled(IDS), expected)                                           # compiled
    step = bm.make_decode_step(model)
    next_tokens, _ = step(IDS[:, :1], model.make_state(1))
    assert int(next_tokens[0, 0]) == int(mx.argmax(expected[0, 0]))

    model.fuse_projections()                                                              # fused projections
    _close(model(IDS)[0], expected)
    _close(_decode(model, IDS)[0], expected)
    _close(model.prefill(IDS)[0], expected[:, -1])
    for a, b in zip(state[0], expected_state[0]):
        _close(a, b)


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_quantized_equals_unfused_with_float_gates(bits):
    """Gates kept in float (the default recipe): q|k|v|o fuse as one quantized group, i|f as a
    float group, and the compiled decode step reads the fused arrays."""
    model, reference = _quantized_pair(_large, bits, 32, predicate=_not_gates)
    layer = model.blocks[0].mlstm_layer
    assert isinstance(layer.q, nn.QuantizedLinear) and type(layer.igate_preact) is nn.Linear
    unfused = model(IDS)[0]
    _close(unfused, reference(IDS)[0])
    model.fuse_projections()
    groups = layer["_fused_projection"]
    assert len(groups) == 2 and set(groups[0]) == {"weight", "scales", "biases"} and set(groups[1]) == {"weight"}
    assert groups[0]["weight"].dtype == mx.uint32
    assert len(model.blocks[0].ffn["_fused_gate_up"]) == 1
    _close(model(IDS)[0], unfused, 1e-5)
    step = bm.make_decode_step(model)
    tok = IDS[:, :1]
    before = _np(step(tok, model.make_state(1))[1][0][0])
    # Zero the fused quantized scales: the compiled step must read the fused arrays.
    groups[0]["scales"] = mx.zeros_like(groups[0]["scales"])
    after = _np(step(tok, model.make_state(1))[1][0][0])
    assert not np.allclose(before, after)


def test_quantized_2024_xlstm_equals_dequantized_float():
    model, reference = _quantized_pair(_xlstm_2024, 4, 32)
    assert isinstance(model.blocks[0].xlstm.proj_up, nn.QuantizedLinear)
    expected = reference(IDS)[0]
    _close(model(IDS)[0], expected)
    _close(_decode(model, IDS)[0], expected)
    compiled = mx.compile(lambda ids: model(ids)[0], inputs=model.state)
    _close(compiled(IDS), expected)
    # The zero state's conv windows take the activations' dtype, not the packed uint32 weight's.
    state = model.make_state(1)
    assert state[0][-1].dtype == mx.float32
    _close(_decode(model, IDS, state)[0], expected)


# ----------------------------------------------------------------------------------- adapters
class _LoRA(nn.Module):
    """A LoRA wrapper as mlx-lm builds it: y = linear(x) + scale * (x @ a) @ b."""

    def __init__(self, linear: nn.Linear, rank: int = 4):
        super().__init__()
        out_dims, in_dims = linear.weight.shape
        self.linear = linear
        self.lora_a = mx.random.uniform(-1 / math.sqrt(in_dims), 1 / math.sqrt(in_dims), (in_dims, rank))
        self.lora_b = mx.random.normal((rank, out_dims)) * 0.01

    def __call__(self, x):
        return self.linear(x) + 2.0 * (x @ self.lora_a) @ self.lora_b


def _wrap_linears(model: nn.Module) -> list[str]:
    wrapped = []

    def wrap(path, m):
        if isinstance(m, nn.Linear):
            wrapped.append(path)
            return _LoRA(m)
        return m

    model.update_modules(tree_map_with_path(wrap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return wrapped


@pytest.mark.parametrize("make", [_large, _xlstm_2024], ids=["xlstm_large", "xlstm_2024"])
def test_every_lora_adapter_gets_a_gradient(make):
    mx.random.seed(0)
    model = make()
    wrapped = _wrap_linears(model)
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"])
    inputs, targets = IDS[:, :-1], IDS[:, 1:]

    def loss_fn(m):
        logits = m(inputs)[0]
        return nn.losses.cross_entropy(logits, targets).mean()

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    norms = {k: float(mx.abs(v).max()) for k, v in tree_flatten(grads)}
    adapters = sorted(k[: -len(".lora_b")] for k in norms if k.endswith(".lora_b"))
    assert adapters == sorted(wrapped)
    assert any("mlstm_layer.q" in a or "xlstm.proj_up" in a for a in adapters)
    zero = [k for k, v in norms.items() if v == 0.0]
    assert not zero, f"adapters without gradient: {zero}"


def test_fused_model_runs_adapters_it_cannot_fuse():
    model = _large()
    plain = model(IDS)[0]
    wrapped = _wrap_linears(model)
    assert "backbone.blocks.0.mlstm_layer.q" in wrapped
    expected = model(IDS)[0]
    assert np.abs(_np(expected) - _np(plain)).max() > 1e-4
    model.fuse_projections()  # nothing of q|k|v|o|i|f is a plain Linear any more: no group fuses
    assert model.blocks[0].mlstm_layer["_fused_projection"] == []
    _close(model(IDS)[0], expected, 1e-5)


# ------------------------------------------------------------------------------ swapped modules
class _Zeros(nn.Module):
    def __init__(self, out_dims: int):
        super().__init__()
        self.out_dims = out_dims

    def __call__(self, x):
        return mx.zeros(x.shape[:-1] + (self.out_dims,), dtype=x.dtype)


@pytest.mark.parametrize("name", ["q", "v", "ogate_preact", "out_proj"])
@pytest.mark.parametrize("fused", [False, True])
def test_swapped_projection_changes_the_output(name, fused):
    model = _large()
    if fused:
        model.fuse_projections()
    before = model(IDS)[0]
    layer = model.blocks[0].mlstm_layer
    model.blocks[0].mlstm_layer.update_modules({name: _Zeros(layer[name].weight.shape[0])})
    after = model(IDS)[0]
    assert np.abs(_np(after) - _np(before)).max() > 1e-3
    # A zero o-gate pre-activation is sigmoid(0) = 0.5, not a closed gate; a zero v or out_proj
    # silences the block's mLSTM branch: check that exact case against a reference that has it.
    if name in ("v", "out_proj"):
        reference = _large()
        reference.blocks[0].mlstm_layer.out_proj.weight = mx.zeros_like(reference.blocks[0].mlstm_layer.out_proj.weight)
        _close(after, reference(IDS)[0], 1e-5)


def test_cells_hold_no_arrays_and_the_tree_holds_every_layer():
    layer = _large().blocks[0].mlstm_layer
    for name, cell in layer.cells.items():
        assert tree_flatten(cell.parameters()) == [], name
    for name in ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact", "multihead_norm", "out_proj"):
        assert name in layer.children()


# ------------------------------------------------------------------------ nn.quantize: our dispatch
@pytest.mark.parametrize("make", [_large, _xlstm_2024, lambda: __import__("xlstm_metal.lab.model", fromlist=["x"])
                                  .build_model("mlstm", vocab_size=97, embedding_dim=64, seed=3)],
                         ids=["large", "2024", "lab"])
def test_nn_quantize_leaves_our_quantized_classes_with_mlx_logits(make):
    """``nn.quantize`` of a model (not only ``quantize_model`` and loading) leaves our quantized
    classes, whose dispatch works around MLX's CUDA kernel where one group spans a row (K <= the
    group size: these models' E = 64 at group 64); on the CPU their logits are MLX's classes' bit
    for bit."""
    from xlstm_metal.kernels.fast.quantized import FastQuantizedEmbedding, FastQuantizedLinear

    model, plain = make(), make()
    nn.quantize(model, group_size=64, bits=8, class_predicate=_divisible)
    kinds = {type(m) for _, m in _leaf_modules(model)}
    assert FastQuantizedLinear in kinds and nn.QuantizedLinear not in kinds and nn.QuantizedEmbedding not in kinds
    assert FastQuantizedEmbedding in kinds
    # MLX's own classes, holding the same arrays (switched back by hand).
    nn.quantize(plain, group_size=64, bits=8, class_predicate=_divisible)
    for _, m in _leaf_modules(plain):
        if type(m) is FastQuantizedLinear:
            m.__class__ = nn.QuantizedLinear
        elif type(m) is FastQuantizedEmbedding:
            m.__class__ = nn.QuantizedEmbedding
    assert not any(type(m) in (FastQuantizedLinear, FastQuantizedEmbedding) for _, m in _leaf_modules(plain))
    got, want = model(IDS)[0], plain(IDS)[0]
    if mx.default_device() == mx.cpu:
        assert mx.array_equal(got, want)
    else:  # on CUDA MLX's kernel is the faulty one here: ours must match the dequantized float model
        _, reference = _quantized_pair(make, 8, 64, _divisible)
        _close(got, reference(IDS)[0])


def _divisible(path: str, module: nn.Module) -> bool:
    """Layers MLX can quantize at group 64 (the lab model has a 176-wide input)."""
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % 64 == 0
