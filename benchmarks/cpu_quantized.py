"""Quantized weights on a CPU: decode and prefill through the C code against float32 (issue 11 item 7).

MLX's quantized matmul is slower than float32 on CPUs (``cpu_quantized_matmul.py``). Where an
xLSTM-Large model is what ``xlstm_metal/kernels/cpu`` computes, its decode step reads the packed
integers (a quarter to an eighth of float32's bytes) and its prefill runs OpenBLAS's GEMM on
dequantized tiles. For each round this measures every variant of the same weights in turns
(float32, then each quantization; ``fuse_projections()``): decode at batch 1 (greedy steps from a
zero state) and a prefill of ``--prefill`` tokens through the C code, and decode through the MLX
graph (``XLSTM_METAL_CPU_STEP=0``, switched in the same process) for reference. Without float32
among the variants a ``--shape`` model is drawn lazily and quantized layer by layer, so a 7B model
fits where its float32 weights (28 GB) would not:

    python benchmarks/cpu_quantized.py --shape 125m --variants float32,8,4,mixed-4-6 --rounds 3 \
        --out benchmarks/results/cpu_quantized_c_125m.json
    python benchmarks/cpu_quantized.py --shape 7b --variants 4 --rounds 1 --tokens 8 --graph-tokens 2 \
        --prefill 64 --out benchmarks/results/cpu_quantized_c_7b.json

Variants: ``float32``, a bit width (2-8, groups of ``--q-group-size``), a ``--q-recipe`` name
(``mixed-B-H``) or a 4-bit float format (``mxfp4``, ``nvfp4``: the C code reads them as affine 8-bit,
from a copy made when its plan is built; the plan's build time and the memory it adds are
recorded for every variant):

    python benchmarks/cpu_quantized.py --shape 7b --variants mxfp4 --rounds 1 --tokens 8 --graph-tokens 0 \
        --prefill 0 --out benchmarks/results/cpu_quantized_c_7b_mxfp4.json

Prints a Markdown table; the JSON keeps every measurement with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from cpu_decode_step import add_common_arguments, check_common_arguments


def _variant(spec: str) -> str:
    """``spec`` if it is float32, a bit width quantization takes or a mixed-B-H recipe it knows;
    else ValueError (before any model is built)."""
    from xlstm_metal.kernels.cpu.decode_step import FP4_MODES  # read as affine 8-bit, from a copy
    from xlstm_metal.quantization import BITS, QuantizationError, make_recipe

    if spec == "float32" or (spec.isdigit() and int(spec) in BITS) or spec in FP4_MODES:
        return spec
    if spec.startswith("mixed-"):
        try:
            make_recipe(spec)
            return spec
        except QuantizationError:
            pass
    raise ValueError(spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    p.add_argument("--variants", default="float32,8,4,mixed-4-6",
                   help="comma-separated: float32, bits (2-8), a mixed-B-H recipe, mxfp4 or nvfp4")
    p.add_argument("--q-group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--tokens", type=int, default=128, help="decode steps per measurement")
    p.add_argument("--graph-tokens", type=int, help="decode steps per MLX-graph measurement (default: --tokens; "
                   "0: none, for large shapes, where MLX's quantized matmul takes seconds per step)")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens per prefill measurement (0: none)")
    args = p.parse_args()
    try:
        variants = [_variant(v) for v in args.variants.split(",") if v]
    except ValueError as err:
        p.error(f"--variants: {err} is not float32, a bit width 2-8, mixed-B-H, mxfp4 or nvfp4")
    if not variants:
        p.error("--variants: give at least one")
    if args.graph_tokens is None:
        args.graph_tokens = args.tokens
    if args.tokens < 1 or args.prefill < 0 or args.graph_tokens < 0:
        p.error("--tokens must be >= 1, --graph-tokens and --prefill >= 0")
    check_common_arguments(p, args)

    import xlstm_metal  # noqa: F401  (binds MLX's BLAS before mlx is imported)

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from tqdm import tqdm

    from xlstm_metal import benchmark as bm
    from xlstm_metal.kernels.cpu import decode_step, prefill
    from xlstm_metal.quantization import QuantizationError, bits_per_weight, quantize_model

    mx.set_default_device(mx.cpu)
    if "float32" in variants or args.model is not None:
        base, name = bm.cpu_float32_model(args.shape, args.model)
        base.unfuse_projections()
        weights = tree_flatten(base.parameters())

        def make(spec: str):
            if spec == "float32":
                return base
            model = type(base)(base.config)
            model.load_weights(weights)
            return model
    else:  # quantized variants only: drawn lazily and quantized layer by layer (a 7B never in float32)
        config, name = bm.shape_config(args.shape), str(args.shape)

        def make(spec: str):
            return bm.random_model(config, lazy=True)
    models, plans = {}, {}
    for spec in variants:
        model = make(spec)
        if spec in decode_step.FP4_MODES:
            quantize_model(model, mode=spec)
        elif spec != "float32":
            try:
                quantize_model(model, recipe=spec if spec.startswith("mixed-") else None,
                               bits=None if spec.startswith("mixed-") else int(spec), group_size=args.q_group_size)
            except QuantizationError as err:
                print(f"error: {spec}: {err}", file=sys.stderr)
                return 2
        model.fuse_projections()
        mx.eval(model.parameters())
        # The C step's plan is built at its first call (a float format's affine copy made then).
        active, start = mx.get_active_memory(), time.perf_counter()
        for path in (decode_step, prefill):
            reason = path.unsupported_reason(model)
            if reason is not None:
                print(f"error: {spec}: the C code does not run this model: {reason}", file=sys.stderr)
                return 2
        plans[spec] = {"plan_s": round(time.perf_counter() - start, 3),
                       "plan_added_mb": (mx.get_active_memory() - active) / 1e6}
        models[spec] = model
    sizes = {spec: {"bits_per_weight": round(bits_per_weight(m), 3),
                    "weights_mb": sum(a.nbytes for _, a in tree_flatten(m.parameters())) / 1e6, **plans[spec]}
             for spec, m in models.items()}
    rows = []
    for rnd in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        for spec, model in models.items():
            found = {"round": rnd + 1, "variant": spec, "loadavg_1m": os.getloadavg()[0],
                     "utc": time.strftime("%H:%M:%S", time.gmtime())}
            found["decode_tok_s"] = bm.measure_decode(model, 1, tokens=args.tokens)["tok_s"]
            if args.graph_tokens:
                with decode_step.switched(False):
                    found["graph_decode_tok_s"] = bm.measure_decode(model, 1, tokens=args.graph_tokens)["tok_s"]
            if args.prefill:
                found["prefill_tok_s"] = bm.measure_prefill(model, args.prefill, 1, repeats=3)["tok_s"]
            rows.append(found)
            print(json.dumps(found), file=sys.stderr, flush=True)
    result = {"command": "python benchmarks/cpu_quantized.py " + " ".join(sys.argv[1:]), "model": name,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": bm.environment(),
              "tokens": args.tokens, "graph_tokens": args.graph_tokens, "prefill": args.prefill, "q_group_size": args.q_group_size,
              "sizes": sizes, "rows": rows}
    if args.out is not None:
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, separators=(",", ":")) + "\n")
        os.replace(tmp, args.out)
    for line in table(result):
        print(line)
    return 0


def table(result: dict) -> list[str]:
    """Markdown: per variant its size, the medians over rounds and the decode ratio to float32
    (each round's own float32 run, measured in the same turn)."""
    rows, sizes = result["rows"], result["sizes"]
    planned = all("plan_s" in size for size in sizes.values())  # recorded since session 44
    lines = ["| weights | bits per weight | MB | decode b1, C tok/s (median) | vs float32 | "
             "decode b1, MLX graph tok/s | prefill tok/s, C (median) |"
             + (" C plan built in s (MB it added) |" if planned else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if planned else "")]
    for spec, size in sizes.items():
        mine = [r for r in rows if r["variant"] == spec]
        ratios = [r["decode_tok_s"] / f["decode_tok_s"] for r in mine for f in rows
                  if f["variant"] == "float32" and f["round"] == r["round"]]
        prefill = statistics.median(r["prefill_tok_s"] for r in mine) if "prefill_tok_s" in mine[0] else None
        graph = statistics.median(r["graph_decode_tok_s"] for r in mine) if "graph_decode_tok_s" in mine[0] else None
        lines.append(
            f"| {spec} | {size['bits_per_weight']:.2f} | {size['weights_mb']:,.1f} | "
            f"{statistics.median(r['decode_tok_s'] for r in mine):,.1f} | "
            f"{f'{statistics.median(ratios):.2f}x' if ratios else 'n/a'} | "
            f"{'n/a' if graph is None else f'{graph:,.1f}'} | "
            f"{'n/a' if prefill is None else f'{prefill:,.1f}'} |"
            + (f" {size['plan_s']:,.1f} ({size['plan_added_mb']:,.0f}) |" if planned else ""))
    return lines


if __name__ == "__main__":
    sys.exit(main())
