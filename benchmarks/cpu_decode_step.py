"""The CPU decode step as one C call against the compiled MLX graph, in turns (issue 19 item 5).

``xlstm_metal/kernels/cpu/decode_step.py`` runs a whole decode step of 1 to 8 rows as one C call
where the model is what that code computes; ``XLSTM_METAL_CPU_STEP=0`` (here: switched in the
same process) runs the compiled MLX graph instead. For each batch size and round this measures
both with ``xlstm_metal.benchmark.measure_decode`` (greedy steps from a zero state, float32,
``fuse_projections()``), one after the other, so the machine's swings hit both alike:

    python benchmarks/cpu_decode_step.py --shape 125m --batches 1,2,4,8 --rounds 3 \
        --out benchmarks/results/cpu_decode_step_125m.json

Prints a Markdown table (batch, tok/s of each per round, median ratio); the JSON keeps every
measurement with the load average and the environment. The helpers below also serve
``benchmarks/cpu_prefill.py`` (the C prefill against the graph, the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """--shape, --model, --rounds and --out, as every C-against-graph benchmark takes them."""
    p.add_argument("--shape", default="125m", help="7b, 1.3b, 125m, a config.json or a checkpoint directory")
    p.add_argument("--model", help="a checkpoint directory to load (e.g. the packaged model) instead of --shape")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="JSON file (written atomically)")


def check_common_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 naming the problem, before any work."""
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out: folder {args.out.parent} does not exist")
    if args.model is not None and not Path(args.model).is_dir():
        p.error(f"--model: {args.model} is not a directory")


def in_turns(args: argparse.Namespace, path: Any, label: str, axis: str, points: list[int],
             measure: Callable[[Any, int], float], extra: dict) -> int:
    """The model of ``args`` in float32 on the CPU; for each round and point, ``measure(model,
    point)`` (tok/s) with the C path ``path`` (a module with ENABLED, switched() and
    unsupported_reason()) on, then off; the JSON (``extra`` added) and a Markdown table.
    Returns the exit code (2: the C path does not run this model)."""
    import mlx.core as mx

    from xlstm_metal import benchmark as bm

    mx.set_default_device(mx.cpu)
    model, name = bm.cpu_float32_model(args.shape, args.model)
    reason = path.unsupported_reason(model)
    if reason is not None:
        print(f"error: the {label} does not run this model: {reason}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    key = label.lower().replace(" ", "_")
    rows = []
    for rnd in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        for point in points:
            found = {"round": rnd + 1, axis: point, "loadavg_1m": os.getloadavg()[0],
                     "utc": time.strftime("%H:%M:%S", time.gmtime())}
            for column, enabled in ((key, True), ("graph", False)):
                with path.switched(enabled):
                    found[column] = measure(model, point)
            rows.append(found)
            print(json.dumps(found), file=sys.stderr, flush=True)
    script = Path(sys.argv[0]).name
    result = {"command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]), "model": name,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": bm.environment(),
              **extra, "rows": rows}
    if args.out is not None:
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, separators=(",", ":")) + "\n")
        os.replace(tmp, args.out)
    print(f"| {axis} | {label} tok/s per round | MLX graph tok/s per round | median {label} / graph |")
    print("| ---: | --- | --- | ---: |")
    for point in dict.fromkeys(points):
        mine = [r for r in rows if r[axis] == point]
        ratio = statistics.median(r[key] / r["graph"] for r in mine)
        ours = ", ".join(f"{r[key]:.1f}" for r in mine)
        graph = ", ".join(f"{r['graph']:.1f}" for r in mine)
        print(f"| {point:,} | {ours} | {graph} | {ratio:.2f}x |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    p.add_argument("--batches", default="1,2,4,8", help="comma-separated rows per step (1 to 8)")
    p.add_argument("--tokens", type=int, default=32, help="decode steps per measurement")
    args = p.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches: integers, comma-separated, got {args.batches!r}")
    if not batches or any(not 1 <= b <= 8 for b in batches):
        p.error("--batches: each between 1 and 8 (the C step's rows)")
    if args.tokens < 1:
        p.error("--tokens must be >= 1")
    check_common_arguments(p, args)

    import xlstm_metal  # noqa: F401  (binds MLX's BLAS before mlx is imported)

    from xlstm_metal import benchmark as bm
    from xlstm_metal.kernels.cpu import decode_step as cpu_decode_step

    return in_turns(args, cpu_decode_step, "C step", "batch", batches,
                    lambda model, batch: bm.measure_decode(model, batch, tokens=args.tokens)["tok_s"],
                    {"tokens": args.tokens})


if __name__ == "__main__":
    sys.exit(main())
