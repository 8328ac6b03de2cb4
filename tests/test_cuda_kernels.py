"""The fused CUDA kernels against their pure-ops references.

These run only where MLX has its CUDA backend (the GPU machine: `python -m pytest
tests/test_cuda_kernels.py`); elsewhere the fused entry points fall back to the reference, which
the CPU tests at the end check.
"""

import mlx.core as mx
import numpy as np
import pytest

from xlstm_metal.kernels.fast.step import cuda_available, mlstm_step_fused
from xlstm_metal.kernels.mlstm import mlstm_step

from conftest import tiny_model

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


def _inputs(seed, B=2, NH=3, DQK=24, DV=40, dtype=mx.float32, gate_scale=4.0, with_state=True):
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0, shift=0.0, dt=dtype):
        return mx.array((rng.standard_normal(shape) * scale + shift).astype(np.float32)).astype(dt)

    q, k, v = arr(B, NH, 1, DQK), arr(B, NH, 1, DQK), arr(B, NH, 1, DV)
    i, f = arr(B, NH, 1, scale=gate_scale), arr(B, NH, 1, scale=gate_scale, shift=2.0)
    state = (arr(B, NH, DQK, DV, dt=mx.float32), arr(B, NH, DQK, dt=mx.float32),
             arr(B, NH, 1, dt=mx.float32)) if with_state else None
    return q, k, v, i, f, state


