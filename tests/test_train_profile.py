"""The training benchmark's profiling pieces (benchmarks/train_side_by_side.py) and the persistent
default of MLX's CUDA kernel cache (xlstm_metal._cuda_cache)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_side_by_side", ROOT / "benchmarks" / "train_side_by_side.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Kernel names as CUPTI reports MLX 0.32's CUDA kernels.
FUSED = "void mlx::core::cu::Df4IMultiplyABEf4OAddDC_VV_f4f4_1234_contiguous<unsigned int, 4>(const float *, float *, unsigned int)"
EVENTS = [
    {"cat": "kernel", "name": "xlstm_mlstm_chunk_states", "ts": 0.0, "dur": 100.0},
    {"cat": "kernel", "name": "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "ts": 100.0, "dur": 300.0},
    {"cat": "kernel", "name": FUSED, "ts": 400.0, "dur": 50.0},
    {"cat": "kernel", "name": "void mlx::core::cu::copy_v<float, __nv_bfloat16, unsigned int, 4>(...)", "ts": 450.0, "dur": 10.0},
    {"cat": "kernel", "name": "void mlx::core::cu::row_reduce_looped<float, 4>(...)", "ts": 460.0, "dur": 20.0},
    {"cat": "kernel", "name": "void mlx::core::cu::binary_g<mlx::core::cu::Add, float>(...)", "ts": 480.0, "dur": 5.0},
    {"cat": "kernel", "name": "xlstm_mlstm_chunk_states", "ts": 1000.0, "dur": 100.0},
    {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "ts": 1100.0, "dur": 15.0},
    {"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 5000.0},  # host side: not GPU time
]


def test_kernel_category(bench):
    assert bench.kernel_category("xlstm_mlstm_chunk_outputs_0") == "our CUDA kernels (mLSTM, AdamW)"
    assert bench.kernel_category("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN") == "GEMM (cuBLASLt / CUTLASS)"
    assert bench.kernel_category(FUSED) == "fused elementwise (mx.compile)"
    assert bench.kernel_category("void mlx::core::cu::copy_v<float>(...)") == "copies, casts, gathers"
    assert bench.kernel_category("void mlx::core::cu::binary_g<mlx::core::cu::Add, float>(...)") == "elementwise (unfused)"
    assert bench.kernel_category("void mlx::core::cu::rms_norm_vjp<float>(...)") == "norms / softmax / logsumexp"
    assert bench.kernel_category("void mlx::core::cu::col_reduce_looped<float>(...)") == "reductions"
    assert bench.kernel_category("something_else") == "other"


def test_summarize_kernels(bench):
    s = bench.summarize_kernels(EVENTS, steps=2, step_s=0.001)
    assert s["kernels_per_step"] == 4.0  # 8 GPU records over 2 steps; the host op is not one
    assert s["gpu_busy_ms"] == pytest.approx(0.3)  # 600 us of GPU work in 2 steps
    assert s["span_ms"] == pytest.approx(1115 / 2000)
    assert s["idle_ms"] == pytest.approx(1.0 - 0.3)
    cats = s["categories"]
    assert list(cats)[0] == "GEMM (cuBLASLt / CUTLASS)"  # sorted by time
    assert cats["our CUDA kernels (mLSTM, AdamW)"] == {"ms": pytest.approx(0.1), "launches": 1.0}
    assert cats["fused elementwise (mx.compile)"]["ms"] == pytest.approx(0.025)
    assert cats["copies, casts, gathers"]["ms"] == pytest.approx((10 + 15) / 2000)
    assert s["top"][1] == {"name": "xlstm_mlstm_chunk_states", "category": "our CUDA kernels (mLSTM, AdamW)",
                           "ms": pytest.approx(0.1), "launches": 1.0}
    # The GPU waits 515 us once (between the Add and the second states kernel).
    assert s["gaps"]["idle_ms"] == pytest.approx(515 / 2000) and s["gaps"]["long_gaps_per_step"] == 0.5
    assert s["gaps"]["longest"] == [{"us": 515.0, "at_ms": 1.0, "before": EVENTS[5]["name"],
                                     "after": "xlstm_mlstm_chunk_states"}]
    # Overlapping kernels (CUDA graphs' branches) are one busy span: no gap inside it.
    overlap = [{"cat": "kernel", "name": "a", "ts": 0.0, "dur": 100.0}, {"cat": "kernel", "name": "b", "ts": 10.0, "dur": 20.0},
               {"cat": "kernel", "name": "c", "ts": 50.0, "dur": 10.0}, {"cat": "kernel", "name": "d", "ts": 130.0, "dur": 5.0}]
    assert bench.kernel_gaps(overlap, 1)["longest"] == [{"us": 30.0, "at_ms": 0.13, "before": "a", "after": "d"}]
    assert bench.summarize_kernels([EVENTS[-1]], 1) == {"error": "the trace holds no kernel events (no CUPTI?)"}
    # The markdown table shows the categories and the idle time.
    text = bench.markdown([{"side": "ours", "kind": "step_trace", "variant": "v", **s}])
    assert "| GEMM (cuBLASLt / CUTLASS) | 0.1 | 0 |" in text
    assert "| GPU idle (launch gaps, host) | 0.7 | |" in text


def test_host_timeline(bench):
    """The host's phases on the kernels' clock: how much GPU work was queued when each
    async_eval returned (up to the next idle gap of >= 200 us), that gap's length, and the
    CUDA runtime's launch calls."""
    events = [
        {"cat": "kernel", "name": "a", "ts": 1000.0, "dur": 4000.0},       # step 1: 1.0-5.0 ms
        {"cat": "kernel", "name": "b", "ts": 5010.0, "dur": 990.0},        # a 10-us gap: not idle
        {"cat": "kernel", "name": "c", "ts": 9000.0, "dur": 3000.0},       # step 2 after a 3-ms gap
        {"cat": "user_annotation", "ph": "X", "name": "xlstm:build", "ts": 0.0, "dur": 500.0},
        {"cat": "user_annotation", "ph": "X", "name": "xlstm:async_eval", "ts": 500.0, "dur": 3500.0},
        {"cat": "gpu_user_annotation", "ph": "X", "name": "xlstm:async_eval", "ts": 1000.0, "dur": 10.0},
        {"cat": "user_annotation", "ph": "X", "name": "xlstm:build", "ts": 4000.0, "dur": 4500.0},
        {"cat": "user_annotation", "ph": "X", "name": "xlstm:async_eval", "ts": 8500.0, "dur": 2500.0},
        {"cat": "cuda_runtime", "ph": "X", "name": "cudaGraphLaunch", "ts": 600.0, "dur": 20.0},
        {"cat": "cuda_runtime", "ph": "X", "name": "cudaGraphLaunch", "ts": 8600.0, "dur": 30.0},
        {"cat": "cuda_runtime", "ph": "X", "name": "cudaStreamSynchronize", "ts": 11000.0, "dur": 1000.0},
    ]
    h = bench.host_timeline(events)
    assert [p["name"] for p in h["phases"]] == ["build", "async_eval", "build", "async_eval"]
    assert h["phases"][2] == {"name": "build", "start_ms": 3.0, "ms": 4.5}
    # The first async_eval returned at 4.0 ms with 2.0 ms queued (to 6.0), then a 3-ms gap; the
    # second at 11.0 ms with 1.0 ms left (the last kernel's end) and no gap after.
    assert h["queued"] == [{"at_ms": 3.0, "queued_ms": 2.0, "gap_ms": 3.0},
                           {"at_ms": 10.0, "queued_ms": 1.0, "gap_ms": 0.0}]
    assert h["launches"] == {"cudaGraphLaunch": {"count": 2, "host_ms": 0.05}}
    assert bench.host_timeline([]) == {}


