"""Where one block's prefill time goes, at one prompt length (7B shape by default).

Times each part of one mLSTM block alone (median of --repeats after a warm-up), for each
chunkwise kernel and chunk size given, plus the bf16 GEMM rate of the block's projection
shapes, so the prefill figures in BENCHMARKS.md can say what limits them:

    python benchmarks/prefill_profile.py --shape 7b --length 16384 --out $OUT/prefill_profile.json

One JSON record per line on stdout and in --out (whole-model figures = per-block x blocks).
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
from xlstm_metal.kernels import get_mlstm_kernel  # noqa: E402
from xlstm_metal.kernels.fast import chunkwise_fused as fused  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b")
    p.add_argument("--dtype", default=None)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--kernels", default="chunkwise_scan,chunkwise_fused,chunkwise")
    p.add_argument("--chunk-sizes", default="64,128,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    dtype = args.dtype or bm.default_dtype()
    config = bm.shape_config(args.shape, num_blocks=1)
    model = bm.random_model(config, dtype=dtype).fuse_projections()
    block = model.blocks[0]
    layer = block.mlstm_layer
    S, E = args.length, config.embedding_dim
    x = (mx.random.normal((1, S, E)) * 0.5).astype(getattr(mx, dtype))
    q, k, v, o, i, f = layer.project(block.norm_mlstm(x))
    mx.eval(x, q, k, v, o, i, f)
    out = open(args.out, "w") if args.out else None

    def emit(record: dict) -> None:
        record = {"shape": args.shape, "dtype": dtype, "length": S, **record, **bm.environment()}
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    h, _ = layer.parallel_kernel_cell(q, k, v, i, f)
    mx.eval(h)
    parts = {
        "block (all parts)": lambda: block(x),
        "rms norm": lambda: block.norm_mlstm(x),
        "q|k|v|o|i|f projection": lambda: layer.project(x),
        "output cell (norm, gate, out_proj)": lambda: layer.output(h, o),
        "ffn (gate|up, down)": lambda: block.ffn(x),
    }
    for name, fn in parts.items():
        emit({"part": name, "kernel": config.chunkwise_kernel, "chunk_size": config.chunk_size,
              "ms": 1000 * bm.median_seconds(fn, args.repeats)})

    for kernel_name in args.kernels.split(","):
        kernel = get_mlstm_kernel(kernel_name)
        for chunk in map(int, args.chunk_sizes.split(",")):
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            ms = 1000 * bm.median_seconds(lambda: kernel(q, k, v, i, f, None, chunk_size=chunk), args.repeats)
            emit({"part": "mLSTM kernel", "kernel": kernel_name, "chunk_size": chunk, "ms": ms,
                  "kernel_peak_gb": (mx.get_peak_memory() - base) / 2**30})
            if kernel_name == "chunkwise_fused" and fused.fused_chunkwise_supported(q, v, chunk):
                # Its three phases alone: gate prep (MLX ops), the states and outputs kernels.
                gates = fused.chunk_gates(i, f, chunk)
                states = fused.chunk_states(k, v, *gates, None)
                mx.eval(gates, states)
                phases = {
                    "fused: gate prep": lambda: fused.chunk_gates(i, f, chunk),
                    "fused: states kernel": lambda: fused.chunk_states(k, v, *gates, None),
                    "fused: outputs kernel": lambda: fused.chunk_outputs(
                        q, k, v, *gates, *states[:3], config.eps, q.dtype),
                }
                for name, fn in phases.items():
                    emit({"part": name, "kernel": kernel_name, "chunk_size": chunk,
                          "ms": 1000 * bm.median_seconds(fn, args.repeats)})

    # bf16 GEMM rate on the block's projection shapes: what the matmuls alone would allow.
    fused_w = layer["_fused_projection"][0]["weight"]
    ffn_w = block.ffn["_fused_gate_up"][0]["weight"]
    flops = 2 * S * E * (fused_w.shape[0] + ffn_w.shape[0]) + 2 * S * (layer.out_proj.weight.size
                                                                   + block.ffn.proj_down.weight.size)
    ms = 1000 * bm.median_seconds(lambda: [x @ fused_w.T, x @ ffn_w.T,
                                x[..., : layer.out_proj.weight.shape[1]] @ layer.out_proj.weight.T,
                                mx.zeros((1, S, block.ffn.proj_down.weight.shape[1]), x.dtype)
                                @ block.ffn.proj_down.weight.T], args.repeats)
    blocks = bm.shape_config(args.shape).num_blocks
    emit({"part": "all block matmuls", "ms": ms, "tflop_s": flops / (ms / 1000) / 1e12,
          "matmul_only_tok_s_bound": S / (ms / 1000 * blocks)})


if __name__ == "__main__":
    main()
