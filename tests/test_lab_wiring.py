"""The architecture lab: registry, specs, validation, masks, polarity, sharing, stages, state,
save/load, and the wired xLSTM-Large / 2024 sLSTM blocks against the hand-written ones."""

from __future__ import annotations

import graphlib
import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import xlstm_metal  # noqa: F401  (BLAS preload before mlx work)
from xlstm_metal.lab import (
    LabCell, LabConfig, LabModel, Wiring, WiredBlock, WiringError, WiringSpec, build_model, cell_types,
    load_arch, register_cell, topological_stages, wired_equivalent,
)
from xlstm_metal.lab.cells import CellError, build_cell

ISSUE_CELLS = ["linear_projection", "gated_projection", "exponential_gate", "sigmoid_gate", "soft_cap_gate",
               "matrix_memory", "scalar_memory", "multihead_layernorm", "rmsnorm", "linear_recurrence",
               "gated_convolution", "softmax_attention", "linear_attention"]


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ------------------------------------------------------------------------------ registry
def test_registry_has_every_cell_of_the_issue_with_ports():
    types = cell_types()
    assert set(ISSUE_CELLS) <= set(types)
    p = build_cell("linear_projection", {"in": 8, "out": 4})
    assert p.input_ports == {"x": 8} and p.output_ports == {"y": 4} and not p.stateful
    m = build_cell("matrix_memory", {"num_heads": 4, "qk_dim": 16, "v_dim": 32, "kv_heads": 2})
    assert m.input_ports == {"q": 16, "k": 8, "v": 16, "i": 4, "f": 4} and m.output_ports == {"h": 32}
    assert m.stateful and [s.shape for s in m.zero_state(3)] == [(3, 4, 4, 8), (3, 4, 4), (3, 4, 1)]
    s = build_cell("scalar_memory", {"dim": 16, "num_heads": 2})
    assert s.input_ports == {"i": 16, "f": 16, "z": 16, "o": 16} and len(s.zero_state(1)) == 4
    assert build_cell("softmax_attention", {"num_heads": 2, "qk_dim": 8}).stateful
    assert not build_cell("rmsnorm", {"dim": 8}).stateful
    with pytest.raises(CellError, match="unknown cell type 'nope'"):
        build_cell("nope", {})
    with pytest.raises(CellError, match="not divisible"):
        build_cell("matrix_memory", {"num_heads": 3, "qk_dim": 16, "v_dim": 16})


class Doubler(LabCell):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = mx.array(2.0)
        self.set_ports({"x": dim}, {"y": dim})

    def __call__(self, inputs, state=None):
        return {"y": inputs["x"] * self.scale}, None


def test_user_registered_cell_in_a_spec():
    register_cell("test_doubler", Doubler, overwrite=True)
    block = WiredBlock({"cells": {"d": {"type": "test_doubler", "dim": 4}}})
    x = mx.arange(8, dtype=mx.float32).reshape(1, 2, 4)
    y, _ = block(x)
    assert np.array_equal(np.array(y), 2 * np.array(x))
    assert "d.scale" in dict(tree_flatten(block.parameters()))
    with pytest.raises(CellError, match="already registered"):
        register_cell("test_doubler", LabCell)


# ------------------------------------------------------------------------------ validation
def _spec(cells, connections, **extra):
    return {"cells": cells, "connections": connections, **extra}


