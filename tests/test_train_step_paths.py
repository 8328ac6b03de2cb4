"""Training-step fast paths: the fused LM head + cross-entropy (``linear_cross_entropy``,
``head_loss="fused"``) and projections fused in the traced step (``fuse_projections``)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from xlstm_metal.config import xLSTMConfig
from xlstm_metal.models.xlstm_large import xLSTMLarge
from xlstm_metal.training.trainer import (
    Trainer, TrainingConfig, cross_entropy, init_xlstm_large, linear_cross_entropy, make_loss_fn,
)


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("rows", [7, 50, 64])
def test_linear_cross_entropy_equals_the_plain_head(cap, rows):
    """Value and gradients (x, weight) equal those of the soft-capped logits through
    ``cross_entropy``, whatever the row blocking (50 tokens: 8 blocks of 7, one, one partial);
    the cotangent scales them."""
    mx.random.seed(0)
    x, w = mx.random.normal((50, 16)), mx.random.normal((40, 16))
    t = mx.random.randint(0, 40, (50,))

    def plain(x, w):
        z = x @ w.T
        return 2.5 * cross_entropy((z if cap is None else cap * mx.tanh(z / cap))[None], t[None])

    (l0, g0), (l1, g1) = (mx.value_and_grad(fn, argnums=(0, 1))(x, w) for fn in (
        plain, lambda x, w: 2.5 * linear_cross_entropy(x, w, t, cap, rows=rows)))
    assert l1.item() == pytest.approx(l0.item(), rel=1e-6) and l0.item() > 2.5 * 2
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6 * float(mx.max(mx.abs(b))))


def _grads(model, dtype, head_loss, x, y):
    params = model.trainable_parameters()
    loss, grads = mx.value_and_grad(make_loss_fn(model, dtype, head_loss=head_loss))(params, x, y)
    model.update(params)
    return loss.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("tie", [False, True])
def test_fused_head_gradients_equal_the_plain_head(tie):
    """A whole model's gradients: float32 equal; bf16 compute as close to the float32 ones as
    the plain head's bf16 gradients are (the soft cap and softmax run in float32 here)."""
    config = xLSTMConfig(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16,
                         tie_word_embeddings=tie)
    model = xLSTMLarge(config)
    init_xlstm_large(model, 0)
    ids = mx.array(np.random.default_rng(0).integers(0, 97, (3, 33)))
    x, y = ids[:, :-1], ids[:, 1:]
    ref_loss, ref = _grads(model, mx.float32, "plain", x, y)
    loss, fused = _grads(model, mx.float32, "fused", x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-6) and len(fused) == len(ref)
    for name, g in ref.items():
        assert float(mx.max(mx.abs(fused[name] - g))) <= 1e-4 * float(mx.max(mx.abs(g))), name

    def spread(grads):
        return np.median([float(mx.max(mx.abs(grads[k] - g)) / mx.max(mx.abs(g))) for k, g in ref.items()])

    plain_bf16, fused_bf16 = (_grads(model, mx.bfloat16, h, x, y)[1] for h in ("plain", "fused"))
    assert spread(fused_bf16) <= 1.25 * spread(plain_bf16)
    assert all(fused_bf16[k].dtype == mx.float32 for k in ref)  # float32 masters get float32 gradients


def test_training_with_the_fused_head(tmp_path):
    """Trainer(head_loss="fused") trains to the plain head's losses (float32), evaluates with the
    plain head, and refuses an unknown setting; --head-loss reaches the run's saved settings."""
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 97, 6000).astype(np.int32)

    def losses(head_loss):
        model = xLSTMLarge(xLSTMConfig(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16))
        init_xlstm_large(model, 0)
        cfg = TrainingConfig(seq_len=40, batch_size=2, steps=3, lr=3e-3, warmup=1, eval_every=100, eval_batches=1,
                             save_every=1000, log_every=1, head_loss=head_loss)
        result = Trainer(model, stream[:5000], stream[5000:], cfg, tmp_path / head_loss, tmp_path,
                         progress=False).train()
        return [loss for _, loss in result.losses] + [result.evals[-1][1]]

    np.testing.assert_allclose(losses("fused"), losses("plain"), rtol=1e-5)
    with pytest.raises(ValueError, match="head_loss must be one of plain, fused"):
        TrainingConfig(head_loss="chunked").validate()