def _rel(a, b) -> float:
    a, b = np.array(a.astype(mx.float32), dtype=np.float64), np.array(b.astype(mx.float32), dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _check(out, ref, tol):
    (h, s), (h_ref, s_ref) = out, ref
    assert h.shape == h_ref.shape and h.dtype == h_ref.dtype
    assert _rel(h, h_ref) <= tol, _rel(h, h_ref)
    for x, y in zip(s, s_ref):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert _rel(x, y) <= tol, _rel(x, y)


def _check_h64(out, ref, inputs):
    """State to 1e-5 of the float32 reference; h to 1e-5 of it, or, where h = q.C / max(|q.n|, ..)
    amplifies the sums' round-off, to the float64 result within twice the reference's own error."""
    from test_cuda_decode import _err64, _h_float64

    (h, s), (h_ref, s_ref) = out, ref
    for x, y in zip(s, s_ref):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert _rel(x, y) <= 1e-5, _rel(x, y)
    assert h.shape == h_ref.shape and h.dtype == h_ref.dtype
    if _rel(h, h_ref) > 1e-5:
        q, k, v, i, f, state = inputs
        h64 = _h_float64(q, k, v, i, f, None, None, state, None)
        assert _err64(h, h64) <= max(1e-5, 2 * _err64(h_ref, h64)), (_err64(h, h64), _err64(h_ref, h64))


@cuda
@pytest.mark.parametrize("DQK,DV", [(24, 40), (16, 32), (256, 512), (7, 130), (512, 256)])
@pytest.mark.parametrize("with_state", [True, False])
def test_fused_step_matches_reference(step_layout, DQK, DV, with_state):
    inputs = _inputs(DQK + DV, DQK=DQK, DV=DV, with_state=with_state)
    if with_state:
        _check_h64(mlstm_step_fused(*inputs), mlstm_step(*inputs), inputs)
    else:
        _check(mlstm_step_fused(*inputs), mlstm_step(*inputs), 1e-5)


@cuda
@pytest.mark.parametrize("gate_scale", [15.0, 40.0])
def test_fused_step_saturated_gates(step_layout, gate_scale):
    inputs = _inputs(1, gate_scale=gate_scale)
    _check_h64(mlstm_step_fused(*inputs), mlstm_step(*inputs), inputs)


@cuda
@pytest.mark.parametrize("state_dtype", [mx.float32, mx.bfloat16])
def test_fused_step_bfloat16_inputs_and_state(step_layout, state_dtype):
    inputs = _inputs(2, B=4, NH=8, DQK=64, DV=128, dtype=mx.bfloat16)
    out = mlstm_step_fused(*inputs, state_dtype=state_dtype)
    ref = mlstm_step(*inputs, state_dtype=state_dtype)
    # Both compute in float32; only the final bf16 rounding of h / state may differ by 1 ulp.
    _check(out, ref, 1e-2 if state_dtype == mx.bfloat16 else 1e-5)
    assert out[0].dtype == mx.bfloat16 and out[1][0].dtype == state_dtype


@cuda
def test_fused_step_reads_strided_views(step_layout):
    """q, k, v, i, f come as transposed views of the projection output, the state may be a
    slice: the kernel reads them through their strides, without copies."""
    rng = np.random.default_rng(9)
    B, NH, DQK, DV = 3, 4, 32, 96
    proj = mx.array(rng.standard_normal((B, 1, NH, 2 * DQK + DV + 2)).astype(np.float32))
    q = proj[..., :DQK].transpose(0, 2, 1, 3)
    k = proj[..., DQK : 2 * DQK].transpose(0, 2, 1, 3)
    v = proj[..., 2 * DQK : 2 * DQK + DV].transpose(0, 2, 1, 3)
    i = proj[..., -2].transpose(0, 2, 1) * 3
    f = proj[..., -1].transpose(0, 2, 1) * 3 + 2
    big = mx.array(rng.standard_normal((B, NH, DQK, 2 * DV)).astype(np.float32))
    state = (big[..., ::2], mx.array(rng.standard_normal((NH, B, DQK)).astype(np.float32)).transpose(1, 0, 2),
             mx.array(rng.standard_normal((B, NH, 1)).astype(np.float32)))
    _check(mlstm_step_fused(q, k, v, i, f, state), mlstm_step(q, k, v, i, f, state), 1e-5)


@cuda
def test_fused_steps_continue_and_compile(step_layout):
    q, k, v, i, f, state = _inputs(3, B=1, NH=2, DQK=32, DV=64)
    step = mx.compile(lambda *a: mlstm_step_fused(*a))
    s_fused, s_ref = state, state
    for t in range(20):
        rng = np.random.default_rng(100 + t)
        new = [mx.array(rng.standard_normal(x.shape).astype(np.float32)) for x in (q, k, v, i, f)]
        h_f, s_fused = step(*new, s_fused)
        h_r, s_ref = mlstm_step(*new, s_ref)
    _check((h_f, s_fused), (h_r, s_ref), 1e-5)


@cuda
def test_fused_model_decode_matches_reference():
    # Both fused (same matmuls; TF32 float32 GEMMs on the GPU differ by algorithm), so only the
    # step kernel differs between the two.
    ref, fast = tiny_model(seed=7).fuse_projections(), tiny_model(seed=7).fuse_projections()
    assert fast.blocks[0].mlstm_layer.recurrent_kernel_cell.step_kernel == "step_fused"
    for block in ref.blocks:
        block.mlstm_layer.recurrent_kernel_cell.step_kernel = "step"
    ids = mx.array(np.random.default_rng(0).integers(0, 97, (3, 21)), dtype=mx.int32)
    (_, s0), (_, s1) = ref(ids), fast(ids)
    tok = mx.array([[1], [2], [3]], dtype=mx.int32)
    for _ in range(5):
        (l0, s0), (l1, s1) = ref(tok, s0), fast(tok, s1)
        assert _rel(l1, l0) <= 1e-5
        tok = mx.argmax(l0[:, -1:], axis=-1).astype(mx.int32)


def test_fused_step_off_cuda_is_the_reference():
    if cuda_available():
        pytest.skip("on CUDA the fused kernel runs (tested above)")
    inputs = _inputs(5)
    h, s = mlstm_step_fused(*inputs)
    h_ref, s_ref = mlstm_step(*inputs)
    np.testing.assert_array_equal(np.array(h), np.array(h_ref))
    for x, y in zip(s, s_ref):
        np.testing.assert_array_equal(np.array(x), np.array(y))


# ------------------------------------------------------------------------- fused chunkwise
from xlstm_metal.kernels.fast.chunkwise import mlstm_chunkwise_scan  # noqa: E402
from xlstm_metal.kernels.fast.chunkwise_fused import _launch, mlstm_chunkwise_fused  # noqa: E402
from xlstm_metal.kernels.mlstm import mlstm_chunkwise  # noqa: E402


def _seq_inputs(seed, B, NH, S, DQK, DV, gate_scale=3.0, with_state=True):
    """bf16 q, k, v as strided views of one projection output (as the model makes them)."""
    rng = np.random.default_rng(seed)
    proj = mx.array(rng.standard_normal((B, S, NH, 2 * DQK + DV)).astype(np.float32)).astype(mx.bfloat16)
    q = proj[..., :DQK].transpose(0, 2, 1, 3)
    k = proj[..., DQK : 2 * DQK].transpose(0, 2, 1, 3)
    v = proj[..., 2 * DQK :].transpose(0, 2, 1, 3)
    gates = mx.array(rng.standard_normal((B, S, 2 * NH)).astype(np.float32)) * gate_scale
    i = gates[..., :NH].transpose(0, 2, 1)
    f = (gates[..., NH:] + 2.0).transpose(0, 2, 1)
    state = None
    if with_state:
        state = (mx.array(rng.standard_normal((B, NH, DQK, DV)).astype(np.float32)),
                 mx.array(rng.standard_normal((B, NH, DQK)).astype(np.float32)),
                 mx.array(rng.standard_normal((B, NH, 1)).astype(np.float32)))
    return q, k, v, i, f, state


def _float64_outputs(q, k, v, i, f, state, eps=1e-6):
    """h of the recurrent form in float64 (numpy; the chunkwise kernels compute the same function)
    and, per element, what float32 round-off allows: 2e-5 of the largest h, plus, where q.n
    cancels in a row's denominator, 3e-6 (50 float32 ulps) of h times the cancellation
    sum_d |q_d n_d| / den (the tests' inputs have rows with 300x at the largest h; the float32
    ops reference uses 3-13% of this allowance on them; h off by 1e-3 everywhere fails 2-7x).
    Returns (h64 [B, NH, S, DV], allowance [B, NH, S, DV])."""
    q, k, v, i, f = (np.array(x.astype(mx.float32), dtype=np.float64) for x in (q, k, v, i, f))
    B, NH, S, D = q.shape
    if state is None:
        C, n, m = np.zeros((B, NH, D, v.shape[-1])), np.zeros((B, NH, D)), np.zeros((B, NH, 1))
    else:
        C, n, m = (np.array(x, dtype=np.float64) for x in state)
    log_f = -np.logaddexp(0.0, -f)
    h = np.zeros(v.shape)
    cond = np.zeros((B, NH, S))
    for t in range(S):
        m_new = np.maximum(log_f[:, :, t : t + 1] + m, i[:, :, t : t + 1])
        decay, write = np.exp(log_f[:, :, t : t + 1] + m - m_new), np.exp(i[:, :, t : t + 1] - m_new)
        C = decay[..., None] * C + write[..., None] * (k[:, :, t, :, None] * v[:, :, t, None, :])
        n = decay * n + write * k[:, :, t]
        qs = q[:, :, t] * D**-0.5
        qn = np.sum(qs * n, axis=-1)
        den = np.maximum(np.abs(qn), np.exp(-m_new[..., 0])) + eps
        h[:, :, t] = np.einsum("bhd,bhdj->bhj", qs, C) / den[..., None]
        cond[:, :, t] = np.sum(np.abs(qs * n), axis=-1) / den
        m = m_new
    allowance = 2e-5 * np.max(np.abs(h)) + 3e-6 * (1.0 + cond[..., None]) * np.abs(h)
    return h, allowance


def _check_float64(h, h64, allowance):
    err = np.abs(np.array(h.astype(mx.float32), dtype=np.float64) - h64)
    assert np.all(err <= allowance), float(np.max(err / allowance))


def _fused_f32(q, k, v, i, f, state, chunk):
    """The fused kernels with h written in float32, so every bit of the math is compared."""
    return _launch(q, k, v, i, f, state, 1e-6, chunk, mx.float32, mx.float32)


@cuda
@pytest.mark.parametrize("B,NH,S,DQK,DV,chunk", [
    (2, 2, 300, 64, 128, 64), (1, 2, 512, 128, 64, 48), (1, 1, 77, 64, 64, 16),
    (1, 3, 5, 64, 64, 32), (1, 8, 1000, 256, 512, 64),
])
@pytest.mark.parametrize("with_state", [True, False])
def test_fused_chunkwise_matches_reference(B, NH, S, DQK, DV, chunk, with_state):
    q, k, v, i, f, state = _seq_inputs(S + DQK, B, NH, S, DQK, DV, with_state=with_state)
    ref = mlstm_chunkwise(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), i, f,
                          state, chunk_size=64)
    # float32 round-off: h to 2e-5 of its largest value (the exponentials and the order of the
    # sums differ from MLX's ops), the states to 1e-5.
    (h, s), (h_ref, s_ref) = _fused_f32(q, k, v, i, f, state, chunk), ref
    assert h.shape == h_ref.shape and _rel(h, h_ref) <= 2e-5, _rel(h, h_ref)
    for x, y in zip(s, s_ref):
        assert x.shape == y.shape and _rel(x, y) <= 1e-5, _rel(x, y)