@pytest.mark.parametrize("data, message", [
    (_spec({"a": {"type": "lstm_cell", "dim": 4}}, []), r"cell 'a': unknown cell type 'lstm_cell'"),
    (_spec({"a": {"type": "linear_projection", "dim": 4}}, [{"from": "a", "to": "zz"}]), r"no cell named 'zz'"),
    (_spec({"a": {"type": "linear_projection", "dim": 4}, "b": {"type": "linear_projection", "dim": 8}},
           [{"from": "a", "to": "b"}]), r"port size mismatch: a\.y has 4 features, b\.x takes 8"),
    (_spec({"a": {"type": "linear_projection", "dim": 4}, "g": {"type": "sigmoid_gate", "dim": 4}},
           [{"from": "a", "to": "g.x"}]), r"cell 'g' \(sigmoid_gate\): input port 'gate' is not connected"),
    (_spec({"a": {"type": "linear_projection", "dim": 4}, "b": {"type": "linear_projection", "dim": 4},
            "c": {"type": "sum", "dim": 4}},
           [{"from": "in.x", "to": "c"}, {"from": "c", "to": "a"}, {"from": "a", "to": "b"}, {"from": "b", "to": "c"},
            {"from": "c", "to": "out.y"}],
           inputs={"x": 4}, outputs={"y": 4}), r"cycle (c -> a -> b -> c|a -> b -> c -> a).*not broken by a recurrent"),
    (_spec({"m": {"type": "matrix_memory", "num_heads": 1, "qk_dim": 4, "v_dim": 4}},
           [{"from": "in.x", "to": "m"}]), r"cell 'm' has several input ports \(q, k, v, i, f\)"),
    (_spec({"a": {"type": "linear_projection", "dim": 4}}, [{"from": "a", "to": "out.y", "polarity": 2}]),
     r"polarity must be \+1 or -1"),
    (_spec({"a": {"type": "linear_projection", "dim": 4}}, [{"from": "a.q", "to": "out.y"}]),
     r"cell 'a' has no output port 'q'"),
    (_spec({"a": {"type": "linear_projection", "dim": 4}, "b": {"type": "linear_projection", "dim": 4, "share": "c"}},
           [{"from": "a", "to": "b"}]), r"shares the featurizer of unknown cell 'c'"),
    (_spec({"a": {"type": "rmsnorm", "dim": 4}, "b": {"type": "linear_projection", "dim": 4, "share": "a"}},
           [{"from": "a", "to": "b"}]), r"only linear projections share featurizers \('a' is a rmsnorm\)"),
    (_spec({"a": {"type": "linear_projection", "dim": 4}},
           [{"from": "a", "to": "out.y", "mask": [[1, 0], [0, 1]]}]), r"mask has shape \(2, 2\).*\[4, 4\]"),
])
def test_validation_errors_name_the_problem(data, message):
    with pytest.raises(WiringError, match=message):
        WiredBlock(data)


