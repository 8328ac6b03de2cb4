"""The CPU decode step as one C call against the compiled MLX graph, in turns (issue 19 item 5).

``xlstm_metal/kernels/cpu/decode_step.py`` runs a whole decode step of 1 to 8 rows as one C call
where the model is what that code computes; ``XLSTM_METAL_CPU_STEP=0`` (here: switched in the
same process) runs the compiled MLX graph instead. For each batch size and round this measures
both with ``xlstm_metal.benchmark.measure_decode`` (greedy steps from a zero state, float32,
``fuse_projections()``), one after the other, so the machine's swings hit both alike:

    python benchmarks/cpu_decode_step.py --shape 125m --batches 1,2,4,8 --rounds 3 \
        --out benchmarks/results/cpu_decode_step_125m.json

Prints a Markdown table (batch, tok/s of each per round, median ratio); the JSON keeps every
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
    p.add_argument("--batches", default="1,2,4,8", help="comma-separated rows per step (1 to 8)")
    p.add_argument("--tokens", type=int, default=32, help="decode steps per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="JSON file (written atomically)")
    args = p.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches: integers, comma-separated, got {args.batches!r}")
    if not batches or any(not 1 <= b <= 8 for b in batches):
        p.error("--batches: each between 1 and 8 (the C step's rows)")
    if args.tokens < 1 or args.rounds < 1:
        p.error("--tokens and --rounds must be >= 1")
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
    reason = cpu_decode_step.unsupported_reason(model)
    if reason is not None:
        print(f"error: the C step does not run this model: {reason}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    rows = []
    for rnd in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        for batch in batches:
            found = {"round": rnd + 1, "batch": batch, "loadavg_1m": os.getloadavg()[0],
                     "utc": time.strftime("%H:%M:%S", time.gmtime())}
            for key, enabled in (("c_step", True), ("graph", False)):
                with cpu_decode_step.switched(enabled):
                    found[key] = bm.measure_decode(model, batch, tokens=args.tokens)["tok_s"]
            rows.append(found)
            print(json.dumps(found), file=sys.stderr, flush=True)
    result = {"command": "python benchmarks/cpu_decode_step.py " + " ".join(sys.argv[1:]), "model": name,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": bm.environment(),
              "tokens": args.tokens, "rows": rows}
    if args.out is not None:
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, separators=(",", ":")) + "\n")
        os.replace(tmp, args.out)
    print("| batch | C step tok/s per round | MLX graph tok/s per round | median C step / graph |")
    print("| ---: | --- | --- | ---: |")
    for batch in batches:
        mine = [r for r in rows if r["batch"] == batch]
        ratio = statistics.median(r["c_step"] / r["graph"] for r in mine)
        c_step = ", ".join(f"{r['c_step']:.1f}" for r in mine)
        graph = ", ".join(f"{r['graph']:.1f}" for r in mine)
        print(f"| {batch} | {c_step} | {graph} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
