"""benchmarks/decode_host_profile.py: py-spy's raw stacks summarised, and the script on a tiny shape."""

import importlib.util
import json

from conftest import ROOT, run_benchmark

SCRIPT = ROOT / "benchmarks" / "decode_host_profile.py"


def _module():
    spec = importlib.util.spec_from_file_location("decode_host_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stacks_summarised_by_share_on_stack_and_direct_callees():
    raw = [
        "main (a.py:1);mlx::core::eval_impl (libmlx.so);mlx::core::gpu::eval (libmlx.so);malloc (libc.so.6) 3",
        "main (a.py:1);mlx::core::eval_impl (libmlx.so);mlx::core::gpu::eval (libmlx.so) 1",
        "main (a.py:1);mlx::core::eval_impl (libmlx.so);mlx::core::Event::is_signaled (libmlx.so) 2",
        "main (a.py:1);other (b.py:2);malloc (libc.so.6) 4",
        "",
    ]
    s = _module().summarise_stacks(raw, top=3)
    assert s["samples"] == 10
    # on the stack: main always, malloc in 7 of 10 samples (twice under different callers), eval_impl in 6
    assert s["frames"] == [("main", 1.0), ("malloc", 0.7), ("mlx::core::eval_impl", 0.6)]
    assert dict(s["children"]["mlx::core::eval_impl"]) == {"mlx::core::gpu::eval": 0.4,
                                                            "mlx::core::Event::is_signaled": 0.2}
    assert dict(s["children"]["mlx::core::gpu::eval"]) == {"malloc": 0.3, "<self>": 0.1}
    assert "mlx::core::detail::compile_replace" not in s["children"]


def test_script_records_each_weight_format(tmp_path):
    out = tmp_path / "out.json"
    run_benchmark("decode_host_profile.py", "--q-bits", "4", "--tokens", "3,5", "--repeats", "2", "--synced-steps", "3",
                  "--out", str(out), tmp_path=tmp_path)
    result = json.loads(out.read_text())
    assert [r["weights"] for r in result["records"]] == ["float32", "4-bit g64"]
    # weight, scales and biases per quantized layer: more arrays for the compiled step to take
    assert result["records"][1]["leaves"] > result["records"][0]["leaves"] > 0
    for r in result["records"]:
        assert [q["tokens"] for q in r["queued"]] == [3, 3, 5, 5]
        assert all(q["tok_s"] > 0 and abs(q["tok_s"] * q["ms_per_step"] - 1000) < 1 for q in r["queued"])
        assert len(r["synced_ms"]) == 3 and min(r["synced_ms"]) > 0 and r["build_ms"] > 0
        assert "py_spy" not in r
    # an existing output is refused before any work
    again = run_benchmark("decode_host_profile.py", "--out", str(out), tmp_path=tmp_path, check=False)
    assert again.returncode == 2 and "exists" in again.stderr
