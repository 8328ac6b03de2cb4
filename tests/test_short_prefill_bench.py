"""benchmarks/short_prefill.py on a tiny shape: one record per mode and length, first-seen marked;
bad input exits 2."""

import json

from conftest import run_benchmark


def test_short_prefill_script(tmp_path):
    out = tmp_path / "out.json"
    run_benchmark("short_prefill.py", "--lengths", "8,8,12", "--warmup", "32", "--out", str(out), tmp_path=tmp_path)
    result = json.loads(out.read_text())
    records = [(r["mode"], r["length"], r["first"]) for r in result["records"]]
    assert records == [("compiled", 8, True), ("compiled", 8, False), ("compiled", 12, True),
                       ("eager", 8, True), ("eager", 8, False), ("eager", 12, True)]
    assert all(r["ms"] > 0 for r in result["records"]) and result["warmup_ms"] > 0
    # on a CPU both modes run short pieces eagerly: the same values
    assert result["compiled_vs_eager_rel"] == 0.0 and result["compiled_vs_eager_same_argmax"] is True
    for args, message in ((["--modes", "fast"], "--modes takes compiled, eager"),
                          (["--lengths", "8,x"], "--lengths takes"), ([], "exists")):
        bad = run_benchmark("short_prefill.py", *args, "--out", str(out), tmp_path=tmp_path, check=False)
        assert bad.returncode == 2 and message in bad.stderr
