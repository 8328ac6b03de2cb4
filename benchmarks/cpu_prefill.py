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
import sys

from cpu_decode_step import add_common_arguments, check_common_arguments, in_turns


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    p.add_argument("--lengths", default="512", help="comma-separated prompt lengths (tokens per row)")
    p.add_argument("--batch", type=int, default=1, help="rows per prompt")
    p.add_argument("--repeats", type=int, default=3, help="prefills per measurement (the best counts)")
    args = p.parse_args()
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths: integers, comma-separated, got {args.lengths!r}")
    if any(n < 1 for n in lengths):
        p.error("--lengths: each at least 1")
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    check_common_arguments(p, args)

    import xlstm_metal  # noqa: F401  (binds MLX's BLAS before mlx is imported)

    from xlstm_metal import benchmark as bm
    from xlstm_metal.kernels.cpu import prefill as cpu_prefill

    return in_turns(args, cpu_prefill, "C prefill", "length", lengths,
                    lambda model, length: bm.measure_prefill(model, length, args.batch, repeats=args.repeats)["tok_s"],
                    {"batch": args.batch, "repeats": args.repeats})


if __name__ == "__main__":
    sys.exit(main())
