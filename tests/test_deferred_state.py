"""The deferred decode state (kernels.mlstm.mlstm_step_deferred and its CUDA kernel,
kernels/fast/step_deferred.py): (C, n, m) with the last steps' (k, v) held apart from C, so a
step reads C and writes it once every R steps. Every form must give the plain step's h and state
to float32 round-off, whatever the model does with the state in between (more steps, a prompt,
a multi-token call, settling). The CUDA tests run only on the GPU machine."""

import mlx.core as mx
import numpy as np
import pytest

import xlstm_metal.models.xlstm_large as xlarge
from xlstm_metal.generation.runner import xLSTMRunner
from xlstm_metal.kernels.fast import step_deferred
from xlstm_metal.kernels.fast.decode import gate_preactivation, mlstm_step_gated
from xlstm_metal.kernels.fast.step import cuda_available
from xlstm_metal.kernels.mlstm import (
    defer_state,
    deferred_terms,
    is_deferred,
    mlstm_step,
    mlstm_step_deferred,
    settle_state,
)

from conftest import tiny_model
from test_cuda_decode import _arr, _rel

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


def _state(rng, B, NH, DQK, DV):
    return (_arr(rng, B, NH, DQK, DV, scale=0.3), _arr(rng, B, NH, DQK, scale=0.3), _arr(rng, B, NH, 1))


def _step_inputs(rng, B, NH, DQK, DV, dtype=mx.float32):
    """q, k, v and raw gates as the model passes them (gates: strided views of one projection);
    the gates spread wide, so some steps keep almost nothing of the state and others all of it."""
    q, k, v = _arr(rng, B, NH, 1, DQK, dtype=dtype), _arr(rng, B, NH, 1, DQK, dtype=dtype), _arr(rng, B, NH, 1, DV, dtype=dtype)
    raw = _arr(rng, B, 1, 2 * NH, scale=6.0, shift=1.0, dtype=dtype)
    return q, k, v, raw[..., :NH].transpose(0, 2, 1), raw[..., NH:].transpose(0, 2, 1)


@pytest.mark.parametrize("terms", [1, 2, 3, 8])
def test_deferred_steps_give_the_plain_steps_h_and_state(terms):
    rng = np.random.default_rng(terms)
    B, NH, DQK, DV = 2, 3, 16, 24
    plain = _state(rng, B, NH, DQK, DV)
    deferred = defer_state(plain, terms)
    for t in range(2 * terms + 3):
        q, k, v, i, f = _step_inputs(rng, B, NH, DQK, DV)
        h, plain = mlstm_step(q, k, v, i, f, plain)
        h_d, deferred = mlstm_step_deferred(q, k, v, i, f, deferred)
        assert _rel(h_d, h) < 2e-5, (t, _rel(h_d, h))
        # the pending terms cycle 1, 2, ..., R - 1, 0: C is a new base every R steps
        assert deferred[3].shape[2] == (t + 1) % terms and deferred_terms(deferred) == terms
        if (t + 1) % terms:
            assert deferred[0] is not None and deferred[3].shape == (B, NH, (t + 1) % terms, DQK)
        for x, y in zip(settle_state(deferred), plain):
            assert x.shape == y.shape and x.dtype == y.dtype
            assert _rel(x, y) < 2e-5


def test_a_fresh_deferral_settles_to_the_same_state_and_plain_states_pass_through():
    rng = np.random.default_rng(0)
    state = _state(rng, 2, 2, 8, 12)
    deferred = defer_state(state, 4, mx.bfloat16)
    assert is_deferred(deferred) and deferred[3].dtype == mx.bfloat16 and deferred[5].shape == (2, 2, 4)
    for x, y in zip(settle_state(deferred), state):
        assert mx.array_equal(x, y)
    assert settle_state(state) is state and deferred_terms(state) == 0
    assert defer_state(deferred, 8) == deferred  # already deferred: kept, with its own R
    with pytest.raises(ValueError, match="terms must be >= 1"):
        defer_state(state, 0)
    q, k, v, i, f = _step_inputs(rng, 2, 2, 8, 12)
    with pytest.raises(ValueError, match="one time step"):
        mlstm_step_deferred(mx.concatenate([q, q], axis=2), k, v, i, f, deferred)


