"""The fused sLSTM (xlstm_metal.kernels.fast.slstm_fused) against the pure-ops reference.

CPU: the custom function with its ops forward and backward equals the reference and mx.vjp
of the reference (every input, incl. R, bias and the state), the cell's dispatch, the launch
plan. CUDA (skipped elsewhere, like tests/test_cuda_kernels.py): the kernels against the
reference computed on the CPU stream (exact float32) — outputs and states, gradients, steps
vs the sequence, bf16 inputs, a model's logits and gradients.
"""

import mlx.core as mx
import numpy as np
import pytest

from xlstm_metal.cells.slstm import sLSTMCell
from xlstm_metal.kernels.fast import slstm_fused as sf
from xlstm_metal.kernels.fast.slstm_fused import kernel_supported, slstm_recurrence
from xlstm_metal.kernels.fast.step import cuda_available
from xlstm_metal.kernels.slstm import slstm_sequence, slstm_step

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


def _rel(a, b) -> float:
    a = np.array(a.astype(mx.float32), dtype=np.float64)
    b = np.array(b.astype(mx.float32), dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _inputs(seed, B=2, S=7, NH=2, DH=8, dtype=mx.float32, with_state=True):
    rng = np.random.default_rng(seed)
    wx = rng.normal(size=(B, S, NH, 4, DH)).astype(np.float32) * 2.0
    wx[..., 0, :] += rng.uniform(-4, 4, size=(NH, DH)).astype(np.float32)  # input gates far apart
    R = rng.normal(size=(NH, DH, 4 * DH)).astype(np.float32) * (1.5 / np.sqrt(DH))
    bias = rng.normal(size=(NH, 4, DH)).astype(np.float32)
    state = None
    if with_state:
        c, m, h = (rng.normal(size=(B, NH, DH)).astype(np.float32) for _ in range(3))
        n = np.abs(rng.normal(size=(B, NH, DH))).astype(np.float32) + 0.5
        state = tuple(mx.array(x) for x in (c, n, m, h))
    return mx.array(wx).astype(dtype), mx.array(R), mx.array(bias), state


def _reference(wx, R, state, bias):
    return slstm_sequence(wx.astype(mx.float32) + bias, R, state)


def _loss_fn(fn, weights):
    """Scalar loss over h and every final state entry, so each gradient path is exercised."""

    def loss(wx, R, bias, c, n, m, h):
        hs, final = fn(wx, R, (c, n, m, h), bias)
        total = mx.sum(hs.astype(mx.float32) * weights[0])
        for x, w in zip(final, weights[1:]):
            total = total + mx.sum(x * w)
        return total

    return loss


def _loss_weights(seed, B, S, NH, DH):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.normal(size=s).astype(np.float32)) for s in [(B, S, NH, DH)] + [(B, NH, DH)] * 4]


def _grads(fn, wx, R, bias, state, weights):
    B, S, NH, _, DH = wx.shape
    if state is None:
        z = mx.zeros((B, NH, DH))
        state = (z, z, z, z)
    return mx.grad(_loss_fn(fn, weights), argnums=tuple(range(7)))(wx, R, bias, *state)


def _ops(wx, R, state, bias):
    return slstm_recurrence(wx, R, state, bias=bias, backend="ops")


def _cuda(wx, R, state, bias):
    return slstm_recurrence(wx, R, state, bias=bias, backend="cuda")


# ------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("with_state", [True, False])
def test_ops_custom_function_equals_reference_and_its_vjp(with_state):
    wx, R, bias, state = _inputs(0, with_state=with_state)
    h, st = _ops(wx, R, state, bias)
    h_ref, st_ref = _reference(wx, R, state, bias)
    assert _rel(h, h_ref) == 0.0
    for a, b in zip(st, st_ref):
        assert _rel(a, b) == 0.0
    weights = _loss_weights(1, *h.shape)
    for g, g_ref in zip(_grads(_ops, wx, R, bias, state, weights), _grads(_reference, wx, R, bias, state, weights)):
        assert g.shape == g_ref.shape
        assert _rel(g, g_ref) <= 1e-5, _rel(g, g_ref)