@cuda
@pytest.mark.parametrize("form", ["32", "32s0", "64"])
@pytest.mark.parametrize("S,chunk,segments,gates", [(1000, 64, 1, "float32"), (333, 48, 3, "bfloat16"),
                                                    (77, 16, 1, "bfloat16")])
def test_fused_chunkwise_states_forms_match_reference(form, S, chunk, segments, gates, monkeypatch):
    """Each form of the states kernel (32 columns of C per block with its C stores staged per warp
    through shared memory, the default; "s0": without; 64 columns) at the 7B head sizes: the
    states to 1e-5 of the float32 reference, h (float32) to the float64 result within float32
    round-off (:func:`_float64_outputs`)."""
    monkeypatch.setenv("XLSTM_METAL_STATES_COLS", form[:2] if form[-2] == "s" else form)
    monkeypatch.setenv("XLSTM_METAL_STATES_STAGE", form[-1] if form[-2] == "s" else "1")
    q, k, v, i, f, state = _seq_inputs(S + 256, 1, 2, S, 256, 512)
    i, f = i.astype(getattr(mx, gates)), f.astype(getattr(mx, gates))
    ref = mlstm_chunkwise(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), i, f,
                          state, chunk_size=64)
    (h, s), (h_ref, s_ref) = _launch(q, k, v, i, f, state, 1e-6, chunk, mx.float32, mx.float32, segments), ref
    assert h.shape == h_ref.shape
    _check_float64(h, *_float64_outputs(q, k, v, i, f, state))
    for x, y in zip(s, s_ref):
        assert x.shape == y.shape and _rel(x, y) <= 1e-5, _rel(x, y)