@pytest.mark.parametrize("bias", [True, False])
def test_the_gated_step_takes_a_deferred_state(bias):
    """mlstm_step_gated (the model's step: gate bias and soft cap from raw projections) on a
    deferred state: the reference ops off CUDA, the kernel on it; either way the plain step's h."""
    rng = np.random.default_rng(3)
    B, NH, DQK, DV = 2, 2, 8, 12
    i_bias = _arr(rng, NH, scale=3.0) if bias else None
    f_bias = _arr(rng, NH, scale=3.0, shift=3.0) if bias else None
    plain = _state(rng, B, NH, DQK, DV)
    deferred = defer_state(plain, 3)
    for _ in range(5):
        q, k, v, i_raw, f_raw = _step_inputs(rng, B, NH, DQK, DV)
        h, plain = mlstm_step(q, k, v, gate_preactivation(i_raw, i_bias, 15.0), gate_preactivation(f_raw, f_bias, 15.0),
                              plain)
        h_d, deferred = mlstm_step_gated(q, k, v, i_raw, f_raw, i_bias, f_bias, deferred, gate_soft_cap=15.0)
        assert is_deferred(deferred)
        assert _rel(h_d, h) < 2e-5
    assert _rel(settle_state(deferred)[0], plain[0]) < 2e-5


def test_the_model_decodes_a_deferred_state_as_the_plain_one():
    model = tiny_model(1).fuse_projections()
    B = 3
    ids = mx.random.randint(0, model.config.vocab_size, (B, 6), key=mx.random.key(1))
    _, plain = model.prefill(ids)
    deferred = model.defer_state(plain, terms=3)
    assert all(is_deferred(s) for s in deferred) and deferred[0][3].dtype == mx.float32
    tok = ids[:, -1:]
    for t in range(7):
        logits, plain = model(tok, plain)
        logits_d, deferred = model(tok, deferred)
        assert _rel(logits_d, logits) < 1e-5, t
        assert deferred[0][3].shape[2] == (t + 1) % 3
        tok = mx.argmax(logits[:, -1:], axis=-1)
    # a multi-token call and a prompt fold the terms in first and go on from the same state
    logits, after = model(ids, plain)
    logits_d, after_d = model(ids, deferred)
    assert _rel(logits_d, logits) < 1e-5 and not any(is_deferred(s) for s in after_d)
    last, _ = model.prefill(ids[:, :4], plain)
    last_d, _ = model.prefill(ids[:, :4], deferred)
    assert _rel(last_d, last) < 1e-5
    for x, y in zip(model.settle_state(deferred), plain):
        for a, b in zip(x, y):
            assert _rel(a, b) < 2e-5


def test_the_fused_step_reads_q_k_v_and_gates_packed_in_one_product(monkeypatch):
    """With q|k|v|o~|i~|f~ fused, the decode step takes their product as one array (the step kernel
    reads its columns: no split of it in the graph), plain and deferred, with the logits of the
    unfused model's ops; a layer replaced in the tree is not read from the stale fused product."""
    from xlstm_metal.cells.mlstm import mLSTMProjectionCell

    reference = tiny_model(2)
    model = tiny_model(2).fuse_projections()

    def unpacked(*args, **kwargs):
        raise AssertionError("the step split the projections")

    monkeypatch.setattr(mLSTMProjectionCell, "project_raw_gates", unpacked)
    B = 3
    tok = mx.random.randint(0, model.config.vocab_size, (B, 1), key=mx.random.key(2))
    state, ref_state = model.make_state(B), None
    deferred = model.defer_state(model.make_state(B), terms=2)
    for t in range(5):
        logits, state = model(tok, state)
        logits_d, deferred = model(tok, deferred)
        want, ref_state = reference(tok, ref_state)
        assert _rel(logits, want) < 1e-5 and _rel(logits_d, want) < 1e-5, t
        tok = mx.argmax(want[:, -1:], axis=-1)
    layer = model.blocks[0].mlstm_layer
    layer.q = layer.q.__class__(layer.q.weight.shape[1], layer.q.weight.shape[0], bias=False)
    assert layer.projection_cell.project_packed(layer, mx.zeros((B, 1, model.config.embedding_dim))) is None


def test_defer_state_leaves_states_alone_where_it_does_not_apply():
    model = tiny_model(2)
    state = model.make_state(2)
    assert model.defer_state(state, terms=4) is state  # unfused: the steps are not the fused step kernel
    model.fuse_projections()
    assert model.defer_state(state, terms=1) is state
    assert model.defer_state(state, terms=0) is state
    # the default on a CPU: none (the kernel is CUDA's; deferral only adds work to the reference ops)
    assert cuda_available() or model.defer_state(state) is state
    assert step_deferred.default_deferral(1) == 0


def test_the_default_deferral_skips_states_its_kernel_does_not_take(monkeypatch):
    # A bf16 state deferred by default ran the deferred step's reference ops on CUDA (7B at 16 rows
    # on an H100: 904.6 tok/s against 2,212.5 for float32); an explicit number of terms still defers.
    monkeypatch.setattr(xlarge, "default_deferral", lambda batch: 4)  # as on CUDA at 16+ rows
    model = tiny_model(3, inference_state_dtype="float32").fuse_projections()
    assert is_deferred(model.defer_state(model.make_state(2))[0])
    narrow = tiny_model(3, inference_state_dtype="bfloat16").fuse_projections()
    state = narrow.make_state(2)
    assert state[0][0].dtype == mx.bfloat16
    assert narrow.defer_state(state) is state
    assert is_deferred(narrow.defer_state(state, terms=4)[0])  # asked for: done
    # a float32 state the cells turn into bf16 at their first step is left alone too
    for block in model.backbone.blocks:
        block.mlstm_layer.recurrent_kernel_cell.state_dtype = mx.bfloat16
    state = model.make_state(2)
    assert model.defer_state(state) is state


