"""`--profile` on generate / chat, bench and train: the profile's settings reach the model."""

import json

import mlx.core as mx
import numpy as np
import pytest

from xlstm_metal.assets import DEFAULT_MODEL_DIR
from xlstm_metal.cli import build_parser, main
from xlstm_metal.profiles import load_profile


@pytest.fixture
def custom(tmp_path):
    prof = load_profile("exact-fp32").replace(
        name="custom", chunk_size=8, prefill_chunk=128, state_dtype="bfloat16", eps=2e-6,
        kernels={"chunkwise": "parallel", "sequence": "sequence", "step": "step"},
        init={"igate_bias": -4.0, "fgate_bias": [1.0, 2.0], "gate_weight_std": 0.0})
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(prof.to_dict()))
    return path


def test_generate_and_chat_load_the_model_under_the_profile(custom):
    from xlstm_metal.cli.generate import load_runner

    for command in ("generate", "chat"):
        args = build_parser().parse_args([command, "--profile", str(custom), "--prompt", "x"])
        runner, _ = load_runner(args)
        cell = runner.model.blocks[0].mlstm_layer.parallel_kernel_cell
        assert (cell.kernel, cell.chunk_size, cell.eps, cell.state_dtype) == ("parallel", 8, 2e-6, mx.bfloat16)
        assert runner.prefill_chunk_size == 128
    # An explicit flag wins over the profile.
    args = build_parser().parse_args(["generate", "--profile", str(custom), "--prompt", "x", "--dtype", "bfloat16"])
    runner, _ = load_runner(args)
    assert runner.model.blocks[0].mlstm_layer.q.weight.dtype == mx.bfloat16


def test_generate_rejects_unknown_profile(capsys):
    assert main(["generate", "--profile", "nope", "--prompt", "x"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err


def test_bench_profile(custom, capsys):
    assert main(["bench", "--config", str(DEFAULT_MODEL_DIR), "--profile", str(custom), "--prefill-lengths", "32",
                 "--decode-batches", "1", "--decode-tokens", "2", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["chunk_size"], r["state_dtype"], r["profile"]) for r in records} == {
        ("parallel", 8, "bfloat16", "custom")}
    assert records[0]["chunk"] == 128 and records[0]["fused"] is False


def test_train_profile_sets_numerics_and_gate_init(custom, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "d.txt").write_text("\n".join(" ".join(rng.choice(list("abcdefg"), 10)) for _ in range(200)))
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "d.txt"), "--out", str(out), "--profile", str(custom), "--steps", "2",
                 "--seq-len", "16", "--batch-size", "2", "--vocab-size", "300", "--warmup", "0", "--lr", "1e-9",
                 "--no-progress"]) == 0
    ckpt = sorted(out.glob("checkpoint-*"))[-1]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["chunk_size"] == 8 and config["eps"] == 2e-6
    from xlstm_metal.loading import load_model

    model = load_model(ckpt)
    bias = np.array(model.blocks[0].mlstm_layer.igate_preact.bias)
    assert np.allclose(bias, -4.0, atol=1e-3)  # the profile's gate init (lr 1e-9: two steps move nothing)
    assert np.allclose(np.array(model.blocks[0].mlstm_layer.fgate_preact.bias), [1.0, 2.0], atol=1e-3)


def test_serve_loads_the_model_under_the_profile(custom, capsys):
    pytest.importorskip("mlx_lm")
    from xlstm_metal.serve import ServeError, load_for_serving, server_args

    model, _ = load_for_serving(DEFAULT_MODEL_DIR, profile=str(custom))
    cell = model.blocks[0].mlstm_layer.parallel_kernel_cell
    assert (cell.kernel, cell.chunk_size, cell.state_dtype) == ("parallel", 8, mx.bfloat16)
    with pytest.raises(ServeError, match="unknown profile"):
        load_for_serving(DEFAULT_MODEL_DIR, profile="nope")
    args = build_parser().parse_args(["serve", "--profile", str(custom), "--dtype", "bfloat16"])
    assert args.profile == str(custom)
    assert server_args(DEFAULT_MODEL_DIR, profile=load_profile(custom)).profile.name == "custom"
    assert main(["serve", "--profile", "nope", "--port", "0"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err


def test_bench_reports_the_profiles_blas_threads(tmp_path, capsys):
    """bench --json's blas_threads is what the runs used: the profile's (it was read before the
    profile set it)."""
    from xlstm_metal import _blas
    from xlstm_metal.profiles import set_blas_threads

    before = _blas.info()["threads"]
    if before is None:  # macOS: MLX's Accelerate (OpenBLAS is preloaded on Linux CPUs, where CI runs)
        pytest.skip("no preloaded OpenBLAS: the profile's BLAS threads do not apply")
    wanted = 1 if before != 1 else 2
    path = tmp_path / "threads.json"
    path.write_text(json.dumps(load_profile("exact-fp32").replace(name="threads", blas_threads=wanted).to_dict()))
    try:
        assert main(["bench", "--config", str(DEFAULT_MODEL_DIR), "--profile", str(path), "--prefill-lengths", "16",
                     "--decode-batches", "1", "--decode-tokens", "2", "--json"]) == 0
    finally:
        set_blas_threads(before)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert records and {r["blas_threads"] for r in records} == {wanted}
