"""Fast paths against their references: fused projections (q|k|v|o|i|f, gate|up), bf16 state."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from xlstm_metal import benchmark as bm
from xlstm_metal.kernels.cpu import prefill as cpu_prefill
from xlstm_metal.loading import load_model, save_model

from conftest import tiny_model


def _run(model, ids, state=None):
    logits, state = model(ids, state)
    mx.eval(logits, state)
    return logits, state


def _close(a, b, tol):
    np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), rtol=tol, atol=tol)


@pytest.mark.parametrize("kwargs", [{}, {"use_bias": True}, {"tie_word_embeddings": True}])
def test_fused_model_matches_unfused(kwargs):
    ref, fused = tiny_model(seed=3, **kwargs), tiny_model(seed=3, **kwargs)
    fused.fuse_projections()
    assert "_fused_projection" in fused.blocks[0].mlstm_layer
    assert "_fused_gate_up" in fused.blocks[0].ffn
    ids = mx.array(np.random.default_rng(0).integers(0, 97, (2, 37)), dtype=mx.int32)
    (l0, s0), (l1, s1) = _run(ref, ids), _run(fused, ids)
    _close(l1, l0, 1e-5)
    # Decode steps continue from the prefill state identically.
    t = mx.array([[3], [4]], dtype=mx.int32)
    for _ in range(3):
        (l0, s0), (l1, s1) = _run(ref, t, s0), _run(fused, t, s1)
        _close(l1, l0, 1e-5)
    for a, b in zip(s0, s1):
        for x, y in zip(a, b):
            _close(y, x, 1e-5)


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the layout is the CPU's")
@pytest.mark.parametrize("row_kernel", [True, False])
def test_cpu_fuse_stores_the_lm_head_for_matrix_vector_products(tmp_path, row_kernel):
    # The LM head (tied to the embeddings or not) is stored in the layout the one-row product
    # reads fastest: [out, in] rows for the BLAS forwarder's row kernel, [in, out] for OpenBLAS's
    # GEMV (the gather of a tied table then reads rows of the transposed view).
    from xlstm_metal import _blas

    if row_kernel and not _blas.GEMV_FORWARD:
        pytest.skip(f"no BLAS forwarder here: {_blas.info()['gemv_forward_reason']}")
    previous = _blas.set_gemv_rows(row_kernel)
    try:
        for tied in (False, True):
            model = tiny_model(seed=8, tie_word_embeddings=tied)
            before = np.array(model.backbone.embeddings.weight)
            model.fuse_projections()
            head = model.backbone.embeddings.weight if tied else model.lm_head.weight
            V, E = head.shape
            assert memoryview(head).strides == ((4 * E, 4) if row_kernel else (4, 4 * V))
            np.testing.assert_array_equal(np.array(model.backbone.embeddings.weight), before)
            ids = mx.array([[5, 0, 96, 5]], dtype=mx.int32)
            np.testing.assert_array_equal(np.array(model.backbone.embeddings(ids))[0], before[[5, 0, 96, 5]])
            save_model(model, tmp_path / f"m{tied}{row_kernel}")
            np.testing.assert_array_equal(np.array(load_model(tmp_path / f"m{tied}{row_kernel}").backbone.embeddings.weight), before)
    finally:
        _blas.set_gemv_rows(previous)


def test_fuse_keeps_memory_names_and_saved_checkpoint(tmp_path):
    model = tiny_model(seed=5)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    mx.eval(model.parameters())
    mx.clear_cache()
    active = mx.get_active_memory()
    model.fuse_projections()
    mx.clear_cache()
    # Views of the fused matrices: no second copy of the projection weights (a copy would add
    # all of fused_bytes; the slack covers allocator granularity, ~30 KB on CUDA).
    fused_bytes = sum(b.mlstm_layer["_fused_projection"][0]["weight"].nbytes + b.ffn["_fused_gate_up"][0]["weight"].nbytes
                      for b in model.blocks)
    assert mx.get_active_memory() <= active + max(4096, fused_bytes // 4)
    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(before)
    for k, v in after.items():
        np.testing.assert_array_equal(np.array(v), before[k])
    save_model(model, tmp_path / "m")
    reloaded = load_model(tmp_path / "m")
    for k, v in tree_flatten(reloaded.parameters()):
        np.testing.assert_array_equal(np.array(v), before[k])


def test_replaced_weights_fall_back_to_separate_layers():
    model = tiny_model(seed=6).fuse_projections()
    other = tiny_model(seed=7)
    # Loading new weights into a fused model must not use the stale fused copy.
    model.load_weights(list(tree_flatten(other.parameters())))
    ids = mx.array([[1, 2, 3, 4, 5]], dtype=mx.int32)
    _close(_run(model, ids)[0], _run(other, ids)[0], 1e-6)
    assert "_fused_projection" not in model.blocks[0].mlstm_layer
    assert "_fused_gate_up" not in model.blocks[0].ffn


def test_compiled_step_keeps_and_uses_the_fused_matrices():
    """mx.compile(inputs=model.state) swaps every array in the state for a tracer; the fused
    matrices must survive that (they once silently fell back to six separate matmuls) and be
    inputs, not constants: a later update() must be seen by the compiled step."""
    model = tiny_model(seed=6).fuse_projections()
    step = bm.make_decode_step(model)
    tok = mx.array([[5]], dtype=mx.int32)
    mx.eval(step(tok, model.make_state(1)))
    assert "_fused_projection" in model.blocks[0].mlstm_layer and "_fused_gate_up" in model.blocks[0].ffn
    # Zeroing the fused q|k|v|o|i|f matrix in place of the model changes the compiled step's output
    # only if the compiled graph reads the fused matrix.
    before = np.array(step(tok, model.make_state(1))[1][0][0])
    layer = model.blocks[0].mlstm_layer
    layer["_fused_projection"][0]["weight"] = mx.zeros_like(layer["_fused_projection"][0]["weight"])
    after = np.array(step(tok, model.make_state(1))[1][0][0])
    assert np.abs(before).max() > 0 and np.abs(after).max() == 0


def test_gradients_through_a_fused_model_equal_the_reference():
    ref, fused = tiny_model(seed=8), tiny_model(seed=8).fuse_projections()
    ids = mx.array([[1, 2, 3, 4, 5, 6]], dtype=mx.int32)

    def loss(model):
        logits, _ = model(ids[:, :-1])
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    g0 = dict(tree_flatten(nn.value_and_grad(ref, loss)(ref)[1]))
    g1 = dict(tree_flatten(nn.value_and_grad(fused, loss)(fused)[1]))
    key = "backbone.blocks.0.mlstm_layer.q.weight"
    assert float(mx.abs(g0[key]).max()) > 0
    for k in g0:
        _close(g1[k], g0[k], 1e-5)


def test_fused_bfloat16_and_bfloat16_state():
    config = bm.shape_config("125m", embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97)
    ref = bm.random_model(config, dtype="bfloat16", seed=9)
    fused = bm.random_model(config, dtype="bfloat16", seed=9).fuse_projections()
    ids = mx.array([[5, 6, 7, 8, 9, 10, 11, 12]], dtype=mx.int32)
    l0, _ = _run(ref, ids)
    l1, _ = _run(fused, ids)
    assert l1.dtype == l0.dtype == mx.bfloat16
    _close(l1, l0, 0.05)
    # bf16 recurrent state: the state is stored in bf16 and stays close to the float32 one.
    cfg16 = bm.shape_config("125m", embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97,
                            inference_state_dtype="bfloat16")
    m32 = bm.random_model(config, seed=10)
    m16 = bm.random_model(cfg16, seed=10)
    s32, s16 = m32.make_state(1), m16.make_state(1)
    assert s16[0][0].dtype == mx.bfloat16
    t = mx.array([[3]], dtype=mx.int32)
    for _ in range(8):
        (a, s32), (b, s16) = _run(m32, t, s32), _run(m16, t, s16)
    assert s16[0][0].dtype == mx.bfloat16
    _close(b, a, 0.1)


# ------------------------------------------------------------------ chunkwise_scan kernel
def _inputs(seed, B=2, NH=3, S=77, D=8, DV=16, with_state=True):
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0, shift=0.0):
        return mx.array((rng.standard_normal(shape) * scale + shift).astype(np.float32))

    q, k, v = arr(B, NH, S, D), arr(B, NH, S, D), arr(B, NH, S, DV)
    i, f = arr(B, NH, S, scale=4), arr(B, NH, S, scale=4, shift=2)
    state = (arr(B, NH, D, DV), arr(B, NH, D), arr(B, NH, 1)) if with_state else None
    return q, k, v, i, f, state


def _rel_close(a, b, rtol=2e-4):
    a, b = np.array(a), np.array(b)
    scale = np.maximum(np.abs(b), 1.0)
    assert np.max(np.abs(a - b) / scale) < rtol, np.max(np.abs(a - b) / scale)


@pytest.mark.parametrize("chunk", [8, 16, 64, 128])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunkwise_scan_matches_reference_kernels(chunk, with_state):
    from xlstm_metal.kernels import get_mlstm_kernel
    from xlstm_metal.kernels.fast import mlstm_chunkwise_scan

    q, k, v, i, f, state = _inputs(chunk, with_state=with_state)
    h, s = mlstm_chunkwise_scan(q, k, v, i, f, state, chunk_size=chunk)
    for ref_name in ("chunkwise", "sequence"):
        h_ref, s_ref = get_mlstm_kernel(ref_name)(q, k, v, i, f, state, chunk_size=chunk)
        _rel_close(h, h_ref)
        for x, y in zip(s, s_ref):
            _rel_close(x, y)


def test_chunkwise_scan_state_continues_in_other_kernels():
    from xlstm_metal.kernels import get_mlstm_kernel
    from xlstm_metal.kernels.fast import mlstm_chunkwise_scan

    q, k, v, i, f, state = _inputs(1, S=100)
    h_full, s_full = get_mlstm_kernel("chunkwise")(q, k, v, i, f, state, chunk_size=16)
    cut = 45
    h1, s1 = mlstm_chunkwise_scan(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], i[:, :, :cut], f[:, :, :cut],
                                  state, chunk_size=16)
    h2, s2 = get_mlstm_kernel("sequence")(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], i[:, :, cut:],
                                          f[:, :, cut:], s1)
    _rel_close(mx.concatenate([h1, h2], axis=2), h_full)
    for x, y in zip(s2, s_full):
        _rel_close(x, y)


def test_model_with_chunkwise_scan_matches_default():
    import xlstm_metal.kernels.fast  # noqa: F401  (registers the kernel name)

    ref = tiny_model(seed=11)
    fast = tiny_model(seed=11, chunkwise_kernel="chunkwise_scan")
    assert fast.blocks[0].mlstm_layer.parallel_kernel_cell.kernel == "chunkwise_scan"
    ids = mx.array(np.random.default_rng(1).integers(0, 97, (2, 70)), dtype=mx.int32)
    (l0, s0), (l1, s1) = _run(ref, ids), _run(fast, ids)
    _close(l1, l0, 1e-4)
    for a, b in zip(s0, s1):
        for x, y in zip(a, b):
            _close(y, x, 1e-4)


@pytest.mark.parametrize("batch,chunk", [(1, 40), (2, 1024)])
@pytest.mark.parametrize("fused", [False, True])
def test_model_prefill_matches_one_forward(batch, chunk, fused):
    """prefill() in pieces (evaluated layer by layer once a piece reaches 2,048 tokens) gives the
    last logits and the state of one plain forward pass; with fused projections the blocks run
    chained (each FFN output added inside the next block's norm)."""
    model = tiny_model(seed=13)
    S = 2500 if batch == 2 else 130
    ids = mx.array(np.random.default_rng(2).integers(0, 97, (batch, S)), dtype=mx.int32)
    logits, state = model(ids)
    if fused:
        model.fuse_projections()
        assert model._chains_residuals()
    last, state_p = model.prefill(ids, chunk_size=chunk)
    assert last.shape == (batch, 97)
    _close(last, logits[:, -1], 1e-4)
    for a, b in zip(state, state_p):
        for x, y in zip(a, b):
            _close(y, x, 1e-4)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        model.prefill(ids[0])


def test_prefill_sees_weight_updates_and_refusing():
    """prefill() keeps its compiled blocks; the weights are their inputs, so loading new weights
    (which un-fuses) and fusing again are both seen."""
    model, other = tiny_model(seed=1).fuse_projections(), tiny_model(seed=2)
    # One piece of 2 x 1024 tokens: long enough for the compiled blocks (the MLX graph's, not the
    # CPU's C prefill: tests/test_cpu_prefill.py).
    ids = mx.array(np.random.default_rng(0).integers(0, 97, (2, 1024)), dtype=mx.int32)
    with cpu_prefill.switched(False):
        first, _ = model.prefill(ids)
        assert model.__dict__.get("_prefill_blocks") is not None
        _close(first, model(ids)[0][:, -1], 1e-4)
        model.load_weights(list(tree_flatten(other.parameters())))
        reference = other(ids)[0][:, -1]
        assert float(mx.abs(first - reference).max()) > 1e-2
        _close(model.prefill(ids)[0], reference, 1e-4)
        _close(model.fuse_projections().prefill(ids)[0], reference, 1e-4)


def test_prefill_follows_kernel_changes(monkeypatch):
    """A kernel chosen after an earlier prefill is used (compiled traces bake the kernel in)."""
    from xlstm_metal import kernels
    from xlstm_metal.kernels import get_mlstm_kernel

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return get_mlstm_kernel("chunkwise")(*args, **kwargs)

    monkeypatch.setitem(kernels._MLSTM_KERNELS, "test_counting", counting)
    model = tiny_model(seed=3)
    ids = mx.array(np.random.default_rng(1).integers(0, 97, (2, 1024)), dtype=mx.int32)
    first, _ = model.prefill(ids)  # compiled blocks (a 2,048-token piece), traced with "chunkwise"
    assert not calls
    for block in model.blocks:
        block.mlstm_layer.parallel_kernel_cell.kernel = "test_counting"
    again, _ = model.prefill(ids)
    # traced again with the new kernel: once, for all blocks (they are alike: models/block_compile.py)
    assert len(calls) == 1
    _close(again, first, 1e-4)


def test_unfuse_restores_separate_weights():
    ref, model = tiny_model(seed=4), tiny_model(seed=4).fuse_projections().unfuse_projections()
    layer = model.blocks[0].mlstm_layer
    assert "_fused_projection" not in layer and "_fused_gate_up" not in model.blocks[0].ffn
    ids = mx.array([[1, 2, 3, 4, 5, 6, 7]], dtype=mx.int32)
    _close(_run(model, ids)[0], _run(ref, ids)[0], 1e-5)
    for name, value in tree_flatten(ref.parameters()):
        np.testing.assert_array_equal(np.array(dict(tree_flatten(model.parameters()))[name]), np.array(value))
