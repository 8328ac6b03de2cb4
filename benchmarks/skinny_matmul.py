"""The skinny decode product (xlstm_metal/kernels/fast/skinny.py) against MLX's matmul, per layer
of a model shape (7B by default), on a CUDA GPU.

    python benchmarks/skinny_matmul.py --shape 7b --rows 2,16,64 --out $OUT/skinny_matmul.jsonl

For each product of a block (fused q|k|v|o|i|f, out_proj, fused gate|up, proj_down) it times all
blocks' weights in one evaluation (as a decode step reads them: nothing stays in L2), and the LM
head alone; per row count: MLX's ``x @ W.T`` and the kernel with its default launch shape and
the ``--configs`` given. Records (one JSON object per line): ms per weight (``ms``: the difference below; ``ms_once``: one
pass, with each evaluation's fixed cost), GB/s of weights read (from ``ms``),
and the kernel's largest error relative to the float32 product of the same bf16 operands
(``rel_err``; MLX's own in ``rel_err`` of the ``mlx`` rows).

``--kernels mma,wgmma`` picks the kernels (``mma``: skinny.py's ``mma.sync`` kernel with its
``--configs``; ``wgmma``: xlstm_metal/kernels/fast/skinny_wgmma.py with its ``--wgmma-configs``,
``tm,stages[,splits[,swizzle]]``). Every method is timed as one compiled function
returning all blocks' products (one evaluation, the launches encoded without Python in between),
once and twice over: the difference, per product, leaves out each evaluation's fixed cost. ``--floor`` adds, per
product, a read-only streaming kernel over the same weights (16-byte loads, each block summing
what it read into one float): the rate a product could reach if reading the weights were all.
``--trace``: ``ms`` is instead the GPU time of the products' kernels (CUPTI through PyTorch's
profiler, summed over one pass, per product; host time and launch gaps left out), the measure
that ranks kernels where the host's encoding (~25-40 µs per cuBLASLt node) hides the GPU's.
``--kernels wgmma-sk``: the wgmma kernel's stream-K schedule (its default launch, the
``--streamk-blocks`` grids given, and the ``--wgmma-configs`` launch shapes). ``--transposed``: MLX's product also as ``(W @ x.T).T`` (the weight as the left operand: another
cuBLASLt kernel choice), made contiguous.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.kernels.fast import skinny_wgmma as wg  # noqa: E402
from xlstm_metal.kernels.fast.step import cuda_available  # noqa: E402
from xlstm_metal.kernels.fast.skinny import (  # noqa: E402
    SkinnyConfig,
    default_config,
    k_splits,
    skinny_matmul,
    skinny_supported,
)

_READ_SOURCE = """
    // Read w (any dtype, as 16-byte pieces) once, grid-stride, 4 pieces in flight per thread;
    // each block writes the sum of what it read (so nothing is optimised away).
    const size_t n16 = (size_t)w_shape[0] * w_shape[1] * sizeof(w[0]) / 16;  // 2-D w
    const uint4* src = reinterpret_cast<const uint4*>(w);
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint32_t acc = 0;
    for (; i + 3 * stride < n16; i += 4 * stride) {
      uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
      acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n16; i += stride) { uint4 a = src[i]; acc ^= a.x ^ a.y ^ a.z ^ a.w; }
    __shared__ uint32_t red[32];
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffff, acc, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int j = 1; j < (int)(blockDim.x >> 5); ++j) acc ^= red[j];
      out[blockIdx.x] = acc;
    }