def test_cli_step_path_flags(tmp_path):
    """--head-loss, --fuse-projections and --mlstm-products reach the run's saved settings; a resume
    may change them."""
    from xlstm_metal.cli import main
    from xlstm_metal.training.checkpoint import read_trainer_state

    corpus = tmp_path / "corpus.txt"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)))
    out = tmp_path / "run"
    assert main(["train", str(corpus), "--out", str(out), "--config", "tiny", "--vocab-size", "300", "--seq-len",
                 "32", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--no-progress",
                 "--head-loss", "fused", "--fuse-projections", "--mlstm-products", "bf16"]) == 0
    saved = read_trainer_state(out / "checkpoint-0000002")["training_config"]
    assert saved["head_loss"] == "fused" and saved["fuse_projections"] is True and saved["mlstm_products"] == "bf16"
    # A resume may switch them (the same math); the run's saved settings follow.
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress", "--head-loss", "plain",
                 "--no-fuse-projections", "--mlstm-products", "float32"]) == 0
    saved = read_trainer_state(out / "checkpoint-0000003")["training_config"]
    assert saved["head_loss"] == "plain" and saved["fuse_projections"] is False
    assert saved["mlstm_products"] == "float32"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite([r["loss"] for r in records if r["kind"] == "train"]).all()


def test_traced_fusion_runs_one_matmul_per_group_with_the_same_gradients(monkeypatch, tmp_path):
    """``fuse_projections=True``: inside the traced loss no projection that reads a shared input
    runs as its own layer (q|k|v|o|i|f and gate|up are one matmul each); the lone ones still do;
    losses and float32 gradients equal the separate layers'; nothing is added to the module tree."""
    import mlx.nn as nn

    config = xLSTMConfig(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16)
    model = xLSTMLarge(config)
    init_xlstm_large(model, 0)
    ids = mx.array(np.random.default_rng(1).integers(0, 97, (2, 33)))
    x, y = ids[:, :-1], ids[:, 1:]
    keys = sorted(k for k, _ in tree_flatten(model.state))
    called = []
    original = nn.Linear.__call__

    def counting(self, x):
        called.append(self.weight.shape)
        return original(self, x)

    monkeypatch.setattr(nn.Linear, "__call__", counting)
    params = model.trainable_parameters()
    loss, grads = mx.value_and_grad(make_loss_fn(model, mx.float32))(params, x, y)
    model.update(params)
    separate = len(called)
    called.clear()
    fused_loss, fused = mx.value_and_grad(make_loss_fn(model, mx.float32, fuse_projections=True))(params, x, y)
    model.update(params)
    # Every projection's weight gradient is a GEMM's own (row-major) output or a row slice of
    # one; autodiff of x @ w.T leaves a transposed view (which the optimizer would copy).
    flat, ref = dict(tree_flatten(fused)), dict(tree_flatten(grads))
    projections = [k for k in ref if k.endswith(".weight") and "norm" not in k and "embedding" not in k
                   and not k.startswith("lm_head")]
    assert len(projections) == 2 * 10
    assert all(_producer(flat[k], tmp_path) == "Matmul" for k in projections)
    assert _producer(ref["backbone.blocks.0.ffn.proj_down.weight"], tmp_path) == "Transpose"
    # per block the lone out_proj and proj_down run as linear_rows_grad too: only the LM head is left
    assert separate == 2 * (6 + 1 + 3) + 1 and len(called) == 1
    assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for name, g in ref.items():
        assert float(mx.max(mx.abs(flat[name] - g))) <= 1e-5 * float(mx.max(mx.abs(g))), name
    assert sorted(k for k, _ in tree_flatten(model.state)) == keys


def _producer(array: mx.array, where: Path) -> str:
    """The primitive that computes the unevaluated ``array`` (through row slices), read from
    ``mx.export_to_dot``."""
    import re

    path = where / "graph.dot"
    mx.export_to_dot(str(path), array)
    text = path.read_text()
    labels = dict(re.findall(r'(\d+) \[label ="(\w+)"', text))
    made_by = {out: prim for prim, out in re.findall(r'^(\d+) -> "(\w+)"$', text, re.M)}
    inputs: dict[str, list[str]] = {}
    for src, prim in re.findall(r'^"(\w+)" -> (\d+)$', text, re.M):
        inputs.setdefault(prim, []).append(src)
    node = re.search(r'rank=sink; "(\w+)"', text).group(1)
    label = labels[made_by[node]]
    while label == "Slice":
        node = inputs[made_by[node]][0]
        label = labels[made_by[node]]
    return label


