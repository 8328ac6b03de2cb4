"""Parity with NX-AI's official xLSTMLarge (native torch kernels, float32) on tiny random models."""

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from xlstm.xlstm_large.model import xLSTMLarge as TorchxLSTMLarge
from xlstm.xlstm_large.model import xLSTMLargeConfig

from xlstm_metal import load_model

TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def official_model(seed=0, weight_mode="single", **overrides):
    fields = dict(
        embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97,
        chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
        step_kernel="native", mode="inference", chunk_size=16, return_last_states=True,
        autocast_kernel_dtype="float32", inference_state_dtype="float32", weight_mode=weight_mode,
    )
    fields.update(overrides)
    config = xLSTMLargeConfig(**fields)
    torch.manual_seed(seed)
    model = TorchxLSTMLarge(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # norms start at ones: move them so a wrong norm shows
                param.copy_(torch.empty_like(param).uniform_(0.5, 1.5, generator=gen))
            elif name.endswith("igate_preact.bias") or name.endswith("ifgate_preact.bias"):
                param.copy_(torch.empty_like(param).uniform_(-6, 6, generator=gen))
            elif name.endswith("fgate_preact.bias"):
                param.copy_(torch.empty_like(param).uniform_(-4, 8, generator=gen))
            elif param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model, config


def save_native(model, config, path):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model, config = official_model(seed=1)
    ours = load_model(save_native(model, config, tmp_path_factory.mktemp("native")))
    return model, ours


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("S", [1, 7, 64, 211])
def test_logits_and_final_states_match(pair, batch, S):
    theirs, ours = pair
    ids = np.random.default_rng(S * 10 + batch).integers(0, 97, size=(batch, S))
    with torch.no_grad():
        ref_logits, ref_state = theirs(torch.tensor(ids))
    logits, state = ours(mx.array(ids.astype(np.int32)))
    assert logits.shape == (batch, S, 97)
    assert rel_err(np.array(logits), ref_logits.numpy()) <= TOL
    for block, (C, n, m) in enumerate(state):
        rC, rn, rm = ref_state[block]
        assert rel_err(np.array(C), rC.numpy()) <= TOL
        assert rel_err(np.array(n), rn.numpy()) <= TOL
        assert rel_err(np.array(m), rm.numpy()) <= TOL


def test_prefill_then_steps_matches_official_generation_states(pair):
    theirs, ours = pair
    ids = np.random.default_rng(7).integers(0, 97, size=(2, 40))
    with torch.no_grad():
        _, ref_state = theirs(torch.tensor(ids[:, :33]))
        for t in range(33, 40):
            ref_logits, ref_state = theirs(torch.tensor(ids[:, t : t + 1]), ref_state)
    _, state = ours(mx.array(ids[:, :33].astype(np.int32)))
    for t in range(33, 40):
        logits, state = ours(mx.array(ids[:, t : t + 1].astype(np.int32)), state)
    assert rel_err(np.array(logits), ref_logits.numpy()) <= TOL
    assert rel_err(np.array(state[1][0]), ref_state[1][0].numpy()) <= TOL


def test_prefill_then_steps_equals_one_forward(pair):
    _, ours = pair
    ids = mx.array(np.random.default_rng(8).integers(0, 97, size=(3, 50)).astype(np.int32))
    full, full_state = ours(ids)
    logits, state = ours(ids[:, :37])
    steps = [logits]
    for t in range(37, 50):
        out, state = ours(ids[:, t : t + 1], state)
        steps.append(out)
    assert rel_err(np.array(mx.concatenate(steps, axis=1)), np.array(full)) <= TOL
    for a, b in zip(state[-1], full_state[-1]):
        assert rel_err(np.array(a), np.array(b)) <= TOL


def test_fused_weight_mode_checkpoint(tmp_path):
    """NX-AI's weight_mode='fused' layout (qkv_opreact, ifgate_preact, proj_up_gate_z)."""
    model, config = official_model(seed=2, weight_mode="fused")
    keys = set(model.state_dict())
    assert any("qkv_opreact" in k for k in keys) and any("proj_up_gate_z" in k for k in keys)
    ours = load_model(save_native(model, config, tmp_path / "fused"))
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 23))
    with torch.no_grad():
        ref_logits, _ = model(torch.tensor(ids))
    logits, _ = ours(mx.array(ids.astype(np.int32)))
    assert rel_err(np.array(logits), ref_logits.numpy()) <= TOL


def test_larger_heads_and_uncommon_factors(tmp_path):
    """More heads, v_dim_factor != 1, no out_norm, uncapped gates: derived sizes must match."""
    model, config = official_model(
        seed=3, embedding_dim=96, num_heads=3, v_dim_factor=0.5, qk_dim_factor=0.25,
        add_out_norm=False, gate_soft_cap=None, ffn_proj_factor=1.5, num_blocks=3,
    )
    ours = load_model(save_native(model, config, tmp_path / "odd"))
    ids = np.random.default_rng(1).integers(0, 97, size=(1, 70))
    with torch.no_grad():
        ref_logits, _ = model(torch.tensor(ids))
    logits, _ = ours(mx.array(ids.astype(np.int32)))
    assert rel_err(np.array(logits), ref_logits.numpy()) <= TOL
