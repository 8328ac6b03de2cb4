"""The CPU prefill as one C call per piece against the MLX graph, in turns (issue 19 item 5).

``xlstm_metal/kernels/cpu/prefill.py`` runs a prompt through the whole model in C where the
model is what that code computes; ``XLSTM_METAL_CPU_PREFILL=0`` (here: switched in the same
process) runs the MLX graph instead. For each prompt length and round this measures both with
``xlstm_metal.benchmark.measure_prefill`` (random tokens, float32, ``fuse_projections()``, the
best of ``--repeats``), one after the other, so the machine's swings hit both alike:

    python benchmarks/cpu_prefill.py --shape 125m --lengths 512,2048 --rounds 3 \
        --out benchmarks/results/cpu_prefill_125m.json

Prints a Markdown table (length, tok/s of each per round, median ratio); the JSON keeps every
measurement with the load average and the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="125m", help="7b, 1.3b, 125m, a config.json or a checkpoint directory")
    p.add_argument("--model", help="a checkpoint directory to load (e.g. the packaged model) instead of --shape")
    p.add_argument("--lengths", default="512", help="comma-separated prompt lengths (tokens per row)")
    p.add_argument("--batch", type=int, default=1, help="rows per prompt")
    p.add_argument("--repeats", type=int, default=3, help="prefills per measurement (the best counts)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="JSON file (written atomically)")
    args = p.parse_args()
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths: integers, comma-separated, got {args.lengths!r}")
    if any(n < 1 for n in lengths):
        p.error("--lengths: each at least 1")
    if args.batch < 1 or args.repeats < 1 or args.rounds < 1:
        p.error("--batch, --repeats and --rounds must be >= 1")
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out: folder {args.out.parent} does not exist")
    if args.model is not None and not Path(args.model).is_dir():
        p.error(f"--model: {args.model} is not a directory")

    import xlstm_metal  # noqa: F401  (binds MLX's BLAS before mlx is imported)
    import mlx.core as mx

    from xlstm_metal import benchmark as bm
    from xlstm_metal.kernels.cpu import prefill as cpu_prefill

    mx.set_default_device(mx.cpu)
    model, name = bm.cpu_float32_model(args.shape, args.model)
    reason = cpu_prefill.unsupported_reason(model)
    if reason is not None:
        print(f"error: the C prefill does not run this model: {reason}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    rows = []
    for rnd in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        for length in lengths:
            found = {"round": rnd + 1, "length": length, "loadavg_1m": os.getloadavg()[0],
                     "utc": time.strftime("%H:%M:%S", time.gmtime())}
            for key, enabled in (("c_prefill", True), ("graph", False)):
                with cpu_prefill.switched(enabled):
                    found[key] = bm.measure_prefill(model, length, args.batch, repeats=args.repeats)["tok_s"]
            rows.append(found)
            print(json.dumps(found), file=sys.stderr, flush=True)
    result = {"command": "python benchmarks/cpu_prefill.py " + " ".join(sys.argv[1:]), "model": name,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": bm.environment(),
              "batch": args.batch, "repeats": args.repeats, "rows": rows}
    if args.out is not None:
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, separators=(",", ":")) + "\n")
        os.replace(tmp, args.out)
    print("| length | C prefill tok/s per round | MLX graph tok/s per round | median C prefill / graph |")
    print("| ---: | --- | --- | ---: |")
    for length in dict.fromkeys(lengths):
        mine = [r for r in rows if r["length"] == length]
        ratio = statistics.median(r["c_prefill"] / r["graph"] for r in mine)
        c_prefill = ", ".join(f"{r['c_prefill']:.1f}" for r in mine)
        graph = ", ".join(f"{r['graph']:.1f}" for r in mine)
        print(f"| {length:,} | {c_prefill} | {graph} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