def test_generation_defers_the_state_where_the_device_says_so(monkeypatch):
    """xLSTMRunner.generate decodes a batch with deferred states when default_deferral says so
    (CUDA at 16+ rows; forced here), giving the plain decode's tokens."""
    model = tiny_model(4).fuse_projections()
    runner = xLSTMRunner(model)
    prompts = [[5, 9, 2, 7], [3, 3, 8], [1, 4, 1, 5, 9]]
    plain = runner.generate(prompts, max_tokens=12)
    seen = []
    call = type(model).__call__

    def spy(self, input_ids, state=None, **kwargs):
        seen.append(state is not None and is_deferred(state[0]))
        return call(self, input_ids, state, **kwargs)

    monkeypatch.setattr(xlarge, "default_deferral", lambda batch: 3)
    monkeypatch.setattr(type(model), "__call__", spy)
    deferred_runner = xLSTMRunner(model)
    assert deferred_runner.generate(prompts, max_tokens=12) == plain
    assert any(seen)  # the steps ran on deferred states


def test_bench_decode_defers_where_the_device_says_so(monkeypatch):
    """benchmark.measure_decode (bench, fused_decode.py) decodes from a deferred state when
    default_deferral says so, tracing every form before its timed steps."""
    from xlstm_metal import benchmark as bm

    model = tiny_model(6).fuse_projections()
    seen = []
    call = type(model).__call__

    def spy(self, input_ids, state=None, **kwargs):
        seen.append(None if state is None else (is_deferred(state[0]) and state[0][3].shape[2]))
        return call(self, input_ids, state, **kwargs)

    monkeypatch.setattr(xlarge, "default_deferral", lambda batch: 5)
    monkeypatch.setattr(type(model), "__call__", spy)
    result = bm.measure_decode(model, 2, tokens=3, warmup=1, compiled=False)
    assert result["tok_s"] > 0 and result["batch"] == 2
    # warm-up: one step per pending count (0..4), then the 3 timed steps
    assert seen == [0, 1, 2, 3, 4, 0, 1, 2]