@cuda
@pytest.mark.parametrize("S,chunk,segments", [(1000, 64, 3), (333, 48, 5), (517, 16, 7), (130, 64, 2), (64, 64, 4)])
@pytest.mark.parametrize("with_state", [True, False])
def test_fused_chunkwise_segments_match_reference(S, chunk, segments, with_state):
    """The states kernel's two-level scan (segments from the zero state, chained, combined on
    load) with odd lengths, a remainder chunk, bf16 gates at the projection's strides."""
    q, k, v, i, f, state = _seq_inputs(S + segments, 1, 3, S, 64, 128, with_state=with_state)
    i, f = i.astype(mx.bfloat16), f.astype(mx.bfloat16)
    ref = mlstm_chunkwise(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), i, f,
                          state, chunk_size=64)
    (h, s), (h_ref, s_ref) = _launch(q, k, v, i, f, state, 1e-6, chunk, mx.float32, mx.float32, segments), ref
    # h to the float64 result within float32 round-off: these inputs have rows whose denominator
    # cancels 300x at the largest h, where 2e-5 of the float32 reference was luck (S6R2: 2.0e-4
    # at 130 steps; the float32 ops reference itself is 4.3e-5 from float64 there).
    h64, allowance = _float64_outputs(q, k, v, i, f, state)
    assert h.shape == h_ref.shape
    _check_float64(h, h64, allowance)
    for x, y in zip(s, s_ref):
        assert x.shape == y.shape and _rel(x, y) <= 1e-5, _rel(x, y)
    # One segment (every block walks all chunks) gives the same result to round-off.
    h1, s1 = _launch(q, k, v, i, f, state, 1e-6, chunk, mx.float32, mx.float32, 1)
    _check_float64(h1, h64, allowance)
    for x, y in zip(s, s1):
        assert _rel(x, y) <= 1e-5


