"""Decode and prefill on the CPU against this machine's limits (issue 19 item 5).

**Decode.** A decode step at batch 1 reads every weight once (the embedding table: one row, unless the LM
head is tied to it) plus the recurrent state, so it cannot take less than
``bytes read per step / read bandwidth``. This script measures both, in turns, several rounds:

- read bandwidth over arrays far larger than the caches (1 GiB): ``likwid-bench -t
  load_avx512`` (or ``load_avx``) with one thread per core where likwid is installed (Debian
  package ``likwid``), numpy streaming reads (``sum`` over one slice per thread, threads in
  parallel) and copies, and a one-row product with a 1 GiB weight through MLX (``gemv``: the
  decode's own product kernel, which reads faster than numpy's ``sum`` here), each before and
  after the decode; the limit uses the highest read figure of the round (the strictest limit);
- our decode at batch 1 (``xlstm_metal.benchmark.measure_decode``: the greedy step as one C call,
  ``xlstm_metal/kernels/cpu/decode_step.py``, ``fuse_projections()``, float32) of a random model of
  the named shape, or of a checkpoint directory (``--model``, e.g. the packaged model, dequantized
  on the CPU as ``generate`` runs it); and beside it the same step through the compiled MLX graph
  (``graph_ms``: ``XLSTM_METAL_CPU_STEP=0``);
- **paired** (``--pairs``, per round): single decode steps, each beside a read of the step's bytes
  through the one-row product, in turns (:func:`paired_reads`): ours against the read rate of the
  same seconds. This machine's read rate jumps between ~33 and ~52 GB/s from one second to the
  next, so the round's best burst (above) is often from another phase than the decode's; the
  pairs' median is the share of the limit the step reaches where it runs.

**Prefill** (``--prefill N``) is compute-bound: 2 FLOP per weight per token in the blocks' matrix
products (the LM head runs on the last position only; the mLSTM kernel adds ~3% at the 125m
shape, not counted). Its ceiling is ``peak FLOP/s / FLOP per token``, with the peak measured as
the best of ``likwid-bench -t peakflops_sp_avx512_fma`` (single precision FMAs from L1, one thread
per core), a 2,048^3 float32 GEMM through MLX's OpenBLAS, and that GEMM's rate per second of CPU
time times the core count (what the cores would do if other jobs left them free); where the CPU has
AMX (which the C prefill's products run on, each float32 value split into three bf16 parts: six
tile products per float32 product), also a sixth of the tiles' own bf16 rate (back-to-back tile
products on every core) and the same 2,048^3 product through them (``xl_amx_sgemm``). Our prefill
of N tokens is measured beside it.

    python benchmarks/cpu_limits.py --shape 125m --rounds 3 --prefill 512 --out benchmarks/results/cpu_limits.json

Prints Markdown tables (round, load average, bandwidth / peak, limit, ours, % of limit, the pairs'
medians).
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


def read_buffer(nbytes: int, K: int = 4096) -> tuple:
    """(weight [nbytes / (4 K), K] float32, x [1, K]), evaluated and read once: a one-row product
    ``x @ weight.T`` through MLX streams the weight, i.e. the kernel a decode step's products run
    (the BLAS forwarder's row kernel on all its threads where it is active, else OpenBLAS's
    sgemv). Made once per run: drawing a GiB of normals takes seconds."""
    import mlx.core as mx

    w = mx.random.normal((max(1, nbytes // (4 * K)), K))
    x = mx.random.normal((1, K))
    mx.eval(w, x, x @ w.T)
    return w, x


def gemv_bandwidth(buffer: tuple, repeats: int = 5) -> dict[str, float]:
    """Best read GB/s of the one-row product over ``buffer`` (:func:`read_buffer`, 1 GiB here): a
    read rate the machine demonstrably reaches."""
    import mlx.core as mx

    w, x = buffer
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(x @ w.T)
        best = min(best, time.perf_counter() - t)
    return {"read_gbs": w.nbytes / best / 1e9}


def paired_reads(model, nbytes: int, pairs: int, buffer: tuple) -> dict:
    """``pairs`` decode steps at batch 1, each beside a streaming read of the step's bytes
    (``nbytes``; ``buffer`` from :func:`read_buffer` of about that size) through a one-row MLX
    product (the row kernel, which reads as fast as a plain
    two-thread sum and likwid's ``load_avx512`` in the same seconds here), in turns (the order
    alternates): the share of the read limit *at the moment the step ran*. This machine's read
    rate jumps between ~33 and ~52 GB/s from one second to the next (other tenants), so a limit
    taken from the round's best burst compares a step of one phase with a read of another.

    Returns the per-pair ratios (stream time scaled to ``nbytes`` / step time), their median
    and quartiles, and the medians of the step's ms and the stream's GB/s."""
    import mlx.core as mx

    from xlstm_metal import benchmark as bm

    w, x = buffer
    step = bm.make_decode_step(model)
    tok, state = bm.start_decode(model, step, mx.zeros((1, 1), mx.int32), 2)
    step_s, stream_s = [], []
    for i in range(pairs):
        for part in ((0, 1) if i % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            if part == 0:
                tok, state = step(tok, state)
                mx.eval(tok, state)
                step_s.append(time.perf_counter() - t)
            else:
                mx.eval(x @ w.T)
                stream_s.append(time.perf_counter() - t)
    ratios = [b * nbytes / w.nbytes / a for a, b in zip(step_s, stream_s)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"pairs": pairs, "ratio_median": statistics.median(ratios), "ratio_quartiles": quartiles,
            "step_ms_median": 1e3 * statistics.median(step_s),
            "stream_gbs_median": statistics.median(w.nbytes / b / 1e9 for b in stream_s),
            "ratios": [round(r, 4) for r in ratios]}


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


def likwid_peak(threads: int) -> float | None:
    """likwid-bench's single-precision FMA peak kernel (GFLOP/s), or None without likwid."""
    exe = shutil.which("likwid-bench")
    if exe is None:
        return None
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kernel = "peakflops_sp_avx512_fma" if "avx512f" in flags else "peakflops_sp_avx_fma"
    out = subprocess.run([exe, "-t", kernel, "-w", f"N:32kB:{threads}"], capture_output=True, text=True,
                         timeout=300)
    match = re.search(r"MFlops/s:\s+([\d.]+)", out.stdout)
    return float(match.group(1)) / 1e3 if out.returncode == 0 and match else None