def test_ops_vjp_through_saturated_gates_and_fresh_rows():
    """Large gate inputs clamp exp(.) at 1 and flip max(i, lf) between steps; row 1 starts
    from the empty state (n == 0) while row 0 continues."""
    wx, R, bias, state = _inputs(2, B=2, S=6)
    wx = wx * 6.0
    state = tuple(mx.concatenate([s[:1], mx.zeros_like(s[1:])], axis=0) for s in state)
    weights = _loss_weights(3, 2, 6, 2, 8)
    for g, g_ref in zip(_grads(_ops, wx, R, bias, state, weights), _grads(_reference, wx, R, bias, state, weights)):
        assert _rel(g, g_ref) <= 1e-5, _rel(g, g_ref)


def test_ops_vjp_of_every_saved_output():
    """The custom function returns every step's (h, c, n, m) and the gate pre-activations;
    cotangents on all of them reach the inputs as the reference's autodiff says."""
    wx, R, bias, state = _inputs(4, B=1, S=5)
    fn = sf._recurrence("ops")
    rng = np.random.default_rng(5)
    outs = fn(wx, bias.reshape(2, 4, 8), R, *state)
    weights = [mx.array(rng.normal(size=o.shape).astype(np.float32)) for o in outs]

    def via_custom(wx, bias, R, c, n, m, h):
        return sum(mx.sum(o * w) for o, w in zip(fn(wx, bias, R, c, n, m, h), weights))

    def via_reference(wx, bias, R, c, n, m, h):
        outs = sf._forward_ops(wx, bias, R, c, n, m, h)  # the reference steps, plain autodiff
        return sum(mx.sum(o * w) for o, w in zip(outs, weights))

    args = (wx, bias, R, *state)
    g = mx.grad(via_custom, argnums=tuple(range(7)))(*args)
    g_ref = mx.grad(via_reference, argnums=tuple(range(7)))(*args)
    for a, b in zip(g, g_ref):
        assert _rel(a, b) <= 1e-5, _rel(a, b)


