"""The chunkwise kernel's own vjp (kernels/fast/chunkwise_grad.py) against MLX's autodiff of the
reference, and training through it (kernel ``chunkwise_fused``).

On the CPU the forward is ``chunkwise_scan`` but the custom vjp runs (the tests check it is the
one called); on CUDA the forward is the fused kernels (tests marked ``cuda`` skip elsewhere).
"""

import math

import mlx.core as mx
import numpy as np
import pytest

import xlstm_metal  # noqa: F401  (BLAS preload before mlx use)
from xlstm_metal.kernels.fast import chunkwise_grad
from xlstm_metal.kernels.fast.chunkwise_fused import fused_chunkwise_supported, mlstm_chunkwise_fused
from xlstm_metal.kernels.fast.step import cuda_available
from xlstm_metal.kernels.mlstm import mlstm_chunkwise
from xlstm_metal.models.xlstm_large import xLSTMLarge
from xlstm_metal.training.checkpoint import checkpoint_dirs
from xlstm_metal.training.trainer import Trainer, TrainingConfig, init_xlstm_large

from conftest import tiny_config

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


def _inputs(seed, B=2, NH=3, S=37, DQK=8, DV=12, gate_scale=3.0, dtype=mx.float32):
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0, shift=0.0, dt=mx.float32):
        return mx.array((rng.standard_normal(shape) * scale + shift).astype(np.float32)).astype(dt)

    q, k, v = arr(B, NH, S, DQK, dt=dtype), arr(B, NH, S, DQK, dt=dtype), arr(B, NH, S, DV, dt=dtype)
    i, f = arr(B, NH, S, scale=gate_scale), arr(B, NH, S, scale=gate_scale, shift=2.0)
    state = (arr(B, NH, DQK, DV), arr(B, NH, DQK), arr(B, NH, 1))
    weights = (arr(B, NH, S, DV), arr(B, NH, DQK, DV), arr(B, NH, DQK))
    return [q, k, v, i, f, *state], weights


def _grads(kernel, args, weights, *, with_state, continued, chunk):
    """Gradients w.r.t. (q, k, v, i, f, C0, n0, m0) of a loss on h and, with ``continued``, on
    the h of a second segment that starts from the returned state (the reference runs it)."""
    wh = weights[0]

    def loss(q, k, v, i, f, C0, n0, m0):
        h, state = kernel(q, k, v, i, f, (C0, n0, m0) if with_state else None, chunk_size=chunk)
        total = mx.sum(h.astype(mx.float32) * wh)
        if continued:
            h2, _ = mlstm_chunkwise(q, k, v, i, f, state, chunk_size=chunk)
            total = total + mx.sum(h2.astype(mx.float32) * wh)
        return total

    return mx.grad(loss, argnums=tuple(range(8)))(*args)


