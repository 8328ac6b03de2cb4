"""`xlstm-metal train` used as an experienced user would: what the settings promise, checked by value."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import xlstm_metal  # noqa: F401  (BLAS preload before mlx use)
from xlstm_metal.training.trainer import TrainingConfig, make_optimizer


def test_weight_decay_reaches_matrices_only_in_lab_models():
    """--weight-decay is 'AdamW weight decay of matrices': an sLSTM lab model's gate bias
    (``slstm_cell._bias_``, a vector whose name does not end in '.bias') was decayed too."""
    from xlstm_metal.lab import training_model
    from xlstm_metal.lab.library import load_arch

    model = training_model(load_arch("slstm"), 300, 0)
    # Trained values (every parameter non-zero): the lab's sLSTM biases start at zero.
    model.update(tree_map(lambda p: p + 0.5, model.parameters()))
    # Host copies: on CUDA the optimizer updates the parameters' buffers in place.
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    lr, wd = 0.1, 0.5
    optimizer = make_optimizer(TrainingConfig(lr=lr, weight_decay=wd), model)
    # Zero gradients: AdamW's step is then the decay alone, p * (1 - lr * wd) for decayed parameters.
    optimizer.update(model, tree_map(mx.zeros_like, model.trainable_parameters()))
    after = dict(tree_flatten(model.parameters()))
    biases = [k for k in before if k.endswith("_bias_")]
    assert biases
    for name, value in before.items():
        decayed = value.ndim >= 2 and "embeddings" not in name and "norm" not in name
        expected = value * (1 - lr * wd) if decayed else value
        np.testing.assert_allclose(np.array(after[name]), expected, rtol=1e-6, atol=1e-7, err_msg=name)


class _Stopped(Exception):
    pass


class _WatchdogAt:
    """A job whose memory watchdog asks to stop once the trainer has run step ``step``."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def update(self, **_fields):
        pass

    def stopping(self):
        return self.trainer.step >= self.step

    def check_all(self, note="", group=None):
        raise _Stopped(note)


@pytest.mark.parametrize("arch, tied", [("slstm", False), ("mlstm", True)])
def test_fused_head_loss_of_lab_models_equals_the_plain_loss(arch, tied):
    """``head_loss="fused"`` (the default on CUDA) reads a lab model's normed hidden states and its
    head's weight: the loss and every gradient equal the plain head's. It read xLSTM-Large's
    ``residual_dtype``, which lab models lack (``train --arch`` failed at its first step on CUDA)."""
    from xlstm_metal.lab import training_model
    from xlstm_metal.lab.library import load_arch
    from xlstm_metal.training.trainer import fused_head_weight, make_loss_fn

    arch_data = {**load_arch(arch), "tie_word_embeddings": tied}
    model = training_model(arch_data, 300, 0)
    assert fused_head_weight(model) is not None
    ids = mx.array(np.random.default_rng(3).integers(0, 300, (2, 17)))
    params = model.trainable_parameters()
    plain = mx.value_and_grad(make_loss_fn(model, mx.float32, head_loss="plain"))(params, ids[:, :-1], ids[:, 1:])
    fused = mx.value_and_grad(make_loss_fn(model, mx.float32, head_loss="fused"))(params, ids[:, :-1], ids[:, 1:])
    model.update(params)
    assert abs(float(plain[0]) - float(fused[0])) < 1e-5 * float(plain[0])
    grads_plain, grads_fused = dict(tree_flatten(plain[1])), dict(tree_flatten(fused[1]))
    assert grads_plain.keys() == grads_fused.keys()
    for name, g in grads_plain.items():
        np.testing.assert_allclose(np.array(grads_fused[name]), np.array(g), rtol=1e-4, atol=1e-6, err_msg=name)


def test_memory_watchdog_stop_at_a_log_and_eval_step_resumes_exactly(tmp_path, monkeypatch):
    """The watchdog's hard limit stops training with a checkpoint 'that resumes exactly'. Stopped
    at a step due for a log record and an evaluation, it saved before both, and the resumed run
    never made them: metrics.jsonl lacked step 4's train and eval records, and step 6's record
    averaged steps 3-6 (4.559 against 4.407). The log record is written before the stop; the
    evaluation is run first by the resumed run, which also marks it in the checkpoint's state."""
    import json

    from test_training import fresh_model, pattern_stream, small_cfg

    from xlstm_metal.loading import load_model
    from xlstm_metal.monitor import current_job
    from xlstm_metal.training import trainer as trainer_module
    from xlstm_metal.training.checkpoint import read_trainer_state
    from xlstm_metal.training.trainer import Trainer

    stream = pattern_stream(4000)
    train, val = stream[:3500], stream[3500:]

    def cfg():
        return small_cfg(steps=12, save_every=4, keep=5, eval_every=4, log_every=2)

    def records(run):
        return [(r["kind"], r["step"], r.get("loss", r.get("val_loss")))
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    full = Trainer(fresh_model(), train, val, cfg(), tmp_path / "full", tmp_path, progress=False)
    full.train()
    part = Trainer(fresh_model(), train, val, cfg(), tmp_path / "part", tmp_path, progress=False)
    monkeypatch.setattr(trainer_module, "current_job", lambda: _WatchdogAt(part, 4))
    with pytest.raises(_Stopped):
        part.train()
    checkpoint = tmp_path / "part" / "checkpoint-0000004"
    assert records(tmp_path / "part") == records(tmp_path / "full")[:2]  # step 2's and step 4's train records
    assert read_trainer_state(checkpoint)["eval_pending"] is True
    monkeypatch.setattr(trainer_module, "current_job", current_job)

    resumed = Trainer(load_model(checkpoint), train, val, cfg(), tmp_path / "part", tmp_path, progress=False)
    resumed.resume_from(checkpoint)
    resumed.train()
    assert records(tmp_path / "part") == records(tmp_path / "full")
    for name in ("checkpoint-0000004", "checkpoint-0000012"):
        a = read_trainer_state(tmp_path / "full" / name)
        b = read_trainer_state(tmp_path / "part" / name)
        for state in (a, b):
            state.pop("elapsed")
        assert a == b, name
        saved_a = mx.load(str(tmp_path / "full" / name / "model.safetensors"))
        saved_b = mx.load(str(tmp_path / "part" / name / "model.safetensors"))
        assert all(mx.array_equal(saved_a[k], saved_b[k]).item() for k in saved_a)
