"""The training step's SwiGLU and output-cell kernels (kernels/fast/train_rows.py) against the
ops they replace, and their wiring into the traced training step (cells: FeedForward,
mLSTMOutputCell). The kernels run on CUDA only (tests marked ``cuda``); the wiring test runs
everywhere with ops standing in for the kernels."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import xlstm_metal  # noqa: F401  (BLAS preload before mlx use)
from xlstm_metal.cells import ffn, mlstm
from xlstm_metal.cells.ffn import swiglu
from xlstm_metal.cells.norms import MultiHeadLayerNorm
from xlstm_metal.config import xLSTMConfig
from xlstm_metal.kernels.fast import train_rows
from xlstm_metal.kernels.fast.step import cuda_available
from xlstm_metal.models.xlstm_large import xLSTMLarge
from xlstm_metal.training.trainer import init_xlstm_large, make_loss_fn

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


def swiglu_split(y: mx.array) -> mx.array:
    """The ops the joined SwiGLU replaces: split the product, then ``swiglu``."""
    F = y.shape[-1] // 2
    gate, up = mx.split(y, [F], axis=-1)
    return swiglu(gate, up)


def norm_gate_ops(h: mx.array, o: mx.array, w: mx.array, eps: float) -> mx.array:
    """The ops the output-cell kernels replace (mLSTMOutputCell before out_proj)."""
    B, NH, S, DV = h.shape
    norm = MultiHeadLayerNorm(NH, DV, eps=eps)
    norm.weight = w
    return mx.sigmoid(o) * norm(h.transpose(0, 2, 1, 3))


def _bf16(rng, *shape, scale=1.0, shift=0.0):
    return mx.array((rng.standard_normal(shape) * scale + shift).astype(np.float32)).astype(mx.bfloat16)


def _f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _as_close_as_the_ops(ours: mx.array, ops: mx.array, exact: np.ndarray, name: str, slack: float = 2.0) -> None:
    """``ours`` (kernels, bf16) no farther from the float32 computation ``exact`` than the bf16
    ops ``ops`` are: relative Frobenius error up to ``slack`` times theirs (bf16 round-off, a
    few 1e-3; a wrong term would be far off). The two bf16 results are not compared bit by bit:
    where the kernels' float32 intermediates (sigmoid, the rows' statistics) round apart from
    MLX's kernels, a flip by one ulp compounds through the following bf16 roundings (S7R2:
    1.8-2.6% of the values more than one ulp apart, equally close to float32)."""
    a, b = _f32(ours), _f32(ops)
    scale = np.linalg.norm(exact) + 1e-30
    err_ours, err_ops = np.linalg.norm(a - exact) / scale, np.linalg.norm(b - exact) / scale
    assert err_ours <= slack * err_ops + 1e-6, (name, err_ours, err_ops)


@cuda
@pytest.mark.parametrize("shape,F", [((3, 37), 64), ((2, 128), 5504)])
def test_swiglu_joined_equals_the_ops(shape, F):
    """Forward and gradient of the joined product against split + swiglu (its vjp) in bf16 and
    in float32: each rounding is the ops', in their order (the sigmoid is MLX's own functor,
    which its precompiled kernel may round apart), so they are as close to float32 as the ops'."""
    rng = np.random.default_rng(F)
    y = _bf16(rng, *shape, 2 * F, scale=3.0)
    cot = _bf16(rng, *shape, F)
    (a,), (da,) = mx.vjp(train_rows.swiglu_joined, [y], [cot])
    (b,), (db,) = mx.vjp(swiglu_split, [y], [cot])
    (c,), (dc,) = mx.vjp(swiglu_split, [y.astype(mx.float32)], [cot.astype(mx.float32)])
    assert a.dtype == mx.bfloat16 and da.shape == y.shape
    _as_close_as_the_ops(a, b, _f32(c), "out")
    _as_close_as_the_ops(da, db, _f32(dc), "dy")
    assert float(mx.max(mx.abs(da[..., :F]))) > 0 and float(mx.max(mx.abs(da[..., F:]))) > 0


@cuda
def test_swiglu_down_is_swiglu_then_the_projection():
    """The FFN's tail keeping only the gate|up product (the SwiGLU recomputed in the backward):
    output and gradients are the bits of swiglu_joined followed by linear_rows_grad."""
    from xlstm_metal.cells.fused import linear_rows_grad

    rng = np.random.default_rng(5)
    F, E = 5504, 2048
    y, w, cot = _bf16(rng, 2, 64, 2 * F, scale=3.0), _bf16(rng, E, F, scale=0.02), _bf16(rng, 2, 64, E)
    (a,), da = mx.vjp(train_rows.swiglu_down, [y, w], [cot])
    (b,), db = mx.vjp(lambda y, w: linear_rows_grad(train_rows.swiglu_joined(y), w), [y, w], [cot])
    assert mx.array_equal(a, b) and all(mx.array_equal(p, q) for p, q in zip(da, db))


