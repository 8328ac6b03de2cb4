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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.kernels.fast.quantized import (  # noqa: E402
    DECODE_MAX_ROWS,
    dequantized_matmul,
    fused_quantized_matmul,
    quantized_matmul,
)
from xlstm_metal.kernels.fast.step import cuda_available  # noqa: E402

# (name, N, K) of the 7B shape: E=4096, qk 2048, v 4096, FFN 10944, vocab 50304.
SHAPES = [("qkvo", 12288, 4096), ("out_proj", 4096, 4096), ("gate_up", 21888, 4096),
          ("proj_down", 4096, 10944), ("lm_head", 50304, 4096)]


class _NoFile:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _nbytes(arrays) -> int:
    return sum(a.nbytes for a in arrays)


def chain(args, out) -> None:
    """ms per step of a compiled chain of only the matrix products of a 7B decode step (32
    blocks of q|k|v|o, out_proj, gate|up, proj_down, then the LM head), evaluated step after
    step like the decode benchmark: bf16 weights and quantized ones through quantized_matmul."""
    env = bm.environment()
    blocks = args.chain
    shapes = [s for s in SHAPES if s[0] != "lm_head"]
    for bits in [None] + [int(b) for b in args.bits.split(",")]:
        layers = []
        for i in range(blocks):
            block = []
            for name, N, K in shapes:
                w = mx.random.normal((N, K), dtype=mx.bfloat16, key=mx.random.key(i * 10 + N)) * (K ** -0.5)
                block.append(w if bits is None else mx.quantize(w, group_size=args.group_size, bits=bits))
                mx.eval(block[-1])
            layers.append(block)
        head = mx.random.normal((50304, 4096), dtype=mx.bfloat16, key=mx.random.key(7)) * 4096 ** -0.5
        head = head if bits is None else mx.quantize(head, group_size=args.group_size, bits=bits)
        mx.eval(head)

        def mm(x, w):
            if bits is None:
                return x @ w.T
            return quantized_matmul(x, *w, group_size=args.group_size, bits=bits)

        def step(x):
            for qkvo, o, gu, down in layers:
                h = mm(x, qkvo)[..., :4096]
                h = mm(h, o)
                u = mm(h, gu)[..., :10944]
                x = mm(u, down) * 0.5 + x
            return x, mm(x, head)

        fn = mx.compile(step)
        for batch in [int(b) for b in args.chain_batches.split(",")]:
            x = mx.random.normal((batch, 4096), dtype=mx.bfloat16, key=mx.random.key(batch))
            for _ in range(3):
                x2, logits = fn(x)
                mx.eval(x2, logits)
            steps = 32
            mx.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                x, logits = fn(x)
                mx.async_eval(x, logits)
            mx.eval(x, logits)
            ms = 1000 * (time.perf_counter() - t0) / steps
            rec = {"kind": "chain", "bits": bits, "group_size": args.group_size if bits else None, "blocks": blocks,
                   "batch": batch, "ms_per_step": ms, **env}
            print(f"chain {blocks} blocks, {'bf16' if bits is None else f'q{bits}':>5}, batch {batch:3d}: {ms:.3f} ms/step", flush=True)
            if out:
                out.write(json.dumps(rec) + "\n")
                out.flush()
        del layers, head
        mx.clear_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,16,64,2048,16384")
    p.add_argument("--bits", default="4,8")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=8, help="different weights per evaluation")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--chain", type=int, default=0, metavar="BLOCKS",
                   help="instead: time a compiled chain of only the matmuls of this many 7B blocks")
    p.add_argument("--chain-batches", default="1,16,64")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.chain:
        with open(args.out, "a") if args.out else _NoFile() as out:
            chain(args, out if args.out else None)
        return
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
                nb = _nbytes([a for q in qs for a in q])
                if M <= DECODE_MAX_ROWS and cuda_available():
                    variants.append((f"fused_q{bits}", lambda qs=qs, bits=bits: [
                        fused_quantized_matmul(x, wq, s, b, group_size=args.group_size, bits=bits)
                        for wq, s, b in qs], nb, bits))
                if M >= 16:
                    variants.append((f"deq_q{bits}", lambda qs=qs, bits=bits: [
                        dequantized_matmul(x, wq, s, b, group_size=args.group_size, bits=bits)
                        for wq, s, b in qs], nb, bits))
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