def test_bad_yaml_is_one_line_naming_where():
    from xlstm_metal.lab.spec import parse_text

    with pytest.raises(WiringError) as err:
        parse_text("blocks: [\n", "arch.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("arch.yaml is not valid YAML: line 2, column 1: ")
    with pytest.raises(WiringError, match=r"^a.json is not valid JSON: Expecting value: line 1 column 1"):
        parse_text("nope", "a.json")


def test_cycle_through_a_recurrent_cell_runs_step_by_step():
    # r.h feeds back into its own input through a projection: the feedback arrives one step late.
    data = _spec({"mix": {"type": "sum", "dim": 4}, "r": {"type": "linear_recurrence", "dim": 4},
                  "p": {"type": "linear_projection", "dim": 4}, "d": {"type": "linear_projection", "dim": 4}},
                 [{"from": "in.x", "to": "mix"}, {"from": "p", "to": "mix"}, {"from": "mix", "to": "r.x"},
                  {"from": "in.x", "to": "d"}, {"from": "d", "to": "r.decay"}, {"from": "r", "to": "p"},
                  {"from": "r", "to": "out.y"}], inputs={"x": 4}, outputs={"y": 4})
    mx.random.seed(0)
    block = WiredBlock(data)
    assert "delayed one step" in block.describe()
    x = mx.random.normal((2, 5, 4))
    y, state = block(x)
    # Same result fed one token at a time, carrying the state (recurrent state + delayed value).
    s, outs = None, []
    for t in range(5):
        yt, s = block(x[:, t : t + 1], s)
        outs.append(yt)
    assert rel(mx.concatenate(outs, axis=1), y) < 1e-6
    # And the feedback matters: without it (p's contribution removed) the output differs.
    data2 = json.loads(json.dumps(data))
    data2["connections"] = [c for c in data2["connections"] if "p" not in (c["from"], c["to"])]
    data2["cells"].pop("p")
    mx.random.seed(0)
    y2, _ = WiredBlock(data2)(x)
    assert rel(y2, y) > 1e-3


# ------------------------------------------------------------------------------ masks, polarity
def test_masked_weights_stay_exactly_zero_through_adamw():
    spec = _spec({"a": {"type": "linear_projection", "dim": 16}, "b": {"type": "linear_projection", "dim": 16}},
                 [{"from": "a", "to": "b", "polarity": -1, "density": 0.5, "seed": 3}])
    mx.random.seed(1)
    block = WiredBlock(spec)
    syn = block.synapses[1]  # 0 is the implicit in.x -> a wire
    mask = np.array(syn.mask)
    assert 0.35 < mask.mean() < 0.65 and set(np.unique(mask)) == {0.0, 1.0}
    assert "synapses.1.mask" not in dict(tree_flatten(block.trainable_parameters()))
    w0 = np.array(syn.weight)
    assert np.all(w0[mask == 0] == 0)
    opt = optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
    x, target = mx.random.normal((4, 3, 16)), mx.random.normal((4, 3, 16))

    def loss(model):
        return ((model(x)[0] - target) ** 2).mean()

    step = nn.value_and_grad(block, loss)
    for _ in range(5):
        _, grads = step(block)
        opt.update(block, grads)
        mx.eval(block.parameters(), opt.state)
    w = np.array(block.synapses[1].weight)
    assert np.all(w[mask == 0] == 0.0)
    assert np.abs(w - w0)[mask == 1].min() > 0  # the unmasked ones did train
    assert np.array_equal(np.array(block.synapses[1].mask), mask)


def test_explicit_mask_and_seeded_density_are_reproducible():
    mask = np.eye(4)
    block = WiredBlock(_spec({"a": {"type": "linear_projection", "dim": 4}},
                             [{"from": "a", "to": "out.y", "mask": mask.tolist()}], outputs={"y": 4}))
    assert np.array_equal(np.array(block.synapses[-1].mask), mask)
    w = np.array(block.synapses[-1].weight)
    assert np.count_nonzero(w) <= 4 and np.all(w[mask == 0] == 0)
    spec = _spec({"a": {"type": "linear_projection", "dim": 8}}, [{"from": "a", "to": "out.y", "density": 0.3}],
                 outputs={"y": 8}, seed=7)
    m1, m2 = (np.array(WiredBlock(spec).synapses[-1].mask) for _ in range(2))
    assert np.array_equal(m1, m2)


@pytest.mark.parametrize("weighted", [False, True])
def test_polarity_flips_the_sign_of_a_connections_contribution(weighted):
    def block(polarity):
        c = {"from": "a", "to": "out.y", "polarity": polarity}
        if weighted:
            c["density"] = 0.5
        mx.random.seed(4)
        return WiredBlock(_spec({"a": {"type": "linear_projection", "dim": 8}}, [c], outputs={"y": 8}))

    x = mx.random.normal((2, 3, 8))
    plus, minus = block(1)(x)[0], block(-1)(x)[0]
    assert float(mx.abs(plus).max()) > 0
    assert np.array_equal(np.array(plus), -np.array(minus))


# ------------------------------------------------------------------------------ sharing
def test_shared_projection_is_one_parameter_array():
    w = (Wiring("share", params={"dim": 8})
         .cell("q", "linear_projection", dim="$dim").cell("k", "linear_projection", dim="$dim")
         .cell("k2", "linear_projection", input_size=8, output_size=6)
         .connect("in.x", "q").connect("in.x", "k").connect("in.x", "k2")
         .input("x", 8).output("q", 8).output("k", 8).output("k2", 6)
         .connect("q", "out.q").connect("k", "out.k").connect("k2", "out.k2"))
    w._data["cells"]["k"]["share"] = "q"
    w._data["cells"]["k2"]["share"] = {"cell": "q", "features": 4}
    block = w.build()
    params = dict(tree_flatten(block.parameters()))
    assert "q.weight" in params and "k.weight" not in params
    assert params["k2.weight"].shape == (2, 8)  # only the unshared rows are its own
    x = mx.random.normal((1, 3, 8))
    out, _ = block({"x": x})
    assert np.array_equal(np.array(out["q"]), np.array(out["k"]))
    assert np.array_equal(np.array(out["k2"][..., :4]), np.array(out["q"][..., :4]))
    # Training moves the one array: the gradient of both uses reaches q.weight.
    grads = nn.value_and_grad(block, lambda m: (m({"x": x})[0]["k"] ** 2).sum())(block)[1]
    assert float(mx.abs(grads["q"]["weight"]).sum()) > 0


def test_key_value_group_sharing_equals_repeated_heads():
    mx.random.seed(0)
    grouped = build_cell("matrix_memory", {"num_heads": 4, "kv_heads": 2, "qk_dim": 16, "v_dim": 16, "kernel": "parallel"})
    full = build_cell("matrix_memory", {"num_heads": 4, "qk_dim": 16, "v_dim": 16, "kernel": "parallel"})
    B, S = 2, 5
    q, k, v = mx.random.normal((B, S, 16)), mx.random.normal((B, S, 8)), mx.random.normal((B, S, 8))
    i, f = mx.random.normal((B, S, 4)), mx.random.normal((B, S, 4))

    def rep(x):  # head h of the full cell reads kv head h // 2
        return mx.repeat(x.reshape(B, S, 2, -1), 2, axis=2).reshape(B, S, -1)

    a, _ = grouped({"q": q, "k": k, "v": v, "i": i, "f": f})
    b, _ = full({"q": q, "k": rep(k), "v": rep(v), "i": i, "f": f})
    assert rel(a["h"], b["h"]) < 1e-6
    att = build_cell("softmax_attention", {"num_heads": 4, "kv_heads": 1, "qk_dim": 16})
    assert att.input_ports == {"q": 16, "k": 4, "v": 4}


# ------------------------------------------------------------------------------ stages
def test_stages_equal_a_reference_topological_sort():
    block = WiredBlock(load_arch("mlstm")["blocks"][0]["spec"], {"dim": 16, "num_heads": 2})
    sorter = graphlib.TopologicalSorter()
    for name in block.cell_names:
        sorter.add(name)
    for s_cell, _, d_cell, _ in block._ends:
        if s_cell in block.cell_names and d_cell in block.cell_names:
            sorter.add(d_cell, s_cell)
    sorter.prepare()
    reference = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())
        reference.append(ready)
        sorter.done(*ready)
    assert [sorted(s) for s in block.stages] == reference
    assert len(reference) >= 6 and reference[0] == ["norm"]
    assert topological_stages(["a", "b", "c"], [("a", "c"), ("b", "c")]) == [["a", "b"], ["c"]]