@cuda
def test_norm_gate_linear_is_the_cell_then_the_projection():
    """The output cell and out_proj keeping only their inputs (the cell recomputed in the
    backward): output and gradients are the bits of norm_gate_train followed by
    linear_rows_grad."""
    from xlstm_metal.cells.fused import linear_rows_grad

    rng = np.random.default_rng(6)
    B, NH, S, DV, E = 2, 4, 96, 512, 2048
    h = _bf16(rng, B, NH, S, DV, scale=2.0)
    o = _bf16(rng, B, S, 2 * NH * DV)[..., NH * DV:]
    w, w_out, cot = _bf16(rng, NH * DV, shift=1.0), _bf16(rng, E, NH * DV, scale=0.02), _bf16(rng, B, S, E)
    (a,), da = mx.vjp(lambda *p: train_rows.norm_gate_linear(*p, 1e-6), [h, o, w, w_out], [cot])
    (b,), db = mx.vjp(lambda h, o, w, wo: linear_rows_grad(train_rows.norm_gate_train(h, o, w, 1e-6), wo),
                      [h, o, w, w_out], [cot])
    assert mx.array_equal(a, b) and all(mx.array_equal(p, q) for p, q in zip(da, db))


@cuda
@pytest.mark.parametrize("B,NH,S,DV", [(2, 4, 40, 512), (1, 2, 300, 256)])
def test_norm_gate_train_equals_the_ops(B, NH, S, DV):
    """Output and gradients (h, o~ read as a column slice of a wider product, the weight) against
    the ops' autodiff in bf16 and in float32: as close to float32 as the bf16 ops are (the
    kernels' float32 row statistics round apart from MLX's layer_norm kernels)."""
    rng = np.random.default_rng(S)
    h = _bf16(rng, B, NH, S, DV, scale=2.0, shift=0.5)
    wide = _bf16(rng, B, S, 3 * NH * DV + 8, scale=2.0)
    o = wide[..., NH * DV + 8: 2 * NH * DV + 8]  # strided rows, as the fused projections give it
    w = _bf16(rng, NH * DV, scale=0.5, shift=1.0)
    cot = _bf16(rng, B, S, NH * DV)
    ours = mx.vjp(lambda h, o, w: train_rows.norm_gate_train(h, o, w, 1e-6), [h, o, w], [cot])
    ops = mx.vjp(lambda h, o, w: norm_gate_ops(h, o, w, 1e-6), [h, o, w], [cot])
    exact = mx.vjp(lambda h, o, w: norm_gate_ops(h, o, w, 1e-6), [a.astype(mx.float32) for a in (h, o, w)],
                   [cot.astype(mx.float32)])
    _as_close_as_the_ops(ours[0][0], ops[0][0], _f32(exact[0][0]), "out")
    for name, a, b, c in zip(("h", "o", "w"), ours[1], ops[1], exact[1]):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        _as_close_as_the_ops(a, b, _f32(c), name)


def _step_grads(model, x, y, dtype=mx.bfloat16, products="float32"):
    params = model.trainable_parameters()
    loss, grads = mx.value_and_grad(make_loss_fn(model, dtype, head_loss="fused", fuse_projections=True,
                                                 mlstm_products=products))(params, x, y)
    model.update(params)
    return loss, dict(tree_flatten(grads))


@cuda
def test_train_step_with_the_kernels_equals_the_ops_step(monkeypatch):
    """A whole model's bf16 loss and gradients in the traced step with the kernels and with
    ``XLSTM_METAL_TRAIN_ROWS=0`` (the ops), both against the float32 step: the loss within bf16
    round-off of it (1e-3 relative; S7R2: kernels 3.0e-4, ops 1.1e-4); all gradients together as
    close to float32 as the ops' (relative Frobenius error of the whole tree up to twice theirs),
    and each parameter's within 5x theirs + 5e-3 (a wrong term is off by O(1); sums with heavy
    cancellation, such as a gate bias's, amplify bf16 round-off unevenly: S7R3, block 1's input
    gate bias 0.040 against the ops' 0.012)."""
    config = xLSTMConfig(embedding_dim=512, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=32)
    model = xLSTMLarge(config)
    init_xlstm_large(model, 0)
    ids = mx.array(np.random.default_rng(3).integers(0, 97, (2, 65)))
    loss, ours = _step_grads(model, ids[:, :-1], ids[:, 1:])
    monkeypatch.setenv("XLSTM_METAL_TRAIN_ROWS", "0")
    ops_loss, ops = _step_grads(model, ids[:, :-1], ids[:, 1:])
    exact_loss, exact = _step_grads(model, ids[:, :-1], ids[:, 1:], mx.float32)
    assert abs(loss.item() - exact_loss.item()) <= 1e-3 * abs(exact_loss.item())
    assert abs(ops_loss.item() - exact_loss.item()) <= 1e-3 * abs(exact_loss.item())
    worse, total = {}, np.zeros(3)
    for k, g in exact.items():
        e = _f32(g)
        d_ours, d_ops = np.linalg.norm(_f32(ours[k]) - e), np.linalg.norm(_f32(ops[k]) - e)
        total += (d_ours**2, d_ops**2, np.linalg.norm(e) ** 2)
        scale = np.linalg.norm(e) + 1e-30
        if not d_ours / scale <= 5 * d_ops / scale + 5e-3:
            worse[k] = (d_ours / scale, d_ops / scale)
    assert not worse, worse
    err_ours, err_ops = np.sqrt(total[0] / total[2]), np.sqrt(total[1] / total[2])
    assert err_ours <= 2 * err_ops, (err_ours, err_ops)


