"""Does the default OpenBLAS thread count survive a busy machine? (issue 13)

Runs `xlstm-metal bench --shape 125m` (prefill and decode batch 1, float32, CPU) with the
default thread count, with 1 thread and with every usable core, first as the machine is, then
with one core kept busy by a spinning process that this script starts. Each figure is the best
of --repeats runs, interleaved across the settings. Prints a Markdown table (each row's ratio is to the better of 1 thread and
every core under the same condition) and writes benchmarks/results/blas_threads.json.

    python benchmarks/blas_threads.py [--repeats 2] [--prefill 256] [--decode-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_once(threads: str | None, args) -> dict:
    """Prefill / decode tok/s of one bench run; threads None = the default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLSTM_METAL_BLAS_THREADS", "OPENBLAS_"))}
    if threads is not None:
        env["XLSTM_METAL_BLAS_THREADS"] = threads
    cmd = [sys.executable, "-m", "xlstm_metal", "bench", "--shape", "125m", "--device", "cpu", "--dtype", "float32",
           "--prefill-lengths", str(args.prefill), "--decode-batches", "1", "--decode-tokens",
           str(args.decode_tokens), "--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    result = {"loadavg_1m": os.getloadavg()[0]}
    for record in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")):
        result[f"{record['kind']}_tok_s"] = record["tok_s"]
        result["threads_used"] = record.get("blas_threads")
    return result


def measure(condition: str, args, cpus: int) -> list[dict]:
    """Best of --repeats for each setting; the repeats are interleaved (default, 1, all,
    default, ...) so that a change of the machine's load hits every setting alike."""
    settings = (("default", None), ("1 thread", "1"), (f"{cpus} threads (all)", str(cpus)))
    runs: dict[str, list[dict]] = {label: [] for label, _ in settings}
    for _ in range(args.repeats):
        for label, threads in settings:
            runs[label].append(bench_once(threads, args))
            print(f"  {condition:>13} {label:>18}: {runs[label][-1]}", file=sys.stderr, flush=True)
    rows = []
    for label, _ in settings:
        rs = runs[label]
        rows.append({"condition": condition, "setting": label, "threads_used": rs[-1].get("threads_used"),
                     "prefill_tok_s": max(r["prefill_tok_s"] for r in rs),
                     "decode_tok_s": max(r["decode_tok_s"] for r in rs),
                     "loadavg_1m": [round(r["loadavg_1m"], 1) for r in rs], "runs": rs})
    for key in ("prefill_tok_s", "decode_tok_s"):
        best = max(r[key] for r in rows[1:])  # the better of 1 thread and every core
        for r in rows:
            r[key.replace("tok_s", "ratio")] = r[key] / best if best else float("nan")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "blas_threads.json"))
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    rows = measure("as is", args, cpus)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        rows += measure("one core busy", args, cpus)
    finally:
        spinner.kill()
        spinner.wait()
    sys.path.insert(0, str(ROOT))
    import xlstm_metal  # noqa: F401  (the BLAS preload, for the report)
    import mlx.core as mx
    from xlstm_metal import _blas

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "cpus": cpus, "blas_core": _blas.info().get("core"), "mlx": mx.__version__, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    print("| condition | threads | prefill tok/s | vs best | decode b1 tok/s | vs best | load avg (per run) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        used = f"{r['setting']} ({r['threads_used']})" if r["setting"] == "default" else r["setting"]
        print(f"| {r['condition']} | {used} | {r['prefill_tok_s']:.1f} | {r['prefill_ratio']:.2f}x | "
              f"{r['decode_tok_s']:.2f} | {r['decode_ratio']:.2f}x | {', '.join(map(str, r['loadavg_1m']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