@cuda
@pytest.mark.parametrize("S", [1000, 2048])
def test_fused_chunkwise_two_bf16_terms_for_half_outputs(S, monkeypatch):
    """h rounded to bf16 with the outputs kernel's float32 operands in two bf16 terms (16
    significant bits) instead of three: the same bf16 results but where the float32 value sits
    within 2^-16 of a rounding boundary, so no further from the float32 reference."""
    q, k, v, i, f, state = _seq_inputs(S, 1, 8, S, 256, 512)
    ref = mlstm_chunkwise(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), i, f,
                          state, chunk_size=64)[0]
    out = {}
    for terms in ("3", "2"):
        monkeypatch.setenv("XLSTM_METAL_CHUNK_SPLIT", terms)
        out[terms] = _launch(q, k, v, i, f, state, 1e-6, 64, mx.bfloat16, mx.float32)[0]
    err3, err2 = _rel(out["3"], ref), _rel(out["2"], ref)
    differ = float(np.mean(np.array(out["3"].astype(mx.float32)) != np.array(out["2"].astype(mx.float32))))
    print(f"bf16 h vs float32 reference: 3 terms {err3:.3e}, 2 terms {err2:.3e}; elements differing {differ:.2e}")
    assert err2 <= err3 * 1.01 + 1e-6 and differ <= 5e-3


@cuda
@pytest.mark.parametrize("S,with_state", [(1000, True), (333, False)])
def test_fused_chunkwise_split_entering_states_same_bits(S, with_state, monkeypatch):
    """bf16 h with the entering states stored as their two bf16 terms by the states kernel
    (the default; the outputs kernel at 128 registers) equals h from float32 entering states
    split by the outputs kernel (unbounded registers), bit for bit; the final state does not move."""
    q, k, v, i, f, state = _seq_inputs(S + 3, 1, 8, S, 256, 512, with_state=with_state)
    out = {}
    for split in ("0", "1"):
        monkeypatch.setenv("XLSTM_METAL_STATES_CSPLIT", split)
        out[split] = _launch(q, k, v, i, f, state, 1e-6, 64, mx.bfloat16, mx.float32)
    (h0, s0), (h1, s1) = out["0"], out["1"]
    assert float(mx.abs(h0.astype(mx.float32)).max()) > 0
    assert np.array_equal(np.array(h1.astype(mx.float32)), np.array(h0.astype(mx.float32)))
    for x, y in zip(s1, s0):
        assert np.array_equal(np.array(x), np.array(y))


_SCHEDULE_FLAGS = ("XLSTM_METAL_STATES_PREGATES", "XLSTM_METAL_STATES_NSKIP", "XLSTM_METAL_OUTPUTS_VEARLY",
                   "XLSTM_METAL_OUTPUTS_STAGE")


@cuda
@pytest.mark.parametrize("S,chunk,with_state,gates", [(1000, 64, True, "bfloat16"), (333, 48, False, "float32"),
                                                      (77, 16, True, "bfloat16")])
def test_prefill_kernel_schedules_same_bits(S, chunk, with_state, gates, monkeypatch):
    """The kernels' schedule settings that keep the arithmetic (chunkwise_fused._flag) give the
    entering and final states and h of the kernels without them, bit for bit (bf16 and float32
    h, and bf16 h from one product term as training may ask; a remainder chunk, gates at the
    projection's strides): the states kernel reading its chunks' gate values from the gates pass
    and summing n only where it is written; the outputs kernel copying the value columns during
    the last slab, q.n from 16-byte loads and h written through shared memory (where the C slabs'
    space holds it)."""
    from xlstm_metal.kernels.fast.chunkwise_fused import fused_forward
    from xlstm_metal.kernels.mlstm import _state_f32

    q, k, v, i, f, state = _seq_inputs(S + 5, 1, 8, S, 256, 512, with_state=with_state)
    i, f = i.astype(getattr(mx, gates)), f.astype(getattr(mx, gates))
    out = {}
    for flag in ("0", "1"):
        for name in _SCHEDULE_FLAGS:
            monkeypatch.setenv(name, flag)
        out[flag] = [_launch(q, k, v, i, f, state, 1e-6, chunk, dt, mx.float32) for dt in (mx.bfloat16, mx.float32)]
        # training's product terms: one term (the outputs kernel's smallest shared C space)
        out[flag].append(fused_forward(q, k, v, i, f, _state_f32(k, v, state), 1e-6, chunk, mx.bfloat16, None, 1))
    for (h0, s0), (h1, s1) in zip(out["0"], out["1"]):
        assert float(mx.abs(h0.astype(mx.float32)).max()) > 0
        assert np.array_equal(np.array(h1.astype(mx.float32)), np.array(h0.astype(mx.float32)))
        for x, y in zip(s1, s0):
            assert np.array_equal(np.array(x), np.array(y))