def _errors_from(exact: dict, *grads: dict) -> tuple[float, ...]:
    """Each gradient tree's error relative to ``exact`` (the float32 step's), over all parameters:
    ||g - exact|| / ||exact||, the norms taken over every tensor of the tree at once."""
    total = np.zeros(len(grads) + 1)
    for k, g in exact.items():
        e = _f32(g)
        total += [np.linalg.norm(_f32(t[k]) - e) ** 2 for t in grads] + [np.linalg.norm(e) ** 2]
    return tuple(float(np.sqrt(t / total[-1])) for t in total[:-1])


def _two_block_fused_model(vocab: int = 97):
    """A 2-block model on the fused mLSTM kernels (DQK 128, DV 256) and a [2, 65] token batch;
    with ``vocab`` >= 130 its tokens are all different (the embedding's gradient is a scatter-add
    whose atomic adds of repeated tokens may round in any order: bit-for-bit tests need that)."""
    config = xLSTMConfig(embedding_dim=512, num_heads=2, num_blocks=2, vocab_size=vocab, chunk_size=32)
    model = xLSTMLarge(config)
    for block in model.blocks:
        block.mlstm_layer.parallel_kernel_cell.kernel = "chunkwise_fused"
    init_xlstm_large(model, 0)
    rng = np.random.default_rng(3)
    ids = rng.permutation(vocab)[:130].reshape(2, 65) if vocab >= 130 else rng.integers(0, vocab, (2, 65))
    return model, mx.array(ids)


@cuda
def test_train_step_with_bf16_mlstm_products_stays_near_float32():
    """``mlstm_products="bf16"`` (the fused mLSTM kernels' float32 operands rounded to bf16, as
    NX-AI's Triton kernels): a whole model's bf16 step against the float32 step. The loss within
    bf16 round-off (1e-3 relative); the whole gradient tree's relative error at most 1.5x that of
    the step with float32 products (the bf16 weights and activations already cost more than the
    cell's products), and the setting reached the kernels (the gradients differ)."""
    model, ids = _two_block_fused_model()
    _, default = _step_grads(model, ids[:, :-1], ids[:, 1:])
    loss, bf16 = _step_grads(model, ids[:, :-1], ids[:, 1:], products="bf16")
    exact_loss, exact = _step_grads(model, ids[:, :-1], ids[:, 1:], mx.float32)
    assert abs(loss.item() - exact_loss.item()) <= 1e-3 * abs(exact_loss.item())
    err_bf16, err_default = _errors_from(exact, bf16, default)
    assert err_bf16 <= 1.5 * err_default, (err_bf16, err_default)
    assert any(not mx.array_equal(bf16[k], default[k]) for k in default)


@cuda
def test_kept_entering_states_give_the_recomputed_states_gradients(monkeypatch):
    """``XLSTM_METAL_MLSTM_KEEP_STATES=1`` (bf16 products): the backward reads the forward's
    entering states instead of recomputing them; the same loss, and every gradient within 1e-2
    of the recomputing step's (relative Frobenius; the forward's states kernel takes the raw
    gates, the recompute MLX's prepared ones: the same states to float32 round-off, then rounded
    to bf16 alike), the whole tree within 2e-3."""
    model, ids = _two_block_fused_model()
    monkeypatch.setenv("XLSTM_METAL_MLSTM_KEEP_STATES", "0")
    loss, ref = _step_grads(model, ids[:, :-1], ids[:, 1:], products="bf16")
    monkeypatch.setenv("XLSTM_METAL_MLSTM_KEEP_STATES", "1")
    kept_loss, kept = _step_grads(model, ids[:, :-1], ids[:, 1:], products="bf16")
    assert kept_loss.item() == loss.item()
    total = np.zeros(2)
    for k, g in ref.items():
        e, d = _f32(g), _f32(kept[k]) - _f32(g)
        assert np.linalg.norm(d) <= 1e-2 * np.linalg.norm(e) + 1e-12, k
        total += (np.linalg.norm(d) ** 2, np.linalg.norm(e) ** 2)
    assert np.sqrt(total[0] / total[1]) <= 2e-3, np.sqrt(total[0] / total[1])


def _traced_float32_reference():
    """A two-block fused-projection model, a batch (x, y) and its traced float32 step's loss and
    gradients, computed before a test stands ops in for the kernels: (model, x, y, params,
    loss_fn, ref_loss, ref)."""
    config = xLSTMConfig(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16)
    model = xLSTMLarge(config)
    init_xlstm_large(model, 0)
    ids = mx.array(np.random.default_rng(4).integers(0, 97, (2, 33)))
    x, y = ids[:, :-1], ids[:, 1:]
    params = model.trainable_parameters()
    loss_fn = make_loss_fn(model, mx.float32, fuse_projections=True)
    ref_loss, ref = mx.value_and_grad(loss_fn)(params, x, y)
    model.update(params)
    return model, x, y, params, loss_fn, ref_loss, ref


