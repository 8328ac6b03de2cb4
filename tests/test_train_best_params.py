"""The best validation step's parameters (Trainer.best_params, what `train --export` writes)
stay that step's values while training goes on, also where the optimizer writes each step's
parameters over the last ones' buffers (the CUDA AdamW kernel, in place): there they are
kept as a host copy. Held as plain references, they took the later steps' values on CUDA."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import xlstm_metal  # noqa: F401  (BLAS preload before mlx use)
import xlstm_metal.training.trainer as trainer_module
from xlstm_metal.kernels.fast.step import cuda_available
from xlstm_metal.training.trainer import Trainer

from test_training import fresh_model, pattern_stream, small_cfg


def _numpy(params: dict) -> dict:
    return {k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in params.items()}


def test_best_params_are_the_best_steps_checkpoint_also_through_a_host_copy(tmp_path, monkeypatch):
    # The copying path runs here too (forced): the kept values equal the checkpoint of the best
    # step bit for bit, in their dtypes (float32 masters), whatever later steps did.
    monkeypatch.setattr(trainer_module, "_updates_in_place", lambda optimizer: True)
    stream = pattern_stream(3000)
    cfg = small_cfg(steps=12, eval_every=4, save_every=4, keep=10, lr=0.3)  # best at step 8, not the last
    trainer = Trainer(fresh_model(), stream[:2500], stream[2500:], cfg, tmp_path / "run", tmp_path, progress=False)
    result = trainer.train()
    assert result.best_step == 8
    assert all(isinstance(v, trainer_module._HostCopy) for v in trainer._best_params.values())
    best = trainer.best_params
    stored = mx.load(str(tmp_path / "run" / f"checkpoint-{result.best_step:07d}" / "model.safetensors"))
    assert set(best) <= set(stored)
    for key, value in best.items():
        assert value.dtype == stored[key].dtype, key
        np.testing.assert_array_equal(np.array(value), np.array(stored[key]), err_msg=key)
    last = dict(tree_flatten(trainer.model.parameters()))  # the last step's weights differ from the kept ones
    assert any(not np.array_equal(np.array(last[k]), np.array(best[k])) for k in best)


def test_host_copies_keep_every_dtype_bit_for_bit():
    values = {"f32": mx.array([1.5, -0.0, float("inf")], mx.float32),
              "bf16": mx.array([3.140625, -2.0, 1e-3], mx.bfloat16),
              "u32": mx.array([0, 2**32 - 1, 7], mx.uint32)}
    for name, value in values.items():
        copy = trainer_module._HostCopy(value).array()
        assert copy.dtype == value.dtype and copy.shape == value.shape
        np.testing.assert_array_equal(np.array(copy.view(mx.uint16) if value.dtype == mx.bfloat16 else copy),
                                      np.array(value.view(mx.uint16) if value.dtype == mx.bfloat16 else value))


@pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")
def test_best_params_survive_the_in_place_adamw_on_cuda(tmp_path):
    # No validation split: nothing replaces the snapshot taken before training.
    stream = pattern_stream(2000)
    trainer = Trainer(fresh_model(), stream, stream[:0], small_cfg(steps=6, save_every=100), tmp_path / "run",
                      tmp_path, progress=False)
    assert trainer_module._updates_in_place(trainer.optimizer)  # the CUDA default
    before = _numpy(dict(tree_flatten(trainer.model.parameters())))
    trainer._keep_best_params()
    references = dict(tree_flatten(trainer.model.parameters()))  # what the old code held
    trainer.train()
    kept = _numpy(trainer.best_params)
    assert all(np.array_equal(kept[k], before[k]) for k in before)
    now = _numpy(dict(tree_flatten(trainer.model.parameters())))
    assert any(not np.array_equal(now[k], before[k]) for k in before)  # training moved the weights
    # The kernel wrote over the buffers: the plain references hold the new values.
    held = _numpy(references)
    assert any(not np.array_equal(held[k], before[k]) for k in before)