def gemm_gflops(n: int = 2048, repeats: int = 3) -> tuple[float, float]:
    """Best float32 n^3 GEMM rate through MLX (OpenBLAS on Linux): (GFLOP per second of wall
    time, GFLOP per second of this process's CPU time). The second is what one core does while
    it runs, whatever else holds the machine; times the core count it bounds the machine."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    wall = cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        mx.eval(a @ b)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / cpu / 1e9


def amx_gflops(threads: int, n: int = 2048, repeats: int = 3) -> dict[str, float]:
    """Where the C library runs products on AMX tiles: a sixth of the tiles' bf16 GFLOP/s on
    ``threads`` threads (a float32 product takes six tile products), and the float32 GFLOP/s of
    an n^3 product through them (best of ``repeats``); {} elsewhere."""
    from xlstm_metal.kernels.cpu import decode_step

    lib = decode_step.library()
    if lib is None or not lib.xl_amx_available():
        return {}
    peak = max(lib.xl_amx_peak_gflops(threads, 2_000_000) for _ in range(repeats)) / 6
    rng = np.random.default_rng(0)
    a, w = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    c = np.empty((n, n), np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        if lib.xl_amx_sgemm(n, n, n, *(decode_step._pointer(x) for x in (a, w, c)), threads) != 0:
            return {f"amx_tiles_peak_div6_x{threads}": peak}
        best = min(best, time.perf_counter() - t)
    return {f"amx_tiles_peak_div6_x{threads}": peak, f"amx_sgemm_{n}": 2 * n**3 / best / 1e9}


def prefill_flops_per_token(model) -> int:
    """2 FLOP per weight of the blocks' matrix products (what prefill multiplies every token by)."""
    from mlx.utils import tree_flatten

    return 2 * sum(p.size for name, p in tree_flatten(model.parameters())
                   if name.startswith("backbone.blocks.") and name.endswith(".weight") and p.ndim == 2)


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
    p.add_argument("--pairs", type=int, default=24,
                   help="decode steps each timed beside a read of the same bytes, per round (0: none)")
    p.add_argument("--prefill", type=int, default=0, help="also measure prefill of this many tokens against the compute ceiling")
    p.add_argument("--out", type=Path, help="JSON file (written atomically)")
    args = p.parse_args()
    if args.rounds < 1 or args.tokens < 1 or args.pairs < 0 or args.prefill < 0:
        p.error("--rounds and --tokens must be >= 1, --pairs and --prefill >= 0")
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out: folder {args.out.parent} does not exist")
    if args.model is not None and not Path(args.model).is_dir():
        p.error(f"--model: {args.model} is not a directory")

    import xlstm_metal  # noqa: F401  (binds MLX's BLAS before mlx is imported)
    import mlx.core as mx

    from xlstm_metal import benchmark as bm
    from xlstm_metal.kernels.cpu import decode_step as cpu_decode_step

    mx.set_default_device(mx.cpu)
    model, name = bm.cpu_float32_model(args.shape, args.model)
    enabled = cpu_decode_step.unsupported_reason(model) is None
    nbytes = decode_bytes(model)
    flops = prefill_flops_per_token(model)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = bm.environment()
    rows = []
    gemv_buffer = read_buffer(GIB)
    paired_buffer = read_buffer(nbytes["total"]) if args.pairs else None
    from tqdm import tqdm

    for rnd in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        load = os.getloadavg()[0]
        # Bandwidth before and after the decode (the best of each method over both): other jobs
        # on a shared machine change it from second to second.
        bw: dict[str, dict] = {}

        def measure_bandwidth() -> None:
            found = {"numpy_1": numpy_bandwidth(1), f"numpy_{threads}": numpy_bandwidth(threads),
                     "gemv": gemv_bandwidth(gemv_buffer)}
            lk = likwid_bandwidth(threads)
            if lk is not None:
                found[f"likwid_{threads}"] = lk
            for key, value in found.items():
                if key not in bw or value["read_gbs"] > bw[key]["read_gbs"]:
                    bw[key] = value

        measure_bandwidth()
        ours = bm.measure_decode(model, 1, tokens=args.tokens)
        with cpu_decode_step.switched(False):  # the same step through the MLX graph, for comparison
            graph = bm.measure_decode(model, 1, tokens=args.tokens)
        measure_bandwidth()
        read = max(v["read_gbs"] for v in bw.values())
        limit_ms = nbytes["total"] / (read * 1e9) * 1e3
        row = {"round": rnd + 1, "loadavg_1m": load,
               "bandwidth": bw, "read_gbs": read, "limit_ms": limit_ms, "limit_tok_s": 1e3 / limit_ms,
               "ours_ms": ours["ms_per_step"], "ours_tok_s": ours["tok_s"], "cpu_step": enabled,
               "graph_ms": graph["ms_per_step"], "graph_tok_s": graph["tok_s"],
               "fraction_of_limit": limit_ms / ours["ms_per_step"],
               "utc": time.strftime("%H:%M:%S", time.gmtime())}
        if args.pairs:
            row["paired"] = paired_reads(model, nbytes["total"], args.pairs, paired_buffer)
        if args.prefill:
            wall_rate, cpu_rate = gemm_gflops()
            peaks = {"gemm_2048": wall_rate, f"gemm_2048_per_cpu_s_x{threads}": cpu_rate * threads}
            lk_peak = likwid_peak(threads)
            if lk_peak is not None:
                peaks[f"likwid_{threads}"] = lk_peak
            peaks.update(amx_gflops(threads))
            pre = bm.measure_prefill(model, args.prefill, repeats=2)
            peak = max(peaks.values())
            row["prefill"] = {"peaks_gflops": peaks, "peak_gflops": peak, "flops_per_token": flops,
                              "ceiling_tok_s": peak * 1e9 / flops, "ours_tok_s": pre["tok_s"],
                              "ours_gflops": pre["tok_s"] * flops / 1e9}
        row["loadavg_1m_end"] = os.getloadavg()[0]
        rows.append(row)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"command": "python benchmarks/cpu_limits.py " + " ".join(sys.argv[1:]), "model": name,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": env,
              "bytes_per_step": nbytes, "prefill_flops_per_token": flops, "rounds": rows}
    if args.out is not None:
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)
    mb = nbytes["total"] / 1e6
    print(f"{name}: {mb:.1f} MB read per decode step ({nbytes['weights'] / 1e6:.1f} MB weights, "
          f"{nbytes['state'] / 1e6:.1f} MB state)")
    print("| round (UTC) | load | read GB/s (best method) | limit tok/s | ours tok/s | ours / limit | MLX graph tok/s "
          "| paired: step ms / read GB/s / ours / limit |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        best = max(r["bandwidth"], key=lambda k: r["bandwidth"][k]["read_gbs"])
        pr = r.get("paired")
        paired = (f"{pr['step_ms_median']:.1f} / {pr['stream_gbs_median']:.1f} / {100 * pr['ratio_median']:.0f}%"
                  if pr else "-")
        print(f"| {r['round']} ({r['utc']}) | {r['loadavg_1m']:.1f} | {r['read_gbs']:.1f} ({best}) | "
              f"{r['limit_tok_s']:.1f} | {r['ours_tok_s']:.1f} | {100 * r['fraction_of_limit']:.0f}% | "
              f"{r['graph_tok_s']:.1f} | {paired} |")
    if rows:
        print(f"median ours / limit: {100 * statistics.median(r['fraction_of_limit'] for r in rows):.0f}%")
        ratios = [x for r in rows if "paired" in r for x in r["paired"]["ratios"]]
        if ratios:
            print(f"paired, median of all {len(ratios)} pairs: {100 * statistics.median(ratios):.0f}%")
    if args.prefill and rows:
        print(f"\nprefill {args.prefill} tokens: {flops / 1e6:.1f} MFLOP per token")
        print("| round | load | peak GFLOP/s (best method) | ceiling tok/s | ours tok/s | ours GFLOP/s |")
        print("| --- | ---: | --- | ---: | ---: | ---: |")
        for r in rows:
            pf = r["prefill"]
            best = max(pf["peaks_gflops"], key=pf["peaks_gflops"].get)
            print(f"| {r['round']} | {r['loadavg_1m']:.1f} | {pf['peak_gflops']:.1f} ({best}) | "
                  f"{pf['ceiling_tok_s']:.0f} | {pf['ours_tok_s']:.1f} | {pf['ours_gflops']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
