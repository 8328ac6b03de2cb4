"""One layer's ``chunkwise_fused`` backward on CUDA, kernel by kernel, beside the MLX-ops backward.

Times (median of --repeats, synchronised) at a model shape's head sizes: the forward; forward +
backward with the CUDA backward kernels (float32 operands as three bf16 terms, as two, and as one:
the operand rounded to bf16) and
with the MLX-ops backward (``mx.compile`` of ``value_and_grad``, as ``train_side_by_side.py
--profile-kernels``); and each part of the kernels' backward alone on precomputed inputs (the
states recompute, ``y``, ``rows``, ``reverse``, ``dqdk``, ``dv``). With --check, the largest
difference of the kernels' gradients from the ops backward's, relative to the largest gradient
(``MLX_ENABLE_TF32=0``: the ops backward in float32, not TF32).
One JSON record per line to --out (appended) and stdout.

    python benchmarks/mlstm_backward.py --shape 1.3b --batch 4 --seq-len 2048 --out results/x.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (BLAS before mlx)
import mlx.core as mx  # noqa: E402

from xlstm_metal.benchmark import environment, median_seconds, shape_config  # noqa: E402
from xlstm_metal.kernels.fast import chunkwise_bwd  # noqa: E402
from xlstm_metal.kernels.fast.chunkwise_fused import (  # noqa: E402
    chunk_gates, chunk_states, fused_chunkwise_supported, mlstm_chunkwise_fused)


#: --paths -> XLSTM_METAL_MLSTM_BWD_TERMS (bf16 terms per float32 operand of the kernels' products)
_TERMS = {"kernels": "3", "kernels_2terms": "2", "kernels_1term": "1"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1.3b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--paths", default="kernels,kernels_2terms,ops",
                   help="backwards to time: kernels (3-term splits), kernels_2terms, kernels_1term, ops (MLX ops)")
    p.add_argument("--parts-terms", default="3",
                   help="comma-separated bf16 terms per float32 operand to time the parts with (3, 2, 1)")
    p.add_argument("--check", action="store_true",
                   help="also compare the kernels' gradients with the ops backward's (needs ops in --paths)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    config = shape_config(args.shape)
    B, S, NH, L = args.batch, args.seq_len, config.num_heads, args.chunk_size
    dqk, dv = config.qk_head_dim, config.v_head_dim
    mx.random.seed(0)
    q, k = (mx.random.normal((B, NH, S, dqk)).astype(mx.bfloat16) for _ in range(2))
    v = mx.random.normal((B, NH, S, dv)).astype(mx.bfloat16)
    i = mx.random.normal((B, NH, S)) - 5
    f = mx.random.normal((B, NH, S)) + 3
    w = mx.random.normal((B, NH, S, dv))
    mx.eval(q, k, v, i, f, w)
    if not fused_chunkwise_supported(q, v, L):
        raise SystemExit("the fused kernels do not run here (needs MLX's CUDA backend and DQK, DV multiples of 64)")

    def emit(record):
        line = json.dumps({"shape": args.shape, "batch": B, "seq_len": S, "chunk_size": L, **record})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")

    emit({"kind": "env", **environment()})

    def loss(q, k, v, i, f):
        h, _ = mlstm_chunkwise_fused(q, k, v, i, f, None, chunk_size=L)
        return mx.sum(h.astype(mx.float32) * w)

    record = {"kind": "layer"}
    fwd = mx.compile(lambda q, k, v, i, f: mlstm_chunkwise_fused(q, k, v, i, f, None, chunk_size=L)[0])
    record["forward_ms"] = 1000 * median_seconds(lambda: fwd(q, k, v, i, f), args.repeats)
    grads = {}
    paths = [p_ for p_ in args.paths.split(",") if p_]
    if args.check and "ops" not in paths:
        raise SystemExit("--check compares with the ops backward: add ops to --paths")
    for path in paths:
        os.environ["XLSTM_METAL_FUSED_MLSTM_BWD"] = "0" if path == "ops" else "1"
        os.environ["XLSTM_METAL_MLSTM_BWD_TERMS"] = _TERMS.get(path, "3")
        both = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
        mx.reset_peak_memory()
        record[f"forward+backward_{path}_ms"] = 1000 * median_seconds(lambda: both(q, k, v, i, f), args.repeats)
        record[f"forward+backward_{path}_peak_gb"] = mx.get_peak_memory() / 1e9
        if args.check:
            grads[path] = both(q, k, v, i, f)[1]
    os.environ["XLSTM_METAL_FUSED_MLSTM_BWD"] = "1"
    os.environ["XLSTM_METAL_MLSTM_BWD_TERMS"] = "3"
    if args.check:
        def rel(a, b):
            a, b = a.astype(mx.float32), b.astype(mx.float32)
            return (mx.max(mx.abs(a - b)) / mx.max(mx.abs(b))).item()

        for path in (p_ for p_ in paths if p_ != "ops"):
            record[f"{path}_vs_ops"] = {name: rel(a, b) for name, a, b in zip("q k v i f".split(), grads[path],
                                                                              grads["ops"])}
    emit(record)

    # Each part alone, on inputs computed once.
    dh = mx.random.normal((B, NH, S, dv)).astype(mx.bfloat16)
    bcum, igc = chunk_gates(i, f, L)
    C0, n0, m0 = mx.zeros((B, NH, dqk, dv)), mx.zeros((B, NH, dqk)), mx.zeros((B, NH, 1))
    C_enter, n_enter, m_enter, (_, _, m_fin) = chunk_states(k, v, bcum, igc, (C0, n0, m0))
    Y, qyp = chunkwise_bwd.y(q, k, dh, bcum, igc, C_enter)
    rowst, dP, St = chunkwise_bwd.rows(q, k, v, dh, bcum, igc, qyp, n_enter, m_enter, 1e-6)
    dC_out, dn_out, _, _ = chunkwise_bwd.reverse(q, dh, bcum, rowst, m_enter, m_fin, C0, n0)
    mx.eval(C_enter, n_enter, m_enter, m_fin, rowst, dP, St, Y, qyp, dC_out, dn_out)
    parts = {
        "gates": lambda: chunk_gates(i, f, L),
        "states (recompute)": lambda: chunk_states(k, v, bcum, igc, (C0, n0, m0))[:3],
        "y": lambda: chunkwise_bwd.y(q, k, dh, bcum, igc, C_enter),
        "y (a block per chunk)": lambda: chunkwise_bwd.y(q, k, dh, bcum, igc, C_enter, split=False),
        "rows": lambda: chunkwise_bwd.rows(q, k, v, dh, bcum, igc, qyp, n_enter, m_enter, 1e-6),
        "reverse": lambda: chunkwise_bwd.reverse(q, dh, bcum, rowst, m_enter, m_fin, C0, n0),
        "dqdk": lambda: chunkwise_bwd.dqdk(q, k, v, dh, bcum, igc, rowst, dP, Y, n_enter, m_enter, m_fin, dC_out,
                                           dn_out),
        "dv": lambda: chunkwise_bwd.dv(q, k, dh, bcum, igc, rowst, St, m_enter, m_fin, dC_out),
        "dqdk (a block per chunk)": lambda: chunkwise_bwd.dqdk(q, k, v, dh, bcum, igc, rowst, dP, Y, n_enter, m_enter,
                                                               m_fin, dC_out, dn_out, split=False),
        "dv (a block per chunk)": lambda: chunkwise_bwd.dv(q, k, dh, bcum, igc, rowst, St, m_enter, m_fin, dC_out,
                                                           split=False),
    }
    for terms in (t for t in args.parts_terms.split(",") if t):
        os.environ["XLSTM_METAL_MLSTM_BWD_TERMS"] = terms
        emit({"kind": "parts", "terms": int(terms),
              **{f"{name}_ms": 1000 * median_seconds(fn, args.repeats) for name, fn in parts.items()}})
    os.environ["XLSTM_METAL_MLSTM_BWD_TERMS"] = "3"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
