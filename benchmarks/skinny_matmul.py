"""The skinny decode product (xlstm_metal/kernels/fast/skinny.py) against MLX's matmul, per layer
of a model shape (7B by default), on a CUDA GPU.

    python benchmarks/skinny_matmul.py --shape 7b --rows 2,16,64 --out $OUT/skinny_matmul.jsonl

For each product of a block (fused q|k|v|o|i|f, out_proj, fused gate|up, proj_down) it times all
blocks' weights in one evaluation (as a decode step reads them: nothing stays in L2), and the LM
head alone; per row count: MLX's ``x @ W.T`` and the kernel with its default launch shape and
the ``--configs`` given. Records (one JSON object per line): ms per weight, GB/s of weights read,
and the kernel's largest error relative to the float32 product of the same bf16 operands
(``rel_err``; MLX's own in ``rel_err`` of the ``mlx`` rows).
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
from xlstm_metal.kernels.fast.skinny import (  # noqa: E402
    SkinnyConfig,
    default_config,
    k_splits,
    skinny_matmul,
    skinny_supported,
)


def parse_config(text: str) -> SkinnyConfig:
    """``tm,w,u,stages``, e.g. ``2,4,2,4``."""
    tm, w, u, stages = (int(v) for v in text.split(","))
    return SkinnyConfig(tm=tm, w=w, u=u, stages=stages)


def layer_shapes(config) -> dict[str, tuple[int, int, int]]:
    """(N, K, count) of each product of a decode step."""
    E, F, NH = config.embedding_dim, config.ffn_dim, config.num_heads
    qk, v = config.qk_dim, config.v_dim
    L = config.num_blocks
    return {"q|k|v|o|i|f": (2 * qk + 2 * v + 2 * NH, E, L), "out_proj": (E, v, L), "gate|up": (2 * F, E, L),
            "proj_down": (E, F, L), "lm_head": (config.vocab_size, E, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b")
    p.add_argument("--rows", default="2,16,64")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--configs", default="", help="extra launch shapes, 'tm,w,u,stages' separated by ';'")
    p.add_argument("--kinds", default="", help="products to time (default: all)")
    p.add_argument("--no-split-too", action="store_true",
                   help="where the default launch splits k across blocks, time it unsplit too")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    config = bm.shape_config(args.shape)
    dtype = getattr(mx, args.dtype)
    extra = [parse_config(c) for c in args.configs.split(";") if c.strip()]
    shapes = layer_shapes(config)
    if args.kinds:
        shapes = {k: shapes[k] for k in args.kinds.split(",")}
    out = open(args.out, "w") if args.out else None

    def emit(record: dict) -> None:
        line = json.dumps({"shape": args.shape, "dtype": args.dtype, **record})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    for kind, (N, K, count) in shapes.items():
        weights = [mx.random.normal((N, K), key=mx.random.key(i), dtype=dtype) * (K ** -0.5) for i in range(count)]
        mx.eval(weights)
        nbytes = sum(w.nbytes for w in weights)
        for M in map(int, args.rows.split(",")):
            x = mx.random.normal((M, K), key=mx.random.key(1000 + M), dtype=dtype)
            ref = x.astype(mx.float32) @ weights[0].astype(mx.float32).T
            scale = mx.max(mx.abs(ref))

            def rel_err(y) -> float:
                return (mx.max(mx.abs(y.astype(mx.float32) - ref)) / scale).item()

            ms = 1000 * bm.median_seconds(lambda: [x @ w.T for w in weights], args.repeats) / count
            emit({"kind": kind, "rows": M, "N": N, "K": K, "method": "mlx", "ms": ms,
                  "gb_s": nbytes / count / (ms / 1000) / 1e9, "rel_err": rel_err(x @ weights[0].T)})
            if not skinny_supported(x, weights[0]):
                continue
            default = default_config(M, N)
            runs = [(default, None)] + [(c, None) for c in extra if c != default]
            if args.no_split_too and k_splits(N, K, default) > 1:
                runs.append((default, 1))
            for i, (cfg, splits) in enumerate(runs):
                ms = 1000 * bm.median_seconds(lambda: [skinny_matmul(x, w, cfg, splits) for w in weights],
                                              args.repeats) / count
                emit({"kind": kind, "rows": M, "N": N, "K": K, "method": "skinny" + ("" if i else " (default)"),
                      "config": [cfg.tm, cfg.w, cfg.u, cfg.stages],
                      "k_splits": k_splits(N, K, cfg, splits), "ms": ms,
                      "gb_s": nbytes / count / (ms / 1000) / 1e9,
                      "rel_err": rel_err(skinny_matmul(x, weights[0], cfg, splits))})
        del weights
        mx.clear_cache()


if __name__ == "__main__":
    main()