# ------------------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.parametrize("terms", [1, 2, 5])
@pytest.mark.parametrize("bias,cap", [(True, 15.0), (False, None)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_cuda_deferred_kernel_matches_its_reference(terms, bias, cap, dtype):
    rng = np.random.default_rng(terms)
    B, NH, DQK, DV = 3, 2, 24, 40
    i_bias = _arr(rng, NH, scale=3.0, dtype=dtype) if bias else None
    f_bias = _arr(rng, NH, scale=3.0, shift=3.0, dtype=dtype) if bias else None
    kernel = defer_state(_state(rng, B, NH, DQK, DV), terms, dtype)
    reference = kernel
    for t in range(2 * terms + 1):
        q, k, v, i_raw, f_raw = _step_inputs(rng, B, NH, DQK, DV, dtype)
        h, kernel = mlstm_step_gated(q, k, v, i_raw, f_raw, i_bias, f_bias, kernel, gate_soft_cap=cap)
        h_ref, reference = mlstm_step_deferred(q, k, v, gate_preactivation(i_raw, i_bias, cap),
                                               gate_preactivation(f_raw, f_bias, cap), reference)
        # float32: round-off, amplified where |q.n| and exp(-m) are both small (7.5e-5 seen on an H200)
        assert h.dtype == dtype and _rel(h, h_ref) < (2e-4 if dtype == mx.float32 else 1e-2), (t, _rel(h, h_ref))
        for x, y in zip(kernel, reference):
            assert x.shape == y.shape and x.dtype == y.dtype
            assert x.size == 0 or _rel(x, y) < 2e-5


@cuda
def test_cuda_deferred_kernel_on_7b_heads_follows_the_plain_kernel():
    """16 rows of the 7B heads (DQK 256, DV 512), R = 8: two flushes and the steps between, against
    the plain gated step kernel carrying (C, n, m)."""
    rng = np.random.default_rng(7)
    B, NH, DQK, DV = 16, 8, 256, 512
    i_bias, f_bias = _arr(rng, NH, scale=3.0, dtype=mx.bfloat16), _arr(rng, NH, shift=3.0, dtype=mx.bfloat16)
    plain = _state(rng, B, NH, DQK, DV)
    deferred = defer_state(plain, 8, mx.bfloat16)
    for t in range(19):
        q, k, v, i_raw, f_raw = _step_inputs(rng, B, NH, DQK, DV, mx.bfloat16)
        h, plain = mlstm_step_gated(q, k, v, i_raw, f_raw, i_bias, f_bias, plain)
        h_d, deferred = mlstm_step_gated(q, k, v, i_raw, f_raw, i_bias, f_bias, deferred)
        assert _rel(h_d, h) < 1e-2, t  # bf16 h: an ulp where round-off crosses a rounding boundary
        assert deferred[3].shape[2] == (t + 1) % 8
    for x, y in zip(settle_state(deferred), plain):
        assert _rel(x, y) < 1e-5


@cuda
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_deferred_kernel_reads_packed_columns_as_the_slices(bias):
    """The packed form (q, k, v and the raw gates read as columns of the fused projections'
    output) against the same kernel on slices of it: the same reads, so the same bits, over a
    flush and the steps around it."""
    from xlstm_metal.kernels.fast.decode import mlstm_step_gated_packed, unpack_step_columns

    rng = np.random.default_rng(11)
    B, NH, DQK, DV = 5, 2, 24, 40
    i_bias = _arr(rng, NH, scale=3.0, dtype=mx.bfloat16) if bias else None
    f_bias = _arr(rng, NH, scale=3.0, shift=3.0, dtype=mx.bfloat16) if bias else None
    # q | k | v | o~ | i~ | f~ side by side, o~ between v and the gates as the model's product has it
    columns = (0, NH * DQK, 2 * NH * DQK, 2 * NH * DQK + NH * DV, 2 * NH * DQK + 2 * NH * DV,
               2 * NH * DQK + 2 * NH * DV + NH)
    width = columns[5] + NH
    packed = sliced = defer_state(_state(rng, B, NH, DQK, DV), 3, mx.bfloat16)
    for t in range(5):
        y = _arr(rng, B, 1, width, dtype=mx.bfloat16)
        h_p, packed = mlstm_step_gated_packed(y, columns, NH, i_bias, f_bias, packed)
        q, k, v, i_raw, f_raw = unpack_step_columns(y, columns, NH)
        h_s, sliced = mlstm_step_gated(q, k, v, i_raw, f_raw, i_bias, f_bias, sliced)
        assert np.array_equal(np.array(h_p.astype(mx.float32)), np.array(h_s.astype(mx.float32))), t
        for x, z in zip(packed, sliced):
            assert x.shape == z.shape and np.array_equal(np.array(x.astype(mx.float32)), np.array(z.astype(mx.float32)))
        assert packed[3].shape[2] == (t + 1) % 3


@cuda
def test_cuda_model_decode_defers_by_default_from_its_row_count():
    model = tiny_model(5).fuse_projections()
    B = step_deferred.DEFER_MIN_ROWS
    state = model.make_state(B)
    assert not any(is_deferred(s) for s in model.defer_state(model.make_state(B - 1)))
    deferred = model.defer_state(state)
    assert step_deferred.DEFER_TERMS <= 1 or all(is_deferred(s) for s in deferred)
    tok = mx.random.randint(0, model.config.vocab_size, (B, 1), key=mx.random.key(0))
    for t in range(20):
        logits, state = model(tok, state)
        logits_d, deferred = model(tok, deferred)
        assert _rel(logits_d, logits) < 1e-4, t
        tok = mx.argmax(logits[:, -1:], axis=-1)


def test_a_wrapped_projection_keeps_its_terms_in_float32_and_decodes_alike():
    """The terms are kept in the projections' dtype (bf16 weights: bf16); a q projection without
    weight or scales of its own (an adapter wrapping it) gets float32 terms, which hold any
    projection output exactly, and decodes as the plain state."""
    from test_module_tree import _LoRA

    def wrapped(model):
        for block in model.backbone.blocks:
            block.mlstm_layer.q = _LoRA(block.mlstm_layer.q)
        return model.fuse_projections()

    bf16 = tiny_model(7)
    bf16.set_dtype(mx.bfloat16)
    assert bf16.fuse_projections().defer_state(bf16.make_state(2), terms=2)[0][3].dtype == mx.bfloat16
    assert wrapped(bf16).defer_state(bf16.make_state(2), terms=2)[0][3].dtype == mx.float32
    model = wrapped(tiny_model(7))
    state = model.make_state(2)
    deferred = model.defer_state(state, terms=2)
    tok = mx.array([[3], [11]])
    for _ in range(5):
        logits, state = model(tok, state)
        logits_d, deferred = model(tok, deferred)
        assert _rel(logits_d, logits) < 1e-5
        tok = mx.argmax(logits[:, -1:], axis=-1)