@pytest.mark.parametrize("clip", [1e-3, 0.0])
@pytest.mark.parametrize("fuse", [False, True])
def test_half_precision_step_equals_float32_gradients_of_the_masters(tmp_path, clip, fuse):
    """bf16 compute: the train step differentiates the cast copies and clips in float32
    (trainer.clip_grad_norm); the updated weights, optimizer state, loss and norm equal those of
    the float32 masters' gradients through MLX's clip_grad_norm + AdamW, bit for bit.
    ``fuse`` (fused projections): the step casts each projection group into one joined copy and
    differentiates that (joined_weight_groups); the same bits, except that the clip norm sums
    the same squares in larger groups (float32 round-off in the norm and the clip scale: ~3e-6
    relative here)."""
    import mlx.optimizers as optim

    from xlstm_metal.training.trainer import make_optimizer

    config = xLSTMConfig(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16)
    model, reference = xLSTMLarge(config), xLSTMLarge(config)
    init_xlstm_large(model, 0)
    init_xlstm_large(reference, 0)
    stream = np.random.default_rng(0).integers(0, 97, 3000).astype(np.int32)
    cfg = TrainingConfig(seq_len=32, batch_size=2, steps=2, lr=1e-2, warmup=0, grad_clip=clip, dtype="bfloat16",
                         fuse_projections=fuse)
    trainer = Trainer(model, stream[:2000], stream[2000:], cfg, tmp_path / "run", tmp_path, progress=False)
    trainer._build_steps(compiled=False)
    ids = mx.array(stream[:66].reshape(2, 33))
    x, y = ids[:, :-1], ids[:, 1:]

    opt = make_optimizer(cfg, reference)
    grad_fn = mx.value_and_grad(make_loss_fn(reference, mx.bfloat16, fuse_projections=fuse))
    if fuse:
        from xlstm_metal.training.trainer import joined_weight_groups

        joined = joined_weight_groups(model)
        assert sorted(len(groups[0]) for _, groups in joined) == [2, 2, 6, 6]  # q|k|v|o|i|f, gate|up per block
    for _ in range(2):
        loss, grad_norm = trainer._train_step(x, y)
        params = reference.trainable_parameters()
        ref_loss, grads = grad_fn(params, x, y)
        reference.update(params)
        assert all(g.dtype == mx.float32 for _, g in tree_flatten(grads))
        if clip:
            grads, ref_norm = optim.clip_grad_norm(grads, clip)
        else:
            ref_norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
        opt.update(reference, grads)
        mx.eval(model.parameters(), reference.parameters(), trainer.optimizer.state, opt.state)
        assert loss.item() == ref_loss.item() and grad_norm.item() == pytest.approx(ref_norm.item(), rel=1e-5 if fuse else 1e-6)
        if clip:
            assert grad_norm.item() > clip  # clipped: the normaliser took part
    ours, theirs = dict(tree_flatten(model.parameters())), dict(tree_flatten(reference.parameters()))
    pairs = [(ours[k], theirs[k]) for k in theirs]
    pairs += [(a, b) for (_, a), (_, b) in zip(tree_flatten(trainer.optimizer.state), tree_flatten(opt.state))]
    if fuse and clip:
        for a, b in pairs:
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6 * float(mx.max(mx.abs(b))))
    else:
        assert all(mx.array_equal(a, b) for a, b in pairs)


def test_swiglu_vjp_is_autodiff():
    import mlx.nn as nn

    from xlstm_metal.cells.ffn import swiglu

    for dtype in (mx.float32, mx.bfloat16):
        mx.random.seed(0)
        gate, up, cot = ((mx.random.normal((16, 48)) * s).astype(dtype) for s in (3, 1, 1))
        ref = mx.vjp(lambda g, u: nn.silu(g) * u, [gate, up], [cot])
        ours = mx.vjp(swiglu, [gate, up], [cot])
        assert all(mx.array_equal(a, b) for a, b in zip(ref[0] + ref[1], ours[0] + ours[1])), dtype


