"""benchmarks/cpu_quantized.py: quantized weights through the C step and prefill against float32,
every variant in turns per round, and its section of BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import pytest

from xlstm_metal import _blas
from xlstm_metal.kernels.cpu import decode_step as ds

from conftest import run_benchmark

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu or ds.library() is None or not _blas.gemv_rows()
                                or _blas.openblas_sgemm() is None,
                                reason="no C compiler or no OpenBLAS: the C step and prefill are not built")


def _report():
    spec = importlib.util.spec_from_file_location("report", Path(__file__).parent.parent / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_cpu_quantized_bench_measures_every_variant_in_turns(tmp_path, monkeypatch):
    out = tmp_path / "cpu_quantized_c_tiny.json"
    done = run_benchmark("cpu_quantized.py", "--variants", "float32,8,4,mixed-4-6,mxfp4", "--rounds", "2", "--tokens", "4",
                         "--graph-tokens", "2", "--prefill", "20", "--out", str(out), tmp_path=tmp_path)
    result = json.loads(out.read_text())
    assert [(r["round"], r["variant"]) for r in result["rows"]] == [
        (rnd, v) for rnd in (1, 2) for v in ("float32", "8", "4", "mixed-4-6", "mxfp4")]
    assert all(r["decode_tok_s"] > 0 and r["graph_decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
               for r in result["rows"])
    sizes = result["sizes"]
    assert sizes["float32"]["bits_per_weight"] == 32.0
    # 8 bits plus a float32 scale and bias per 64 weights (the gates stay float32)
    assert 9.0 < sizes["8"]["bits_per_weight"] < 10.0 and 5.0 < sizes["4"]["bits_per_weight"] < 6.0
    assert sizes["float32"]["weights_mb"] > sizes["8"]["weights_mb"] > sizes["4"]["weights_mb"]
    assert sizes["mixed-4-6"]["bits_per_weight"] > sizes["4"]["bits_per_weight"]
    # mxfp4: 4 bits and a uint8 scale per 32 weights; the C plan adds its affine 8-bit copy (8 bits
    # and two float32 per 32: ~2.35x the stored codes), affine weights are read as they are
    assert 4.0 < sizes["mxfp4"]["bits_per_weight"] < sizes["4"]["bits_per_weight"]
    assert sizes["mxfp4"]["plan_added_mb"] > 1.5 * sizes["mxfp4"]["weights_mb"] * 4.25 / sizes["mxfp4"]["bits_per_weight"] - 0.01
    assert abs(sizes["4"]["plan_added_mb"]) < 0.01 and all(size["plan_s"] >= 0 for size in sizes.values())
    lines = [line for line in done.stdout.splitlines() if line.startswith("| 4 |")]
    assert len(lines) == 1 and "x |" in lines[0]
    report = _report()
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    section = report.cpu_quantized_rows()
    assert "## CPU: quantized weights through the C step and prefill vs float32 (cpu_quantized_c_tiny.json)" in section
    assert sum(line.startswith(("| float32 |", "| 8 |", "| 4 |", "| mixed-4-6 |", "| mxfp4 |")) for line in section) == 5
    assert "C plan built in s (MB it added)" in "\n".join(section)


def test_quantized_variants_alone_are_drawn_lazily_with_the_same_weights(tmp_path):
    """Without float32 the --shape model is drawn lazily and quantized layer by layer (how a 7B fits):
    the same sizes as beside float32, and the C code runs it."""
    runs = {}
    for variants in ("float32,4", "4"):
        out = tmp_path / f"{variants}.json"
        run_benchmark("cpu_quantized.py", "--variants", variants, "--rounds", "1", "--tokens", "2",
                      "--graph-tokens", "0", "--prefill", "0", "--out", str(out), tmp_path=tmp_path)
        runs[variants] = json.loads(out.read_text())
    alone = runs["4"]
    assert [r["variant"] for r in alone["rows"]] == ["4"] and alone["rows"][0]["decode_tok_s"] > 0
    assert "graph_decode_tok_s" not in alone["rows"][0] and "prefill_tok_s" not in alone["rows"][0]
    same = ("bits_per_weight", "weights_mb")
    assert [alone["sizes"]["4"][k] for k in same] == [runs["float32,4"]["sizes"]["4"][k] for k in same]


@pytest.mark.parametrize("args,message", [
    (["--variants", "7"], "--variants: 7 is not float32"),
    (["--variants", "float32,mixed-9-9"], "--variants: mixed-9-9 is not float32"),
    (["--variants", ","], "--variants: give at least one"),
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--prefill", "-1"], "--graph-tokens and --prefill >= 0"),
    (["--graph-tokens", "-1"], "--graph-tokens and --prefill >= 0"),
    (["--q-group-size", "48"], "invalid choice"),
    (["--out", "/nonexistent/x.json"], "--out: folder /nonexistent does not exist"),
])
def test_cpu_quantized_bench_bad_input_exits_2(tmp_path, args, message):
    done = run_benchmark("cpu_quantized.py", *args, tmp_path=tmp_path, check=False)
    assert done.returncode == 2 and message in done.stderr


def test_random_model_drawn_lazily_holds_the_same_weights():
    from mlx.utils import tree_flatten

    from xlstm_metal import benchmark as bm

    from conftest import tiny_config

    eager, lazy = bm.random_model(tiny_config(), seed=3), bm.random_model(tiny_config(), seed=3, lazy=True)
    pairs = list(zip(tree_flatten(eager.parameters()), tree_flatten(lazy.parameters())))
    assert len(pairs) > 10
    for (name, a), (other, b) in pairs:
        assert name == other and a.dtype == b.dtype and mx.array_equal(a, b).item(), name
    assert not mx.array_equal(eager.backbone.embeddings.weight,
                              bm.random_model(tiny_config(), seed=4).backbone.embeddings.weight).item()
