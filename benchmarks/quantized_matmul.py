"""Quantized matrix products at xLSTM-7B layer shapes: bf16 matmul, MLX's quantized_matmul and
this project's quantized_matmul (xlstm_metal/kernels/fast/quantized.py), per shape and rows.

    python benchmarks/quantized_matmul.py --rows 1,4,16,64,2048,16384 --out $OUT/qmm.jsonl

For each weight shape [N, K] of a 7B block (fused q|k|v|o, out_proj, fused gate|up, proj_down;
the LM head) ``--layers`` different random weights are multiplied in one evaluation (so the
weights come from HBM, not from L2), median of ``--repeats``. Each record: shape, rows, bits,
group size, ms per layer, GB/s of weights read (decode: the figure that matters) and TFLOP/s,
and the error of each quantized product against x @ dequantize(w).T in float32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.kernels.fast.quantized import quantized_matmul  # noqa: E402

# (name, N, K) of the 7B shape: E=4096, qk 2048, v 4096, FFN 10944, vocab 50304.
SHAPES = [("qkvo", 12288, 4096), ("out_proj", 4096, 4096), ("gate_up", 21888, 4096),
          ("proj_down", 4096, 10944), ("lm_head", 50304, 4096)]


def _nbytes(arrays) -> int:
    return sum(a.nbytes for a in arrays)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,16,64,2048,16384")
    p.add_argument("--bits", default="4,8")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=8, help="different weights per evaluation")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    wanted = set(args.shapes.split(","))
    out = open(args.out, "w") if args.out else None
    env = bm.environment()
    print(f"{'shape':10} {'rows':>6} {'kind':>10} {'ms/layer':>9} {'GB/s':>7} {'TFLOP/s':>8} {'rel err':>8}")
    for name, N, K in SHAPES:
        if name not in wanted:
            continue
        L = args.layers
        weights = [mx.random.normal((N, K), dtype=mx.bfloat16, key=mx.random.key(N + K + i)) * (K ** -0.5)
                   for i in range(L)]
        mx.eval(weights)
        quantized = {}
        for bits in bits_list:
            quantized[bits] = [mx.quantize(w, group_size=args.group_size, bits=bits) for w in weights]
            mx.eval(quantized[bits])
        for M in rows:
            x = mx.random.normal((M, K), dtype=mx.bfloat16, key=mx.random.key(10_000 + M))
            mx.eval(x)
            variants = [("bf16", lambda: [x @ w.T for w in weights], _nbytes(weights), None)]
            for bits in bits_list:
                qs = quantized[bits]
                variants.append((f"mlx_q{bits}", lambda qs=qs, bits=bits: [
                    mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=args.group_size, bits=bits)
                    for wq, s, b in qs], _nbytes([a for q in qs for a in q]), bits))
                variants.append((f"fast_q{bits}", lambda qs=qs, bits=bits: [
                    quantized_matmul(x, wq, s, b, group_size=args.group_size, bits=bits)
                    for wq, s, b in qs], _nbytes([a for q in qs for a in q]), bits))
            for kind, fn, nbytes, bits in variants:
                seconds = bm.median_seconds(fn, args.repeats)
                err = None
                if bits is not None:
                    wq, s, b = quantized[bits][0]
                    ref = x.astype(mx.float32) @ mx.dequantize(wq, s, b, group_size=args.group_size, bits=bits).astype(mx.float32).T
                    got = fn()[0].astype(mx.float32)
                    err = (mx.linalg.norm(got - ref) / mx.linalg.norm(ref)).item()
                rec = {"shape": name, "N": N, "K": K, "rows": M, "kind": kind, "bits": bits,
                       "group_size": args.group_size if bits else None, "ms_per_layer": 1000 * seconds / L,
                       "weight_gb_s": nbytes / seconds / 1e9, "tflop_s": 2 * M * N * K * L / seconds / 1e12,
                       "rel_err": err, **env}
                e = f"{err:.1e}" if err is not None else "-"
                print(f"{name:10} {M:6d} {kind:>10} {rec['ms_per_layer']:9.3f} {rec['weight_gb_s']:7.0f} "
                      f"{rec['tflop_s']:8.1f} {e:>8}", flush=True)
                if out:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
        del weights, quantized
        mx.clear_cache()
    if out:
        out.close()


if __name__ == "__main__":
    main()