def test_layer_norm_float32_vjp_is_autodiff():
    from xlstm_metal.cells.norms import layer_norm_float32

    mx.random.seed(1)
    x = (mx.random.normal((2, 5, 3, 64)) * 4 + 1).astype(mx.bfloat16)
    cot = mx.random.normal((2, 5, 3, 64)).astype(mx.bfloat16)

    def ref(x):
        return mx.fast.layer_norm(x.astype(mx.float32), None, None, 1e-6).astype(x.dtype)

    (a,), (da,) = mx.vjp(ref, [x], [cot])
    (b,), (db,) = mx.vjp(lambda x: layer_norm_float32(x, 1e-6), [x], [cot])
    assert mx.array_equal(a, b) and mx.array_equal(da, db) and db.dtype == mx.bfloat16


def test_gpu_branches_give_the_cpu_gradients(monkeypatch):
    """Off the CPU the FFN runs ``swiglu`` and the multi-head norm ``layer_norm_float32`` (their
    own vjps, less memory kept): a whole model's bf16 loss and gradients are the same bits."""
    config = xLSTMConfig(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16)
    model = xLSTMLarge(config)
    init_xlstm_large(model, 0)
    ids = mx.array(np.random.default_rng(2).integers(0, 97, (2, 33)))
    from xlstm_metal.cells import activations, ffn, norms

    monkeypatch.setattr(activations, "_ENABLED", False)  # MLX's activation ops on both sides
    # MLX's scatter-add for the embedding on both sides (off the CPU the ordered gradient would
    # sum in another order; tests/test_embedding_grads.py covers it).
    monkeypatch.setenv("XLSTM_METAL_ORDERED_EMBEDDING_GRADS", "0")
    cpu = _grads(model, mx.bfloat16, "plain", ids[:, :-1], ids[:, 1:])

    calls = []
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))  # the Python branches only: ops stay on the CPU
    for module, name in ((ffn, "swiglu"), (norms, "layer_norm_float32")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, original=original, name=name: calls.append(name) or original(*a))
    gpu = _grads(model, mx.bfloat16, "plain", ids[:, :-1], ids[:, 1:])
    assert set(calls) == {"swiglu", "layer_norm_float32"}
    assert gpu[0] == cpu[0]
    assert all(mx.array_equal(gpu[1][k], cpu[1][k]) for k in cpu[1])


def test_default_step_paths_by_device(monkeypatch):
    """New runs take the fused head and projections and bf16 mLSTM products on CUDA, the plain
    step elsewhere."""
    from xlstm_metal.cli import train as cli_train
    from xlstm_metal.kernels.fast import step

    monkeypatch.setattr(step, "cuda_available", lambda: False)  # (the suite runs on GPUs too)
    assert cli_train.default_step_paths() == {"head_loss": "plain", "fuse_projections": False,
                                              "mlstm_products": "float32"}
    monkeypatch.setattr(step, "cuda_available", lambda: True)
    assert cli_train.default_step_paths() == {"head_loss": "fused", "fuse_projections": True,
                                              "mlstm_products": "bf16"}


def test_command_buffer_limits_for_training(monkeypatch):
    """On CUDA the trainer's process gets smaller command buffers (TRAIN_COMMAND_BUFFERS) unless
    the environment names either limit; elsewhere nothing is set."""
    import os

    from xlstm_metal.kernels.fast import step
    from xlstm_metal.training.trainer import TRAIN_COMMAND_BUFFERS, limit_command_buffers

    for name in ("MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(step, "cuda_available", lambda: False)
    limit_command_buffers()
    assert "MLX_MAX_OPS_PER_BUFFER" not in os.environ
    monkeypatch.setattr(step, "cuda_available", lambda: True)
    limit_command_buffers()
    assert (os.environ["MLX_MAX_OPS_PER_BUFFER"], os.environ["MLX_MAX_MB_PER_BUFFER"]) == tuple(
        map(str, TRAIN_COMMAND_BUFFERS))
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER")
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "1000")  # the user's choice stands
    limit_command_buffers()
    assert "MLX_MAX_OPS_PER_BUFFER" not in os.environ and os.environ["MLX_MAX_MB_PER_BUFFER"] == "1000"


