"""Decode at batch 1 on the CPU against the machine's memory-bandwidth limit (issue 19 item 5).

A decode step at batch 1 reads every weight once (the embedding table: one row, unless the LM
head is tied to it) plus the recurrent state, so it cannot take less than
``bytes read per step / read bandwidth``. This script measures both, in turns, several rounds:

- read bandwidth over arrays far larger than the caches (1 GiB): ``likwid-bench -t
  load_avx512`` (or ``load_avx``) with one thread per core where likwid is installed (Debian
  package ``likwid``), and numpy streaming reads (``sum`` over one slice per thread, threads in
  parallel) and copies; the limit uses the highest read figure of the round;
- our decode at batch 1 (``xlstm_metal.benchmark.measure_decode``: the compiled greedy step,
  ``fuse_projections()``, float32) of a random model of the named shape, or of a checkpoint
  directory (``--model``, e.g. the packaged model, dequantized on the CPU as ``generate`` runs it).

    python benchmarks/cpu_decode_limit.py --shape 125m --rounds 3 --out benchmarks/results/cpu_decode_limit.json

Prints a Markdown table (round, load average, bandwidths, bytes per step, limit, ours, % of limit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def numpy_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Best read (``sum``) and copy (read + write bytes) GB/s over a ``gib`` GiB float32 array
    split into one slice per thread (numpy releases the GIL in both)."""
    a = np.ones(int(gib * GIB) // 4, np.float32)
    b = np.empty_like(a)
    bounds = np.linspace(0, a.size, threads + 1).astype(int)
    parts = [(a[s:e], b[s:e]) for s, e in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(threads) as pool:
        def best(fn) -> float:
            list(pool.map(fn, parts))  # warm-up: pages touched
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                list(pool.map(fn, parts))
                times.append(time.perf_counter() - t)
            return min(times)

        read = best(lambda p: p[0].sum())
        copy = best(lambda p: np.copyto(p[1], p[0]))
    return {"read_gbs": a.nbytes / read / 1e9, "copy_gbs": 2 * a.nbytes / copy / 1e9}


def likwid_bandwidth(threads: int) -> dict[str, float] | None:
    """likwid-bench's streaming load kernel (AVX-512 where the CPU has it), 1 GB in all."""
    exe = shutil.which("likwid-bench")
    if exe is None:
        return None
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kernel = "load_avx512" if "avx512f" in flags else "load_avx"
    out = subprocess.run([exe, "-t", kernel, "-w", f"N:1GB:{threads}"], capture_output=True, text=True,
                         timeout=300)
    match = re.search(r"MByte/s:\s+([\d.]+)", out.stdout)
    if out.returncode != 0 or match is None:
        return None
    return {"kernel": kernel, "read_gbs": float(match.group(1)) / 1e3}


def decode_bytes(model) -> dict[str, int]:
    """Bytes a batch-1 decode step reads: every weight the step multiplies by (the embedding
    table only through a tied LM head, else one row of it) and the recurrent state."""
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    emb = params["backbone.embeddings.weight"]
    weights = sum(p.nbytes for p in params.values()) - emb.nbytes
    tied = model.config.tie_word_embeddings
    weights += emb.nbytes if tied else emb.nbytes // emb.shape[0]
    state = sum(s.nbytes for layer in model.make_state(1) for s in layer)
    return {"weights": weights, "state": state, "total": weights + state}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="125m", help="named shape (random weights, float32)")
    p.add_argument("--model", help="a checkpoint directory instead (quantized ones are dequantized)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32, help="decode steps per measurement")
    p.add_argument("--out", type=Path, help="JSON file (written atomically)")
    args = p.parse_args()
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out: folder {args.out.parent} does not exist")
    if args.model is not None and not Path(args.model).is_dir():
        p.error(f"--model: {args.model} is not a directory")

    import xlstm_metal  # noqa: F401  (binds MLX's BLAS before mlx is imported)
    import mlx.core as mx

    from xlstm_metal import benchmark as bm

    mx.set_default_device(mx.cpu)
    if args.model:
        from xlstm_metal.assets import for_this_device
        from xlstm_metal.loading import load_model

        model = for_this_device(load_model(args.model, dtype="float32"))
        name = args.model
    else:
        model = bm.random_model(bm.shape_config(args.shape), dtype="float32")
        name = args.shape
    model.fuse_projections()
    nbytes = decode_bytes(model)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = bm.environment()
    rows = []
    from tqdm import tqdm

    for rnd in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        load = os.getloadavg()[0]
        bw = {"numpy_1": numpy_bandwidth(1), f"numpy_{threads}": numpy_bandwidth(threads)}
        lk = likwid_bandwidth(threads)
        if lk is not None:
            bw[f"likwid_{threads}"] = lk
        read = max(v["read_gbs"] for v in bw.values())
        ours = bm.measure_decode(model, 1, tokens=args.tokens)
        limit_ms = nbytes["total"] / (read * 1e9) * 1e3
        rows.append({"round": rnd + 1, "loadavg_1m": load, "loadavg_1m_end": os.getloadavg()[0],
                     "bandwidth": bw, "read_gbs": read, "limit_ms": limit_ms, "limit_tok_s": 1e3 / limit_ms,
                     "ours_ms": ours["ms_per_step"], "ours_tok_s": ours["tok_s"],
                     "fraction_of_limit": limit_ms / ours["ms_per_step"],
                     "utc": time.strftime("%H:%M:%S", time.gmtime())})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"command": "python benchmarks/cpu_decode_limit.py " + " ".join(sys.argv[1:]), "model": name,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": env,
              "bytes_per_step": nbytes, "rounds": rows}
    if args.out is not None:
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)
    mb = nbytes["total"] / 1e6
    print(f"{name}: {mb:.1f} MB read per decode step ({nbytes['weights'] / 1e6:.1f} MB weights, "
          f"{nbytes['state'] / 1e6:.1f} MB state)")
    print("| round (UTC) | load | read GB/s (best method) | limit tok/s | ours tok/s | ours / limit |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        best = max(r["bandwidth"], key=lambda k: r["bandwidth"][k]["read_gbs"])
        print(f"| {r['round']} ({r['utc']}) | {r['loadavg_1m']:.1f} | {r['read_gbs']:.1f} ({best}) | "
              f"{r['limit_tok_s']:.1f} | {r['ours_tok_s']:.1f} | {100 * r['fraction_of_limit']:.0f}% |")
    if rows:
        print(f"median ours / limit: {100 * statistics.median(r['fraction_of_limit'] for r in rows):.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
