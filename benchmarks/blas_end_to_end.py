"""What the OpenBLAS preload does end to end on a Linux CPU: the same `xlstm-metal bench` run
with MLX bound to OpenBLAS (default) and to its bundled netlib reference BLAS
(XLSTM_METAL_NO_OPENBLAS=1), plus a float32 GEMM probe. Writes benchmarks/results/blas.json.

    python benchmarks/blas_end_to_end.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, "-m", "xlstm_metal", "bench", "--shape", "125m", "--prefill-lengths", "256",
         "--decode-batches", "1,8", "--decode-tokens", "16", "--json"]
GEMM = (
    "import json, time, xlstm_metal, mlx.core as mx\n"
    "a = mx.random.normal((1024, 1024)); mx.eval(a @ a); best = 1e9\n"
    "for _ in range(5):\n"
    "    t = time.perf_counter(); mx.eval(a @ a); best = min(best, time.perf_counter() - t)\n"
    "print(json.dumps({'gemm_gflops': 2 * 1024**3 / best / 1e9}))\n"
)


def run(label: str, env: dict) -> dict:
    full = {**os.environ, **env}
    gemm = json.loads(subprocess.run([sys.executable, "-c", GEMM], env=full, capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1])
    out = subprocess.run(BENCH, env=full, capture_output=True, text=True, check=True, cwd=ROOT)
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {"label": label, "loadavg_1m": os.getloadavg()[0], **gemm, "records": records}


def main() -> int:
    results = [run("OpenBLAS (default: every core)", {}),
               run("OpenBLAS, 1 thread", {"XLSTM_METAL_BLAS_THREADS": "1"}),
               run("netlib reference BLAS", {"XLSTM_METAL_NO_OPENBLAS": "1"})]
    out = ROOT / "benchmarks" / "results" / "blas.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "command": "python benchmarks/blas_end_to_end.py", "runs": results}, indent=1))
    os.replace(tmp, out)
    for r in results:
        print(r["label"], f"GEMM {r['gemm_gflops']:.1f} GFLOP/s",
              ", ".join(f"{x['kind']} b{x['batch']} {x['tok_s']:.1f} tok/s" for x in r["records"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
