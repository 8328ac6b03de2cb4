"""benchmarks/decode_host.py run as a script on a tiny shape: one complete record per weight format,
round and compile mode, with the host times adding up."""

import json
import subprocess
import sys

from conftest import BENCH_CONFIG, ROOT, repo_env


def test_decode_host_script_records(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(BENCH_CONFIG))
    out = tmp_path / "out.jsonl"
    env = repo_env(MLX_MAX_MB_PER_BUFFER="77")
    env.pop("MLX_MAX_OPS_PER_BUFFER", None), env.pop("MLX_USE_CUDA_GRAPHS", None)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_host.py"), "--shape", str(config),
                    "--q-bits", "4", "--steps", "3", "--rounds", "1", "--batch", "2", "--out", str(out)],
                   check=True, env=env, capture_output=True, timeout=300)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["q_bits"], r["mode"]) for r in records] == [(None, "inputs"), (None, "constants"),
                                                            (4, "inputs"), (4, "constants")]
    # Quantized layers hold weight, scales and biases: more arrays in the tree than the float model.
    assert records[2]["leaves"] > records[0]["leaves"] > 0
    for r in records:
        assert r["batch"] == 2 and r["steps"] == 3
        assert r["call_ms"] > 0 and r["submit_ms"] >= 0 and r["pipelined_ms"] > 0
        assert abs(r["host_ms"] - (r["call_ms"] + r["submit_ms"])) < 1e-3
        assert abs(r["tok_s"] - 2 * 1000 / r["pipelined_ms"]) < 0.01 * r["tok_s"]
        assert r["mlx_env"] == {"MLX_MAX_OPS_PER_BUFFER": None, "MLX_MAX_MB_PER_BUFFER": "77",
                                "MLX_USE_CUDA_GRAPHS": None}


def test_decode_host_runner_modes(tmp_path):
    """runner: the runner's decode loop; aheadN: measure_decode(ahead=N); queued runs repeated."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(BENCH_CONFIG))
    out = tmp_path / "out.jsonl"
    env = repo_env()
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_host.py"), "--shape", str(config),
                    "--q-bits", "", "--steps", "3", "--rounds", "1", "--modes", "inputs,runner,ahead2",
                    "--queued-steps", "5", "--queued-repeats", "2", "--label", "x", "--out", str(out)],
                   check=True, env=env, capture_output=True, timeout=300)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in records] == ["inputs", "runner", "ahead2"]
    for r in records:
        assert r["label"] == "x" and r["queued_steps"] == 5 and len(r["pipelined_each_ms"]) == 2
        assert r["pipelined_ms"] > 0 and abs(r["tok_s"] - 1000 / r["pipelined_ms"]) < 0.01 * r["tok_s"]


def test_decode_host_rejects_unknown_mode(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_host.py"), "--modes", "eager"],
                            env=repo_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--modes takes inputs and/or constants" in result.stderr
