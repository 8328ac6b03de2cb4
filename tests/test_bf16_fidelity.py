"""bf16 fidelity: bf16 weights against the float32 model on the same weights (NX-AI's
xLSTMLarge initialisation), and the float32 residual stream that keeps the drift down."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from xlstm.xlstm_large.model import xLSTMLarge as TorchxLSTMLarge
from xlstm.xlstm_large.model import xLSTMLargeConfig

import xlstm_metal.cells.mlstm as cells_mlstm
from xlstm_metal import load_model
from xlstm_metal.cells.norms import RMSNorm
from xlstm_metal.kernels.fast.decode import add_rms_norm
from xlstm_metal.kernels.fast.step import cuda_available

# rel. L2 error of all logits (2 x 96 positions) of this seed's model, bf16 vs float32:
# 0.0097 with the float32 residual stream, 0.0131 with the residual in bf16 (as NX-AI's bf16
# model and this package before keep it); over seeds 0-3: 0.0097-0.0104 against 0.0131-0.0153.
BOUND = 0.0115
VOCAB = 1024
ROOT = Path(__file__).resolve().parent.parent


def rel_l2(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """NX-AI's xLSTMLarge with its own initialisation (seeded), saved as a native checkpoint."""
    config = xLSTMLargeConfig(
        embedding_dim=256, num_heads=2, num_blocks=6, vocab_size=VOCAB, mode="inference", return_last_states=True,
        chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
        step_kernel="native", autocast_kernel_dtype="float32", inference_state_dtype="float32",
    )
    torch.manual_seed(0)
    model = TorchxLSTMLarge(config)
    path = tmp_path_factory.mktemp("nxai")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return path


@pytest.fixture(scope="module")
def ids():
    return mx.array(np.random.default_rng(0).integers(0, VOCAB, size=(2, 96)).astype(np.int32))


@pytest.fixture(scope="module")
def reference(checkpoint, ids):
    logits, _ = load_model(checkpoint, dtype="float32")(ids)
    return np.array(logits)


def test_bf16_logits_stay_close_to_float32(checkpoint, ids, reference):
    model = load_model(checkpoint, dtype="bfloat16")
    assert model.residual_dtype == mx.float32  # load_model sets up inference
    logits, state = model(ids)
    assert logits.dtype == mx.bfloat16 and state[0][0].dtype == mx.float32
    assert rel_l2(np.array(logits.astype(mx.float32)), reference) <= BOUND
    # The bound is one the residual stream in bf16 fails (what the test guards against).
    model.residual_dtype = None
    logits_bf16_residual, _ = model(ids)
    assert rel_l2(np.array(logits_bf16_residual.astype(mx.float32)), reference) > BOUND


def test_prefill_and_fused_path_keep_the_float32_residual(checkpoint, ids, reference, monkeypatch):
    """model.prefill (compiled blocks) and the fused fast path compute as model(ids), and the
    projections still run in bf16 (a float32 residual must not promote the matmuls)."""
    model = load_model(checkpoint, dtype="bfloat16").fuse_projections()
    assert model.residual_dtype == mx.float32
    seen = []
    real = cells_mlstm.get_mlstm_kernel

    def spy(name):
        kernel = real(name)

        def run(q, k, v, *args, **kwargs):
            seen.append((q.dtype, k.dtype, v.dtype))
            return kernel(q, k, v, *args, **kwargs)

        return run

    monkeypatch.setattr(cells_mlstm, "get_mlstm_kernel", spy)
    full, _ = model(ids)
    last, state = model.prefill(ids, chunk_size=40)  # three pieces, the state carried
    assert seen and all(d == (mx.bfloat16,) * 3 for d in seen)
    assert rel_l2(np.array(last.astype(mx.float32)), reference[:, -1]) <= BOUND
    assert rel_l2(np.array(last.astype(mx.float32)), np.array(full[:, -1].astype(mx.float32))) < 0.01
    step, _ = model(ids[:, :1], state)  # a decode step after the prompt runs in bf16 too
    assert step.dtype == mx.bfloat16 and seen[-1] == (mx.bfloat16,) * 3


def test_weight_updates_drop_the_float32_residual(checkpoint):
    """Training replaces weights through update(): its activations stay in the weights' dtype."""
    model = load_model(checkpoint, dtype="bfloat16")
    model.update(model.parameters())
    assert model.residual_dtype is None
    model.fuse_projections()
    assert model.residual_dtype == mx.float32


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("bf16_fidelity", ROOT / "benchmarks" / "bf16_fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_same_weights_both_sides(tmp_path):
    """benchmarks/bf16_fidelity.py end to end at a tiny shape: our float32 side matches NX-AI's
    float32 reference (the weights crossed exactly), ours bf16 stays under the bound, and bad
    input is refused before any work."""
    bench = _benchmark_module()
    out = tmp_path / "f.json"
    assert bench.main(["--shape", "64:2:2:128", "--lengths", "20,70", "--steps", "4",
                       "--sides", "official,ours,ours-float32", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {(r["length"], r["side"]): r for r in record["rows"]}
    assert set(rows) == {(n, s) for n in (20, 70) for s in ("reference", "official", "ours", "ours-float32")}
    for n in (20, 70):
        assert len(rows[n, "reference"]["tokens"]) == 4
        assert rows[n, "ours-float32"]["metrics"]["last_rel_l2"] < 1e-5
        assert rows[n, "ours-float32"]["metrics"]["agree"] == 4
        assert 0 < rows[n, "ours"]["metrics"]["last_rel_l2"] < 0.05
    assert "| 70 | ours |" in record["table"]
    assert bench.main(["--shape", "64:2:2:128", "--out", str(out)]) == 2  # exists, no --overwrite
    assert bench.main(["--shape", "7:2:2:128", "--out", str(tmp_path / "g.json")]) == 2
    assert bench.main(["--lengths", "1", "--out", str(tmp_path / "g.json")]) == 2
    assert not (tmp_path / "g.json").exists()


@pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")
@pytest.mark.parametrize("shape", [(1, 1, 4096), (16, 1, 4096), (3, 1, 200), (2, 5, 64)])
def test_add_rms_norm_with_float32_residual(shape):
    """The fused add + RMSNorm with a float32 residual x beside bf16 y and weight: s = x + y in
    float32 exactly as the add, norm(s) as RMSNorm's float32 path rounded once to bf16."""
    rng = np.random.default_rng(shape[0] * shape[-1])
    x = mx.array(rng.standard_normal(shape).astype(np.float32))
    y = mx.array((0.5 * rng.standard_normal(shape)).astype(np.float32)).astype(mx.bfloat16)
    norm = RMSNorm(shape[-1])
    norm.weight = mx.array((1.0 + 0.3 * rng.standard_normal(shape[-1])).astype(np.float32)).astype(mx.bfloat16)
    s, n = add_rms_norm(x, y, norm)
    s_ref = x + y
    n_ref = norm(s_ref).astype(mx.bfloat16)
    assert s.dtype == mx.float32 and n.dtype == mx.bfloat16
    assert mx.array_equal(s, s_ref)
    a, b = np.array(n.astype(mx.float32), np.float64), np.array(n_ref.astype(mx.float32), np.float64)
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) <= 1e-2