def test_traced_step_routes_swiglu_and_output_cell_through_the_kernels(monkeypatch):
    """Where the kernels apply, the traced (fused-projection) step calls them once per block with
    the joined gate|up product and the output cell's h, o~, weight; with ops standing in for
    the kernels the loss and float32 gradients equal the step without them."""
    model, x, y, params, loss_fn, ref_loss, ref = _traced_float32_reference()

    calls = []
    monkeypatch.setattr(ffn, "swiglu_joined_supported", lambda dtype, F: True)
    monkeypatch.setattr(ffn, "swiglu_joined", lambda y: calls.append(("swiglu", y.shape)) or swiglu_split(y))
    monkeypatch.setattr(ffn, "swiglu_down_residual",
                        lambda y, w: calls.append(("swiglu", y.shape)) or swiglu_split(y) @ w.T)
    monkeypatch.setattr(mlstm, "norm_gate_train_supported", lambda h, o, w: True)
    monkeypatch.setattr(mlstm, "norm_gate_train",
                        lambda h, o, w, eps: calls.append(("norm", h.shape, o.shape)) or norm_gate_ops(h, o, w, eps))
    monkeypatch.setattr(mlstm, "norm_gate_linear", lambda h, o, w, w_out, eps: calls.append(
        ("norm", h.shape, o.shape)) or norm_gate_ops(h, o, w, eps) @ w_out.T)
    loss, grads = mx.value_and_grad(loss_fn)(params, x, y)
    model.update(params)
    F, E, NH = model.config.ffn_dim, model.config.embedding_dim, model.config.num_heads
    assert calls == [("norm", (2, NH, 32, E // NH), (2, 32, E)), ("swiglu", (2, 32, 2 * F))] * 2
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    flat, ref = dict(tree_flatten(grads)), dict(tree_flatten(ref))
    # Float32 round-off of sums taken in another order: per array 1e-4 of its largest entry
    # (the forget-gate bias's two entries sum over every position and differ by ~1.4e-5 on CPU).
    for k, g in ref.items():
        assert float(mx.max(mx.abs(flat[k] - g))) <= 1e-4 * float(mx.max(mx.abs(g))) + 1e-12, k
    # Outside the traced step (inference, the plain training step) neither runs.
    calls.clear()
    model(x)
    assert calls == []


@cuda
def test_cast_joined_is_the_cast_and_concatenation():
    """One kernel for a projection group's compute copy: the bits of the casts + concatenation,
    at the 1.3b mLSTM layer's shapes (q, k, v, o~, i~, f~) and an FFN's (gate, up)."""
    rng = np.random.default_rng(7)
    for rows, E in (((1024, 1024, 2048, 2048, 4, 4), 2048), ((5504, 5504), 2048), ((3, 5), 12)):
        members = [mx.array(rng.standard_normal((r, E)).astype(np.float32)) for r in rows]
        ours = train_rows.cast_joined(members, mx.bfloat16)
        ref = mx.concatenate([w.astype(mx.bfloat16) for w in members], axis=0)
        assert ours.shape == ref.shape and ours.dtype == mx.bfloat16
        assert mx.array_equal(ours, ref), rows


@cuda
def test_sum_of_squares_equals_the_ops():
    """The clip norm's squares in one launch per dtype and 256 arrays: 300 bf16 arrays (sizes
    from 1 to 2M, row slices at odd offsets: unaligned starts) and float32 ones, against the
    ops' per-array sums to float32 round-off."""
    rng = np.random.default_rng(9)
    big = mx.array(rng.standard_normal((3001, 700)).astype(np.float32)).astype(mx.bfloat16)
    arrays = [big[j : j + 1 + j % 5] for j in range(0, 2700, 9)]  # 300 views, most unaligned
    arrays += [mx.array(rng.standard_normal(n).astype(np.float32)) for n in (1, 7, 2_000_003)]
    ours = train_rows.sum_of_squares(arrays)
    ref = sum(mx.sum(mx.square(a.astype(mx.float32))) for a in arrays)
    assert ours.dtype == mx.float32 and ours.ndim == 0
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()


@cuda
@pytest.mark.parametrize("cap", [None, 15.0])
def test_linear_cross_entropy_kernel_equals_the_ops(cap, monkeypatch):
    """The fused LM head + loss with its CUDA rows kernel (cross_entropy_rows) against the same
    function on the float32 ops (XLSTM_METAL_TRAIN_ROWS=0) and in float32: the loss to 1e-5,
    the gradients as close to float32 as the ops' bf16 ones (3,000 tokens: one kernel chunk)."""
    from xlstm_metal.training.trainer import linear_cross_entropy

    rng = np.random.default_rng(13)
    x, w = _bf16(rng, 3000, 256, scale=2.0), _bf16(rng, 1000, 256, scale=0.3)
    t = mx.array(rng.integers(0, 1000, 3000).astype(np.int32))

    def run(x, w):
        return mx.value_and_grad(lambda x, w: 3.0 * linear_cross_entropy(x, w, t, cap), argnums=(0, 1))(x, w)

    loss, grads = run(x, w)
    exact_loss, exact = run(x.astype(mx.float32), w.astype(mx.float32))
    monkeypatch.setenv("XLSTM_METAL_TRAIN_ROWS", "0")
    ops_loss, ops = run(x, w)
    assert abs(loss.item() - ops_loss.item()) <= 1e-5 * abs(ops_loss.item())
    for name, a, b, c in zip(("x", "w"), grads, ops, exact):
        _as_close_as_the_ops(a, b, _f32(c), name)


def test_residual_into_output_adds_the_residual_in_the_gemm(monkeypatch):
    """XLSTM_METAL_TRAIN_ADDMM=1: inside ``residual_into_output(x)`` the first swiglu_down /
    norm_gate_linear / linear_residual whose output matches x returns x + output (``mx.addmm``) and marks the
    residual taken (a second one, or a mismatched shape, does not take it); value and gradients
    (x's included) those of the plain add to float32 round-off (ops standing in for the kernels).
    Switched off, nothing is taken."""
    rng = np.random.default_rng(5)
    monkeypatch.setattr(train_rows, "_swiglu_launch",
                        lambda kind, args, F, cols: swiglu_split(args[0]) if kind == "fwd" else mx.vjp(
                            swiglu_split, [args[0]], [args[1]])[1][0])
    monkeypatch.setattr(train_rows, "norm_gate_rows", norm_gate_ops)
    monkeypatch.setattr(train_rows, "_norm_gate_backward", lambda h, o, w, c, eps: mx.vjp(
        lambda h, o, w: norm_gate_ops(h, o, w, eps), [h, o, w], [c])[1])
    B, S, E, F, NH, DV = 2, 5, 12, 8, 2, 6
    arrays = [mx.array(rng.standard_normal(shape).astype(np.float32)) for shape in
              ((B, S, E), (B, S, 2 * F), (E, F), (B, NH, S, DV), (B, S, NH * DV), (NH * DV,), (E, NH * DV))]

    def fused(x, y, w_down, h, o, w, w_out):
        with train_rows.residual_into_output(x) as res:
            a = train_rows.swiglu_down_residual(y, w_down)
            b = train_rows.swiglu_down_residual(y, w_down)  # the residual is taken once
        x2 = a if res.taken else x + a
        with train_rows.residual_into_output(x2) as res2:
            c = train_rows.norm_gate_linear(h, o, w, w_out, 1e-6)
        with train_rows.residual_into_output(x2[:, :1]) as res3:  # another shape: not taken
            train_rows.norm_gate_linear(h, o, w, w_out, 1e-6)
        assert not res3.taken
        x3 = c if res2.taken else x2 + c
        with train_rows.residual_into_output(x3) as res4:  # the kept cell's out_proj
            d = train_rows.linear_residual(norm_gate_ops(h, o, w, 1e-6), w_out)
        out = (d if res4.taken else x3 + d) * 1.5 + b
        return out.sum() + (out * out).sum(), (res.taken, res2.taken, res4.taken)

    def plain(x, y, w_down, h, o, w, w_out):
        x2 = x + swiglu_split(y) @ w_down.T
        x3 = x2 + norm_gate_ops(h, o, w, 1e-6) @ w_out.T
        out = (x3 + norm_gate_ops(h, o, w, 1e-6) @ w_out.T) * 1.5 + swiglu_split(y) @ w_down.T
        return out.sum() + (out * out).sum()

    ref, ref_grads = mx.value_and_grad(plain, argnums=tuple(range(7)))(*arrays)
    for setting, taken in (("1", (True, True, True)), ("0", (False, False, False))):
        monkeypatch.setenv("XLSTM_METAL_TRAIN_ADDMM", setting)
        assert fused(*arrays)[1] == taken
        value, grads = mx.value_and_grad(lambda *a: fused(*a)[0], argnums=tuple(range(7)))(*arrays)
        assert value.item() == pytest.approx(ref.item(), rel=1e-5)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-4, atol=1e-4 * float(mx.max(mx.abs(r))))


@cuda
def test_train_step_with_residuals_in_the_gemms_stays_near_float32(monkeypatch):
    """XLSTM_METAL_TRAIN_ADDMM=1 (each block's residual added in out_proj's and proj_down's GEMM,
    one rounding instead of two): a whole model's bf16 step against the float32 step: the loss
    within bf16 round-off (1e-3 relative), the whole gradient tree no farther from float32 than
    1.5x the plain add's step, and the setting reached the step (the gradients differ)."""
    model, ids = _two_block_fused_model()
    monkeypatch.setenv("XLSTM_METAL_TRAIN_ADDMM", "0")
    _, plain = _step_grads(model, ids[:, :-1], ids[:, 1:], products="bf16")
    monkeypatch.setenv("XLSTM_METAL_TRAIN_ADDMM", "1")
    loss, fused = _step_grads(model, ids[:, :-1], ids[:, 1:], products="bf16")
    exact_loss, exact = _step_grads(model, ids[:, :-1], ids[:, 1:], mx.float32)
    assert abs(loss.item() - exact_loss.item()) <= 1e-3 * abs(exact_loss.item())
    err_fused, err_plain = _errors_from(exact, fused, plain)
    assert err_fused <= 1.5 * err_plain, (err_fused, err_plain)
    assert any(not mx.array_equal(fused[k], plain[k]) for k in plain)


@cuda
def test_kept_states_stored_in_bf16_by_the_states_kernel_are_the_same_bits(monkeypatch):
    """``XLSTM_METAL_MLSTM_KEEP_BF16=1``: with one product term the states kernel stores the kept
    entering C in bf16 (rounded to nearest) and the outputs kernel reads it so, instead of
    storing float32 that the outputs kernel rounds and a cast rounds again for the backward:
    h, the final state and the kept states bit for bit (fused_forward at the 1.3b head sizes,
    a ragged last chunk)."""
    from xlstm_metal.kernels.fast.chunkwise_fused import fused_forward

    rng = np.random.default_rng(9)
    B, NH, S, dqk, dv = 1, 4, 200, 256, 512
    q, k, v = (_bf16(rng, B, NH, S, d) for d in (dqk, dqk, dv))
    i = mx.array(rng.standard_normal((B, NH, S)).astype(np.float32) * 3)
    f = mx.array(rng.standard_normal((B, NH, S)).astype(np.float32) * 3 + 2)
    state = (mx.array(rng.standard_normal((B, NH, dqk, dv)).astype(np.float32)),
             mx.array(rng.standard_normal((B, NH, dqk)).astype(np.float32)), mx.zeros((B, NH, 1)))
    runs = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("XLSTM_METAL_MLSTM_KEEP_BF16", setting)
        h, final, kept = fused_forward(q, k, v, i, f, state, 1e-6, 64, mx.bfloat16, terms=1, keep_states=True)
        mx.eval(h, final, kept)
        runs[setting] = (h, final, kept)
    (h0, fin0, kept0), (h1, fin1, kept1) = runs["0"], runs["1"]
    assert kept0[0].dtype == mx.float32 and kept1[0].dtype == mx.bfloat16
    assert mx.array_equal(h0, h1)
    assert all(mx.array_equal(a, b) for a, b in zip(fin0, fin1))
    assert mx.array_equal(kept0[0].astype(mx.bfloat16), kept1[0])
    assert mx.array_equal(kept0[1], kept1[1]) and mx.array_equal(kept0[2], kept1[2])
    # (a whole training step's bits: test_same_bits_knobs_leave_the_training_steps_unchanged)


def test_split_columns_joins_the_cotangents_in_the_traced_step(monkeypatch):
    """Where the join kernel applies, the traced step splits each projection group's product with
    ``split_columns`` (per block q|k|v|o~|i~|f~, and gate|up off CUDA) and its vjp joins the pieces'
    cotangents; with the concatenation standing in for the kernel, loss and gradients are the
    plain split's bit for bit."""
    from xlstm_metal.cells import fused

    model, x, y, params, loss_fn, ref_loss, ref = _traced_float32_reference()
    joins = []
    monkeypatch.setattr(fused, "join_columns_supported", lambda dtype, widths: True)
    monkeypatch.setattr(train_rows, "_join_launch", lambda pieces, widths, dtype: joins.append(widths) or
                        mx.concatenate([p.astype(dtype) for p in pieces], axis=-1))
    loss, grads = mx.value_and_grad(loss_fn)(params, x, y)
    model.update(params)
    qk, v, F = model.config.qk_dim, model.config.v_dim, model.config.ffn_dim
    assert sorted(joins) == sorted([(qk, qk, v, v, 2, 2), (F, F)] * 2)  # (on CUDA the SwiGLU reads gate|up joined)
    assert loss.item() == ref_loss.item()
    flat = dict(tree_flatten(grads))
    for k, g in tree_flatten(ref):
        if k == "backbone.embeddings.weight" and mx.default_device() != mx.cpu:
            # MLX's CUDA scatter-add (the lookup's gradient) adds in no fixed order: two runs of the
            # same step differ by float32 round-off there (H200, S16R2: 9.5e-7 of ~0.03).
            assert mx.allclose(flat[k], g, rtol=1e-5, atol=1e-6), k
        else:
            assert mx.array_equal(flat[k], g), k


@cuda
def test_join_kernel_is_the_concatenation():
    """The join kernel: MLX's concatenation bit for bit, for the 1.3b mLSTM group's widths
    (1024, 1024, 2048, 2048, 4, 4) with transposed-view pieces (the i~, f~ cotangents), for
    widths that split 16-byte groups, and an unaligned piece."""
    rng = np.random.default_rng(12)
    T = 300
    for widths in ((1024, 1024, 2048, 2048, 4, 4), (5, 11, 16, 3), (8, 24)):
        pieces = [_bf16(rng, T, w) for w in widths]
        if widths[-1] == 4:  # as the gates' cotangents: [B, NH, S] transposed to [B, S, NH]
            pieces[-1] = _bf16(rng, 4, T).T
        if widths == (8, 24):
            pieces[0] = _bf16(rng, T * 8 + 1).reshape(-1)[1:].reshape(T, 8)  # 2-byte offset
        ours = train_rows._join_launch(pieces, widths, mx.bfloat16)
        assert mx.array_equal(ours, mx.concatenate(pieces, axis=-1)), widths
    # (a whole training step's bits: test_same_bits_knobs_leave_the_training_steps_unchanged)


@cuda
def test_cast_many_is_the_casts():
    """cast_many: each array's astype bit for bit, 200 arrays (three launches) of sizes that are
    no multiple of 4, one element, and an unaligned view; fp16 too."""
    rng = np.random.default_rng(13)
    sizes = [(96, 333), (7,), (1,), (2048,), (4, 2048), (130, 64)] * 33 + [(5, 3), (9,)]
    arrays = [mx.array(rng.standard_normal(s).astype(np.float32) * 3) for s in sizes]
    arrays.append(mx.array(rng.standard_normal(4 * 96 + 1).astype(np.float32))[1:].reshape(4, 96))
    for dtype in (mx.bfloat16, mx.float16):
        ours = train_rows.cast_many(arrays, dtype)
        assert len(ours) == len(arrays)
        for a, o in zip(arrays, ours):
            assert o.dtype == dtype and mx.array_equal(o, a.astype(dtype)), a.shape


@cuda
def test_same_bits_knobs_leave_the_training_steps_unchanged(monkeypatch, tmp_path):
    """The trainer's bf16 step (fused projections and head, bf16 products; one block of the 1.3b
    shape, 4 x 2,048 tokens) for two steps with the launch and traffic savings that keep the bits
    (multi-tensor AdamW, kept states stored in bf16, the one-kernel join, the grouped casts) all
    on against all off: the same losses and
    the same float32 weights and AdamW moments bit for bit (all tokens different: the
    embedding's scatter-add is exact)."""
    from xlstm_metal.training.trainer import Trainer, TrainingConfig

    from xlstm_metal.benchmark import shape_config

    knobs = ("XLSTM_METAL_ADAMW_MULTI", "XLSTM_METAL_MLSTM_KEEP_BF16", "XLSTM_METAL_TRAIN_JOIN",
             "XLSTM_METAL_TRAIN_CAST_MANY")
    # One block of the 1.3b shape at its batch (4 x 2,048: the benchmark's kernels, from MLX's
    # kernel cache when it ran first); all tokens different (see _two_block_fused_model).
    B, S, V, steps = 4, 2048, 32768, 2
    stream = np.random.default_rng(0).permutation(V)[:(steps + 1) * B * (S + 1)].astype(np.int32)
    runs = []
    for setting in ("0", "1"):
        for knob in knobs:
            monkeypatch.setenv(knob, setting)
        model = xLSTMLarge(shape_config("1.3b", num_blocks=1, vocab_size=V, chunk_size=64))
        for block in model.blocks:
            block.mlstm_layer.parallel_kernel_cell.kernel = "chunkwise_fused"
        init_xlstm_large(model, 0)
        cfg = TrainingConfig(seq_len=S, batch_size=B, steps=steps, dtype="bfloat16", head_loss="fused",
                             fuse_projections=True, mlstm_products="bf16", eval_batches=1, lr=1e-3)
        trainer = Trainer(model, stream, stream[:B * (S + 1)], cfg, tmp_path / setting, tmp_path, progress=False)
        trainer._build_steps()
        losses = []
        for _ in range(steps):
            x, y = trainer.batches.next()
            loss, _norm = trainer._train_step(mx.array(x), mx.array(y))
            mx.eval(loss, model.state, trainer.optimizer.state)
            losses.append(loss.item())
        runs.append((losses, dict(tree_flatten(model.parameters())), dict(tree_flatten(trainer.optimizer.state))))
    (l0, p0, s0), (l1, p1, s1) = runs
    assert l0 == l1
    for k in p0:
        assert mx.array_equal(p0[k], p1[k]), k
    for k in s0:
        assert mx.array_equal(s0[k], s1[k]), k


@cuda
def test_kept_output_cell_gives_the_recomputing_steps_bits(monkeypatch):
    """``XLSTM_METAL_TRAIN_RECOMPUTE_CELL=0``: the mLSTM output cell's output kept for out_proj's
    backward instead of recomputed there (the same kernel, the same products): a whole model's
    bf16 loss and gradients bit for bit, with and without the residual adds in the GEMMs."""
    model, ids = _two_block_fused_model(vocab=257)
    for addmm in ("0", "1"):
        monkeypatch.setenv("XLSTM_METAL_TRAIN_ADDMM", addmm)
        monkeypatch.setenv("XLSTM_METAL_TRAIN_RECOMPUTE_CELL", "1")
        loss0, g0 = _step_grads(model, ids[:, :-1], ids[:, 1:], products="bf16")
        monkeypatch.setenv("XLSTM_METAL_TRAIN_RECOMPUTE_CELL", "0")
        loss1, g1 = _step_grads(model, ids[:, :-1], ids[:, 1:], products="bf16")
        assert loss0.item() == loss1.item(), addmm
        for key in g0:
            assert mx.array_equal(g0[key], g1[key]), (addmm, key)


@cuda
def test_addmm_rows_is_the_product_plus_the_residual():
    """The residual add inside the GEMM (XLSTM_METAL_TRAIN_ADDMM, on by default): at the 1.3b
    block's shapes (2,048 tokens; out_proj 2048 x 2048, proj_down 2048 x 5504) ``r + x @ w.T``
    from one cuBLASLt product in bf16 is no farther from the float32 result than the product
    rounded to bf16 and then added (relative Frobenius error up to 1.05x; one rounding instead
    of two), and the two differ (the epilogue ran)."""
    rng = np.random.default_rng(14)
    for K in (2048, 5504):
        x, w = _bf16(rng, 1, 2048, K), _bf16(rng, 2048, K, scale=K ** -0.5)
        r = _bf16(rng, 1, 2048, 2048)
        fused = train_rows._addmm_rows(r, x, w)
        plain = r + x @ w.T
        exact = _f32(r) + _f32(x) @ _f32(w).T
        err_fused = np.linalg.norm(_f32(fused) - exact) / np.linalg.norm(exact)
        err_plain = np.linalg.norm(_f32(plain) - exact) / np.linalg.norm(exact)
        assert fused.shape == plain.shape and fused.dtype == mx.bfloat16
        assert err_fused <= 1.05 * err_plain, (K, err_fused, err_plain)
        assert not mx.array_equal(fused, plain), K


def test_traced_step_routes_the_pre_norms_through_residual_norm(monkeypatch):
    """XLSTM_METAL_TRAIN_NORM_RESIDUAL's wiring: in the traced (fused-projection) step each
    block's two pre-norms run as residual_norm (x passed through, its two cotangents summed in
    the norm's backward), twice per block; with its float32 ops backward (off CUDA) the loss and
    gradients equal the plain step's to float32 round-off; outside the traced step it never runs."""
    from xlstm_metal.blocks import xlstm_large as blocks

    model, x, y, params, loss_fn, ref_loss, ref = _traced_float32_reference()
    calls = []
    monkeypatch.setattr(blocks, "residual_norm_supported", lambda x, w: True)
    real = blocks.residual_norm
    monkeypatch.setattr(blocks, "residual_norm", lambda x, w, eps: calls.append(x.shape) or real(x, w, eps))
    loss, grads = mx.value_and_grad(loss_fn)(params, x, y)
    model.update(params)
    assert calls == [(2, 32, model.config.embedding_dim)] * 4
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    flat, ref = dict(tree_flatten(grads)), dict(tree_flatten(ref))
    # float32 round-off (the norm's gradient in another order), which sums with heavy
    # cancellation (the gate biases') amplify: 1e-4 of each gradient's largest value
    for k, g in ref.items():
        assert float(mx.max(mx.abs(flat[k] - g))) <= 1e-4 * float(mx.max(mx.abs(g))) + 1e-12, k
    assert any(not mx.array_equal(flat[k], g) for k, g in ref.items())  # the ops backward ran
    calls.clear()
    model(x)
    assert calls == []


@cuda
@pytest.mark.parametrize("D, dtype", [(2048, mx.bfloat16), (768, mx.float16)])
def test_residual_norm_backward_kernel_against_float32(monkeypatch, D, dtype):
    """residual_norm's backward kernel at the 1.3b block's rows (8,192 x 2,048 bf16) and a
    125m-like fp16 width: dx (the residual's cotangent plus the norm's input gradient, one
    rounding) and dweight no farther from the float32 gradient than MLX's ops (rms_norm's vjp,
    then the add) are, up to 1.05x; the forward is rms_norm's bits and x itself."""
    monkeypatch.setenv("XLSTM_METAL_TRAIN_NORM_RESIDUAL", "1")
    rng = np.random.default_rng(21)
    rows, eps = 8192, 1e-6
    x = _bf16(rng, rows, D, scale=3.0).astype(dtype)
    w = _bf16(rng, D, scale=0.2, shift=1.0).astype(dtype)
    g = _bf16(rng, rows, D, scale=0.01).astype(dtype)
    c = _bf16(rng, rows, D, scale=0.01).astype(dtype)
    assert train_rows.residual_norm_supported(x, w)
    xp, normed = train_rows.residual_norm(x, w, eps)
    assert mx.array_equal(xp, x) and mx.array_equal(normed, mx.fast.rms_norm(x, w, eps))
    (dx, dw) = mx.vjp(lambda x, w: train_rows.residual_norm(x, w, eps), [x, w], [c, g])[1]

    def ops(x, w, g, c):
        _, (gx, gw) = mx.vjp(lambda x, w: mx.fast.rms_norm(x, w, eps), [x, w], [g])
        return gx + c, gw

    f32 = [a.astype(mx.float32) for a in (x, w, g, c)]
    ex, ew = ops(*f32)
    ox, ow = ops(x, w, g, c)
    _as_close_as_the_ops(dx, ox, _f32(ex), "dx", slack=1.05)
    _as_close_as_the_ops(dw, ow, _f32(ew), "dw", slack=1.05)
    assert not mx.array_equal(dx, ox)  # the kernel ran (one rounding, not the ops' two)


@cuda
def test_train_step_with_residual_norms_stays_near_float32(monkeypatch):
    """XLSTM_METAL_TRAIN_NORM_RESIDUAL=1: a whole model's bf16 step against the float32 step: the
    loss within bf16 round-off, the whole gradient tree no farther from float32 than 1.05x the
    step with autodiff's add, and the setting reached the step (the gradients differ)."""
    model, ids = _two_block_fused_model()
    monkeypatch.setenv("XLSTM_METAL_TRAIN_NORM_RESIDUAL", "0")
    _, plain = _step_grads(model, ids[:, :-1], ids[:, 1:], products="bf16")
    monkeypatch.setenv("XLSTM_METAL_TRAIN_NORM_RESIDUAL", "1")
    loss, fused = _step_grads(model, ids[:, :-1], ids[:, 1:], products="bf16")
    exact_loss, exact = _step_grads(model, ids[:, :-1], ids[:, 1:], mx.float32)
    assert abs(loss.item() - exact_loss.item()) <= 1e-3 * abs(exact_loss.item())
    err_fused, err_plain = _errors_from(exact, fused, plain)
    assert err_fused <= 1.05 * err_plain, (err_fused, err_plain)
    assert any(not mx.array_equal(fused[k], plain[k]) for k in plain)