def _products_spy(monkeypatch, kept: list | None = None) -> tuple[xLSTMLarge, list]:
    """A tiny xLSTM-Large on ``chunkwise_fused`` whose fused path is a spy: each layer's custom
    function is built on the scan path (no CUDA here), and the list records the product terms
    the fused kernels would have been built with."""
    from xlstm_metal.kernels.fast import chunkwise_fused, chunkwise_grad

    seen = []
    real = chunkwise_grad._differentiable

    def spy(eps, L, fused, has_state, final_grad=True, terms=None, keep=False):
        assert fused
        seen.append(terms)
        if kept is not None:
            kept.append(keep)
        return real(eps, L, False, has_state, final_grad)

    monkeypatch.setattr(chunkwise_grad, "_differentiable", spy)
    monkeypatch.setattr(chunkwise_fused, "fused_chunkwise_supported", lambda *a: True)
    model = xLSTMLarge(xLSTMConfig(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16))
    init_xlstm_large(model, 0)
    for block in model.blocks:
        block.mlstm_layer.parallel_kernel_cell.kernel = "chunkwise_fused"
    return model, seen


def test_mlstm_products_setting_reaches_the_fused_kernels(monkeypatch):
    """``TrainingConfig.mlstm_products`` sets the bf16 terms of the fused mLSTM kernels' products
    (forward and backward), read when the loss's forward is traced: "bf16" -> 1, "float32" ->
    None (each kernel's default, float32's precision). The kernels are CUDA's: here a spy stands
    in for them (the scan path) and records what each layer's custom function was built with."""
    from xlstm_metal.kernels.fast import chunkwise_grad
    from xlstm_metal.training.trainer import MLSTM_PRODUCTS

    model, seen = _products_spy(monkeypatch)
    ids = mx.array(np.random.default_rng(0).integers(0, 97, (2, 33)))
    grads = {}
    for products in ("float32", "bf16"):
        seen.clear()
        params = model.trainable_parameters()
        loss, g = mx.value_and_grad(make_loss_fn(model, mx.float32, mlstm_products=products))(
            params, ids[:, :-1], ids[:, 1:])
        model.update(params)
        grads[products] = dict(tree_flatten(g))
        assert seen == [MLSTM_PRODUCTS[products]] * 2, (products, seen)
    assert MLSTM_PRODUCTS == {"float32": None, "bf16": 1}
    # the stand-in ignores the setting: the same gradients (what reaches the kernels is what differs)
    assert all(mx.array_equal(grads["bf16"][k], v) for k, v in grads["float32"].items())
    with pytest.raises(ValueError, match="mlstm_products"):
        TrainingConfig(mlstm_products="fp8").validate()
    with pytest.raises(ValueError, match="1, 2 or 3"):
        with chunkwise_grad.product_terms(4):
            pass


def test_train_help_prints(capsys):
    """``xlstm-metal train --help`` renders every option's help (argparse formats it with %: a
    bare percent sign in a default's note made it raise)."""
    from xlstm_metal.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--mlstm-products" in out and "4.7% faster" in out


def test_trainer_keeps_the_products_setting_for_recomputed_layers(monkeypatch, tmp_path):
    """With ``recompute="mlstm"`` each layer's forward runs again inside the backward, and that
    pass takes the products its forward took (the checkpoint re-enters the forward's context) (spy as in the test above: every call, 2 layers x 2 passes, sees 1 term)."""
    model, seen = _products_spy(monkeypatch)
    stream = np.random.default_rng(0).integers(0, 97, 3000).astype(np.int32)
    cfg = TrainingConfig(seq_len=32, batch_size=2, steps=2, lr=1e-2, warmup=0, recompute="mlstm",
                         mlstm_products="bf16")
    trainer = Trainer(model, stream[:2000], stream[2000:], cfg, tmp_path / "run", tmp_path, progress=False)
    trainer._build_steps(compiled=False)
    ids = mx.array(stream[:66].reshape(2, 33))
    loss, norm = trainer._train_step(ids[:, :-1], ids[:, 1:])
    mx.eval(loss, norm)
    assert np.isfinite(loss.item()) and seen == [1] * 4, seen


def test_keep_states_setting_reaches_the_fused_kernels(monkeypatch):
    """The training loss builds each fused layer's function with the forward keeping its
    entering states (the default; ``XLSTM_METAL_MLSTM_KEEP_STATES=0``: recomputed), with bf16
    products only (float32 products' backward reads float32 states: recomputed as before).
    (Spy as above.)"""
    kept = []
    model, _ = _products_spy(monkeypatch, kept)
    ids = mx.array(np.random.default_rng(0).integers(0, 97, (2, 33)))
    for env, products, expected in ((None, "bf16", True), (None, "float32", False), ("0", "bf16", False),
                                    ("1", "bf16", True)):
        if env is None:
            monkeypatch.delenv("XLSTM_METAL_MLSTM_KEEP_STATES", raising=False)
        else:
            monkeypatch.setenv("XLSTM_METAL_MLSTM_KEEP_STATES", env)
        kept.clear()
        params = model.trainable_parameters()
        mx.value_and_grad(make_loss_fn(model, mx.float32, mlstm_products=products))(params, ids[:, :-1], ids[:, 1:])
        model.update(params)
        assert kept == [expected] * 2, (env, products, kept)