# ------------------------------------------------------------------------------ state
@pytest.mark.parametrize("spec", ["mlstm", "attention", "linear_attention", "gated_conv", "linear_recurrence",
                                  "slstm_2024_block"])
def test_state_carries_through_prefill_and_step(spec):
    mx.random.seed(0)
    data = load_arch(spec)["blocks"][0]["spec"]
    params = {"dim": 16, "num_heads": 2} if "num_heads" in data["params"] else {"dim": 16}  # gated_conv has no heads
    block = WiredBlock(data, params)
    x = mx.random.normal((2, 9, 16))
    full, _ = block(x)
    y1, state = block(x[:, :6])
    assert len(state) == len(block.make_state(2))
    steps = [y1]
    for t in range(6, 9):
        yt, state = block(x[:, t : t + 1], state)
        steps.append(yt)
    assert rel(mx.concatenate(steps, axis=1), full) < 2e-5
    zero = block.make_state(2)
    assert rel(block(x, zero)[0], full) < 1e-6


# ------------------------------------------------------------------------------ models
def test_spec_round_trip_yaml_json_and_builder():
    spec = WiringSpec({"cells": {"a": {"type": "linear_projection", "dim": 16},
                                 "b": {"type": "linear_projection", "dim": 16}},
                       "connections": [{"from": "a", "to": "b", "polarity": -1, "density": 0.5}]})
    again = WiringSpec(__import__("yaml").safe_load(spec.to_yaml()))
    assert again.to_dict() == spec.to_dict() == json.loads(json.dumps(spec.to_dict()))
    block = WiredBlock(spec)
    assert block.input_ports == {"x": 16} and block.output_ports == {"y": 16}
    assert block.synapses[1].polarity == -1 and block.synapses[1].weighted


