"""benchmarks/step_kernel.py and decode_profile.py --breakdown, run as scripts on a tiny shape.

Off CUDA both layouts of the step run the reference ops, so the script's own check of layout 2
against layout 1 must find no difference at all, and every record must be complete.
"""

import json
import subprocess
import sys

from conftest import BENCH_CONFIG, ROOT, repo_env


def _run(tmp_path, script, *args):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(BENCH_CONFIG))
    out = tmp_path / "out.jsonl"
    env = repo_env()
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--shape", str(config), *args,
                    "--out", str(out)], check=True, env=env, capture_output=True, timeout=300)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_step_kernel_script_records(tmp_path):
    records = _run(tmp_path, "step_kernel.py", "--batches", "1,3", "--repeats", "1", "--tiles", "default,8x4@2",
                   "--v3", "1x16", "--v4", "default,4x2@1")
    for B in (1, 3):
        kinds = [r["kernel"] for r in records if r.get("batch") == B]
        assert kinds == ["copy", "v1", "v2", "v2", "v3", "v4", "v4"]
        v4 = [r["launch"] for r in records if r.get("batch") == B and r["kernel"] == "v4"]
        # (CH, STAGES, RT, blocks): DV 32 is 8 column groups, 32 rows of threads; 2 heads per batch row
        assert v4 == [[16, 3, 32, 2 * B], [4, 2, 32, 2 * B]]
        (v3,) = [r for r in records if r.get("batch") == B and r["kernel"] == "v3"]
        assert (v3["rb"], v3["rows"], v3["applies"]) == (1, 16, False)  # DV 32: not whole 128-column groups
        for r in records:
            if r.get("batch") == B:
                assert r["us_per_layer"] > 0 and r["gb_s"] > 0 and (r["DQK"], r["DV"], r["layers"]) == (16, 32, 2)
        tiles = [r["tile"] for r in records if r.get("batch") == B and r["kernel"] == "v2"]
        assert tiles[1] == [8, 16, 4, 1]  # 8 threads along the columns, 16 rows of threads for DQK 16
        assert [r["blocks_per_sm"] for r in records if r.get("batch") == B and r["kernel"] == "v2"] == [None, 2]
        for r in records:
            if r.get("kernel") in ("v2", "v3", "v4"):
                assert r["max_rel_diff_vs_v1"] == {"h": 0.0, "C": 0.0}
    assert records[-1]["kind"] == "done"


def test_decode_profile_breakdown(tmp_path):
    (r,) = _run(tmp_path, "decode_profile.py", "--batches", "2", "--repeats", "1", "--breakdown")
    ms = r["ms"]
    assert r["kind"] == "breakdown" and r["batch"] == 2 and r["step_kernel"] in (1, 2)
    assert all(ms[k] > 0 for k in ("whole_step", "products", "lm_head", "step_kernels"))
    assert abs(ms["whole_step"] - ms["products"] - ms["lm_head"] - ms["step_kernels"] - ms["rest"]) < 1e-9
    assert abs(r["tok_s"] - 2000 / ms["whole_step"]) < 1e-6


def test_decode_profile_chains(tmp_path):
    # Off CUDA every chain is MLX's matmul (the kernels need CUDA): the records, not the speeds.
    records = _run(tmp_path, "decode_profile.py", "--batches", "2", "--repeats", "1", "--only-chain",
                   "--chains", "mlx;wgmma;wgmma, k not split")
    assert [r["products"] for r in records] == ["mlx", "wgmma", "wgmma, k not split"]
    assert all(r["batch"] == 2 and r["ms"] > 0 and r["gb_s"] > 0 for r in records)
    assert [r["max_rel_diff_vs_mlx"] for r in records] == [0.0, 0.0, 0.0]  # the same products off CUDA


def test_skinny_matmul_script_records(tmp_path):
    records = _run(tmp_path, "skinny_matmul.py", "--rows", "2,5", "--kernels", "mma,wgmma", "--floor",
                   "--repeats", "1", "--kinds", "out_proj,lm_head")
    # Off CUDA only MLX's product runs (the kernels and the read floor need CUDA).
    assert [(r["kind"], r["rows"], r["method"]) for r in records] == [
        ("out_proj", 2, "mlx"), ("out_proj", 5, "mlx"), ("lm_head", 2, "mlx"), ("lm_head", 5, "mlx")]
    for r in records:
        # bf16 operands: MLX rounds the product to bf16, the reference keeps float32.
        # ms: two passes minus one (noise on a busy CPU, possibly <= 0; then no GB/s).
        assert r["ms_once"] > 0 and (r["gb_s"] is None) == (r["ms"] <= 0) and 0 < r["rel_err"] <= 4e-3
        assert (r["N"], r["K"]) == ((64, 64) if r["kind"] == "out_proj" else (97, 64))
