"""The four mLSTM kernels agree with each other and with NX-AI's native torch kernels."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_autograd
from mlstm_kernels.torch.recurrent.native_sequence import mlstm_recurrent_sequence__native_fw

from xlstm_metal.kernels import (
    available_mlstm_kernels,
    get_mlstm_kernel,
    mlstm_chunkwise,
    mlstm_parallel,
    mlstm_sequence,
    mlstm_step,
    resolve_kernel_name,
)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def make_inputs(seed, B=2, NH=3, S=37, DQK=8, DV=12, gate_scale=4.0, f_bias=2.0, with_state=False):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, NH, S, DQK)).astype(np.float32)
    k = rng.standard_normal((B, NH, S, DQK)).astype(np.float32)
    v = rng.standard_normal((B, NH, S, DV)).astype(np.float32)
    i = (rng.standard_normal((B, NH, S)) * gate_scale).astype(np.float32)
    f = (rng.standard_normal((B, NH, S)) * gate_scale + f_bias).astype(np.float32)
    state = None
    if with_state:
        state = (
            rng.standard_normal((B, NH, DQK, DV)).astype(np.float32),
            rng.standard_normal((B, NH, DQK)).astype(np.float32),
            rng.standard_normal((B, NH, 1)).astype(np.float32),
        )
    return q, k, v, i, f, state


def run(kernel, inputs, **kw):
    q, k, v, i, f, state = inputs
    st = None if state is None else tuple(mx.array(s) for s in state)
    h, (C, n, m) = kernel(mx.array(q), mx.array(k), mx.array(v), mx.array(i), mx.array(f), st, **kw)
    return np.array(h), (np.array(C), np.array(n), np.array(m))


def assert_same(a, b, tol=1e-5):
    (ha, sa), (hb, sb) = a, b
    assert rel_err(ha, hb) <= tol, rel_err(ha, hb)
    for x, y in zip(sa, sb):
        assert rel_err(x, y) <= tol, rel_err(x, y)


@pytest.mark.parametrize("S", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunkwise_parallel_sequence_agree(S, with_state):
    inputs = make_inputs(S, S=S, with_state=with_state)
    ref = run(mlstm_sequence, inputs)
    assert_same(run(mlstm_parallel, inputs), ref)
    for chunk in (4, 16, 64):  # ragged last chunk for most S
        assert_same(run(mlstm_chunkwise, inputs, chunk_size=chunk), ref)


def test_gates_at_soft_cap_extremes():
    q, k, v, i, f, _ = make_inputs(1, S=50)
    rng = np.random.default_rng(2)
    i = rng.choice([-15.0, 15.0], size=i.shape).astype(np.float32)
    f = rng.choice([-15.0, 15.0], size=f.shape).astype(np.float32)
    inputs = (q, k, v, i, f, None)
    ref = run(mlstm_sequence, inputs)
    assert np.all(np.isfinite(ref[0]))
    # Saturated gates leave some normalisers |q.n| near cancellation (|h| ~ 2e3 here), which
    # amplifies float32 round-off: the forms agree to 1e-3 relative, the states exactly.
    assert_same(run(mlstm_parallel, inputs), ref, tol=1e-3)
    assert_same(run(mlstm_chunkwise, inputs, chunk_size=16), ref, tol=1e-3)


def test_long_sequence_is_finite_and_matches_steps():
    S = 4096
    q, k, v, i, f, _ = make_inputs(3, B=1, NH=2, S=S, DQK=8, DV=8, gate_scale=6.0)
    inputs = (q, k, v, i, f, None)
    h, state = run(mlstm_chunkwise, inputs, chunk_size=64)
    assert np.all(np.isfinite(h)) and all(np.all(np.isfinite(s)) for s in state)
    # Check against the step recurrence on the tail: continue from the chunkwise state of the
    # first S-40 steps through 40 steps.
    head = tuple(x[:, :, : S - 40] for x in (q, k, v, i, f)) + (None,)
    tail = tuple(x[:, :, S - 40 :] for x in (q, k, v, i, f))
    _, mid = run(mlstm_chunkwise, head, chunk_size=64)
    h_tail, end = run(mlstm_sequence, tail + (mid,))
    assert rel_err(h[:, :, S - 40 :], h_tail) <= 1e-4
    for a, b in zip(state, end):
        assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("first", ["chunkwise", "parallel", "sequence"])
@pytest.mark.parametrize("second", ["chunkwise", "parallel", "sequence", "step"])
def test_final_state_continues_in_any_kernel(first, second):
    q, k, v, i, f, state = make_inputs(4, S=30, with_state=True)
    cut = 29 if second == "step" else 17
    whole = run(mlstm_sequence, (q, k, v, i, f, state))
    part1 = tuple(x[:, :, :cut] for x in (q, k, v, i, f)) + (state,)
    h1, mid = run(get_mlstm_kernel(first), part1, chunk_size=8)
    part2 = tuple(x[:, :, cut:] for x in (q, k, v, i, f)) + (mid,)
    h2, end = run(get_mlstm_kernel(second), part2, chunk_size=8)
    assert_same((np.concatenate([h1, h2], axis=2), end), whole)


def test_step_rejects_sequences():
    q, k, v, i, f, _ = make_inputs(0, S=2)
    with pytest.raises(ValueError, match="one time step"):
        run(mlstm_step, (q, k, v, i, f, None))


@pytest.mark.parametrize("S", [7, 64, 100])
def test_matches_nxai_native_kernels(S):
    """NX-AI's native chunkwise (S multiple of chunk) and recurrent sequence kernels."""
    q, k, v, i, f, state = make_inputs(5, S=S, DQK=16, DV=16, with_state=True)
    t = torch.tensor
    ref_h, ref_state = mlstm_recurrent_sequence__native_fw(
        t(q), t(k), t(v), t(i), t(f), t(state[0]), t(state[1]), t(state[2]), return_last_states=True
    )
    ours = run(mlstm_chunkwise, (q, k, v, i, f, state), chunk_size=16)
    assert_same(ours, (ref_h.numpy(), tuple(s.numpy() for s in ref_state)), tol=1e-4)
    if S % 16 == 0:
        ch_h, ch_state = mlstm_chunkwise__native_autograd(
            t(q), t(k), t(v), t(i), t(f), t(state[0]), t(state[1]), t(state[2]),
            return_last_states=True, chunk_size=16, autocast_kernel_dtype=torch.float32,
        )
        assert_same(ours, (ch_h.numpy(), tuple(s.numpy() for s in ch_state)), tol=1e-4)


def test_state_dtype_is_honoured():
    q, k, v, i, f = (mx.array(x) for x in make_inputs(6, S=9)[:5])
    _, ref = mlstm_chunkwise(q, k, v, i, f, state_dtype=mx.float32)
    for kernel in (mlstm_chunkwise, mlstm_parallel, mlstm_sequence):
        _, state = kernel(q, k, v, i, f, state_dtype=mx.bfloat16)
        assert all(s.dtype == mx.bfloat16 for s in state)
        # bf16 storage of the same float32 state: ~3 significant digits.
        assert rel_err(np.array(state[0].astype(mx.float32)), np.array(ref[0])) < 1e-2


def test_registry_maps_official_names():
    assert resolve_kernel_name("chunkwise--triton_limit_chunk") == "chunkwise"
    assert resolve_kernel_name("parallel--native_autograd") == "parallel"
    assert resolve_kernel_name("native_sequence__triton") == "sequence"
    assert resolve_kernel_name("triton") == "step_fused"
    assert {"chunkwise", "parallel", "sequence", "step"} <= set(available_mlstm_kernels())
    with pytest.raises(KeyError, match="unknown mLSTM kernel 'bogus'"):
        resolve_kernel_name("bogus")