def test_lab_model_save_load_round_trip(tmp_path):
    model = build_model("hybrid", vocab_size=20, embedding_dim=16, seed=0)
    ids = mx.array([[1, 2, 3, 4, 5, 6]])
    logits, state = model(ids)
    xlstm_metal.save_model(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "xlstm_lab" and saved["blocks"][0]["spec"]["cells"]
    loaded = xlstm_metal.load_model(tmp_path / "m")
    assert isinstance(loaded, LabModel)
    assert np.array_equal(np.array(loaded(ids)[0]), np.array(logits))
    assert rel(loaded(mx.array([[7]]), state)[0], model(mx.array([[7]]), state)[0]) == 0.0


def test_bad_arch_block_size_is_named():
    with pytest.raises(WiringError, match="block 0"):
        LabModel(LabConfig(vocab_size=10, embedding_dim=8,
                           blocks=[{"spec": {"cells": {"a": {"type": "linear_projection", "in": 8, "out": 4}}}}]))


# ------------------------------------------------------------------------------ equivalence
def test_wired_xlstm_large_equals_the_hand_written_model(tmp_path):
    from xlstm_metal.config import xLSTMConfig
    from xlstm_metal.models.xlstm_large import xLSTMLarge
    from xlstm_metal.training import init_xlstm_large

    cfg = xLSTMConfig(embedding_dim=64, num_heads=4, num_blocks=2, vocab_size=97, chunk_size=16)
    model = xLSTMLarge(cfg)
    init_xlstm_large(model, 3)
    wired = wired_equivalent(model)
    assert set(dict(tree_flatten(wired.parameters()))) == set(dict(tree_flatten(model.parameters())))
    ids = mx.random.randint(0, 97, (2, 40))
    (a, sa), (b, sb) = model(ids), wired(ids)
    assert rel(b, a) < 1e-5
    for x, y in zip(sa, sb):
        assert len(x) == len(y) and all(rel(q, p) < 1e-5 for p, q in zip(x, y))
    assert rel(wired(ids[:, :1], sb)[0], model(ids[:, :1], sa)[0]) < 1e-5
    # The same checkpoint files load into the wired model.
    xlstm_metal.save_model(model, tmp_path / "ckpt")
    from xlstm_metal.lab import load_wired

    loaded = load_wired(tmp_path / "ckpt")
    assert isinstance(loaded, LabModel) and rel(loaded(ids)[0], a) < 1e-5


def test_a_quantized_checkpoint_loads_wired_with_its_dequantized_weights(tmp_path):
    # The packaged model is quantized: load_wired refused it (the wiring's projection cells are
    # no nn.Linear, so nn.quantize left them in float: 40 unexpected .scales/.biases).
    from xlstm_metal.config import xLSTMConfig
    from xlstm_metal.lab import load_wired
    from xlstm_metal.models.xlstm_large import xLSTMLarge
    from xlstm_metal.quantization import quantize_model
    from xlstm_metal.training import init_xlstm_large

    cfg = xLSTMConfig(embedding_dim=128, num_heads=4, num_blocks=2, vocab_size=97, chunk_size=16)
    model = xLSTMLarge(cfg)
    init_xlstm_large(model, 4)
    quantize_model(model, bits=4, group_size=32)
    xlstm_metal.save_model(model, tmp_path / "ckpt")
    ours = xlstm_metal.load_model(tmp_path / "ckpt")
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in ours.named_modules())
    wired = load_wired(tmp_path / "ckpt")
    ids = mx.random.randint(0, 97, (2, 24))
    assert rel(wired(ids)[0], ours(ids)[0]) < 1e-5
    q = dict(ours.named_modules())["backbone.blocks.0.mlstm_layer.q"]
    assert np.array_equal(np.array(dict(tree_flatten(wired.parameters()))["backbone.blocks.0.mlstm_layer.q.weight"]),
                          np.array(mx.dequantize(q.weight, q.scales, q.biases, 32, 4)))


