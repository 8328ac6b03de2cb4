"""benchmarks/cpu_prefill.py: the C prefill and the MLX graph in turns, per length and round."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from xlstm_metal import _blas
from xlstm_metal.kernels.cpu import decode_step as ds

from conftest import run_benchmark

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu or ds.library() is None
                                or _blas.openblas_sgemm() is None or not _blas.gemv_rows(),
                                reason="no C compiler or no OpenBLAS, or the row kernel is off (then the "
                                       "fused model takes a layout the C prefill does not read)")


def test_cpu_prefill_bench_records_both_paths_per_length(tmp_path):
    out = tmp_path / "prefill.json"
    done = run_benchmark("cpu_prefill.py", "--lengths", "40,100", "--batch", "2", "--repeats", "1", "--rounds", "2",
                         "--out", str(out), tmp_path=tmp_path)
    result = json.loads(out.read_text())
    assert [(r["round"], r["length"]) for r in result["rows"]] == [(1, 40), (1, 100), (2, 40), (2, 100)]
    assert all(r["c_prefill"] > 0 and r["graph"] > 0 for r in result["rows"])
    assert result["environment"]["cpu_prefill"] is True and result["batch"] == 2
    lines = [line for line in done.stdout.splitlines() if line.startswith("| 100 |")]
    assert len(lines) == 1 and lines[0].endswith("x |")


@pytest.mark.parametrize("args,message", [
    (["--lengths", "0,2"], "--lengths: each at least 1"),
    (["--lengths", "a"], "--lengths: integers"),
    (["--lengths", "8,,8"], "--lengths: integers"),
    (["--batch", "0"], "--batch and --repeats must be >= 1"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--out", "/nonexistent/x.json"], "--out: folder /nonexistent does not exist"),
])
def test_cpu_prefill_bench_bad_input_exits_2(tmp_path, args, message):
    done = run_benchmark("cpu_prefill.py", *args, tmp_path=tmp_path, check=False)
    assert done.returncode == 2 and message in done.stderr