def test_part_profile_gemm_and_optimizer(bench):
    """The parts run on any device: every projection's products counted as the step runs them,
    and the optimizer part updates the model's parameters."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from xlstm_metal.config import xLSTMConfig
    from xlstm_metal.models.xlstm_large import xLSTMLarge

    config = xLSTMConfig(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=96)
    model = xLSTMLarge(config)
    args = types.SimpleNamespace(batch=2, seq_len=8, shape="tiny")
    gemm = bench.part_profile("gemm", args, model)
    rows = {r["name"]: r for r in gemm["rows"]}
    assert rows["q, k"]["count"] == 4 and (rows["q, k"]["K"], rows["q, k"]["N"]) == (64, config.qk_dim)
    assert (rows["FFN down"]["K"], rows["FFN down"]["N"]) == (config.ffn_dim, 64)
    assert rows["LM head"]["count"] == 1 and rows["LM head"]["N"] == 96
    # 6 x tokens x (every projection's weights but the gates' and the embedding's)
    weights = sum(p.size for n, p in tree_flatten(model.parameters())
                  if n.endswith(".weight") and p.ndim == 2 and not n.endswith(("igate_preact.weight", "fgate_preact.weight")) and "embeddings" not in n)
    assert gemm["tflop"] * 1e12 == pytest.approx(6 * 16 * weights)
    before = np.array(model.backbone.blocks[0].ffn.proj_up.weight)  # a host copy: CUDA's AdamW updates in place
    opt = bench.part_profile("optimizer", args, model)
    assert opt["ms"] > 0 and "error" not in opt
    assert not np.array_equal(before, np.array(model.backbone.blocks[0].ffn.proj_up.weight))
    assert "unknown part" in bench.part_profile("attention", args, model)["error"]


def test_ptx_cache_default(tmp_path):
    from xlstm_metal import _cuda_cache

    env = {"XDG_CACHE_HOME": str(tmp_path)}
    value = _cuda_cache.configure_ptx_cache(env, platform="linux")
    from importlib import metadata

    assert value == env["MLX_PTX_CACHE_DIR"] == str(tmp_path / "xlstm_metal" / "ptx" / f"mlx-{metadata.version('mlx')}")
    assert not (tmp_path / "xlstm_metal").exists()  # MLX creates it when it first writes a kernel
    env = {"MLX_PTX_CACHE_DIR": "/mine", "XDG_CACHE_HOME": str(tmp_path)}
    assert _cuda_cache.configure_ptx_cache(env, platform="linux") == "/mine" and env["MLX_PTX_CACHE_DIR"] == "/mine"
    env = {}
    assert _cuda_cache.configure_ptx_cache(env, platform="darwin") is None and env == {}


def test_ptx_cache_set_on_import(tmp_path):
    code = "import os, xlstm_metal; print(os.environ.get('MLX_PTX_CACHE_DIR'))"
    base = {k: v for k, v in os.environ.items() if k != "MLX_PTX_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env={**base, "XDG_CACHE_HOME": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout.strip()
    expected = str(tmp_path / "xlstm_metal" / "ptx") if sys.platform == "linux" else "None"
    assert out.startswith(expected)
    out = subprocess.run([sys.executable, "-c", code], env={**base, "MLX_PTX_CACHE_DIR": str(tmp_path / "x")},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(tmp_path / "x")


def test_graph_census_and_build_thread_blocks(bench, tmp_path):
    """graph_census counts the operations one compiled step builds (then runs the step);
    build_thread_ab alternates the plain loop and the builder thread's loop on one trainer."""
    import math
    import sys

    import mlx.core as mx

    sys.path.insert(0, str(ROOT / "tests"))
    from test_training import fresh_model, pattern_stream, small_cfg

    from xlstm_metal.training import Trainer

    stream = pattern_stream(6000)
    trainer = Trainer(fresh_model(), stream, stream[:1000], small_cfg(steps=20), tmp_path, tmp_path, progress=False)
    trainer._build_steps()
    x, y = trainer.batches.next()
    mx.eval(trainer._train_step(mx.array(x), mx.array(y)), trainer.model.state, trainer.optimizer.state)
    census = bench.graph_census(trainer)
    assert census["nodes"] > 100 and census["nodes"] >= sum(census["by_primitive"].values())
    assert census["outputs"] > 2 and census["leaves"] > 0
    ab = bench.build_thread_ab(trainer, 1, 2, deadline=math.inf)
    assert [b["build_thread"] for b in ab["blocks"]] == [False, True] and "error" not in ab
    assert all(math.isfinite(v) for b in ab["blocks"] for v in b["losses"])
    assert set(ab) == {"blocks", "plain", "threaded"} and trainer.step_traces == 2  # one trace per thread


def test_cuda_graph_cache_default_leaves_a_users_value():
    import os

    from xlstm_metal import _cuda_cache

    env = {}
    assert _cuda_cache.configure_graph_cache(env) == "1000" == env["MLX_CUDA_GRAPH_CACHE_SIZE"]
    env = {"MLX_CUDA_GRAPH_CACHE_SIZE": "50"}
    assert _cuda_cache.configure_graph_cache(env) == "50" and env == {"MLX_CUDA_GRAPH_CACHE_SIZE": "50"}
    # importing the package set it for this process (MLX reads it at its first CUDA graph)
    assert os.environ.get("MLX_CUDA_GRAPH_CACHE_SIZE")