def test_wired_slstm_2024_block_equals_the_hand_written_model(tmp_path):
    from xlstm_metal.models.xlstm_2024 import xLSTMLMConfig, model_from_config

    cfg = xLSTMLMConfig.from_dict({"vocab_size": 50, "embedding_dim": 64, "num_blocks": 2, "slstm_at": "all",
                                   "slstm_block": {"slstm": {"num_heads": 4}}})
    model = model_from_config(cfg, seed=0)
    wired = wired_equivalent(model)
    assert set(dict(tree_flatten(wired.parameters()))) == set(dict(tree_flatten(model.parameters())))
    ids = mx.random.randint(0, 50, (2, 12))
    (a, sa), (b, sb) = model(ids), wired(ids)
    assert rel(b, a) < 1e-5
    for x, y in zip(sa, sb):  # (c, n, m, h, conv) in the hand-written order
        assert len(x) == len(y) == 5 and all(rel(q, p) < 1e-5 for p, q in zip(x, y))
    assert rel(wired(ids[:, :1], sb)[0], model(ids[:, :1], sa)[0]) < 1e-5
    xlstm_metal.save_model(model, tmp_path / "ckpt")
    from xlstm_metal.lab import load_wired

    assert rel(load_wired(tmp_path / "ckpt")(ids)[0], a) < 1e-5


@pytest.mark.parametrize("where, spec_seed, conn, message", [
    ("connection seed", 0, {"seed": "abc"}, r"connection 0 \(a -> b\): seed must be a non-negative integer, got 'abc'"),
    ("connection seed", 0, {"seed": -3}, r"connection 0 \(a -> b\): seed must be a non-negative integer, got -3"),
    ("spec seed", "x", {}, r"^seed must be a non-negative integer, got 'x'"),
    ("weight flag", 0, {"weight": "no"}, r"connection 0 \(a -> b\): weight must be true or false, got 'no'"),
])
def test_bad_seeds_and_flags_are_wiring_errors_naming_the_field(where, spec_seed, conn, message):
    # A string or negative seed reached numpy (TypeError / ValueError tracebacks from `mad --arch`);
    # weight: "no" was read as bool("no") = True.
    spec = {"seed": spec_seed, "inputs": {"x": 8}, "outputs": {"y": 8},
            "cells": {"a": {"type": "linear_projection", "dim": 8}, "b": {"type": "linear_projection", "dim": 8}},
            "connections": [{"from": "a", "to": "b", "density": 0.5, **conn},
                            {"from": "in.x", "to": "a"}, {"from": "b", "to": "out.y"}]}
    with pytest.raises(WiringError, match=message):
        WiringSpec(spec).resolve()
    # a valid connection seed still fixes the mask
    ok = {**spec, "seed": 0, "connections": [{"from": "a", "to": "b", "density": 0.5, "seed": 7}] + spec["connections"][1:]}
    assert WiringSpec(ok).resolve().connections[0].seed == 7
