"""What publishing a job's status (and running the memory watchdog) costs a decode.

Two measurements on the packaged model (or --model):

1. Direct: decode tokens/s with ``runner.stream`` alone vs. inside ``job_status`` with
   ``track_generation`` (publisher thread every second, watchdog sampling every 250 ms),
   alternating, median of --repeats runs each. On a busy machine this difference is noisy.
2. Accounted: the hook's cost per token (``update`` + ``check`` + the generator layer, timed
   over 200,000 calls) times the decode rate, plus the publisher thread's CPU time per second
   of wall time (its own ``time.thread_time``, reported in each record). This bound holds
   whatever the machine's load.

    PYTHONPATH=. python benchmarks/monitor_overhead.py --tokens 400 --repeats 5 \
        --out benchmarks/results/monitor_overhead.json && python benchmarks/report.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import timeit

import xlstm_metal  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
from xlstm_metal.generation import DEFAULT_MODEL_DIR, xLSTMRunner
from xlstm_metal.monitor import job_status
from xlstm_metal.monitor.job import JobStatus
from xlstm_metal.monitor.watchdog import WatchdogConfig


def decode_rate(runner, tokens: int, tracked: bool) -> tuple[float, dict | None]:
    """Decode tokens/s of one greedy generation (the last chunk's own rate)."""
    if not tracked:
        last = None
        for last in runner.stream("def main():", max_tokens=tokens):
            pass
        return last.generation_tps, None
    with job_status("bench", model="overhead") as job:
        t0 = time.perf_counter()
        last = None
        for last in job.track_generation(runner.stream("def main():", max_tokens=tokens), tokens):
            pass
        wall = time.perf_counter() - t0
        job.publish()
        record = job.record()
    return last.generation_tps, {"wall_s": wall, "publisher_cpu_s": record["publisher_cpu_s"],
                                 "publishes": record["publishes"], "samples": record["memory"]["samples"]}


class _Chunk:
    generation_tokens = 1
    prompt_tps = 100.0
    generation_tps = 100.0


def hook_cost_us(n: int = 200_000) -> float:
    """Microseconds per token of track_generation (update + check + generator layer)."""
    config = WatchdogConfig(10**15, 2 * 10**15, 3 * 10**15, poll_s=3600)
    with tempfile.TemporaryDirectory() as tmp:
        job = JobStatus("bench", "hook", watchdog=config, interval=3600, directory=__import__("pathlib").Path(tmp))
        chunks = [_Chunk()] * n
        plain = timeit.timeit(lambda: sum(1 for _ in iter(chunks)), number=1)
        tracked = timeit.timeit(lambda: sum(1 for _ in job.track_generation(iter(chunks), n)), number=1)
        if job.watchdog is not None:
            job.watchdog.close()
    return (tracked - plain) / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="also write the result here (benchmarks/results/monitor_overhead.json feeds "
                                 "BENCHMARKS.md through report.py)")
    args = p.parse_args()
    os.environ.setdefault("XLSTM_RUNTIME_DIR", tempfile.mkdtemp(prefix="xlstm-overhead-"))
    runner = xLSTMRunner(args.model)
    runner.model.fuse_projections()
    decode_rate(runner, 32, False)  # compile
    plain, tracked, threads = [], [], []
    for _ in range(args.repeats):
        plain.append(decode_rate(runner, args.tokens, False)[0])
        rate, info = decode_rate(runner, args.tokens, True)
        tracked.append(rate)
        threads.append(info)
    hook_us = hook_cost_us()
    plain_m, tracked_m = statistics.median(plain), statistics.median(tracked)
    thread_frac = sum(t["publisher_cpu_s"] for t in threads) / sum(t["wall_s"] for t in threads)
    accounted = hook_us * 1e-6 * plain_m + thread_frac
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/monitor_overhead.py " + " ".join(sys.argv[1:]),
        "loadavg_1m": os.getloadavg()[0], "cpu_count": os.cpu_count(),
        "device": str(mx.default_device()), "mlx": mx.__version__, "model": args.model, "tokens": args.tokens,
        "repeats": args.repeats, "decode_tok_s_plain": plain_m, "decode_tok_s_tracked": tracked_m,
        "direct_overhead_pct": 100 * (plain_m - tracked_m) / plain_m, "hook_us_per_token": hook_us,
        "publisher_cpu_fraction": thread_frac, "accounted_overhead_pct": 100 * accounted,
        "runs_plain": plain, "runs_tracked": tracked,
    }
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, args.out)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"device {result['device']}, mlx {result['mlx']}, {args.tokens} tokens x {args.repeats} runs")
        print(f"decode tok/s: plain {plain_m:,.1f}, with status + watchdog {tracked_m:,.1f} "
              f"(direct difference {result['direct_overhead_pct']:+.2f}%; runs {[round(x) for x in plain]} vs "
              f"{[round(x) for x in tracked]})")
        print(f"hook {hook_us:.2f} us/token x {plain_m:,.0f} tok/s = {hook_us * plain_m / 1e4:.3f}% ; publisher "
              f"thread {100 * thread_frac:.3f}% of wall time -> accounted overhead {100 * accounted:.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
