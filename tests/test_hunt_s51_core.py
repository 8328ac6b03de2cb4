"""Session 51 hunt, the model core on the CPU: kernels, xLSTM-Large / 2024 models, their paths."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from xlstm_metal.kernels.cpu import decode_step as ds
from xlstm_metal.kernels.cpu import prefill as cp

from conftest import tiny_model


def _rel(a, b) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _ids(rows: int, length: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 97, (rows, length)), dtype=mx.int32)


def test_weightless_norm_modules_run_in_every_path():
    """A user's norm without a weight array (nn.LayerNorm(affine=False), nn.Identity) in place
    of a block's RMSNorm: the forward read ``norm.weight.dtype`` to round the norm's output and
    failed with AttributeError in every path."""
    x = _ids(2, 9, 4)
    for dtype in (mx.float32, mx.bfloat16):
        model = tiny_model()
        model.set_dtype(dtype)
        before, _ = model(x)
        for block in model.blocks:
            block.norm_mlstm = nn.LayerNorm(64, affine=False)
            block.norm_ffn = nn.Identity()
        with ds.switched(False), cp.switched(False):
            full, full_state = model(x)
        assert _rel(full, before) > 1e-2  # the replacements run
        model.fuse_projections()  # the inference path (a float32 residual stream under bf16)
        tol = 1e-4 if dtype == mx.float32 else 3e-2
        logits, state = model.prefill(x[:, :5], chunk_size=3)
        for t in range(5, 9):
            logits, state = model(x[:, t:t + 1], state)
        assert _rel(logits[:, -1], full[:, -1]) < tol
        for ours, ref in zip(state, full_state):
            assert max(_rel(a, b) for a, b in zip(ours, ref)) < tol


class _UserFFN(nn.Module):
    """A user's feed-forward module: no fuse_projections, no proj_down."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 64)

    def __call__(self, x):
        return self.b(nn.gelu(self.a(x)))


def test_user_ffn_module_survives_update_fuse_and_quantize():
    """A block's ``ffn`` replaced by a user's module: update() (set_dtype, load_weights, every
    optimizer step), fuse_projections(), profiles and quantize_model called the FeedForward's
    (un)fuse_projections on it and failed with AttributeError."""
    from xlstm_metal.profiles import apply_profile
    from xlstm_metal.quantization import quantize_model

    x = _ids(2, 7, 1)
    model = tiny_model()
    for block in model.blocks:
        block.ffn = _UserFFN()
    mx.eval(model.parameters())
    with ds.switched(False), cp.switched(False):
        ref, _ = model(x)
    model.update(model.parameters())
    model.set_dtype(mx.float32)
    model.fuse_projections()
    logits, state = model.prefill(x[:, :4])
    for t in range(4, 7):
        logits, state = model(x[:, t:t + 1], state)
    assert _rel(logits[:, -1], ref[:, -1]) < 1e-4
    apply_profile(model, "exact-fp32")
    quantize_model(model, bits=8)
    assert isinstance(model.blocks[0].ffn, _UserFFN)
    quantized, _ = model(x)
    assert _rel(quantized, ref) < 0.15  # 8 bits (the tiny model's shut heads amplify it)


def test_2024_model_refuses_bad_input_ids_state_and_batch_size_clearly():
    """The 2024 xLSTM checked only input_ids.ndim: float, bool or empty ids, a list, and a state
    made for another batch size failed deep inside ("[gather] Got indices with invalid dtype",
    "[reshape] Cannot infer the shape of an empty array", "[concatenate] ..."), make_state(1.5)
    with "std::bad_cast" and make_state(0) returned empty arrays."""
    import pytest

    from xlstm_metal.models.xlstm_2024 import create_xlstm_model

    model = create_xlstm_model(61, 2, (1, 1), 32, 8, 4, seed=1, slstm_backend="vanilla")
    ids = mx.array([[1, 2, 3], [4, 5, 6]])
    _, state = model(ids)
    with pytest.raises(TypeError, match="integer dtype"):
        model(mx.array([[1.0, 2.0]]))
    with pytest.raises(TypeError, match="integer dtype"):
        model(mx.array([[True]]))
    with pytest.raises(ValueError, match="S >= 1"):
        model(mx.zeros((1, 0), dtype=mx.int32))
    with pytest.raises(TypeError, match="mx.array"):
        model([[1, 2]])
    with pytest.raises(ValueError, match="batch of 1"):
        model(mx.array([[1]]), state)
    with pytest.raises(TypeError, match="integer"):
        model.make_state(1.5)
    with pytest.raises(ValueError, match=">= 1"):
        model.make_state(0)
    # what worked still does: a state from a call, make_state, None entries (zero states)
    out, _ = model(ids[:, 2:], state)
    zero, _ = model(ids, model.make_state(2))
    none, _ = model(ids, [None, None])
    assert _rel(zero, none) == 0.0 and out.shape == (2, 1, 61)


def test_profile_sets_the_2024_mlstm_step_kernel():
    """apply_profile set the 2024 mLSTM's sequence kernel and chunk size but left its step
    kernel at "step": fast-bf16's step_fused (one CUDA launch) never ran for a 2024 model, and a
    step kernel the 2024 mLSTM cannot run was accepted silently."""
    import pytest

    from xlstm_metal.models.xlstm_2024 import create_xlstm_model
    from xlstm_metal.profiles import ProfileError, apply_profile, load_profile

    model = create_xlstm_model(61, 2, (1, 1), 32, 8, 4, seed=1, slstm_backend="vanilla")
    ids = mx.array([[1, 2, 3, 4]])
    ref, _ = model(ids)
    mlstm = model.blocks[0].xlstm
    apply_profile(model, load_profile("fast-bf16").replace(dtype="float32"))
    assert mlstm.step_kernel == "step_fused" and mlstm.kernel_name == "chunkwise_fused"
    logits, state = model(ids[:, :2])
    for t in (2, 3):
        logits, state = model(ids[:, t:t + 1], state)
    assert _rel(logits[:, -1], ref[:, -1]) < 1e-4
    apply_profile(model, "exact-fp32")
    assert mlstm.step_kernel == "step"
    with pytest.raises(ProfileError, match="kernels.step"):
        apply_profile(model, load_profile("exact-fp32").replace(name="x", kernels={"step": "sequence"}))
