"""On a CPU, does quantization save time? MLX's quantized matmul (``mx.quantized_matmul``, the op
``nn.QuantizedLinear`` runs) against a float32 matmul through the preloaded OpenBLAS (both weight layouts; the faster is the baseline), at batch 1
(decode) and 512 rows (prefill), for 7B-shaped layers (E=4096; FFN 10944) and the packaged
model's (E=256; FFN 704). Writes benchmarks/results/cpu_quantized_matmul.json.

    python benchmarks/cpu_quantized_matmul.py                    # ~5 minutes on 2 busy cores
    python benchmarks/cpu_quantized_matmul.py --rows 1 --shapes 4096x4096
    python benchmarks/cpu_quantized_matmul.py --ours --rows 1,64,512   # beside our layers' product
    XLSTM_METAL_BLAS_THREADS=1 python benchmarks/cpu_quantized_matmul.py --out results/x.json

Each figure is the median of ``--repeats`` timed calls after a warm-up. Other processes on the
machine slow both sides; the 1-minute load average is recorded with each row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import xlstm_metal  # noqa: F401  (first: binds MLX to OpenBLAS on Linux)
import mlx.core as mx  # noqa: E402

from xlstm_metal.benchmark import environment  # noqa: E402
from xlstm_metal.kernels.fast.quantized import quantized_matmul  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _median_seconds(fn, repeats: int) -> float:
    mx.eval(fn())  # warm-up (and first-use kernel builds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(rows: int, n_in: int, n_out: int, bits: list[int], group_size: int, repeats: int,
            routed: bool = False) -> list[dict]:
    """Seconds per [rows, n_in] @ [n_in, n_out]: float32, then each bit width (``routed``: also
    ``kernels.fast.quantized.quantized_matmul``, the product our quantized layers run)."""
    key = mx.random.key(0)
    x = mx.random.normal((rows, n_in), key=key)
    w = mx.random.normal((n_out, n_in), key=mx.random.key(1)) * n_in**-0.5
    mx.eval(x, w)
    # Float32 both ways: W [out, in] as nn.Linear stores it, and the [in, out] copy fuse_projections() makes
    # on CPUs for decoding (cells.mlstm.gemv_layout); the faster one is the baseline.
    wt = mx.contiguous(w.T)
    mx.eval(wt)
    plain = _median_seconds(lambda: x @ w.T, repeats)
    column = _median_seconds(lambda: x @ wt, repeats)
    base = min(plain, column)
    out = [{"rows": rows, "in": n_in, "out": n_out, "kind": "float32 [out,in]", "ms": plain * 1e3,
            "slowdown": plain / base},
           {"rows": rows, "in": n_in, "out": n_out, "kind": "float32 [in,out]", "ms": column * 1e3,
            "slowdown": column / base}]
    for b in bits:
        wq, scales, biases = mx.quantize(w, group_size=group_size, bits=b)
        mx.eval(wq, scales, biases)
        t = _median_seconds(
            lambda: mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group_size, bits=b), repeats
        )
        out.append({"rows": rows, "in": n_in, "out": n_out, "kind": f"{b}-bit g{group_size}", "ms": t * 1e3,
                    "slowdown": t / base})
        if routed:  # what a quantized layer of ours runs: MLX's product, dequantize + GEMM over 64 rows
            t = _median_seconds(lambda: quantized_matmul(x, wq, scales, biases, group_size=group_size, bits=b), repeats)
            out.append({"rows": rows, "in": n_in, "out": n_out, "kind": f"{b}-bit g{group_size}, ours",
                        "ms": t * 1e3, "slowdown": t / base})
    load = os.getloadavg()[0]
    for row in out:
        row["loadavg_1m"] = load
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,4096x10944,256x704",
                   help="IN x OUT layer shapes, comma-separated (default: 7B attention, 7B FFN up, packaged FFN up)")
    p.add_argument("--rows", default="1,512", help="batch rows, comma-separated (default: 1,512)")
    p.add_argument("--prefill-shapes", default="4096x4096,256x704",
                   help="shapes timed at rows > 1 (default: 4096x4096,256x704; a quantized 512x4096x10944 "
                        "matmul takes ~30 s on 2 busy cores)")
    p.add_argument("--bits", default="4,8", help="bit widths (default: 4,8)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ours", action="store_true",
                   help="also time the product our quantized layers run (MLX's up to 64 rows, dequantize + GEMM above)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_quantized_matmul.json"))
    args = p.parse_args(argv)
    mx.set_default_device(mx.cpu)
    def parse(text: str) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]

    shapes, prefill_shapes = parse(args.shapes), parse(args.prefill_shapes)
    bits = [int(b) for b in args.bits.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"{'rows':>5} {'in x out':>12} {'kind':>16} {'ms':>10} {'x float32':>10} {'load':>5}")
    for r in rows:
        for n_in, n_out in (shapes if r == 1 else prefill_shapes):
            for row in measure(r, n_in, n_out, bits, args.group_size, args.repeats, args.ours):
                results.append(row)
                print(f"{row['rows']:>5} {row['in']:>5}x{row['out']:<6} {row['kind']:>16} {row['ms']:>10.3f} "
                      f"{row['slowdown']:>10.2f} {row['loadavg_1m']:>5.1f}", flush=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(),
              "blas_threads": os.environ.get("XLSTM_METAL_BLAS_THREADS", "all cores"),
              "command": " ".join(["python benchmarks/cpu_quantized_matmul.py", *(argv or sys.argv[1:])]),
              "results": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