@cuda
def test_fused_chunkwise_prepared_gates_api_matches():
    """chunk_states / chunk_outputs (prepared gates; the backward recomputes states with them)
    against the forward that prepares the gates in-kernel."""
    from xlstm_metal.kernels.fast.chunkwise_fused import chunk_gates, chunk_outputs, chunk_states

    q, k, v, i, f, state = _seq_inputs(11, 1, 2, 300, 64, 128)
    bcum, igc = chunk_gates(i, f, 64)
    C_enter, n_enter, m_enter, final = chunk_states(k, v, bcum, igc, state)
    h = chunk_outputs(q, k, v, bcum, igc, C_enter, n_enter, m_enter, 1e-6, mx.float32)
    h_ref, s_ref = _launch(q, k, v, i, f, state, 1e-6, 64, mx.float32, mx.float32, 1)
    assert C_enter.shape == (1, 2, 5, 64, 128) and m_enter.shape == (1, 2, 5)
    assert _rel(h, h_ref) <= 2e-5
    for x, y in zip(final, s_ref):
        assert _rel(x, y) <= 1e-5


@cuda
@pytest.mark.parametrize("gate_scale", [15.0, 40.0])
def test_fused_chunkwise_saturated_gates(gate_scale):
    q, k, v, i, f, state = _seq_inputs(3, 1, 2, 200, 64, 64, gate_scale=gate_scale)
    ref = mlstm_chunkwise(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), i, f,
                          state, chunk_size=64)
    # As between the reference kernels (tests/test_kernels.py): states exact, h to 1e-3 where
    # |q.n| nearly cancels at saturated gates.
    (h, s), (h_ref, s_ref) = _fused_f32(q, k, v, i, f, state, 64), ref
    assert _rel(h, h_ref) <= 1e-3
    for x, y in zip(s, s_ref):
        assert _rel(x, y) <= 1e-5


@cuda
def test_fused_chunkwise_bf16_output_continues_and_compiles():
    q, k, v, i, f, state = _seq_inputs(4, 1, 4, 384, 64, 128)
    run = mx.compile(lambda *a: mlstm_chunkwise_fused(*a, chunk_size=64))
    h, s = run(q, k, v, i, f, state)
    assert h.dtype == mx.bfloat16 and h.shape == (1, 4, 384, 128)
    h_ref, s_ref = mlstm_chunkwise_scan(q, k, v, i, f, state, chunk_size=64)
    assert _rel(h, h_ref) <= 1e-2  # both round float32 results to bf16
    for x, y in zip(s, s_ref):
        assert _rel(x, y) <= 1e-5
    # Two pieces carrying the state equal one call.
    h1, s1 = mlstm_chunkwise_fused(q[:, :, :200], k[:, :, :200], v[:, :, :200], i[:, :, :200], f[:, :, :200], state)
    h2, s2 = mlstm_chunkwise_fused(q[:, :, 200:], k[:, :, 200:], v[:, :, 200:], i[:, :, 200:], f[:, :, 200:], s1)
    assert _rel(mx.concatenate([h1, h2], axis=2), h) <= 1e-2
    for x, y in zip(s2, s):
        assert _rel(x, y) <= 1e-5


@cuda
def test_fused_chunkwise_model_prefill_matches_reference():
    from xlstm_metal.benchmark import random_model, shape_config

    config = shape_config("125m", num_blocks=2, embedding_dim=256, num_heads=2, vocab_size=101)
    ids = mx.array(np.random.default_rng(1).integers(0, 101, (2, 300)), dtype=mx.int32)
    logits = {}
    for kernel in ("chunkwise", "chunkwise_fused"):
        model = random_model(config, dtype="bfloat16", seed=5).fuse_projections()
        for block in model.blocks:
            block.mlstm_layer.parallel_kernel_cell.kernel = kernel
            block.mlstm_layer.parallel_kernel_cell.chunk_size = 64
        logits[kernel], _ = model.prefill(ids)
    assert _rel(logits["chunkwise_fused"], logits["chunkwise"]) <= 2e-2


