"""HyperProfiles: shipped files, validation, apply_profile, `profile check` (pass and fail)."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model

from xlstm_metal.cli import main
from xlstm_metal.kernels import register_mlstm_kernel
from xlstm_metal.kernels.mlstm import mlstm_chunkwise
from xlstm_metal.loading import save_model
from xlstm_metal.profiles import (
    ProfileError,
    apply_profile,
    list_profiles,
    load_profile,
    profile_from_dict,
    save_profile,
    shipped_profile_names,
)
from xlstm_metal.profiles.check import check_profile


@pytest.fixture(autouse=True)
def _user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))


def test_shipped_profiles_load_and_carry_their_contract():
    assert shipped_profile_names() == ["exact-fp32", "fast-bf16", "nxai-parity"]
    exact, fast, nxai = (load_profile(n) for n in shipped_profile_names())
    assert (exact.dtype, exact.state_dtype, exact.max_rel_error) == ("float32", "float32", 1e-4)
    assert fast.dtype == "bfloat16" and fast.fuse and fast.max_rel_error == 0.1
    # NX-AI's xLSTMLargeConfig defaults, autocast dtype included.
    assert nxai.kernels == {"chunkwise": "chunkwise--triton_limit_chunk", "sequence": "native_sequence__triton",
                            "step": "triton"}
    assert (nxai.autocast_kernel_dtype, nxai.gate_soft_cap, nxai.output_logit_soft_cap, nxai.eps) == (
        "bfloat16", 15.0, 30.0, 1e-6)
    assert [p.name for p in list_profiles()] == ["exact-fp32", "fast-bf16", "nxai-parity"]


@pytest.mark.parametrize("bad, words", [
    ({"name": "x", "version": 1, "dtype": "float8"}, "dtype"),
    ({"name": "x", "version": 0}, "version"),
    ({"name": "x", "version": 1, "kernels": {"chunkwise": "nope"}}, "unknown mLSTM kernel"),
    ({"name": "x", "version": 1, "chunk_sise": 3}, "unknown field"),
    ({"name": "x", "version": 1, "tolerance": {"max_rel_error": -1}}, "tolerance"),
    ({"name": "x", "version": 1, "tolerance": {"max_rel_error": 0.1, "extra": 1}}, "nothing else"),  # was kept
])
def test_bad_profiles_are_named(bad, words):
    with pytest.raises(ProfileError, match=words):
        profile_from_dict(bad, "p.json")


def test_saved_profile_loads_by_name_and_is_not_overwritten(tmp_path):
    prof = load_profile("exact-fp32").replace(name="mine", chunk_size=32)
    path = save_profile(prof)
    assert load_profile("mine").chunk_size == 32 and load_profile(str(path)) == prof
    with pytest.raises(ProfileError, match="exists"):
        save_profile(prof)
    with pytest.raises(ProfileError, match="shipped"):
        save_profile(prof.replace(name="fast-bf16"))
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        load_profile("nope")


def test_apply_profile_sets_every_kernel_cell_and_dtype():
    model = tiny_model()
    prof = load_profile("exact-fp32").replace(
        dtype="bfloat16", state_dtype="bfloat16", chunk_size=8, eps=1e-5, norm_eps=1e-5, gate_soft_cap=10.0,
        kernels={"chunkwise": "parallel", "sequence": "sequence", "step": "step"})
    apply_profile(model, prof)
    assert model.config.chunk_size == 8 and model.config.gate_soft_cap == 10.0
    for block in model.blocks:
        layer = block.mlstm_layer
        assert layer.parallel_kernel_cell.kernel == "parallel"
        assert layer.parallel_kernel_cell.chunk_size == 8 and layer.recurrent_kernel_cell.eps == 1e-5
        assert layer.recurrent_kernel_cell.state_dtype == mx.bfloat16
        assert layer.projection_cell.gate_soft_cap == 10.0 and block.norm_ffn.eps == 1e-5
        assert layer.q.weight.dtype == mx.bfloat16
    _, state = model(mx.array([[1, 2, 3]]))
    assert state[0][0].dtype == mx.bfloat16
    new = apply_profile(tiny_model().config, "nxai-parity")
    assert new.step_kernel == "triton" and new.autocast_kernel_dtype == "bfloat16"


def test_check_passes_exact_profile_against_both_references(tmp_path):
    save_model(tiny_model(seed=3), tmp_path / "m")
    for reference in ("mlx", "nxai"):
        result = check_profile(tmp_path / "m", "exact-fp32", reference=reference)
        assert result.passed and len(result.block_output_errors) == 2
        assert 0 < result.max_error < 1e-4  # different kernels/frameworks: round-off, not zero


def _dropped_normaliser_kernel(q, k, v, i, f, state=None, **kw):
    """A deliberately wrong kernel: the chunkwise kernel with the forget gates ignored."""
    return mlstm_chunkwise(q, k, v, i, mx.full(f.shape, 30.0), state, **kw)


def test_check_fails_for_a_wrong_kernel_setting(tmp_path, capsys):
    save_model(tiny_model(seed=4), tmp_path / "m")
    register_mlstm_kernel("test_wrong_forget", _dropped_normaliser_kernel)
    wrong = load_profile("exact-fp32").replace(name="wrong", kernels={"chunkwise": "test_wrong_forget"})
    (tmp_path / "wrong.json").write_text(json.dumps(wrong.to_dict()))
    assert main(["profile", "check", str(tmp_path / "wrong.json"), "--model", str(tmp_path / "m"),
                 "--reference", "mlx"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "block 0" in out and "block 1" in out
    # A kernel eps far from the model's also breaks the contract (the normaliser floor dominates).
    eps = load_profile("exact-fp32").replace(name="eps", eps=1e3)
    result = check_profile(tmp_path / "m", eps, reference="mlx")
    assert not result.passed and result.logits_error > 1e-4
    # ... and the exact profile passes on the same model through the command line.
    assert main(["profile", "check", "exact-fp32", "--model", str(tmp_path / "m"), "--reference", "mlx"]) == 0


def test_profile_list_shows_usable_names_and_survives_a_bad_user_file(tmp_path, capsys):
    """One invalid user profile made `profile list` list nothing (exit 2); a file whose "name"
    differs from its file name was listed under a name --profile did not take."""
    user = tmp_path / "profiles"
    user.mkdir()
    (user / "broken.json").write_text('{"name": "broken", "version": 1, "fuse": "yes"}')
    (user / "mine.json").write_text('{"name": "other", "version": 1, "chunk_size": 32}')
    assert main(["profile", "list"]) == 1
    captured = capsys.readouterr()
    names = [line.split()[0] for line in captured.out.splitlines()[1:] if not line.startswith("(")]
    assert names == ["exact-fp32", "fast-bf16", "mine", "nxai-parity"]
    assert "mine (named other)" in captured.out and "32" in captured.out
    assert "broken.json" in captured.err and "fuse must be true or false" in captured.err
    assert load_profile("mine").chunk_size == 32  # the listed name is the one --profile takes
    (user / "broken.json").unlink()
    assert main(["profile", "list"]) == 0


def test_profile_cli_show_and_errors(capsys):
    assert main(["profile", "show", "fast-bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"
    assert main(["profile", "show", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    assert main(["profile", "check", "exact-fp32", "--model", "/nonexistent/dir"]) == 2


def test_bf16_profile_error_is_bounded_and_nonzero(tmp_path):
    save_model(tiny_model(seed=5), tmp_path / "m")
    result = check_profile(tmp_path / "m", "fast-bf16", reference="mlx")
    assert 1e-4 < result.max_error < 0.1 and result.passed
    assert np.isfinite(result.logits_error)


def test_copy_and_float_load_of_a_quantized_checkpoint(tmp_path):
    """The packaged model ships quantized: copies stay quantized alike, the float32 load used by
    `profile check` dequantizes."""
    from xlstm_metal.profiles.check import _load_float32, copy_model
    from xlstm_metal.quantization import quantization_config, quantize_model

    model = tiny_model()
    quantize_model(model, bits=4, group_size=32)
    ids = mx.array([[1, 5, 9, 2, 7]])
    ref, _ = model(ids)
    copy = copy_model(model)
    assert quantization_config(copy) == quantization_config(model)
    assert np.allclose(np.array(copy(ids)[0]), np.array(ref), atol=1e-5)
    save_model(model, tmp_path / "q")
    loaded = _load_float32(tmp_path / "q")
    assert quantization_config(loaded) is None
    assert np.allclose(np.array(loaded(ids)[0]), np.array(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, asks", [("exact-fp32", True), ("fast-bf16", False), ("nxai-parity", False)])
def test_a_float32_profile_asks_for_float32_matmuls_on_gpus(monkeypatch, name, asks):
    """MLX runs float32 GEMMs on NVIDIA GPUs as TF32 unless MLX_ENABLE_TF32=0 (read at the first
    one): exact-fp32 (float32 weights, state and kernel products) asks for float32 ones where the
    environment does not say otherwise; profiles computing in bf16 leave MLX's default."""
    from xlstm_metal.profiles import TF32_VARIABLE, apply_profile

    monkeypatch.delenv(TF32_VARIABLE, raising=False)
    apply_profile(tiny_model(), name)
    assert os.environ.get(TF32_VARIABLE) == ("0" if asks else None)
    monkeypatch.setenv(TF32_VARIABLE, "1")  # the user's own choice stays
    apply_profile(tiny_model(), name)
    assert os.environ[TF32_VARIABLE] == "1"