def _rel(a, b) -> float:
    a, b = np.array(a.astype(mx.float32), dtype=np.float64), np.array(b.astype(mx.float32), dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


@pytest.fixture
def counted_backward(monkeypatch):
    """Counts calls of the custom vjp (so a test knows MLX did not differentiate the forward)."""
    calls = []
    original = chunkwise_grad._backward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(chunkwise_grad, "_backward", counting)
    return calls


def _reference_and_spread(args, weights, *, with_state, chunk):
    """MLX's autodiff of the loop reference, and per input how far autodiff of the other ops
    kernels (chunkwise_scan, the quadratic form) lands from it on this device: the float32
    round-off its ops produce (~4e-5 on the CPU; a GPU's exp and reductions may differ)."""
    from xlstm_metal.kernels.fast.chunkwise import mlstm_chunkwise_scan
    from xlstm_metal.kernels.mlstm import mlstm_parallel

    ref = _grads(mlstm_chunkwise, args, weights, with_state=with_state, continued=False, chunk=chunk)
    spread = np.zeros(8)
    for kernel in (mlstm_chunkwise_scan, mlstm_parallel):
        other = _grads(kernel, args, weights, with_state=with_state, continued=False, chunk=chunk)
        spread = np.maximum(spread, [_rel(a, b) for a, b in zip(other, ref)])
    return ref, spread


@pytest.mark.parametrize("S,chunk", [(37, 16), (64, 16), (20, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_custom_vjp_equals_autodiff_of_reference(S, chunk, with_state, counted_backward):
    """Against MLX's autodiff of the loop reference to 5e-5 or twice the ops kernels' own spread
    on this device, whichever is larger; on the CPU against chunkwise_scan's autodiff, whose
    forward this path shares, to 1e-5."""
    from xlstm_metal.kernels.fast.chunkwise import mlstm_chunkwise_scan

    args, weights = _inputs(S + chunk, S=S)
    ours = _grads(mlstm_chunkwise_fused, args, weights, with_state=with_state, continued=False, chunk=chunk)
    assert counted_backward, "the custom vjp did not run"
    ref, spread = _reference_and_spread(args, weights, with_state=with_state, chunk=chunk)
    scan = _grads(mlstm_chunkwise_scan, args, weights, with_state=with_state, continued=False, chunk=chunk)
    for j, (name, a, b, c) in enumerate(zip("q k v i f C0 n0 m0".split(), ours, ref, scan)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if not with_state and name in ("C0", "n0", "m0"):
            continue  # no state given: the zeros made inside get no gradient
        assert _rel(a, b) <= max(5e-5, 2 * spread[j]), (name, _rel(a, b), spread[j])
        if mx.default_device() == mx.cpu:
            assert _rel(a, c) <= 1e-5, (name, _rel(a, c))
    assert float(mx.max(mx.abs(ours[4]))) > 1e-3  # the forget gates do get gradient


@pytest.mark.parametrize("gate_scale", [1.0, 12.0])
def test_gradient_through_the_returned_state(gate_scale, counted_backward):
    """A second segment continuing from the returned state: gradients reach the first segment's
    inputs through (C, n, m) as through the reference. Saturated gates (i~ up to ~30) make the
    stabiliser m take over from the running max. Both sides' forward states differ by float32
    round-off, which the second segment amplifies a little: tolerance 3e-5."""
    args, weights = _inputs(5, gate_scale=gate_scale)
    ours = _grads(mlstm_chunkwise_fused, args, weights, with_state=True, continued=True, chunk=16)
    ref = _grads(mlstm_chunkwise, args, weights, with_state=True, continued=True, chunk=16)
    assert counted_backward
    for name, a, b in zip("q k v i f C0 n0 m0".split(), ours, ref):
        assert _rel(a, b) <= 3e-5, (name, _rel(a, b))


def _unread_state_check(args, weights, chunk, with_state, counted=None):
    """Gradients of a loss on h alone: inside ``final_states_unread`` (the backward leaves out
    the zero cotangents of the final state) equal to those outside, bit for bit; the returned
    state carries no gradient there (a loss on it differentiates to zero)."""
    plain = _grads(mlstm_chunkwise_fused, args, weights, with_state=with_state, continued=False, chunk=chunk)
    with chunkwise_grad.final_states_unread():
        unread = _grads(mlstm_chunkwise_fused, args, weights, with_state=with_state, continued=False, chunk=chunk)

        def state_loss(q):
            _, (C, n, m) = mlstm_chunkwise_fused(q, *args[1:5], None, chunk_size=chunk)
            return mx.sum(C) + mx.sum(n)

        assert float(mx.max(mx.abs(mx.grad(state_loss)(args[0])))) == 0.0
    for name, a, b in zip("q k v i f C0 n0 m0".split(), unread, plain):
        assert mx.array_equal(a, b), name
    assert float(mx.max(mx.abs(plain[4]))) > 0


@pytest.mark.parametrize("with_state", [False, True])
def test_unread_final_state_gives_the_same_gradients(with_state, counted_backward):
    args, weights = _inputs(23)
    _unread_state_check(args, weights, 16, with_state)
    assert counted_backward


def test_custom_vjp_under_compile():
    args, weights = _inputs(11)
    eager = _grads(mlstm_chunkwise_fused, args, weights, with_state=True, continued=False, chunk=16)

    compiled = mx.compile(lambda *a: _grads(mlstm_chunkwise_fused, list(a), weights, with_state=True,
                                            continued=False, chunk=16))(*args)
    for a, b in zip(compiled, eager):
        assert _rel(a, b) <= 1e-6


def _train_losses(tmp_path, kernel, recompute="none", dtype="float32", steps=4, chunk=16, **shape):
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 97, 6000).astype(np.int32)
    model = xLSTMLarge(tiny_config(chunkwise_kernel=kernel, chunk_size=chunk, **shape))
    init_xlstm_large(model, 0)
    cfg = TrainingConfig(seq_len=40, batch_size=2, steps=steps, lr=3e-3, warmup=1, eval_every=100, eval_batches=1,
                         save_every=1000, log_every=1, dtype=dtype, recompute=recompute)
    trainer = Trainer(model, stream[:5000], stream[5000:], cfg, tmp_path / f"{kernel}-{recompute}", tmp_path,
                      progress=False)
    return [loss for _, loss in trainer.train().losses]


def test_training_through_the_custom_vjp_matches_the_reference(tmp_path, counted_backward):
    reference = _train_losses(tmp_path, "chunkwise")
    fast = _train_losses(tmp_path, "chunkwise_fused")
    assert counted_backward
    assert len(fast) == 4 and fast[0] > math.log(97) - 1
    np.testing.assert_allclose(fast, reference, rtol=2e-5)


def test_recomputed_activations_give_the_same_losses(tmp_path):
    plain = _train_losses(tmp_path, "chunkwise_fused", steps=3)
    for recompute in ("head", "mlstm", "ffn", "blocks"):
        # Same math; gradient sums may add in another order (float32 round-off, ~1e-7).
        np.testing.assert_allclose(_train_losses(tmp_path, "chunkwise_fused", recompute, steps=3), plain,
                                   rtol=1e-6, err_msg=recompute)


def test_bad_recompute_setting_is_refused():
    with pytest.raises(ValueError, match="recompute must be one of none, head, mlstm, ffn, blocks"):
        TrainingConfig(recompute="all").validate()


# ------------------------------------------------------------------------------------ CUDA
@cuda
@pytest.mark.parametrize("S,with_state", [(256, False), (200, True)])
def test_fused_custom_vjp_equals_autodiff_of_reference(S, with_state):
    """bf16 q, k, v (the fused kernels' inputs) at head sizes the kernels take; float32 gates
    and state. Gradients w.r.t. bf16 inputs are bf16 on both sides: equal to one bf16 ulp, or
    twice the ops kernels' spread on this device (relative to the largest gradient)."""
    args, weights = _inputs(S, B=2, NH=2, S=S, DQK=64, DV=128, dtype=mx.bfloat16)
    assert fused_chunkwise_supported(args[0], args[2], 64)
    ours = _grads(mlstm_chunkwise_fused, args, weights, with_state=with_state, continued=False, chunk=64)
    ref, spread = _reference_and_spread(args, weights, with_state=with_state, chunk=64)
    for j, (name, a, b) in enumerate(zip("q k v i f C0 n0 m0".split(), ours, ref)):
        assert a.dtype == b.dtype, name
        if not with_state and name in ("C0", "n0", "m0"):
            continue
        if a.dtype == mx.bfloat16:
            a32, b32 = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
            atol = max(1e-6, 2 * spread[j]) * np.abs(b32).max()
            assert np.all(np.abs(a32 - b32) <= 2**-7 * np.abs(b32) + atol), (name, np.abs(a32 - b32).max(), atol)
        else:
            assert _rel(a, b) <= max(2e-5, 2 * spread[j]), (name, _rel(a, b), spread[j])


@cuda
@pytest.mark.parametrize("B,NH,S,DQK,DV,chunk,with_state,split", [
    (2, 2, 200, 64, 128, 64, True, "1"),   # several chunks, a partial last one, an initial state
    (1, 3, 160, 128, 128, 32, False, "0"),  # 32-step chunks; a block loops over two column tiles
    (1, 2, 144, 64, 64, 48, True, "1"),     # 48-step chunks (three warps per block)
])
def test_backward_kernels_equal_the_ops_backward(B, NH, S, DQK, DV, chunk, with_state, split, monkeypatch):
    """The CUDA backward (kernels/fast/chunkwise_bwd.py) against the MLX-ops backward of the same
    custom vjp (XLSTM_METAL_FUSED_MLSTM_BWD=0), TF32 off: float32 round-off apart. The loss also
    reads a second segment continuing from the returned state, so the final state's cotangent is
    carried back through every chunk. ``split``: one block per 64 output columns, or one per chunk."""
    monkeypatch.setenv("XLSTM_METAL_MLSTM_BWD_SPLIT", split)
    args, weights = _inputs(S + chunk, B=B, NH=NH, S=S, DQK=DQK, DV=DV, dtype=mx.bfloat16)
    assert fused_chunkwise_supported(args[0], args[2], chunk)
    grads = {}
    for path in ("0", "1"):
        monkeypatch.setenv("XLSTM_METAL_FUSED_MLSTM_BWD", path)
        grads[path] = _grads(mlstm_chunkwise_fused, args, weights, with_state=with_state, continued=True,
                             chunk=chunk)
    for name, a, b in zip("q k v i f C0 n0 m0".split(), grads["1"], grads["0"]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if not with_state and name in ("C0", "n0", "m0"):
            continue
        a32, b32 = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
        assert np.abs(b32).max() > 0, name
        # bf16 results (q, k, v): one bf16 ulp apart at most (round-off on either side of a
        # rounding boundary); float32 ones to 1e-4 of the largest (the forget gates' gradient is
        # a sum over all later steps).
        rtol = 2**-7 if a.dtype == mx.bfloat16 else 0.0
        atol = 1e-4 * np.abs(b32).max()
        assert np.all(np.abs(a32 - b32) <= rtol * np.abs(b32) + atol), (name, np.abs(a32 - b32).max(), atol)


@cuda
@pytest.mark.parametrize("terms,bound", [(1, 2e-2), (2, 4e-3)])
def test_fewer_product_terms_stay_near_the_float32_backward(terms, bound, monkeypatch):
    """``product_terms(1 | 2)`` (training's ``mlstm_products="bf16"`` is 1): the fused kernels'
    forward and backward with their float32 operands rounded to fewer bf16 terms, against the
    MLX-ops backward in float32 (TF32 off). Per input the relative Frobenius error stays at bf16
    operand round-off (1 term: 2^-9 per operand, a few 1e-3 after the sums; 2 terms: only the
    bf16 results' own rounding), and the setting reached the kernels: the gradients differ from
    the three-term ones."""
    args, weights = _inputs(S := 200, B=2, NH=2, S=S, DQK=64, DV=128, dtype=mx.bfloat16)
    assert fused_chunkwise_supported(args[0], args[2], 64)
    monkeypatch.setenv("XLSTM_METAL_FUSED_MLSTM_BWD", "0")
    ref = _grads(mlstm_chunkwise_fused, args, weights, with_state=True, continued=False, chunk=64)
    monkeypatch.setenv("XLSTM_METAL_FUSED_MLSTM_BWD", "1")
    exact = _grads(mlstm_chunkwise_fused, args, weights, with_state=True, continued=False, chunk=64)
    with chunkwise_grad.product_terms(terms):
        fewer = _grads(mlstm_chunkwise_fused, args, weights, with_state=True, continued=False, chunk=64)
    for name, a, b, c in zip("q k v i f C0 n0 m0".split(), fewer, ref, exact):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        a64, b64 = np.array(a.astype(mx.float32), np.float64), np.array(b.astype(mx.float32), np.float64)
        err = np.linalg.norm(a64 - b64) / (np.linalg.norm(b64) + 1e-30)
        assert err <= bound, (name, terms, err)
    assert any(not mx.array_equal(a, c) for a, c in zip(fewer[:3], exact[:3]))


@cuda
@pytest.mark.parametrize("with_state", [False, True])
def test_unread_final_state_gives_the_same_gradients_on_cuda(with_state):
    """The backward kernels' path (chunkwise_bwd.fused_backward) inside ``final_states_unread``."""
    args, weights = _inputs(77, B=2, NH=2, S=200, DQK=64, DV=128, dtype=mx.bfloat16)
    assert fused_chunkwise_supported(args[0], args[2], 64)
    _unread_state_check(args, weights, 64, with_state)


@cuda
def test_fused_training_matches_the_reference_on_cuda(tmp_path):
    # DQK 64, DV 128: sizes the fused kernels take.
    shape = dict(embedding_dim=256, num_heads=2, chunk=32)
    reference = _train_losses(tmp_path, "chunkwise", dtype="bfloat16", **shape)
    fast = _train_losses(tmp_path, "chunkwise_fused", dtype="bfloat16", **shape)
    np.testing.assert_allclose(fast, reference, rtol=2e-3)
    assert checkpoint_dirs(tmp_path / "chunkwise_fused-none")


def test_cli_fast_path_with_recompute_resumes_exactly(tmp_path, counted_backward):
    """`xlstm-metal train --kernel chunkwise_fused --recompute blocks`: the run's saved settings
    keep the recompute; a resume (kernel and recompute may be given again) continues it bit for
    bit."""
    import json
    import shutil

    from xlstm_metal.cli import main
    from xlstm_metal.training.checkpoint import read_trainer_state

    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(200)))
    out = tmp_path / "run"
    args = ["--config", "tiny", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "2", "--warmup", "1",
            "--log-every", "1", "--no-progress", "--steps", "4", "--save-every", "2", "--eval-every", "4",
            "--kernel", "chunkwise_fused", "--recompute", "blocks"]
    assert main(["train", str(corpus), "--out", str(out), *args]) == 0
    assert read_trainer_state(out / "checkpoint-0000002")["training_config"]["recompute"] == "blocks"
    assert counted_backward  # trained through the custom vjp

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-0000004")
    assert main(["train", "--out", str(resumed), "--resume", "--no-progress", "--kernel", "chunkwise_fused",
                 "--recompute", "blocks"]) == 0
    assert losses(resumed) == losses(out) and len(losses(out)) == 4


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_cross_entropy_vjp_equals_autodiff(dtype):
    import mlx.nn as nn

    from xlstm_metal.training.trainer import cross_entropy

    rng = np.random.default_rng(1)
    logits = mx.array(rng.normal(0, 3, (3, 7, 50)).astype(np.float32)).astype(dtype)
    targets = mx.array(rng.integers(0, 50, (3, 7)).astype(np.int32))

    def reference(x):
        return nn.losses.cross_entropy(x.astype(mx.float32), targets, reduction="mean")

    loss, grad = mx.value_and_grad(lambda x: cross_entropy(x, targets))(logits)
    ref_loss, ref_grad = mx.value_and_grad(reference)(logits)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6) and loss.item() > 1.0
    assert grad.dtype == dtype
    tol = 1e-6 if dtype == mx.float32 else 2**-8
    np.testing.assert_allclose(np.array(grad.astype(mx.float32)), np.array(ref_grad.astype(mx.float32)),
                               rtol=tol, atol=tol * float(mx.max(mx.abs(ref_grad)).astype(mx.float32)))