def test_steps_built_on_a_second_thread_are_the_plain_loops_steps(tmp_path):
    """StepBuilder (XLSTM_METAL_TRAIN_BUILD_THREAD's loop, the benchmark's build-thread mode): the
    next step's graph built on a second host thread while this step is queued with the arrays
    it had (state_arrays) gives the plain loop's losses, weights and AdamW moments bit for bit,
    and the builder thread replays the compiled step's trace (no second trace)."""
    from mlx.utils import tree_flatten

    from test_training import fresh_model, pattern_stream, small_cfg

    from xlstm_metal.training.trainer import StepBuilder, state_arrays

    stream = pattern_stream(6000)
    runs = []
    for threaded in (False, True):
        model = fresh_model()
        trainer = Trainer(model, stream, stream[:1000], small_cfg(steps=7), tmp_path / str(threaded), tmp_path,
                          progress=False)
        trainer._build_steps()

        def build(trainer=trainer):
            x, y = trainer.batches.next()
            return trainer._train_step(mx.array(x), mx.array(y))

        losses = []
        # MLX's compile cache is per thread: with the builder, every step is built there.
        builder = StepBuilder() if threaded else None
        for _ in range(2):  # the first call traces
            loss, norm = builder.submit(build).result() if builder is not None else build()
            mx.eval(loss, norm, model.state, trainer.optimizer.state)
            losses.append(loss)
        assert trainer.step_traces == 1
        ahead, pending = None, None
        for step in range(5):
            if ahead is not None:
                loss, norm = ahead.result()
            else:
                loss, norm = builder.submit(build).result() if builder is not None else build()
            if builder is not None and step < 4:
                queued = [loss, norm] + state_arrays(model.state, trainer.optimizer.state)
                ahead = builder.submit(build)
                mx.async_eval(queued)
            else:
                ahead = None
                mx.async_eval(loss, norm, model.state, trainer.optimizer.state)
            if pending is not None:
                mx.eval(pending)
            pending = [loss, norm]
            losses.append(loss)
        mx.eval(pending, model.state, trainer.optimizer.state)
        if builder is not None:
            builder.close()
        assert trainer.step_traces == 1, threaded
        runs.append(([v.item() for v in losses], dict(tree_flatten(model.parameters())),
                     dict(tree_flatten(trainer.optimizer.state))))
    (l0, p0, s0), (l1, p1, s1) = runs
    assert l0 == l1 and len(set(l0)) > 1
    for k in p0:
        assert mx.array_equal(p0[k], p1[k]), k
    for k in s0:
        assert mx.array_equal(s0[k], s1[k]), k


@pytest.mark.parametrize("stop", ["steps", "max_time"])
def test_trainer_with_the_build_thread_trains_as_without(tmp_path, monkeypatch, stop):
    """XLSTM_METAL_TRAIN_BUILD_THREAD=1: Trainer.train builds each step on the builder thread, the
    next one while this one is queued except before evaluations and checkpoints. The same
    metrics (losses, learning rates, gradient norms, evaluations), checkpoints and final weights
    and moments bit for bit as the plain loop, also when a time budget stops the run right after
    a step built ahead (that step undone: the state, data position and step count it started from)."""
    from test_training import fresh_model, pattern_stream, small_cfg

    from xlstm_metal.training.trainer import _restore_leaves  # noqa: F401  (the undo's helper)

    stream = pattern_stream(6000)
    runs = []
    for setting in ("0", "1"):
        monkeypatch.setenv("XLSTM_METAL_TRAIN_BUILD_THREAD", setting)
        fields = dict(steps=14, eval_every=5, save_every=6, keep=5, log_every=3)
        if stop == "max_time":
            fields.update(max_time=1.0)
        out = tmp_path / setting
        trainer = Trainer(fresh_model(), stream[:5000], stream[5000:], small_cfg(**fields), out, tmp_path, progress=False)
        if stop == "max_time":  # the budget runs out after 8 steps; the 9th was built ahead
            trainer.clock = lambda trainer=trainer: 0.0 if trainer.step < 8 else 10.0
        result = trainer.train()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        for r in records:
            r.pop("elapsed_s", None), r.pop("tokens_per_s", None)
        runs.append((result.step, result.losses, result.evals, records, sorted(p.name for p in out.glob("checkpoint-*")),
                     dict(tree_flatten(trainer.model.parameters())), dict(tree_flatten(trainer.optimizer.state)),
                     (trainer.batches.position.epoch, trainer.batches.position.batch)))
    (*a, p0, s0, pos0), (*b, p1, s1, pos1) = runs
    assert a == b and pos0 == pos1
    if stop == "max_time":
        # The last step run was followed by one built ahead (no evaluation or checkpoint after it),
        # which the stop undid: the same data position as the plain run proves it.
        assert a[0] == 8
    else:
        assert a[0] == 14
    for k in p0:
        assert mx.array_equal(p0[k], p1[k]), k
    for k in s0:
        assert mx.array_equal(s0[k], s1[k]), k


