"""One-row float32 products on the CPU: the forwarder's row kernel and OpenBLAS's GEMV (both through
xlstm_metal/_blas.py) against OpenBLAS's GEMM path, for each weight layout, on the matrices a decode
step reads.

MLX's CPU matmul calls only ``cblas_sgemm``; for a [1, K] x [K, N] product OpenBLAS's GEMM packs
the whole weight first. The forwarder sends such products to its own row kernel (contiguous
weight rows) or ``cblas_sgemv`` instead; ``_blas.set_gemv_forward`` and ``_blas.set_gemv_rows``
switch them in this process, so all three run interleaved on the same arrays. Layouts: W [out,
in] row-major (``nn.Linear``, ``x @ W.T``) and W^T [in, out] row-major (what
``fuse_projections()`` stores on CPUs without the row kernel, ``x @ Wt``). Each figure is the
wall time of all copies of one matrix in a decode step (12 blocks of the 125m shape, 4 of the packaged
pydoc-15m), best and median of --repeats rounds; GB/s = weight bytes / time.

    python benchmarks/cpu_gemv.py --repeats 7 --out benchmarks/results/cpu_gemv.json

``--other-formats`` adds, for the pydoc-15m matrices, the same product with the weights in bfloat16 and float16
(MLX's own CPU matmul: no BLAS) and quantized to 4 and 6 bits (``mx.quantized_matmul``, group 64):
fewer bytes, but is it faster here?
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# (name, out, in, copies per decode step)
MATRICES = [
    ("125m q|k|v|o|i|f", 2312, 768, 12), ("125m out_proj", 768, 768, 12), ("125m gate|up", 4224, 768, 12),
    ("125m proj_down", 768, 2112, 12), ("125m lm_head", 50304, 768, 1),
    ("pydoc-15m q|k|v|o|i|f", 1544, 512, 4), ("pydoc-15m out_proj", 512, 512, 4),
    ("pydoc-15m gate|up", 2816, 512, 4), ("pydoc-15m proj_down", 512, 1408, 4),
    ("pydoc-15m lm_head (tied)", 4096, 512, 1),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--other-formats", action="store_true", help="also bfloat16, float16, 4- and 6-bit weights")
    p.add_argument("--out", type=Path, help="JSON file (written atomically)")
    args = p.parse_args()
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out: folder {args.out.parent} does not exist")

    import xlstm_metal  # noqa: F401  (binds MLX's BLAS before mlx is imported)
    import mlx.core as mx

    from xlstm_metal import _blas, benchmark

    mx.set_default_device(mx.cpu)
    if _blas.info()["gemv_forward"] is not True:
        p.error(f"the GEMV forwarder is not active here: {_blas.info()['gemv_forward_reason'] or _blas.info()['reason']}")
    data = {}
    for name, n_out, n_in, copies in MATRICES:
        ws = [mx.random.normal((n_out, n_in)) for _ in range(copies)]
        wts = [mx.contiguous(w.T) for w in ws]
        x = mx.random.normal((1, n_in))
        mx.eval(ws, wts, x)
        data[name] = (ws, wts, x, copies * n_out * n_in * 4)
    other: dict[str, dict] = {}
    if args.other_formats:
        for name, (ws, wts, x, _) in data.items():
            if not name.startswith("pydoc-15m"):  # the packaged model's question; 125m's are slow to run
                continue
            forms = {"bfloat16 W^T [in, out]": ([w.astype(mx.bfloat16) for w in wts], x.astype(mx.bfloat16)),
                     "float16 W^T [in, out]": ([w.astype(mx.float16) for w in wts], x.astype(mx.float16))}
            for bits in (4, 6):
                forms[f"{bits}-bit g64"] = ([mx.quantize(w, 64, bits) for w in ws], x)
            mx.eval([f[0] for f in forms.values()])
            other[name] = forms
    times: dict[tuple[str, str, str], list[float]] = {}  # (matrix, layout, path)
    other_times: dict[tuple[str, str], list[float]] = {}
    load0 = os.getloadavg()[0]
    # (path, forwarder on, its row kernel on); the row kernel takes only W [out, in] (contiguous rows).
    rows_default = _blas.gemv_rows()
    paths = [("GEMV (forwarded)", True, False), ("GEMM (OpenBLAS)", False, False)]
    if rows_default:
        paths.insert(0, ("row kernel (forwarded)", True, True))
    for _ in range(args.repeats):
        for path, forward, rows_on in paths:
            _blas.set_gemv_forward(forward)
            _blas.set_gemv_rows(rows_on)
            # The other path's idle threads spin on for a while after their last product (OpenBLAS's
            # up to ~0.1 s): let them sleep, so no path runs beside another's spinning workers.
            time.sleep(0.5)
            for name, (ws, wts, x, _) in data.items():
                for layout, fn in (("W [out, in]", lambda: [x @ w.T for w in ws]),
                                   ("W^T [in, out]", lambda: [x @ w for w in wts])):
                    if rows_on and layout != "W [out, in]":
                        continue
                    mx.eval(fn())
                    t = time.perf_counter()
                    mx.eval(fn())
                    times.setdefault((name, layout, path), []).append(time.perf_counter() - t)
        _blas.set_gemv_forward(True)
        _blas.set_gemv_rows(rows_default)
        for name, forms in other.items():
            for form, (weights, xin) in forms.items():
                if "bit" in form:
                    bits = int(form.split("-")[0])
                    fn = lambda weights=weights, xin=xin, bits=bits: [  # noqa: E731
                        mx.quantized_matmul(xin, *q, transpose=True, group_size=64, bits=bits) for q in weights]
                else:
                    fn = lambda weights=weights, xin=xin: [xin @ w for w in weights]  # noqa: E731
                mx.eval(fn())
                t = time.perf_counter()
                mx.eval(fn())
                other_times.setdefault((name, form), []).append(time.perf_counter() - t)
    _blas.set_gemv_forward(True)
    rows = []
    for (name, layout, path), ts in times.items():
        nbytes = data[name][3]
        rows.append({"matrix": name, "layout": layout, "path": path,
                     "mbytes": nbytes / 1e6, "best_ms": 1e3 * min(ts), "median_ms": 1e3 * statistics.median(ts),
                     "best_gbs": nbytes / min(ts) / 1e9, "median_gbs": nbytes / statistics.median(ts) / 1e9})
    for (name, form), ts in other_times.items():
        rows.append({"matrix": name, "layout": form, "path": "MLX (no BLAS)", "mbytes": data[name][3] / 1e6,
                     "best_ms": 1e3 * min(ts), "median_ms": 1e3 * statistics.median(ts)})
    result = {"command": "python benchmarks/cpu_gemv.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": benchmark.environment(),
              "loadavg_1m": [load0, os.getloadavg()[0]], "rows": rows}
    if args.out is not None:
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)
    print(f"BLAS threads {result['environment'].get('blas_threads')}, load {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print("| matrix (copies per step) | MB | layout | row kernel ms (GB/s) | GEMV ms (GB/s) | GEMM ms (GB/s) | GEMM / GEMV |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, _, _, copies in MATRICES:
        for layout in ("W [out, in]", "W^T [in, out]"):
            found = {r["path"].split(" (")[0]: r for r in rows if r["matrix"] == name and r["layout"] == layout}
            k, g, m = found.get("row kernel"), found["GEMV"], found["GEMM"]
            kernel = f"{k['median_ms']:.2f} ({k['median_gbs']:.1f})" if k else "-"
            print(f"| {name} (x{copies}) | {g['mbytes']:.1f} | {layout} | {kernel} | {g['median_ms']:.2f} ({g['median_gbs']:.1f}) | "
                  f"{m['median_ms']:.2f} ({m['median_gbs']:.1f}) | {m['median_ms'] / g['median_ms']:.2f}x |")
    if other_times:
        print("\n| matrix | other format | ms | x float32 GEMV (W^T) |\n| --- | --- | ---: | ---: |")
        for r in rows:
            if r["path"] == "MLX (no BLAS)":
                ref = next(x for x in rows if x["matrix"] == r["matrix"] and x["layout"] == "W^T [in, out]"
                           and x["path"].startswith("GEMV"))
                print(f"| {r['matrix']} | {r['layout']} | {r['median_ms']:.2f} | {r['median_ms'] / ref['median_ms']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
