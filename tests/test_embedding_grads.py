"""The embedding lookup's ordered gradient (xlstm_metal/cells/embedding.py, its CUDA kernel in
xlstm_metal/kernels/fast/rows_sum.py).

Everywhere: ``summed_rows`` equals MLX's scatter-add (exactly on integer-valued rows, whose sums
are exact in any order; to round-off otherwise), the lookup's values and gradient equal the plain
module's, and every model's forward (and the training loss) routes its embedding through it.
On the GPU machine (MLX's CUDA backend): the kernel equals the ops reference, and repeated
gradients, and two trainings, are bit-equal.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from xlstm_metal.cells import embedding
from xlstm_metal.cells.embedding import (embed_tokens, ordered_embedding_grads, summed_rows,
                                         summed_rows_reference)
from xlstm_metal.kernels.fast.step import cuda_available

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


@pytest.mark.parametrize("n, rows", [(1, 5), (2, 1), (7, 3), (64, 64), (100, 50), (513, 20), (1000, 1000), (300, 1)])
def test_summed_rows_equals_the_scatter_add_exactly_on_integer_rows(n, rows):
    rng = np.random.default_rng(n * 31 + rows)
    ids = mx.array(rng.integers(0, rows, n))
    values = mx.array(rng.integers(-9, 10, (n, 6)).astype(np.float32))
    got = summed_rows(values, ids, rows)
    want = mx.zeros((rows, 6)).at[ids].add(values)
    assert got.shape == (rows, 6) and got.dtype == mx.float32
    assert mx.array_equal(got, want)
    # Rows no id names are exact zeros.
    absent = np.setdiff1d(np.arange(rows), np.array(ids))
    if absent.size:
        assert not np.any(np.array(got)[absent])


def test_summed_rows_with_keys_past_32_bits():
    # id * n + position outgrows 32 bits (70,000 rows x 70,000 positions): 64-bit sort keys.
    rng = np.random.default_rng(9)
    n = rows = 70_000
    ids = np.concatenate([rng.integers(0, rows, n - 3), [rows - 1, rows - 1, 0]])
    values = rng.integers(-9, 10, (n, 2)).astype(np.float32)
    want = np.zeros((rows, 2), np.float32)
    np.add.at(want, ids, values)
    got = summed_rows(mx.array(values), mx.array(ids), rows)
    assert np.array_equal(np.array(got), want)


def test_summed_rows_of_float_rows_is_the_sum_to_round_off():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 37, 2049)
    values = rng.normal(0, 1, (2049, 16)).astype(np.float32)
    want = np.zeros((37, 16))
    np.add.at(want, ids, values.astype(np.float64))
    got = np.array(summed_rows(mx.array(values), mx.array(ids), 37))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_summed_rows_sums_bf16_rows_in_float32():
    # 300 rows of 1/256 + one of 1: bf16 adds of 1/256 to 1 round away, float32 keeps them.
    ids = mx.zeros(301, mx.int32)
    values = mx.concatenate([mx.ones((1, 4)), mx.full((300, 4), 1 / 256)]).astype(mx.bfloat16)
    got = summed_rows(values, ids, 2)
    assert got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got[0]), 1 + 300 / 256, rtol=1e-6)
    assert not np.any(np.array(got[1]))


def _lookup_loss(emb, ids, r, ordered):
    def f(weight):
        emb.weight = weight
        with ordered_embedding_grads(ordered):
            return (embed_tokens(emb, ids) * r).sum()

    return f


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_ordered_lookup_has_the_plain_values_and_gradient(dtype):
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    emb = nn.Embedding(40, 8)
    emb.weight = emb.weight.astype(dtype)
    ids = mx.array(rng.integers(0, 40, (3, 17)))
    r = mx.array(rng.normal(size=(3, 17, 8)).astype(np.float32)).astype(dtype)
    with ordered_embedding_grads():
        assert mx.array_equal(embed_tokens(emb, ids), emb(ids))
    w = emb.weight
    plain = mx.grad(_lookup_loss(emb, ids, r, False))(w)
    ordered = mx.grad(_lookup_loss(emb, ids, r, True))(w)
    assert ordered.dtype == dtype
    tol = 1e-6 if dtype == mx.float32 else 3e-2
    np.testing.assert_allclose(np.array(ordered.astype(mx.float32)), np.array(plain.astype(mx.float32)),
                               rtol=tol, atol=tol)
    # Rows of ids not looked up get no gradient.
    unused = np.setdiff1d(np.arange(40), np.array(ids))
    assert unused.size and not np.any(np.array(ordered.astype(mx.float32))[unused])


def test_other_embedding_modules_run_as_they_stand():
    calls = []

    class Recording(nn.Module):
        def __call__(self, ids):
            calls.append(ids.shape)
            return mx.zeros((*ids.shape, 3))

    with ordered_embedding_grads():
        out = embed_tokens(Recording(), mx.array([[1, 2]]))
    assert calls == [(1, 2)] and out.shape == (1, 2, 3)
    q = nn.QuantizedEmbedding(64, 64, group_size=64, bits=8)
    ids = mx.array([[0, 5, 5]])
    with ordered_embedding_grads():
        assert mx.array_equal(embed_tokens(q, ids), q(ids))


@pytest.fixture
def lookups(monkeypatch):
    """The shapes of the ids each ordered lookup (``embedding._lookup``) took, in order."""
    seen = []
    real = embedding._lookup

    def spy(weight, ids):
        seen.append(ids.shape)
        return real(weight, ids)

    monkeypatch.setattr(embedding, "_lookup", spy)
    return seen


class _SecondOfTwo:
    """A stand-in group: rank 1 of 2 (the all-sum is patched to the identity)."""

    def rank(self):
        return 1

    def size(self):
        return 2


def test_vocab_sharded_embedding_takes_the_ordered_gradient(monkeypatch, lookups):
    from xlstm_metal.distributed.tensor import VocabShardedEmbedding

    monkeypatch.setattr(mx.distributed, "all_sum", lambda x, group=None: x)
    rng = np.random.default_rng(3)
    table = nn.Embedding(40, 8)
    shard = VocabShardedEmbedding.from_embedding(table, _SecondOfTwo())  # rows 20..39
    assert shard.weight.shape == (20, 8)
    ids = mx.array(rng.integers(0, 40, (3, 17)))
    r = mx.array(rng.normal(size=(3, 17, 8)).astype(np.float32))
    seen = lookups
    grads = {}
    for ordered in (False, True):
        def loss(weight):
            shard.weight = weight
            with ordered_embedding_grads(ordered):
                return (embed_tokens(shard, ids) * r).sum()

        grads[ordered] = mx.grad(loss)(shard.weight)
    assert seen == [(3, 17)]  # the ordered run only
    np.testing.assert_allclose(np.array(grads[True]), np.array(grads[False]), rtol=1e-6, atol=1e-6)
    # Row j of the shard is id 20 + j: its gradient sums r over those positions; ids of the other
    # rank add nothing (they look up row 0 masked to zero).
    want = np.zeros((20, 8), np.float32)
    for pos, i in np.ndenumerate(np.array(ids)):
        if i >= 20:
            want[i - 20] += np.array(r)[pos]
    np.testing.assert_allclose(np.array(grads[True]), want, rtol=1e-5, atol=1e-5)


def _tiny_models():
    from xlstm_metal.config import xLSTMConfig
    from xlstm_metal.config_2024 import xLSTMLMConfig
    from xlstm_metal.lab.model import LabConfig, LabModel
    from xlstm_metal.models.xlstm_2024 import xLSTMLMModel
    from xlstm_metal.models.xlstm_large import xLSTMLarge

    large = xLSTMLarge(xLSTMConfig(vocab_size=50, embedding_dim=32, num_heads=2, num_blocks=1, chunk_size=8))
    small_2024 = xLSTMLMModel(xLSTMLMConfig.from_dict(
        {"vocab_size": 50, "embedding_dim": 32, "num_blocks": 2, "context_length": 16, "slstm_at": [1],
         "mlstm_block": {"mlstm": {"num_heads": 2}}, "slstm_block": {"slstm": {"num_heads": 2}}}), seed=2)
    lab = LabModel(LabConfig.from_arch("mlstm", vocab_size=50, embedding_dim=32))
    return {"large": large, "2024": small_2024, "lab": lab}


@pytest.mark.parametrize("which", ["large", "2024", "lab"])
def test_every_model_and_the_training_loss_route_the_lookup_through_the_ordered_gradient(which, monkeypatch, lookups):
    from xlstm_metal.training import trainer
    from xlstm_metal.training.trainer import make_loss_fn

    mx.random.seed(1)
    model = _tiny_models()[which]
    seen = lookups
    ids = mx.array(np.random.default_rng(1).integers(0, 50, (2, 9)))
    with ordered_embedding_grads():
        logits, _ = model(ids)
    assert seen == [(2, 9)]
    plain, _ = model(ids)
    assert seen == [(2, 9)]  # outside the context: the module's own call
    assert mx.array_equal(logits, plain)

    # The training loss turns it on where the scatter-add is unordered (a GPU); on the CPU the
    # plain lookup runs. Both give the same loss and gradient to round-off.
    recompute = "none" if which == "lab" else "blocks"
    params = model.trainable_parameters()
    targets = mx.array(np.random.default_rng(2).integers(0, 50, (2, 9)))
    seen.clear()
    monkeypatch.setattr(trainer, "scatter_add_is_unordered", lambda: False)
    loss, grads = mx.value_and_grad(make_loss_fn(model, mx.float32, recompute))(params, ids, targets)
    assert seen == []
    monkeypatch.setattr(trainer, "scatter_add_is_unordered", lambda: True)
    loss2, grads2 = mx.value_and_grad(make_loss_fn(model, mx.float32, recompute))(params, ids, targets)
    assert seen == [(2, 9)]
    from mlx.utils import tree_flatten

    g, g2 = dict(tree_flatten(grads)), dict(tree_flatten(grads2))
    key = next(k for k in g if k.endswith("embeddings.weight") or k.endswith("embedding.weight"))
    np.testing.assert_allclose(np.array(g2[key]), np.array(g[key]), rtol=1e-5, atol=1e-6)
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-6)


@cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("n, rows, E", [(1, 7, 64), (513, 20, 300), (4096, 1000, 256), (2048, 3, 2048), (777, 1, 40)])
def test_on_cuda_the_kernel_equals_the_reference(dtype, n, rows, E):
    rng = np.random.default_rng(n + rows + E)
    ids = mx.array(rng.integers(0, rows, n).astype(np.int32))
    ints = mx.array(rng.integers(-9, 10, (n, E)).astype(np.float32)).astype(dtype)
    got = summed_rows(ints, ids, rows)
    assert got.dtype == mx.float32 and got.shape == (rows, E)
    with mx.stream(mx.cpu):
        want = mx.zeros((rows, E)).at[ids].add(ints.astype(mx.float32))
    assert mx.array_equal(got, want)  # integer sums: exact in any order
    floats = mx.array(rng.normal(0, 1, (n, E)).astype(np.float32)).astype(dtype)
    got = summed_rows(floats, ids, rows)
    ref = summed_rows_reference(floats, ids, rows)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-4)
    assert all(mx.array_equal(got, summed_rows(floats, ids, rows)) for _ in range(3))


@cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_on_cuda_the_ordered_gradient_has_the_same_bits_every_time(dtype):
    rng = np.random.default_rng(0)
    emb = nn.Embedding(300, 64)
    emb.weight = emb.weight.astype(dtype)
    ids = mx.array(rng.integers(0, 20, (8, 512)))
    r = mx.array(rng.normal(0, 1, (8, 512, 64)).astype(np.float32)).astype(dtype)
    grads = [mx.grad(_lookup_loss(emb, ids, r, True))(emb.weight) for _ in range(5)]
    mx.eval(grads)
    assert all(mx.array_equal(grads[0], g) for g in grads[1:])
    with mx.stream(mx.cpu):
        want = mx.zeros((300, 64)).at[ids.reshape(-1)].add(r.reshape(-1, 64).astype(mx.float32))
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    np.testing.assert_allclose(np.array(grads[0].astype(mx.float32)), np.array(want), rtol=tol, atol=tol * 10)


@cuda
def test_on_cuda_two_trainings_lose_the_same_bits():
    import tempfile
    from pathlib import Path

    from test_training import fresh_model, pattern_stream, small_cfg

    from xlstm_metal.training.trainer import Trainer

    stream = pattern_stream(4000)

    def run():
        d = Path(tempfile.mkdtemp())
        res = Trainer(fresh_model(), stream[:3500], stream[3500:], small_cfg(steps=12, eval_every=100), d / "run", d,
                      progress=False).train()
        return [loss for _, loss in res.losses]

    assert run() == run()