def test_build_thread_default_is_on_for_cuda_only(monkeypatch):
    """XLSTM_METAL_TRAIN_BUILD_THREAD unset: the builder thread runs where MLX runs CUDA (measured
    faster on an H200) and not elsewhere; 0 and 1 override either way."""
    import xlstm_metal.kernels.fast.step as step
    from xlstm_metal.training.trainer import build_thread_enabled

    monkeypatch.delenv("XLSTM_METAL_TRAIN_BUILD_THREAD", raising=False)
    for cuda in (True, False):
        monkeypatch.setattr(step, "cuda_available", lambda cuda=cuda: cuda)
        assert build_thread_enabled() is cuda
        for setting in ("0", "1"):
            monkeypatch.setenv("XLSTM_METAL_TRAIN_BUILD_THREAD", setting)
            assert build_thread_enabled() is (setting == "1")
        monkeypatch.delenv("XLSTM_METAL_TRAIN_BUILD_THREAD")


def test_step_builders_share_one_daemon_thread_and_the_process_exits_cleanly(tmp_path):
    """Every StepBuilder runs on one daemon thread that outlives it: with MLX 0.32.4 a process in
    which a thread that had built MLX graphs ended aborted at exit now and then ("terminate called
    without an active exception"), so the thread is never ended or joined. Builds run under the
    builder's default stream; a process with two builders one after another exits with 0."""
    import subprocess
    import sys
    import threading

    from xlstm_metal.training.trainer import StepBuilder

    names = []
    for _ in range(2):
        builder = StepBuilder()
        assert builder.submit(lambda: mx.default_stream(mx.default_device())).result() == builder._stream
        names.append(builder.submit(lambda: threading.current_thread().name).result())
        builder.close()
    threads = [t for t in threading.enumerate() if t.name == "xlstm-step-build"]
    assert names == ["xlstm-step-build"] * 2 and len(threads) == 1 and threads[0].daemon and threads[0].is_alive()

    script = tmp_path / "two_builders.py"
    script.write_text(
        "import xlstm_metal\nimport mlx.core as mx\nimport mlx.nn as nn\nimport mlx.optimizers as optim\n"
        "from xlstm_metal.training.trainer import StepBuilder, state_arrays\n"
        "model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))\nopt = optim.AdamW(1e-3)\n"
        "state = [model.state, opt.state]\n"
        "def step(x):\n"
        "    loss, g = nn.value_and_grad(model, lambda x: (model(x) ** 2).mean())(x)\n"
        "    opt.update(model, g)\n    return loss\n"
        "step = mx.compile(step, inputs=state, outputs=state)\nx = mx.random.normal((32, 64))\n"
        "mx.eval(step(x), model.state, opt.state)\n"
        "for _ in range(2):\n    builder = StepBuilder()\n    for _ in range(5):\n"
        "        loss = builder.submit(step, x).result()\n"
        "        mx.async_eval([loss] + state_arrays(model.state, opt.state))\n"
        "    mx.eval(loss, model.state, opt.state)\n    builder.close()\nprint('done', loss.item())\n")
    for _ in range(3):  # the abort came in 1-3 of 12-20 runs; with the shared thread in none of 20
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.startswith("done"), (run.returncode, run.stderr[-2000:])
