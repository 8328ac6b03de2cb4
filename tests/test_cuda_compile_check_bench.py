"""benchmarks/cuda_compile_check.py on this CPU: the launches one decode step records in place of
MLX's CUDA kernels, the sources written for NVRTC, and its refusals (NVRTC itself is not needed
here: the tests stop before compiling)."""

import json
import subprocess
import sys

from conftest import BENCH_CONFIG, ROOT, run_benchmark

_RECORD = """
import json, sys
sys.path.insert(0, {bench!r})
import cuda_compile_check as c
launches = c.record_launches({config!r}, 2, 4, 32, {rows}, "bfloat16", 132)
print(json.dumps([{{"name": l.kernel.name, "inputs": l.kernel.input_names, "outputs": l.kernel.output_names,
                   "template": [[k, str(v)] for k, v in l.template], "source": l.source()}} for l in launches]))
"""


def _record(tmp_path, rows):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(BENCH_CONFIG))
    code = _RECORD.format(bench=str(ROOT / "benchmarks"), config=str(config), rows=rows)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT))
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_step_records_the_quantized_decode_kernels_as_compilable_sources(tmp_path):
    launches = _record(tmp_path, rows=1)
    names = [entry["name"] for entry in launches]
    assert len(names) == len({(e["name"], json.dumps(e["template"])) for e in launches})  # each launch once
    assert any(n.startswith("xlstm_decode_chain_") for n in names), names  # the 4-bit chain on "CUDA"
    for entry in launches:
        src = entry["source"]
        signature = src[src.index(f"__global__ void {entry['name']}("):].split(")", 1)[0]
        for name in entry["inputs"]:
            assert "const " in signature and f"* {name}" in signature, (entry["name"], name)
        for name in entry["outputs"]:
            assert f"* {name}" in signature and f"const {name}" not in signature
        if entry["template"]:
            inst = src[src.index("template __global__ void"):]
            values = dict(entry["template"])
            if "BITS" in values:
                args = inst[inst.index("<") + 1:inst.index(">")].split(", ")
                assert args[[k for k, _ in entry["template"]].index("BITS")] == "4"
                assert values["G"] == "32"
        assert src.count("__global__ void") == 1 + bool(entry["template"])


def test_refuses_missing_nvrtc_and_bad_arguments(tmp_path):
    proc = run_benchmark("cuda_compile_check.py", "--nvrtc", str(tmp_path / "libnvrtc.so.12"), tmp_path=tmp_path,
                         check=False)
    assert proc.returncode == 2 and "no NVRTC library" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_benchmark("cuda_compile_check.py", "--q-bits", "3", tmp_path=tmp_path, check=False)
    assert proc.returncode == 2 and "--q-bits 0, 4 or 8" in proc.stderr
