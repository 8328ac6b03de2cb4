"""benchmarks/short_prefill.py on a tiny shape: one record per mode and length, first-seen marked;
bad input exits 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "short_prefill.py"
TINY = {"embedding_dim": 64, "num_heads": 2, "num_blocks": 2, "vocab_size": 97, "ffn_proj_factor": 2.0,
        "chunk_size": 16}


def test_short_prefill_script(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(SCRIPT), "--shape", str(config), "--lengths", "8,8,12", "--warmup", "32",
                    "--out", str(out)], check=True, env=env, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    records = [(r["mode"], r["length"], r["first"]) for r in result["records"]]
    assert records == [("compiled", 8, True), ("compiled", 8, False), ("compiled", 12, True),
                       ("eager", 8, True), ("eager", 8, False), ("eager", 12, True)]
    assert all(r["ms"] > 0 for r in result["records"]) and result["warmup_ms"] > 0
    # on a CPU both modes run short pieces eagerly: the same values
    assert result["compiled_vs_eager_rel"] == 0.0 and result["compiled_vs_eager_same_argmax"] is True
    for args, message in ((["--modes", "fast"], "--modes takes compiled, eager"),
                          (["--lengths", "8,x"], "--lengths takes"), ([], "exists")):
        bad = subprocess.run([sys.executable, str(SCRIPT), "--shape", str(config), *args, "--out", str(out)],
                             env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr
