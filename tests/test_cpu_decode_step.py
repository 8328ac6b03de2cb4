"""The CPU decode step in C (xlstm_metal/kernels/cpu/decode_step.py) against the MLX graph it
stands for: the same logits and states, the tree read at every call, and the graph wherever the
model or the state is not what the C step computes."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from xlstm_metal import _blas, benchmark as bm
from xlstm_metal.generation.runner import xLSTMRunner
from xlstm_metal.kernels.cpu import decode_step as ds
from xlstm_metal.kernels.mlstm import defer_state

from conftest import tiny_model
from test_module_tree import _not_gates

IDS = [3, 17, 42, 5, 88, 1, 23, 64]

pytestmark = [
    pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the C step runs where MLX runs on the CPU"),
    # .ci/run installs a compiler; elsewhere, without one, neither the row kernel nor the C step is
    # built, and a build without OpenMP leaves both to OpenBLAS where it runs more threads
    pytest.mark.skipif(ds.library() is None or not _blas.gemv_rows(),
                       reason="no C compiler, or the row kernel is off (XLSTM_METAL_GEMV_ROWS=0, or a "
                              "one-thread build): the C step does not run"),
]


def _rel(a, b) -> float:
    a, b = np.array(a), np.array(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _graph_steps(model, ids, state=None):
    out = []
    for token in ids:
        logits, state = model(mx.array([[token]], dtype=mx.int32), state)
        out.append(logits)
    return out, state


def _c_steps(model, ids, state=None):
    out = []
    for token in ids:
        result = ds.decode_step(model, mx.array([[token]], dtype=mx.int32), state)
        assert result is not None, ds.unsupported_reason(model)
        logits, state = result
        out.append(logits)
    return out, state


def _assert_same(model, ids=IDS, state=None, tol=2e-5):
    expected, expected_state = _graph_steps(model, ids, state)
    got, got_state = _c_steps(model, ids, state)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape == (1, 1, model.config.vocab_size)
        assert _rel(a, b) < tol, f"logits of step {step}: {_rel(a, b):.3g}"
    for block, (ours, theirs) in enumerate(zip(got_state, expected_state)):
        for name, a, b in zip("Cnm", ours, theirs):
            assert a.shape == b.shape and a.dtype == mx.float32, (block, name)
            assert _rel(a, b) < tol, f"block {block} {name}: {_rel(a, b):.3g}"


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True, "add_out_norm": False},
    {"gate_soft_cap": None, "output_logit_soft_cap": None, "num_heads": 4, "num_blocks": 3},
], ids=["default", "tied-no-out-norm", "no-caps-4-heads"])
def test_c_step_equals_the_graph_from_the_zero_state(overrides):
    model = tiny_model(seed=3, **overrides)
    assert ds.unsupported_reason(model) is None
    _assert_same(model)


def test_c_step_after_fuse_projections_and_from_a_prefill_state():
    model = tiny_model(seed=4)
    model.fuse_projections()  # the layers' weights become row views of the fused matrices
    _, state = model.prefill(mx.array([[9, 8, 7, 6, 5, 4, 3, 2, 1, 60]], dtype=mx.int32), None)
    _assert_same(model, state=state)


def test_the_state_it_returned_is_read_where_it_wrote_it_and_never_changed(monkeypatch):
    # The step writes the new state and the logits into one array of MLX's and reads a state it
    # returned from there (no views made); a caller's older state, branched from twice, and a
    # state copied or rebuilt from the returned arrays give the same values; no returned array
    # changes afterwards.
    model = tiny_model(seed=5)
    views = {"calls": 0}
    state_views = ds._state_views

    def counted(*args):
        views["calls"] += 1
        return state_views(*args)

    monkeypatch.setattr(ds, "_state_views", counted)
    expected, expected_state = _graph_steps(model, IDS)
    got, state = _c_steps(model, IDS)
    assert views["calls"] == 1  # the zero state only: every later state was the step's own output
    for a, b in zip(got, expected):
        assert _rel(a, b) < 2e-5
    for ours, theirs in zip(state, expected_state):
        assert all(_rel(a, b) < 2e-5 for a, b in zip(ours, theirs))
    _, middle = _c_steps(model, IDS[:3])
    kept = [tuple(np.array(a) for a in block) for block in middle]
    first, _ = _c_steps(model, IDS[3:], middle)
    second, _ = _c_steps(model, IDS[3:], middle)  # the same state again, after it was stepped from
    for a, b, c in zip(first, second, expected[3:]):
        assert mx.array_equal(a, b) and _rel(a, c) < 2e-5
    for block, copies in zip(middle, kept):
        assert all(np.array_equal(np.array(a), c) for a, c in zip(block, copies))
    _, last = _c_steps(model, IDS[:3])
    calls = views["calls"]
    rebuilt = [tuple(block) for block in last]  # the last output's arrays in new containers: still its own
    assert mx.array_equal(_c_steps(model, [IDS[3]], rebuilt)[0][0], first[0]) and views["calls"] == calls
    assert mx.array_equal(_c_steps(model, [IDS[3]], middle)[0][0], first[0]) and views["calls"] == calls + 1
    calls += 1  # an older output than the last: read through views, as any other state
    copied = [tuple(mx.array(np.array(a)) for a in block) for block in middle]  # other arrays: read as given
    assert mx.array_equal(_c_steps(model, [IDS[3]], copied)[0][0], first[0]) and views["calls"] == calls + 1
    # an array of the last output given new values in place (the same object, other memory)
    _, last = _c_steps(model, IDS[:3])
    last[1][0][0, 0] = 0.0  # block 1's C, head 0: the rows of row 0
    edited = [tuple(mx.array(np.array(a)) for a in block) for block in last]
    reference, _ = _graph_steps(model, [IDS[3]], edited)
    got, _ = _c_steps(model, [IDS[3]], last)
    assert _rel(got[0], reference[0]) < 2e-5 and _rel(got[0], first[0]) > 1e-3
    logits, _ = _c_steps(model, [IDS[0]])
    assert logits[0].shape == (1, 1, model.config.vocab_size) and _rel(logits[0], expected[0]) < 2e-5
    # what the step keeps beside MLX's memory: its work space only (its outputs are MLX's arrays)
    assert ds.held_bytes(model) == model._cpu_step_plan.rows(1).work.nbytes > 0


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 32), (4, 32), (4, 64), (5, 64), (6, 32), (6, 64), (8, 32),
                                        (8, 64)])
def test_c_step_reads_quantized_weights(bits, group):
    """Every affine width: the packed integers read in C give the graph's logits and states (MLX's
    quantized matmul); 4 and 8 bits take their own unpacking, the others the general one."""
    model = tiny_model(seed=11, tie_word_embeddings=bits % 2 == 0)
    nn.quantize(model, group_size=group, bits=bits)
    assert isinstance(model.blocks[0].ffn.proj_down, nn.QuantizedLinear)
    assert ds.unsupported_reason(model) is None
    _assert_same(model)


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("tied", [True, False])
def test_c_step_reads_4_bit_float_formats(mode, tied):
    """mxfp4 / nvfp4 weights (embeddings and head too) read as affine 8-bit (their values on a
    half-step grid, exactly): the graph's logits and states, fused groups included; the levels
    equal MLX's dequantization bit for bit."""
    from xlstm_metal.kernels.cpu.decode_step import _FP4AsAffine

    group = 32 if mode == "mxfp4" else 16
    w = mx.random.normal((8, 64), key=mx.random.key(3)) * 3
    packed, scales = mx.quantize(w, group, 4, mode=mode)
    read = _FP4AsAffine(packed, scales, mode, group)
    levels = mx.view(read.weight, mx.uint8).reshape(8, 64).astype(mx.float32)
    as_read = levels * mx.repeat(read.scales, group, axis=1) + mx.repeat(read.biases, group, axis=1)
    assert mx.array_equal(as_read, mx.dequantize(packed, scales, None, group, 4, mode=mode, dtype=mx.float32)).item()

    model = tiny_model(seed=16, tie_word_embeddings=tied)
    nn.quantize(model, mode=mode, class_predicate=_not_gates)
    assert model.backbone.embeddings.mode == mode and ds.unsupported_reason(model) is None
    # 1e-4: at one step of this model MLX's own mxfp4 graph is 4.6e-5 off the float32 model holding
    # the dequantized weights (the C step 1.7e-5; both ~4e-7 elsewhere)
    _assert_same(model, tol=1e-4)
    model.fuse_projections()
    assert model.blocks[0].mlstm_layer["_fused_projection"][0]["scales"].dtype == mx.uint8
    _assert_same(model, tol=1e-4)
    # the layers of a fused group read one conversion of its arrays, each from its own row
    read = [a for a in ds._collect(model)[0] if isinstance(a, _FP4AsAffine)]
    q_k = [a for a in read if a.source[0] is model.blocks[0].mlstm_layer["_fused_projection"][0]["weight"]]
    assert len(q_k) == 4 and all(a.shared is q_k[0].shared for a in q_k) and [a.row for a in q_k] == [0, 32, 64, 128]


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
def test_fp4_conversion_in_c_equals_mlx_ops_bit_for_bit(mode):
    """The C conversion (xl_fp4_as_affine8) against its reference in MLX's ops, on every code byte
    and every scale byte (E8M0's 0 and 255: a subnormal and inf; E4M3's NaN, zeros and subnormals)."""
    group = 32 if mode == "mxfp4" else 16
    rows, cols = 16, 512
    rng = np.random.default_rng(5)
    codes = np.arange(rows * cols // 2, dtype=np.uint32).reshape(rows, cols // 2) % 256  # every byte
    rng.shuffle(codes, axis=1)
    packed = mx.array(codes.astype(np.uint8)).reshape(rows, -1)
    packed = mx.view(packed, mx.uint32)
    scales = mx.array((np.arange(rows * cols // group) % 256).astype(np.uint8).reshape(rows, cols // group))
    got = ds.fp4_as_affine8(packed, scales, mode, group)
    want = ds.fp4_as_affine8_reference(packed, scales, mode)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(np.array(a), np.array(b), equal_nan=a.dtype == mx.float32)
    assert np.isnan(np.array(got[1])).any() == (mode == "nvfp4") and np.isinf(np.array(got[1])).any() == (mode == "mxfp4")


def test_mxfp8_is_left_to_the_graph():
    """mxfp8's values (e4m3) lie on no grid of 256 levels: the C code leaves it to MLX, saying why."""
    model = tiny_model(seed=17)
    nn.quantize(model, mode="mxfp8", class_predicate=_not_gates)
    assert "mxfp8" in ds.unsupported_reason(model)


WIDE = ds.library() is not None and bool(ds.library().xl_wide_unpack_available())


@pytest.mark.parametrize("wide", [
    pytest.param(True, marks=pytest.mark.skipif(not WIDE, reason="this CPU or build has no AVX-512BW unpacking")),
    False,
], ids=["avx512bw", "portable"])
@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (5, 32), (6, 64), (6, 128)])
def test_c_step_general_unpacking_both_forms(wide, bits, group):
    """The general unpacking's two forms (AVX-512BW and portable), each against the graph, at 1
    and 3 rows: where this CPU has AVX-512BW the default takes the wide form, so without the
    switch the portable one would go untested here, and the other way round elsewhere."""
    model = tiny_model(seed=12 + bits, tie_word_embeddings=False, embedding_dim=128)
    nn.quantize(model, group_size=group, bits=bits)
    with ds.wide_unpacking(wide) as runs_wide:
        assert runs_wide == wide
        _assert_same(model)
        prompt = mx.array([[4, 9, 1], [7, 7, 2], [30, 11, 8]], dtype=mx.int32)
        expected, _ = model(prompt[:, :1])
        got = ds.decode_step(model, prompt[:, :1], None)
        assert got is not None
        assert _rel(got[0], expected) < 2e-5


def _recipe(path: str, module: nn.Module):
    """The packaged model's kind of mix: embeddings at 6 bits, the gates in float, the head at 8."""
    if not hasattr(module, "to_quantized") or path.endswith(("igate_preact", "fgate_preact")):
        return False
    if path == "backbone.embeddings":
        return {"group_size": 64, "bits": 6}
    if path == "lm_head":
        return {"group_size": 32, "bits": 8}
    return {"group_size": 64, "bits": 4}


@pytest.mark.parametrize("rows", [1, 3, 8, 12, 20])
def test_c_step_on_a_mixed_recipe_from_a_prefill_state(rows):  # beyond MAX_ROWS: groups of MAX_ROWS
    model = tiny_model(seed=12)
    nn.quantize(model, class_predicate=_recipe)
    assert type(model.blocks[0].mlstm_layer.igate_preact) is nn.Linear
    assert ds.unsupported_reason(model) is None
    prompt = mx.array([[(7 * r + j) % 97 for j in range(6)] for r in range(rows)], dtype=mx.int32)
    _, state = model.prefill(prompt, None)
    graph_state = c_state = state
    for token in IDS[:4]:
        ids = mx.array([[(token + r) % 97] for r in range(rows)], dtype=mx.int32)
        expected, graph_state = model(ids, graph_state)
        got, c_state = ds.decode_step(model, ids, c_state)
        assert got.shape == expected.shape == (rows, 1, 97)
        assert _rel(got, expected) < 2e-5
    for ours, theirs in zip(c_state, graph_state):
        for a, b in zip(ours, theirs):
            assert _rel(a, b) < 2e-5


def test_quantized_weights_are_read_as_quantized():
    """A change to one packed integer, scale or bias reaches the C step's logits (it reads the
    tree's quantized arrays, not a float copy made once)."""
    model = tiny_model(seed=13)
    nn.quantize(model, group_size=32, bits=4)
    token = mx.array([[3]], dtype=mx.int32)
    before, _ = ds.decode_step(model, token, None)
    down = model.blocks[1].ffn.proj_down
    down.scales = down.scales * 2.0
    after, _ = ds.decode_step(model, token, None)
    expected, _ = model(token, None)
    assert _rel(after, expected) < 2e-5 and _rel(after, before) > 1e-3
    head = model.lm_head
    head.weight = mx.zeros_like(head.weight)  # every integer 0: the head's output is its biases' sums
    got, _ = ds.decode_step(model, token, None)
    expected, _ = model(token, None)
    assert _rel(got, expected) < 2e-5


def test_fused_quantized_groups_are_what_it_reads():
    """While fuse_projections()'s quantized copies are current the graph multiplies by them; so do
    the C step and the C prefill (here made to differ from the layers by doubling their scales)."""
    from xlstm_metal.kernels.cpu import prefill as cp

    def not_gates(path: str, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and not path.endswith(("igate_preact", "fgate_preact"))

    model = tiny_model(seed=15)
    nn.quantize(model, group_size=32, bits=4, class_predicate=not_gates)
    model.fuse_projections()
    for block in model.blocks:
        for group in (block.mlstm_layer["_fused_projection"][0], block.ffn["_fused_gate_up"][0]):
            assert group["weight"].dtype == mx.uint32
            group["scales"] = group["scales"] * 2.0
    token = mx.array([[11]], dtype=mx.int32)
    with ds.switched(False):
        expected, _ = model(token, None)
    got, _ = ds.decode_step(model, token, None)
    assert _rel(got, expected) < 2e-5
    plain = tiny_model(seed=15)
    nn.quantize(plain, group_size=32, bits=4, class_predicate=not_gates)
    assert _rel(got, plain(token, None)[0]) > 1e-2  # the doubled scales changed the output
    ids = mx.array([[4, 8, 15, 16, 23, 42, 7, 9, 11, 13]], dtype=mx.int32)
    got = cp.prefill(model, ids)
    with cp.switched(False):
        expected = model.prefill(ids)
    assert got is not None and _rel(got[0], expected[0]) < 3e-5


def test_the_tree_is_read_at_every_call():
    model = tiny_model(seed=5)
    token = mx.array([[7]], dtype=mx.int32)
    before, _ = ds.decode_step(model, token, None)
    layer = model.blocks[1].mlstm_layer
    layer.out_proj.weight = layer.out_proj.weight * 3.0  # a new array in the tree
    after, _ = ds.decode_step(model, token, None)
    expected, _ = model(token, None)
    assert _rel(after, expected) < 2e-5
    assert _rel(after, before) > 1e-3
    model.blocks[0].norm_ffn.eps = 0.5  # a plain attribute the step reads
    expected, _ = model(token, None)
    assert _rel(ds.decode_step(model, token, None)[0], expected) < 2e-5
    for block in model.blocks:  # the cap the graph uses is the projection cell's
        block.mlstm_layer.projection_cell.gate_soft_cap = 3.0
    expected, _ = model(token, None)
    assert _rel(ds.decode_step(model, token, None)[0], expected) < 2e-5
    model.blocks[0].mlstm_layer.projection_cell.gate_soft_cap = 4.0
    assert ds.unsupported_reason(model) == "the blocks' gate soft caps differ"


class _Zeros(nn.Module):
    def __call__(self, x):
        return mx.zeros((*x.shape[:-1], 64), x.dtype)


def test_models_it_does_not_compute_run_the_graph():
    token = mx.array([[5]], dtype=mx.int32)
    microscaled = tiny_model(seed=6)
    nn.quantize(microscaled, group_size=32, bits=8, mode="mxfp8")  # no affine form (mxfp4's is read)
    assert ds.unsupported_reason(microscaled) == \
        "backbone.embeddings is quantized in a way the C code does not read (mxfp8, 8 bits, groups of 32)"
    assert ds.decode_step(microscaled, token, None) is None
    swapped = tiny_model(seed=6)
    swapped.blocks[1].mlstm_layer.out_proj = _Zeros()  # a user's module: the graph calls it
    assert ds.unsupported_reason(swapped) == \
        "backbone.blocks.1.mlstm_layer.out_proj is not a float32 nn.Linear or an affine nn.QuantizedLinear"
    assert ds.decode_step(swapped, token, None) is None
    step = bm.make_decode_step(swapped)
    plain = tiny_model(seed=6)
    nxt, _ = step(token, None)
    expected, _ = swapped(token, None)
    assert nxt.item() == mx.argmax(expected[0, -1]).item()
    assert _rel(expected, plain(token, None)[0]) > 1e-3  # the zero module changed the output
    half = tiny_model(seed=6)
    half.update(nn.utils.tree_map(lambda p: p.astype(mx.bfloat16), half.parameters()))
    assert ds.decode_step(half, token, None) is None
    plain = tiny_model(seed=6)
    deferred = [defer_state(block_state, 4) for block_state in plain.make_state(1)]  # CUDA's form
    assert ds.decode_step(plain, token, deferred) is None
    assert ds.decode_step(plain, mx.array([[5, 6]], dtype=mx.int32), None) is None  # two tokens: prefill


def test_turned_off_by_the_switch(monkeypatch):
    model = tiny_model(seed=7)
    monkeypatch.setattr(ds, "ENABLED", False)
    assert ds.unsupported_reason(model) == "turned off by XLSTM_METAL_CPU_STEP=0"
    assert ds.decode_step(model, mx.array([[1]], dtype=mx.int32), None) is None


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_runner_generates_the_same_tokens_with_and_without_the_c_step(monkeypatch, temperature):
    model = tiny_model(seed=8)
    runs = []
    for enabled in (False, True):
        monkeypatch.setattr(ds, "ENABLED", enabled)
        runner = xLSTMRunner(model)
        calls = []
        real = ds.decode_step
        monkeypatch.setattr(ds, "decode_step", lambda *a: calls.append(1) or real(*a))
        runs.append(runner.generate([4, 9, 33], max_tokens=24, temperature=temperature, seed=3))
        runs.append(runner.generate([[4, 9, 33], [70, 2], [5]], max_tokens=12, temperature=temperature, seed=3))
        monkeypatch.setattr(ds, "decode_step", real)
        assert (len(calls) > 0) == enabled
    assert len(runs[0]) == 24 and [len(r) for r in runs[1]] == [12, 12, 12]
    assert runs[0] == runs[2] and runs[1] == runs[3]


def test_benchmark_decode_step_takes_it():
    model = tiny_model(seed=9)
    ours = bm.make_decode_step(model)
    with ds.switched(False):
        graph = bm.make_decode_step(model)
    assert ds.ENABLED
    tok_a = tok_b = mx.array([[12]], dtype=mx.int32)
    state_a = state_b = None
    for _ in range(10):
        tok_a, state_a = ours(tok_a, state_a)
        tok_b, state_b = graph(tok_b, state_b)
        assert tok_a.item() == tok_b.item()
    assert _rel(state_a[1][0], state_b[1][0]) < 2e-5


@pytest.mark.parametrize("rows", [1, 2])
def test_mlx_lm_view_decodes_through_it(monkeypatch, rows):
    from xlstm_metal.mlx_lm_model import from_xlstm_metal

    view = from_xlstm_metal(tiny_model(seed=10))
    assert "Model" in ds.unsupported_reason(view)  # its __call__ takes mlx-lm's cache: not the runner's
    calls = []
    real = ds.decode_step
    monkeypatch.setattr(ds, "decode_step", lambda *a: calls.append(1) or real(*a))
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(ds, "ENABLED", enabled)
        cache = view.make_cache()
        view(mx.array([[2, 40, 7], [9, 1, 66]][:rows], dtype=mx.int32), cache)  # a prompt through the graph
        runs.append([view(mx.array([[token], [token + 1]][:rows], dtype=mx.int32), cache) for token in IDS])
    assert len(calls) == 2 * len(IDS)  # every decode token asked; only the first run's computed it
    for a, b in zip(*runs):
        assert a.shape == b.shape == (rows, 1, 97) and _rel(a, b) < 2e-5


def test_a_subclass_with_its_own_call_runs_its_call():
    from xlstm_metal.models.xlstm_large import xLSTMLarge

    class Biased(xLSTMLarge):  # always prefers token 5
        def __call__(self, input_ids, state=None, **kwargs):
            logits, state = super().__call__(input_ids, state, **kwargs)
            return logits + 1e3 * (mx.arange(logits.shape[-1]) == 5), state

    model = tiny_model(seed=12)
    biased = Biased(model.config)
    biased.update(model.parameters())
    assert ds.unsupported_reason(biased) == "Biased.__call__ is not xLSTMLarge's"
    # the first token comes from model.prefill; every decode step from Biased.__call__
    assert xLSTMRunner(biased).generate([1, 2, 3], max_tokens=6)[1:] == [5] * 5
    assert xLSTMRunner(model).generate([1, 2, 3], max_tokens=6)[1:] != [5] * 5


def test_off_with_the_row_kernel(monkeypatch):
    model = tiny_model(seed=13)
    monkeypatch.setattr(_blas, "gemv_rows", lambda: False)
    assert ds.unsupported_reason(model).startswith("the BLAS forwarder's row kernel is off")
    assert ds.decode_step(model, mx.array([[1]], dtype=mx.int32), None) is None


@pytest.mark.parametrize("rows", [2, 3, 8])
def test_several_rows_equal_the_graph(rows):
    model = tiny_model(seed=14)
    model.fuse_projections()
    rng = np.random.default_rng(rows)
    _, state = model.prefill(mx.array(rng.integers(0, 97, (rows, 7)), dtype=mx.int32), None)
    for _ in range(3):
        ids = mx.array(rng.integers(0, 97, (rows, 1)), dtype=mx.int32)
        expected, expected_state = model(ids, state)
        got = ds.decode_step(model, ids, state)
        assert got is not None
        assert got[0].shape == expected.shape == (rows, 1, 97)
        assert _rel(got[0], expected) < 2e-5
        for ours, theirs in zip(got[1], expected_state):
            for a, b in zip(ours, theirs):
                assert a.shape == b.shape and _rel(a, b) < 2e-5
        state = got[1]
    # beyond MAX_ROWS float weights go to the graph (MLX's GEMM reads each weight once for all rows)
    assert ds.decode_step(model, mx.zeros((ds.MAX_ROWS + 1, 1), mx.int32), None) is None


def test_fused_copies_are_read_while_current():
    """While fuse_projections()'s copies are current the graph multiplies by them, not by the
    layers' row views: so does the C step (a copy replaced in place shows in both)."""
    model = tiny_model(seed=15)
    model.fuse_projections()
    token = mx.array([[11]], dtype=mx.int32)
    ffn = model.blocks[1].ffn
    ffn["_fused_gate_up"][0]["weight"] = ffn["_fused_gate_up"][0]["weight"] * 0.5
    expected, _ = model(token, None)
    got, _ = ds.decode_step(model, token, None)
    assert _rel(got, expected) < 2e-5
    model.unfuse_projections()  # the layers' own weights again (unchanged by the copy's edit)
    expected_unfused, _ = model(token, None)
    assert _rel(ds.decode_step(model, token, None)[0], expected_unfused) < 2e-5
    assert _rel(expected_unfused, expected) > 1e-3