"""
_read_kernel_cache: list = []


def read_weights(w: mx.array, salt: mx.array, blocks: int = 132 * 8) -> mx.array:
    """A read-only pass over ``w`` (the streaming floor of a product over it); ``salt`` is not
    read: two passes with different salts are two launches (a compiled function would merge
    identical ones)."""
    if not _read_kernel_cache:
        _read_kernel_cache.append(mx.fast.cuda_kernel(
            name="xlstm_bench_read_weights", input_names=["w", "salt"], output_names=["out"], source=_READ_SOURCE))
    (out,) = _read_kernel_cache[0](inputs=[w, salt], grid=(blocks * 256, 1, 1), threadgroup=(256, 1, 1),
                                   output_shapes=[(blocks,)], output_dtypes=[mx.uint32])
    return out


def parse_config(text: str) -> SkinnyConfig:
    """``tm,w,u,stages`` of the ``mma.sync`` kernel, e.g. ``2,8,1,4``."""
    tm, w, u, stages = (int(v) for v in text.split(","))
    return SkinnyConfig(tm=tm, w=w, u=u, stages=stages)


def parse_wgmma_config(text: str) -> tuple[wg.WgmmaConfig, int | None]:
    """``tm,stages[,splits[,swizzle]]``, e.g. ``2,4``, ``1,6,4`` or ``2,4,0,0`` (splits 0: the
    default; swizzle 0: the interleaved shared-memory layout)."""
    vals = [int(v) for v in text.split(",")]
    splits = vals[2] if len(vals) > 2 and vals[2] > 0 else None
    return wg.WgmmaConfig(tm=vals[0], stages=vals[1], swizzle=len(vals) < 4 or vals[3] == 1), splits


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
    p.add_argument("--kernels", default="mma",
                   help="kernels to time beside MLX's matmul: mma, wgmma, wgmma-sk (the wgmma kernel's stream-K schedule)")
    p.add_argument("--streamk-blocks", default="",
                   help="wgmma-sk: grids besides the default (numbers of blocks, comma-separated)")
    p.add_argument("--wgmma-configs", default="",
                   help="extra wgmma launch shapes, 'tm,stages[,splits[,swizzle]]' separated by ';'")
    p.add_argument("--floor", action="store_true", help="also a read-only streaming kernel over the weights")
    p.add_argument("--trace", action="store_true", help="ms: the kernels' GPU time under CUPTI")
    p.add_argument("--transposed", action="store_true", help="also MLX's (W @ x.T).T")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--deadline", type=float, default=None, help="seconds from the start: skip what begins later")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    start = time.perf_counter()
    config = bm.shape_config(args.shape)
    dtype = getattr(mx, args.dtype)
    extra = [parse_config(c) for c in args.configs.split(";") if c.strip()]
    wg_extra = [parse_wgmma_config(c) for c in args.wgmma_configs.split(";") if c.strip()]
    kernels = set(filter(None, args.kernels.split(",")))
    shapes = layer_shapes(config)
    if args.kinds:
        shapes = {k: shapes[k] for k in args.kinds.split(",")}
    out = open(args.out, "a") if args.out else None

    def emit(record: dict) -> None:
        line = json.dumps({"shape": args.shape, "dtype": args.dtype, **record})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    def late() -> bool:
        return args.deadline is not None and time.perf_counter() - start > args.deadline

    for kind, (N, K, count) in shapes.items():
        if late():
            break
        weights = [mx.random.normal((N, K), key=mx.random.key(i), dtype=dtype) * (K ** -0.5) for i in range(count)]
        mx.eval(weights)
        nbytes = sum(w.nbytes for w in weights)

        def timed(product, x: mx.array) -> tuple[float, float]:
            """ms per block's product, GPU-bound: all blocks' products as one compiled function,
            once and twice over (the difference: no fixed cost of an evaluation)."""
            # The second pass on a copy of x: a compiled function merges identical products.
            x2 = mx.array(x)
            once = mx.compile(lambda x, *ws: [product(x, w) for w in ws])
            twice = mx.compile(lambda x, x2, *ws: [product(x, w) for w in ws] + [product(x2, w) for w in ws])
            t1 = bm.median_seconds(lambda: once(x, *weights), args.repeats)
            if args.trace:
                from train_side_by_side import trace_kernels  # noqa: PLC0415  (benchmarks/)

                summary = trace_kernels(lambda: mx.eval(once(x, *weights)), 2)
                busy = summary.get("gpu_busy_ms", float("nan"))
                return busy / count, 1000 * t1 / count
            t2 = bm.median_seconds(lambda: twice(x, x2, *weights), args.repeats)
            return 1000 * (t2 - t1) / count, 1000 * t1 / count

        def rate(ms: float) -> float | None:
            """GB/s of weights; None where the difference of two timings came out <= 0 (noise)."""
            return nbytes / count / (ms / 1000) / 1e9 if ms > 0 else None

        if args.floor and cuda_available():  # a CUDA kernel
            ms, ms_once = timed(lambda x, w: read_weights(w, x), mx.zeros((1,)))
            emit({"kind": kind, "rows": 0, "N": N, "K": K, "method": "read floor", "ms": ms, "ms_once": ms_once,
                  "gb_s": rate(ms)})
        for M in map(int, args.rows.split(",")):
            if late():
                break
            x = mx.random.normal((M, K), key=mx.random.key(1000 + M), dtype=dtype)
            ref = x.astype(mx.float32) @ weights[0].astype(mx.float32).T
            scale = mx.max(mx.abs(ref))

            def rel_err(y) -> float:
                return (mx.max(mx.abs(y.astype(mx.float32) - ref)) / scale).item()

            def record(method: str, times: tuple[float, float], err: float, **extra_fields) -> None:
                emit({"kind": kind, "rows": M, "N": N, "K": K, "method": method, **extra_fields, "ms": times[0],
                      "ms_once": times[1], "gb_s": rate(times[0]), "rel_err": err})

            record("mlx", timed(lambda x, w: x @ w.T, x), rel_err(x @ weights[0].T))
            if args.transposed:
                record("mlx (W @ x.T).T", timed(lambda x, w: mx.contiguous((w @ x.T).T), x),
                       rel_err((weights[0] @ x.T).T))
            if not skinny_supported(x, weights[0]):
                continue
            if "mma" in kernels:
                default = default_config(M, N)
                runs = [(default, None)] + [(c, None) for c in extra if c != default]
                if args.no_split_too and k_splits(N, K, default) > 1:
                    runs.append((default, 1))
                for i, (cfg, splits) in enumerate(runs):
                    record("skinny" + ("" if i else " (default)"),
                           timed(lambda x, w, c=cfg, s=splits: skinny_matmul(x, w, c, s), x),
                           rel_err(skinny_matmul(x, weights[0], cfg, splits)),
                           config=[cfg.tm, cfg.w, cfg.u, cfg.stages], k_splits=k_splits(N, K, cfg, splits))
            if "wgmma" in kernels:
                default = wg.default_config(M, N)
                runs = [(default, None)] + [r for r in wg_extra if r != (default, None)]
                for i, (cfg, splits) in enumerate(runs):
                    if late():
                        break
                    record("wgmma" + ("" if i else " (default)"),
                           timed(lambda x, w, c=cfg, s=splits: wg.wgmma_matmul(x, w, c, s), x),
                           rel_err(wg.wgmma_matmul(x, weights[0], cfg, splits)),
                           config=[cfg.tm, cfg.stages, int(cfg.swizzle)], k_splits=wg.k_splits(N, K, cfg, splits))
            if "wgmma-sk" in kernels:
                default = wg.default_config(M, N)
                nw = wg.padded_rows(M)
                runs = [(default, None)] + [(default, int(b)) for b in args.streamk_blocks.split(",") if b.strip()]
                runs += [(cfg, None) for cfg, _ in wg_extra if cfg != default]
                for cfg, blocks in runs:
                    if late():
                        break
                    grid = wg.streamk_grid(N, K, cfg, nw, blocks)
                    label = "wgmma stream-K" + (" (default)" if (cfg, blocks) == (default, None) else "")
                    record(label,
                           timed(lambda x, w, c=cfg, g=grid: wg.wgmma_matmul(x, w, c, schedule="streamk", blocks=g), x),
                           rel_err(wg.wgmma_matmul(x, weights[0], cfg, schedule="streamk", blocks=grid)),
                           config=[cfg.tm, cfg.stages, int(cfg.swizzle)], blocks=grid)
        del weights
        mx.clear_cache()


if __name__ == "__main__":
    main()
