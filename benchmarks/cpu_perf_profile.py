"""Where a CPU decode step or prefill spends its CPU time, by class of work, sampled with Linux `perf`.

A child process runs our decode (batch 1, compiled step) or prefill loop on a random model of the
named shape (or the README command's model and sampling, ``--workload readme``); once it is warm,
``perf record`` samples it for --seconds, and the samples are grouped by shared object and symbol:

- BLAS GEMV / BLAS GEMM (+ packing) / BLAS other: OpenBLAS (the copy xlstm_metal binds MLX to) and
  the BLAS forwarder's row kernel with its OpenMP threads (``xlstm_metal/_blas.py``);
- MLX fused kernels: the C++ that ``mx.compile`` generates and builds (one library per kernel);
- MLX op kernels: MLX's own elementwise, reduction, copy, sort and gather loops in libmlx.so;
- MLX graph, dispatch, allocator: the rest of libmlx.so (eval, scheduler, compile replay, arrays);
- libm: scalar transcendental functions (MLX's CPU ``exp``/``log`` on x86 call them per element);
- libc: malloc/free, memcpy/memset; OS kernel: page faults, thread wake-ups, context switches;
- Python: the interpreter and extension glue.

    python benchmarks/cpu_perf_profile.py --workload decode --shape 125m --seconds 10 --out benchmarks/results/cpu_perf_decode.json

CPU time, not wall time: on a shared machine other jobs change how long each part waits for a
core, not how much work it is. Needs ``perf`` (Debian: ``linux-perf``) and permission to sample.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import os, sys, time
import xlstm_metal
import mlx.core as mx
from xlstm_metal import benchmark as bm
workload, shape, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
if workload == "readme":
    from xlstm_metal.assets import DEFAULT_MODEL_DIR, for_this_device
    from xlstm_metal.generation import xLSTMRunner
    from xlstm_metal.loading import load
    model, tok = load(str(DEFAULT_MODEL_DIR), dtype="float32")
    for_this_device(model)
    model.fuse_projections()
    runner = xLSTMRunner(model, tok)
    gen = dict(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=0)
    def work():
        for _ in runner.stream("The Python interpreter", max_tokens=200, **gen):
            pass
else:
    model = bm.random_model(bm.shape_config(shape), dtype="float32")
    model.fuse_projections()
    if workload == "decode":
        work = lambda: bm.measure_decode(model, 1, tokens=16, warmup=1)
    else:
        work = lambda: bm.measure_prefill(model, 512, warmup=False)
work(); work()
print("ready", flush=True)
t = time.time()
while time.time() - t < seconds:
    work()
"""

BLAS_LIBS = ("libxlstm_metal_blas", "libopenblas", "libblas")
OP_KERNEL = re.compile(r"binary_op|unary_op|ternary|reduction|Reduce|copy_|simd::|gather|scatter|sort|partition|"
                       r"softmax|erfinv|threefry|arg_reduce|ArgReduce|Scan|scan_|contiguous_reduce|strided_reduce|"
                       r"select_op|matmul|Gather|Scatter")


def classify(dso: str, sym: str) -> str:
    if dso.startswith("libgomp"):  # the row kernel's OpenMP threads: waking, waiting
        return "BLAS other (threads, copies)"
    if any(dso.startswith(lib) for lib in BLAS_LIBS):
        if "gemv" in sym or sym.startswith(("dot_rows", "rows_product")):  # the forwarder's row kernel
            return "BLAS GEMV"
        if "gemm" in sym:  # the kernels and the packing routines (sgemm_itcopy_..., sgemm_oncopy_...)
            return "BLAS GEMM (+ packing)"
        return "BLAS other (threads, copies)"
    if dso.startswith("libmlx"):
        return "MLX op kernels (libmlx.so)" if OP_KERNEL.search(sym) else "MLX graph, dispatch, allocator"
    if dso.startswith("libm.") or dso.startswith("libm-"):
        return "libm (scalar transcendentals)"
    if dso.startswith("libc.") or dso.startswith("libc-"):
        return "libc (malloc/free, memcpy/memset)"
    if dso.startswith("[kernel"):
        return "OS kernel (page faults, thread switches)"
    if "python" in dso or dso.startswith("core.cpython") or dso.endswith(".cpython-311-x86_64-linux-gnu.so"):
        return "Python"
    if dso.startswith("libstdc++") or dso.startswith("libgcc"):
        return "C++ runtime"
    if re.match(r"lib[A-Z]", dso) and dso.endswith(".so"):
        return "MLX fused kernels (mx.compile)"
    return "other"


def perf_samples(data: Path) -> list[tuple[float, str, str]]:
    """(percent, dso, symbol) rows of ``perf report``."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso,sym", "--stdio", "--percent-limit", "0",
                          "--no-children"], capture_output=True, text=True, timeout=600)
    rows = []
    for line in out.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*)$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3).strip()))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=("decode", "prefill", "readme"), default="decode")
    p.add_argument("--shape", default="125m", help="named shape for decode/prefill (random float32 weights)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--top", type=int, default=12, help="also list this many hottest symbols")
    p.add_argument("--out", type=Path, help="JSON file (written atomically)")
    args = p.parse_args()
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out: folder {args.out.parent} does not exist")
    if shutil.which("perf") is None:
        p.error("needs Linux `perf` on the PATH (Debian package linux-perf)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="cpu_perf-") as tmp:
        data = Path(tmp) / "perf.data"
        child = subprocess.Popen([sys.executable, "-c", _CHILD, args.workload, args.shape, str(args.seconds + 30)],
                                 env=env, stdout=subprocess.PIPE, text=True)
        try:
            if child.stdout.readline().strip() != "ready":
                p.error("the workload did not start")
            load = os.getloadavg()[0]
            rec = subprocess.run(["perf", "record", "-F", "999", "-o", str(data), "-p", str(child.pid), "--",
                                  "sleep", str(args.seconds)], capture_output=True, text=True)
            if rec.returncode != 0 or not data.exists():
                p.error(f"perf record failed: {rec.stderr.strip()[-500:]}")
        finally:
            child.kill()
            child.wait()
        rows = perf_samples(data)
    classes: dict[str, float] = defaultdict(float)
    for pct, dso, sym in rows:
        classes[classify(dso, sym)] += pct
    total = sum(classes.values()) or 1.0
    shares = {k: 100 * v / total for k, v in sorted(classes.items(), key=lambda kv: -kv[1])}
    top = [{"percent": 100 * pct / total, "dso": dso, "symbol": sym[:120], "class": classify(dso, sym)}
           for pct, dso, sym in sorted(rows, reverse=True)[: args.top]]
    result = {"command": "python benchmarks/cpu_perf_profile.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "workload": args.workload,
              "shape": args.shape if args.workload != "readme" else "pydoc-15m (packaged, float32)",
              "blas_threads": os.environ.get("XLSTM_METAL_BLAS_THREADS", "automatic"),
              "loadavg_1m": [load, os.getloadavg()[0]], "classes": shares, "top_symbols": top}
    if args.out is not None:
        tmp_out = args.out.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(result, indent=1))
        os.replace(tmp_out, args.out)
    print(f"{result['workload']} ({result['shape']}), load {load:.1f}: share of CPU samples")
    print("| class | share |\n| --- | ---: |")
    for k, v in shares.items():
        print(f"| {k} | {v:.1f}% |")
    print("\n| hottest symbols | class | share |\n| --- | --- | ---: |")
    for t in top:
        print(f"| `{t['symbol'][:60]}` ({t['dso'][:40]}) | {t['class']} | {t['percent']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
