"""benchmarks/readme_speed.py: the README's first command in each configuration, in turns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the script measures the CPU")
def test_readme_speed_runs_the_packaged_model_quantized_and_as_float32(tmp_path):
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_speed.py"), "--configs",
                           "this,this-float32", "--rounds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["config"] for r in runs] == ["this", "this-float32"]
    assert all(r.get("tokens", 0) > 0 and r["tok_s"] > 0 for r in runs), runs
    assert any(line.startswith("| this-float32 |") for line in done.stdout.splitlines())


def test_readme_speed_rejects_unknown_configs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_speed.py"), "--configs", "this,fast"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--configs: choose from" in done.stderr and "this-float32" in done.stderr
