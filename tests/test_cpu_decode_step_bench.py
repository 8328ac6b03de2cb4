"""benchmarks/cpu_decode_step.py: the C step and the MLX graph in turns, per batch and round."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from xlstm_metal import _blas
from xlstm_metal.kernels.cpu import decode_step as ds

from conftest import run_benchmark

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu or ds.library() is None or not _blas.gemv_rows(),
                                reason="no C compiler: the row kernel and the C step are not built")


def test_cpu_decode_step_bench_records_both_paths_per_batch(tmp_path):
    out = tmp_path / "step.json"
    done = run_benchmark("cpu_decode_step.py", "--batches", "1,3", "--tokens", "4", "--rounds", "2", "--out", str(out),
                         tmp_path=tmp_path)
    result = json.loads(out.read_text())
    assert [(r["round"], r["batch"]) for r in result["rows"]] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert all(r["c_step"] > 0 and r["graph"] > 0 for r in result["rows"])
    assert result["environment"]["cpu_step"] is True and result["tokens"] == 4
    lines = [line for line in done.stdout.splitlines() if line.startswith("| 3 |")]
    assert len(lines) == 1 and lines[0].endswith("x |")


@pytest.mark.parametrize("args,message", [
    (["--batches", "0,2"], "--batches: each between 1 and 8"),
    (["--batches", "a"], "--batches: integers"),
    (["--out", "/nonexistent/x.json"], "--out: folder /nonexistent does not exist"),
])
def test_cpu_decode_step_bench_bad_input_exits_2(tmp_path, args, message):
    done = run_benchmark("cpu_decode_step.py", *args, tmp_path=tmp_path, check=False)
    assert done.returncode == 2 and message in done.stderr
