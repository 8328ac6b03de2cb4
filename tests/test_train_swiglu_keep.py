"""XLSTM_METAL_TRAIN_KEEP_SWIGLU: the share of the training step's FFNs that keep their SwiGLU
output for the backward (the others recompute it), spread evenly over the blocks."""

from __future__ import annotations

import mlx.core as mx
import pytest

import xlstm_metal  # noqa: F401  (BLAS preload before mlx use)
from xlstm_metal.cells import ffn
from xlstm_metal.kernels.fast import train_rows
from xlstm_metal.kernels.fast.step import cuda_available

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


def _pattern(count: int) -> list[bool]:
    with train_rows.counting_ffns():
        return [train_rows.swiglu_output_recomputed() for _ in range(count)]


@pytest.mark.parametrize("share, kept", [("0", []), ("1", list(range(24))), ("0.5", list(range(1, 24, 2))),
                                         ("0.25", [3, 7, 11, 15, 19, 23]),
                                         ("0.67", [i for i in range(24) if i % 3 != 0])])
def test_the_kept_ffns_are_the_share_spread_evenly(monkeypatch, share, kept):
    monkeypatch.setenv("XLSTM_METAL_TRAIN_KEEP_SWIGLU", share)
    recomputed = _pattern(24)
    assert [i for i, r in enumerate(recomputed) if not r] == kept
    assert _pattern(24) == recomputed  # each trace counts from its first FFN again


def test_recompute_off_keeps_every_output_and_outside_a_step_nothing_is_counted(monkeypatch):
    monkeypatch.setenv("XLSTM_METAL_TRAIN_RECOMPUTE", "0")
    monkeypatch.setenv("XLSTM_METAL_TRAIN_KEEP_SWIGLU", "0.5")
    assert _pattern(4) == [False] * 4
    monkeypatch.setenv("XLSTM_METAL_TRAIN_RECOMPUTE", "1")
    # no counting_ffns: a share below 1 recomputes (no FFN index to choose by), 1 keeps
    assert [train_rows.swiglu_output_recomputed() for _ in range(3)] == [True] * 3
    monkeypatch.setenv("XLSTM_METAL_TRAIN_KEEP_SWIGLU", "1")
    assert train_rows.swiglu_output_recomputed() is False


@pytest.mark.parametrize("raw", ["-0.1", "1.5", "half", "nan", ""])
def test_a_share_outside_0_to_1_is_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv("XLSTM_METAL_TRAIN_KEEP_SWIGLU", raw)
    with pytest.raises(ValueError, match="XLSTM_METAL_TRAIN_KEEP_SWIGLU must be a number from 0 to 1"):
        train_rows.train_swiglu_kept_fraction()


@cuda
@pytest.mark.parametrize("share, recomputing", [("0", 2), ("0.5", 1), ("1", 0)])
def test_kept_swiglu_outputs_give_the_recomputing_steps_bits(monkeypatch, share, recomputing):
    """On CUDA the traced bf16 step of a 2-block model: each share gives the all-recomputing
    step's loss and gradients bit for bit (residual adds outside the GEMMs, where both paths
    round the same), with the expected number of FFNs on the recomputing path."""
    from test_cuda_train_rows import _step_grads, _two_block_fused_model

    model, ids = _two_block_fused_model(vocab=257)
    monkeypatch.setenv("XLSTM_METAL_TRAIN_ADDMM", "0")
    monkeypatch.setenv("XLSTM_METAL_TRAIN_KEEP_SWIGLU", "0")
    loss0, g0 = _step_grads(model, ids[:, :-1], ids[:, 1:], products="bf16")
    calls = []
    real = ffn.swiglu_down_residual
    monkeypatch.setattr(ffn, "swiglu_down_residual", lambda y, w: calls.append(y.shape) or real(y, w))
    monkeypatch.setenv("XLSTM_METAL_TRAIN_KEEP_SWIGLU", share)
    loss1, g1 = _step_grads(model, ids[:, :-1], ids[:, 1:], products="bf16")
    assert len(calls) == recomputing
    assert loss0.item() == loss1.item()
    for key in g0:
        assert mx.array_equal(g0[key], g1[key]), key