def test_cell_dispatch_off_cuda_runs_the_reference():
    cell = sLSTMCell(16, 2)
    assert cell.kernel == "fused"
    rng = np.random.default_rng(6)
    cell.set_from_compute_layout(mx.array(rng.normal(size=(2, 8, 32)).astype(np.float32) * 0.3),
                                 mx.array(rng.normal(size=(2, 4, 8)).astype(np.float32)))
    wx = mx.array(rng.normal(size=(3, 5, 2, 4, 8)).astype(np.float32))
    assert cell.uses_fused_kernel() == cuda_available()
    h, st = cell(wx)
    ref = sLSTMCell(16, 2, kernel="reference")
    ref.update(cell.parameters())
    h_ref, st_ref = ref(wx)
    assert _rel(h, h_ref) <= (1e-5 if cuda_available() else 0.0)
    h1, _ = cell(wx[:, :1], st)  # the step path
    h1_ref, _ = ref(wx[:, :1], st_ref)
    assert _rel(h1, h1_ref) <= (1e-5 if cuda_available() else 0.0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown sLSTM kernel"):
        sLSTMCell(16, 2, kernel="triton")
    wx, R, bias, _ = _inputs(7)
    with pytest.raises(ValueError, match="unknown sLSTM backend"):
        slstm_recurrence(wx, R, bias=bias, backend="metal")
    with pytest.raises(ValueError, match="4 gates"):
        slstm_recurrence(wx[:, :, :, :3], R)
    with pytest.raises(ValueError, match="recurrent kernel must have shape"):
        slstm_recurrence(wx, R[:, :, :8])
    if not cuda_available():
        with pytest.raises(ValueError, match="CUDA"):
            slstm_recurrence(wx, R, backend="cuda")


@pytest.mark.parametrize("B,NH,DH", [(1, 4, 256), (16, 4, 256), (40, 4, 256), (300, 4, 256), (3, 2, 8),
                                     (5, 3, 7), (2, 1, 512), (9, 16, 64)])
def test_launch_plan_fits_the_kernels(B, NH, DH):
    """Every launch: all blocks resident (<= _MAX_BLOCKS), each row chunk's pointwise threads
    exist (BC U <= threads), static shared memory <= 48 KB, and the row groups cover the batch."""
    for row_floats in (DH + 4 * sf._units(DH), 4 * DH + sf._units(DH)):
        U, bc, chunks = sf._plan(B, NH, DH, row_floats)
        assert DH % U == 0 and U <= sf._MAX_UNITS
        assert NH * (DH // U) * chunks <= sf._MAX_BLOCKS
        assert bc * U <= 4 * U * sf._LANES
        assert bc * row_floats * 4 <= 48 * 1024
        groups = sf._row_groups(B, bc, chunks)
        assert groups[0][0] == 0 and groups[-1][1] == B
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        assert all(-(-(hi - lo) // bc) <= chunks for lo, hi in groups)


# ----------------------------------------------------------------------------------- CUDA
@pytest.fixture(params=["barrier", "tagged"])
def exchange(request, monkeypatch):
    """Both ways the blocks of a head exchange a step's values."""
    monkeypatch.setattr(sf, "EXCHANGE", request.param)
    return request.param


def _on_cpu(fn, *args):
    with mx.stream(mx.cpu):
        out = fn(*args)
        mx.eval(out)
    return out


@cuda
@pytest.mark.parametrize("B,S,NH,DH", [(2, 9, 2, 8), (1, 33, 4, 256), (40, 6, 4, 256)])
@pytest.mark.parametrize("with_state", [True, False])
def test_kernel_forward_both_exchanges(B, S, NH, DH, with_state, exchange):
    test_kernel_forward_matches_reference(B, S, NH, DH, with_state)


@cuda
@pytest.mark.parametrize("B,S,NH,DH", [(3, 11, 2, 32), (2, 16, 4, 256)])
def test_kernel_gradients_both_exchanges(B, S, NH, DH, exchange):
    test_kernel_gradients_match_reference(B, S, NH, DH, True)


@cuda
@pytest.mark.parametrize("B,S,NH,DH", [(3, 17, 3, 24), (17, 12, 4, 64), (2, 5, 2, 7), (2, 4, 1, 512)])
@pytest.mark.parametrize("with_state", [True, False])
def test_kernel_forward_matches_reference(B, S, NH, DH, with_state):
    wx, R, bias, state = _inputs(B + S + DH, B=B, S=S, NH=NH, DH=DH, with_state=with_state)
    assert kernel_supported(NH, DH)
    h, st = _cuda(wx, R, state, bias)
    h_ref, st_ref = _on_cpu(_reference, wx, R, state, bias)
    assert h.dtype == mx.float32 and _rel(h, h_ref) <= 1e-5, _rel(h, h_ref)
    for a, b in zip(st, st_ref):
        assert a.shape == b.shape and _rel(a, b) <= 1e-5, _rel(a, b)


@cuda
@pytest.mark.parametrize("B,S,NH,DH", [(2, 9, 2, 8), (20, 5, 4, 64)])
@pytest.mark.parametrize("with_state", [True, False])
def test_kernel_gradients_match_reference(B, S, NH, DH, with_state):
    wx, R, bias, state = _inputs(10 + B + DH, B=B, S=S, NH=NH, DH=DH, with_state=with_state)
    weights = _loss_weights(11, B, S, NH, DH)
    g = _grads(_cuda, wx, R, bias, state, weights)
    g_ref = _on_cpu(lambda: _grads(_reference, wx, R, bias, state, weights))
    names = ("wx", "R", "bias", "c0", "n0", "m0", "h0")
    for name, a, b in zip(names, g, g_ref):
        assert a.shape == b.shape
        assert _rel(a, b) <= 1e-4, (name, _rel(a, b))


@cuda
def test_kernel_steps_equal_the_sequence_and_compile():
    wx, R, bias, state = _inputs(12, B=3, S=10, NH=4, DH=64)
    h_seq, st_seq = _cuda(wx, R, state, bias)
    step = mx.compile(lambda x, s: _cuda(x, R, s, bias))
    st, hs = state, []
    for t in range(wx.shape[1]):
        h, st = step(wx[:, t : t + 1], st)
        hs.append(h)
    assert _rel(mx.concatenate(hs, axis=1), h_seq) <= 1e-6
    for a, b in zip(st, st_seq):
        assert _rel(a, b) <= 1e-6
    # and the reference step agrees
    h_ref, _ = _on_cpu(lambda: slstm_step(wx[:, 0].astype(mx.float32) + bias, R, state))
    assert _rel(hs[0][:, 0], h_ref) <= 1e-5


@cuda
def test_kernel_bfloat16_inputs():
    wx, R, bias, state = _inputs(13, B=4, S=20, NH=4, DH=128, dtype=mx.bfloat16)
    h, st = _cuda(wx, R, state, bias)
    assert h.dtype == mx.bfloat16 and st[0].dtype == mx.float32
    h_ref, st_ref = _on_cpu(_reference, wx, R, state, bias)
    assert _rel(h, h_ref) <= 1e-2  # the reference's h is float32; ours is rounded to bf16
    for a, b in zip(st, st_ref):
        assert _rel(a, b) <= 1e-5
    weights = _loss_weights(14, 4, 20, 4, 128)
    g = _grads(_cuda, wx, R, bias, state, weights)
    g_ref = _on_cpu(lambda: _grads(_reference, wx, R, bias, state, weights))
    assert g[0].dtype == mx.bfloat16
    for a, b in zip(g, g_ref):
        assert _rel(a, b) <= 1e-2


@cuda
def test_model_with_fused_slstm_matches_reference():
    from xlstm_metal.models.xlstm_2024 import create_xlstm_model

    ref = create_xlstm_model(97, 4, (1, 1), 64, 16, 4, seed=3)
    fast = create_xlstm_model(97, 4, (1, 1), 64, 16, 4, seed=3)
    for r, f in zip(ref.blocks, fast.blocks):
        if "slstm_cell" in f.xlstm:
            assert f.xlstm.slstm_cell.uses_fused_kernel()  # the default on CUDA
            r.xlstm.slstm_cell.kernel = "reference"
    ids = mx.array(np.random.default_rng(15).integers(0, 97, (2, 24)), dtype=mx.int32)
    (l0, s0), (l1, s1) = ref(ids), fast(ids)
    assert _rel(l1, l0) <= 1e-4
    tok = ids[:, -1:]
    for _ in range(4):
        (l0, s0), (l1, s1) = ref(tok, s0), fast(tok, s1)
        assert _rel(l1, l0) <= 1e-4
        tok = mx.argmax(l0[:, -1:], axis=-1).astype(mx.int32)

    import mlx.nn as nn
    from mlx.utils import tree_flatten

    def grads(model):
        def loss(x, y):
            logits, _ = model(x)
            return nn.losses.cross_entropy(logits, y, reduction="mean")

        return dict(tree_flatten(nn.value_and_grad(model, loss)(ids[:, :-1], ids[:, 1:])[1]))

    g0, g1 = grads(ref), grads(fast)
    assert set(g0) == set(g1)
    for key, value in g0.items():
        assert _rel(g1[key], value) <= 1e-3, key


# ------------------------------------------------------------------------------ benchmark
def _bench_module(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_hands_our_weights_to_the_official_model(tmp_path):
    """benchmarks/slstm_2024.py's "same weights": ours (NX-AI init, "cuda" sLSTM layout) saved,
    loaded into NX-AI's xLSTMLMModel with the vanilla backend: the same logits."""
    import torch
    from mlx.utils import tree_flatten, tree_unflatten

    from xlstm_metal.config_2024 import xLSTMLMConfig
    from xlstm_metal.models.xlstm_2024 import xLSTMLMModel

    bench = _bench_module("slstm_2024")
    cfg = dict(bench.TINY, vocab_size=61, embedding_dim=32, num_blocks=3, context_length=32, slstm_at=[1])
    ours = xLSTMLMModel(xLSTMLMConfig.from_dict(cfg), seed=4)
    rng = np.random.default_rng(4)  # off the init (R starts at zero), so a layout mix-up shows
    ours.update(tree_unflatten([(k, v + mx.array(rng.normal(size=v.shape).astype(np.float32) * 0.2))
                                for k, v in tree_flatten(ours.parameters())]))
    path = str(tmp_path / "w.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(ours.parameters())))
    from xlstm import xLSTMLMModel as Official

    official = Official(bench._official_config(cfg, "vanilla", 2))
    bench._load_official_weights(official, path)
    ids = bench._token_ids(61, 2, 11)
    with torch.no_grad():
        ref = official.eval()(torch.tensor(ids).long()).numpy()
    out, _ = ours(mx.array(ids))
    assert _rel(out, mx.array(ref)) <= 1e-4


def test_report_renders_the_side_by_side(tmp_path, monkeypatch):
    import json

    report = _bench_module("report")
    bench = _bench_module("slstm_2024")
    records = [
        {"side": "ours", "kind": "model", "params": 356924752, "same_weights": True, "slstm_kernel": "fused",
         "fused_active": True, "mlstm_kernel": "chunkwise_scan", "mlx": "0.32.4", "device_name": "NVIDIA H200"},
        {"side": "ours", "kind": "train", "batch": 4, "seq": 2048, "tok_s": 30000.0, "peak_mem_gb": 40.0},
        {"side": "ours", "kind": "decode", "tok_s": 300.0},
        {"side": "official", "kind": "cuda_backend_probe", "ok": False, "seconds": 70.0,
         "tail": "Traceback\nRuntimeError: Ninja is required to load C++ extensions"},
        {"side": "official", "kind": "model", "slstm_backend": "vanilla", "torch": "2.11", "device": "NVIDIA H200"},
        {"side": "official", "kind": "train", "batch": 4, "seq": 2048, "tok_s": 2000.0, "peak_mem_gb": 60.0},
        {"side": "official", "kind": "decode", "tok_s": 100.0},
    ]
    (tmp_path / "xlstm71_350m.json").write_text(json.dumps(
        {"date": "d", "round": "GPU round R2", "command": "c", "config": bench.CONFIG, "records": records}))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = "\n".join(report.slstm_2024_rows())
    assert "official sLSTM backend that ran: **vanilla**" in text
    assert "did not build within 70 s: RuntimeError: Ninja is required" in text
    assert "| 30,000.0 | 2,000.0 | 15.00x | >= 1.5x |" in text
    assert "| decode tok/s, batch 1 | 300.0 | 100.0 | 3.00x | >= 1.5x |" in text
    assert "357.0M parameters" not in text and "356.9M parameters" in text


# ------------------------------------------------- the 2024 model's mLSTM step (decode path)
def _mlstm_steps(step_kernel, seed=5):
    from xlstm_metal.models.xlstm_2024 import create_xlstm_model

    model = create_xlstm_model(97, 3, (2, 1), 64, 16, 4, seed=seed)
    for block in model.blocks:
        if "mlstm_cell" in block.xlstm:
            block.xlstm.step_kernel = step_kernel
    ids = mx.array(np.random.default_rng(seed).integers(0, 97, (2, 9)), dtype=mx.int32)
    logits, state = model(ids)
    outs = [logits[:, -1]]
    tok = ids[:, -1:]
    for _ in range(4):
        logits, state = model(tok, state)
        outs.append(logits[:, -1])
        tok = mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32)
    return mx.stack(outs), state


def test_mlstm_2024_step_kernel_choice():
    with pytest.raises(ValueError, match="unknown mLSTM step kernel"):
        from xlstm_metal.neurons.mlstm_2024 import mLSTMNeuron2024

        mLSTMNeuron2024(32, 64, step_kernel="triton")
    fused, s_fused = _mlstm_steps("step_fused")
    ref, s_ref = _mlstm_steps("step")
    # Off CUDA "step_fused" is the reference itself; on CUDA the fused kernel, float32-exact.
    assert _rel(fused, ref) <= (1e-5 if cuda_available() else 0.0)
    for a, b in zip(s_fused[0], s_ref[0]):
        assert _rel(a, b) <= (1e-5 if cuda_available() else 0.0)