@cuda
def test_prefill_swiglu_reads_the_joined_product(monkeypatch):
    """With fused projections on CUDA the FFN runs swiglu_joined on the gate|up product itself:
    the same bits as the ops' SwiGLU over the product's two column slices."""
    from xlstm_metal.benchmark import random_model, shape_config

    config = shape_config("125m", num_blocks=1, embedding_dim=256, num_heads=2, vocab_size=101)
    ffn = random_model(config, dtype="bfloat16", seed=6).fuse_projections().blocks[0].ffn
    x = mx.array(np.random.default_rng(2).standard_normal((2, 300, 256)).astype(np.float32)).astype(mx.bfloat16)
    assert ffn._joined_gate_up(x) is not None
    out = ffn(x)
    monkeypatch.setenv("XLSTM_METAL_PREFILL_SWIGLU", "0")
    assert ffn._joined_gate_up(x) is None
    ref = ffn(x)
    assert out.dtype == ref.dtype == mx.bfloat16 and float(mx.abs(ref).max()) > 0
    assert np.array_equal(np.array(out.astype(mx.float32)), np.array(ref.astype(mx.float32)))


@cuda
def test_model_prefill_same_bits_as_before_the_prompt_kernels(monkeypatch):
    """The bf16 model's prefill (compiled blocks) with the prompt path of sessions 8-9 (SwiGLU on
    the joined product, split entering states, the 128-register outputs kernel; the kernels'
    schedule settings, the packed norm + gate kernel) gives the logits and state of the path
    before them, bit for bit: the arithmetic did not change."""
    from mlx.utils import tree_flatten

    from xlstm_metal.benchmark import random_model, shape_config

    config = shape_config("125m", num_blocks=2, embedding_dim=512, num_heads=2, vocab_size=101)
    ids = mx.array(np.random.default_rng(3).integers(0, 101, (1, 333)), dtype=mx.int32)
    out = {}
    for flag in ("1", "0"):
        for name in ("XLSTM_METAL_PREFILL_SWIGLU", "XLSTM_METAL_STATES_CSPLIT"):
            monkeypatch.setenv(name, flag)
        monkeypatch.setenv("XLSTM_METAL_OUTPUTS_BLOCKS", "4" if flag == "1" else "0")
        for name in _SCHEDULE_FLAGS:
            monkeypatch.setenv(name, flag)
        monkeypatch.setenv("XLSTM_METAL_NORM_GATE_PACKED", "5" if flag == "1" else "0")
        model = random_model(config, dtype="bfloat16", seed=7).fuse_projections()
        for block in model.blocks:
            block.mlstm_layer.parallel_kernel_cell.kernel = "chunkwise_fused"
            block.mlstm_layer.parallel_kernel_cell.chunk_size = 64
        logits, state = model.prefill(ids)
        mx.eval(logits, state)
        out[flag] = (logits, state)
    assert float(mx.abs(out["0"][0].astype(mx.float32)).max()) > 0
    assert np.array_equal(np.array(out["1"][0].astype(mx.float32)), np.array(out["0"][0].astype(mx.float32)))
    for a, b in zip(tree_flatten(out["1"][1]), tree_flatten(out["0"][1])):
        assert np.array_equal(np.array(a[1].astype(mx.float32)), np.array(b[1].astype(mx.float32))), a[0]


@cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("B,NH,S,DV,offset", [(1, 8, 300, 512, 8), (2, 3, 5, 256, 3), (1, 2, 1, 768, 0)])
@pytest.mark.parametrize("packed", ["0", "5"], ids=["float", "packed"])
def test_norm_gate_rows_matches_reference_and_decode_kernel(dtype, B, NH, S, DV, offset, packed, monkeypatch):
    """Prompts' multi-head LayerNorm + output gate (a warp per row, norm_rows.py) against the
    ops, and against the decode kernel (a block per row) run token by token: the same math,
    rounding points and order of the float32 sums, so the same bits; also with the row kept as
    loaded (``XLSTM_METAL_NORM_GATE_PACKED``). An odd offset makes o~ a misaligned view (the
    kernel's element-wise loads)."""
    monkeypatch.setenv("XLSTM_METAL_NORM_GATE_PACKED", packed)
    from xlstm_metal.cells.norms import MultiHeadLayerNorm
    from xlstm_metal.kernels.fast import decode
    from xlstm_metal.kernels.fast.norm_rows import norm_gate_rows

    rng = np.random.default_rng(B * NH * S + DV)

    def arr(*shape, scale=1.0, shift=0.0):
        return mx.array((rng.standard_normal(shape) * scale + shift).astype(np.float32)).astype(dtype)

    h = arr(B, NH, S, DV, scale=2.0, shift=0.5)
    o = arr(B, S, NH * DV + 11, scale=3.0)[..., offset : offset + NH * DV]
    norm = MultiHeadLayerNorm(NH, DV)
    norm.weight = arr(NH * DV, scale=0.3, shift=1.0)
    out = decode.output_norm_gate(h, o, norm) if S > 1 else norm_gate_rows(h, o, norm.weight, norm.eps)
    ref = mx.sigmoid(o) * norm(h.transpose(0, 2, 1, 3))
    assert out.shape == ref.shape == (B, S, NH * DV) and out.dtype == dtype
    assert _rel(out, ref) <= 1e-2, _rel(out, ref)
    per_token = mx.concatenate([decode.output_norm_gate(h[:, :, t : t + 1], o[:, t : t + 1], norm)
                                for t in range(S)], axis=1)
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)), np.array(per_token.astype(mx.float32)))


@cuda
@pytest.mark.parametrize("x_dtype,dtype", [(mx.float32, mx.bfloat16), (mx.bfloat16, mx.bfloat16),
                                           (mx.float32, mx.float16), (mx.float32, mx.float32)])
@pytest.mark.parametrize("B,S,E", [(1, 37, 4096), (2, 3, 2048)])
def test_add_rms_norm_rows_matches_decode_kernel(x_dtype, dtype, B, S, E):
    """Prompts' residual add + RMSNorm (256 threads per row, 16-byte accesses, norm_rows.py)
    against the ops, and against the decode kernel (1,024 threads per row) token by token: the
    same bits, sums included."""
    from xlstm_metal.cells.norms import RMSNorm
    from xlstm_metal.kernels.fast import decode

    rng = np.random.default_rng(B * S + E)

    def arr(*shape, scale=1.0, shift=0.0, dt=dtype):
        return mx.array((rng.standard_normal(shape) * scale + shift).astype(np.float32)).astype(dt)

    x, y = arr(B, S, E, scale=3.0, dt=x_dtype), arr(B, S, E)
    norm = RMSNorm(E)
    norm.weight = arr(E, scale=0.2, shift=1.0)
    s, normed = decode.add_rms_norm(x, y, norm)
    assert s.dtype == x_dtype and normed.dtype == dtype and s.shape == normed.shape == (B, S, E)
    ref_s = x + y
    ref_n = norm(ref_s).astype(dtype)
    assert _rel(s, ref_s) <= 1e-2 and _rel(normed, ref_n) <= 1e-2, (_rel(s, ref_s), _rel(normed, ref_n))
    per_token = [decode.add_rms_norm(x[:, t : t + 1], y[:, t : t + 1], norm) for t in range(S)]
    for got, parts in ((s, [p[0] for p in per_token]), (normed, [p[1] for p in per_token])):
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)),
                                      np.array(mx.concatenate(parts, axis=1).astype(mx.float32)))


def test_fused_chunkwise_elsewhere_is_the_scan_kernel():
    q, k, v, i, f, state = _seq_inputs(6, 1, 2, 70, 64, 64)
    if cuda_available():
        q, k, v = (x.astype(mx.float32) for x in (q, k, v))  # float32 inputs take the ops path
    h, s = mlstm_chunkwise_fused(q, k, v, i, f, state, chunk_size=32)
    h_ref, s_ref = mlstm_chunkwise_scan(q, k, v, i, f, state, chunk_size=32)
    np.testing.assert_array_equal(np.array(h.astype(mx.float32)), np.array(h_ref.astype(mx.float32)))
    for x, y in zip(s, s_ref):
        np.testing.assert_array_equal(np.array(x), np.array(y))
