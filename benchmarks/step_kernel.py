"""The gated mLSTM step kernel alone (xlstm_metal/kernels/fast/decode.py, ``mlstm_step_gated``):
bytes per second of state moved, its first layout against the second, beside MLX's own
elementwise pass over the same state (the copy rate), on an NVIDIA GPU.

    python benchmarks/step_kernel.py --shape 7b --batches 1,16,64 --out $OUT/step_kernel.jsonl

One evaluation runs the step of every layer (``--layers``, default the shape's block count), each
on its own state, as a decode step does: the state of all layers is far larger than L2, so every
step reads its C from memory. Inputs as the 7B model passes them: q, k, v and the raw gates in
the weights' dtype (strided views of the projection output), gate biases, float32 state.
Records (one JSON object per line): ``kernel`` (``v1``, ``v2`` with its tile, ``v3`` with its
rows per tile and in flight, ``v4`` with its rows per chunk, chunks in its ring and blocks per SM, ``copy``: MLX's
``C * 0.5``, ``copy4``: a plain 16-byte copy kernel, ``tile_copy16/32``: a copy in the step
kernel's access pattern, strips of 64 / 128 columns), batch,
``us_per_layer`` (median over ``--repeats``), ``gb_s`` (C read + C written + n read + written,
per second) and, for v2, ``max_rel_diff_vs_v1`` of h and C (the same math, other summation order).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xlstm_metal  # noqa: E402,F401  (first: BLAS preload on Linux CPUs)
import mlx.core as mx  # noqa: E402

from xlstm_metal import benchmark as bm  # noqa: E402
from xlstm_metal.kernels.fast import decode  # noqa: E402


def _rel(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.max(mx.abs(a - b)) / (mx.max(mx.abs(b)) + 1e-30)).item()


_copy_kernel = None


def _copy4(x: mx.array) -> mx.array:
    """A plain copy of a float32 array through 16-byte loads and stores, one per thread (a
    custom kernel beside the step's: the streaming rate a kernel of this kind reaches)."""
    global _copy_kernel
    if x.dtype != mx.float32 or x.size % 4:
        raise ValueError("_copy4 copies float32 arrays of a multiple of 4 elements")
    if _copy_kernel is None:
        _copy_kernel = mx.fast.cuda_kernel(
            name="xlstm_bench_copy4", input_names=["x"], output_names=["y"],
            source="""
    const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < N4) reinterpret_cast<float4*>(y)[i] = reinterpret_cast<const float4*>(x)[i];
""")
    n4 = x.size // 4
    return _copy_kernel(inputs=[x], template=[("N4", n4)], grid=(-(-n4 // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
                        output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


_tile_copy_kernel = None


def _tile_copy(c: mx.array, tx: int) -> mx.array:
    """A copy of C [B, NH, DQK, DV] (float32) in the step kernel's access pattern: a block per
    (head, strip of tx * 4 columns), its tx x (256 / tx) threads walking the rows with 16-byte
    accesses, 4 rows in flight per thread: what the pattern alone costs against a flat copy."""
    global _tile_copy_kernel
    if _tile_copy_kernel is None:
        _tile_copy_kernel = mx.fast.cuda_kernel(
            name="xlstm_bench_tile_copy", input_names=["x"], output_names=["y"],
            source="""
    constexpr int TD = 256 / TX;
    const size_t base = static_cast<size_t>(blockIdx.z) * DQK * DV + blockIdx.x * TX * 4 + threadIdx.x * 4;
    for (int d0 = threadIdx.y; d0 < DQK; d0 += 4 * TD) {
        float4 t[4];
        #pragma unroll
        for (int r = 0; r < 4; ++r) if (d0 + r * TD < DQK) t[r] = reinterpret_cast<const float4*>(x + base + static_cast<size_t>(d0 + r * TD) * DV)[0];
        #pragma unroll
        for (int r = 0; r < 4; ++r) if (d0 + r * TD < DQK) reinterpret_cast<float4*>(y + base + static_cast<size_t>(d0 + r * TD) * DV)[0] = t[r];
    }
""")
    B, NH, dqk, dv = c.shape
    if c.dtype != mx.float32 or dv % (tx * 4):
        raise ValueError("_tile_copy copies float32 states whose DV is a multiple of 4 * tx")
    return _tile_copy_kernel(inputs=[c], template=[("TX", tx), ("DQK", dqk), ("DV", dv)],
                             grid=(dv // 4, 256 // tx, B * NH), threadgroup=(tx, 256 // tx, 1),
                             output_shapes=[c.shape], output_dtypes=[c.dtype])[0]


_bulk_copy_kernels: dict = {}


def _bulk_copy(x: mx.array, chunk: int, stages: int, blocks: int) -> mx.array:
    """A copy of float32 ``x`` through shared memory as layout 4 moves the state: persistent
    blocks, each taking chunks of ``chunk`` bytes (i, i + blocks, ...) through a ring of
    ``stages`` slots, one thread issuing bulk asynchronous loads (mbarrier completion) and bulk
    stores; no arithmetic: what that mechanism alone reaches."""
    if x.nbytes % chunk or chunk % 16:
        raise ValueError("_bulk_copy needs whole chunks of a multiple of 16 bytes")
    key = (chunk, stages)
    if key not in _bulk_copy_kernels:
        _bulk_copy_kernels[key] = mx.fast.cuda_kernel(
            name=f"xlstm_bench_bulk_copy_{chunk}_{stages}", input_names=["x"], output_names=["y"],
            shared_memory=chunk * stages, source="""
    extern __shared__ __align__(128) uint8_t ring_[];
    __shared__ __align__(8) uint64_t full[STAGES];
    const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(ring_));
    const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
    const int n_chunks = static_cast<int>(x_shape[0] / (CHUNK / 4));
    const int total = (n_chunks - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
    auto off = [&](int g) { return (static_cast<size_t>(blockIdx.x) + static_cast<size_t>(g) * gridDim.x) * (CHUNK / 4); };
    auto load = [&](int g) {
        const uint32_t bar = full0 + 8 * (g % STAGES);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\\n" :: "r"(bar), "r"(CHUNK) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\\n"
                     :: "r"(ring + (g % STAGES) * CHUNK), "l"(x + off(g)), "r"(CHUNK), "r"(bar) : "memory");
    };
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\\n" :: "r"(full0 + 8 * s) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;\\n" ::: "memory");
        for (int g = 0; g < STAGES - 1 && g < total; ++g) load(g);
        for (int g = 0; g < total; ++g) {
            uint32_t done = 0;
            while (!done) {
                asm volatile("{\\n.reg .pred p;\\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\\nselp.u32 %0, 1, 0, p;\\n}\\n"
                             : "=r"(done) : "r"(full0 + 8 * (g % STAGES)), "r"((g / STAGES) & 1) : "memory");
            }
            asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\\n"
                         :: "l"(y + off(g)), "r"(ring + (g % STAGES) * CHUNK), "r"(CHUNK) : "memory");
            asm volatile("cp.async.bulk.commit_group;\\n" ::: "memory");
            asm volatile("cp.async.bulk.wait_group.read 1;\\n" ::: "memory");
            if (g + STAGES - 1 < total) load(g + STAGES - 1);
        }
        asm volatile("cp.async.bulk.wait_group 0;\\n" ::: "memory");
    }
""")
    flat = x.reshape(-1)
    (y,) = _bulk_copy_kernels[key](inputs=[flat], template=[("CHUNK", chunk), ("STAGES", stages)],
                                   grid=(min(blocks, flat.nbytes // chunk) * 32, 1, 1), threadgroup=(32, 1, 1),
                                   output_shapes=[flat.shape], output_dtypes=[flat.dtype])
    return y.reshape(x.shape)


def make_steps(config, batch: int, dtype: mx.Dtype, layers: int, seed: int = 0) -> tuple[Callable[[], list], list, int]:
    """The step of ``layers`` layers of ``config``'s heads at ``batch`` rows, each on its own random
    state, as one function (-> [(h, state)] per layer); the states [(C, n, m)]; the bytes of state
    one call moves."""
    NH, dqk, dv = config.num_heads, config.qk_head_dim, config.v_head_dim
    mx.random.seed(seed)
    raw = [mx.random.normal((batch, 1, 2 * NH)).astype(dtype) * 4 for _ in range(layers)]
    qkv = [tuple(mx.random.normal((batch, NH, 1, d)).astype(dtype) for d in (dqk, dqk, dv)) for _ in range(layers)]
    bias = (mx.random.normal((NH,)).astype(dtype), (mx.random.normal((NH,)) + 3).astype(dtype))
    states = [(mx.random.normal((batch, NH, dqk, dv)) * 0.1, mx.random.normal((batch, NH, dqk)),
               mx.zeros((batch, NH, 1))) for _ in range(layers)]
    mx.eval(raw, qkv, bias, states)

    def steps() -> list:
        return [decode.mlstm_step_gated(q, k, v, y[..., :NH].transpose(0, 2, 1), y[..., NH:].transpose(0, 2, 1),
                                        *bias, s) for (q, k, v), y, s in zip(qkv, raw, states)]

    return steps, states, layers * 2 * (batch * NH * dqk * dv * 4 + batch * NH * dqk * 4)  # C and n, read and written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--layers", type=int, default=None, help="default: the shape's number of blocks")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tiles", default="default,default@3,16x8,16x8@3,32x4,32x4@3,32x8",
                   help="v2 tiles to time: 'default' (the kernel's own choice) or TXxRB[@P] (threads along "
                        "the columns x rows per thread in flight; P: the grid capped to P blocks per SM, "
                        "each block taking several tiles), comma-separated")
    p.add_argument("--v3", default="1x32,2x32,1x16",
                   help="layout 3 (row tiles) settings to time: RBxR (rows in flight per warp x rows per tile), "
                        "comma-separated")
    p.add_argument("--v4", default="default",
                   help="layout 4 (whole heads through shared memory by bulk copies) settings to time: 'default' "
                        "or CHxSTAGES[@P] (rows per chunk x chunks in the ring, P blocks per SM), comma-separated")
    p.add_argument("--bulk-copy", default="",
                   help="copies of the state through layout 4's ring alone, KBxSTAGES[@P] (chunk KB x slots, "
                        "P blocks per SM, default 2), comma-separated (CUDA only)")
    p.add_argument("--no-tile-copy", action="store_true", help="leave out the copies in column strips")
    p.add_argument("--no-stream-hints", action="store_true", help="also time v2 (default tile) without them")
    p.add_argument("--deadline", type=float, default=None, help="seconds from the start: stop starting new work")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    start = time.perf_counter()
    config = bm.shape_config(args.shape)
    dtype = getattr(mx, bm.default_dtype())
    NH, dqk, dv = config.num_heads, config.qk_head_dim, config.v_head_dim
    layers = args.layers or config.num_blocks
    out = open(args.out, "a") if args.out else None

    def emit(record: dict) -> None:
        line = json.dumps({"shape": args.shape, "NH": NH, "DQK": dqk, "DV": dv, "layers": layers, **record})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    version, stream, tx, rb = decode.step_kernel_version(), decode._STREAM_HINTS, decode._V2_TX, decode._V2_RB
    blocks_per_sm = decode._V2_BLOCKS_PER_SM
    for B in map(int, filter(None, args.batches.split(","))):
        if args.deadline is not None and time.perf_counter() - start > args.deadline:
            break
        steps, states, nbytes = make_steps(config, B, dtype, layers, seed=B)

        def timed(fn) -> tuple[dict, list]:
            fn_c = mx.compile(fn)  # traced afresh: the kernel settings are read at trace time
            sec = bm.median_seconds(fn_c, args.repeats)
            return {"batch": B, "us_per_layer": 1e6 * sec / layers, "gb_s": nbytes / sec / 1e9}, fn_c()

        # MLX's own pass over the same bytes: C * a read and written once (n likewise).
        emit({"kernel": "copy", **timed(lambda: [(s[0] * 0.5, s[1] * 0.5) for s in states])[0]})
        if mx.default_device() == mx.gpu and mx.cuda.is_available():
            emit({"kernel": "copy4", **timed(lambda: [(_copy4(s[0]), _copy4(s[1])) for s in states])[0]})
            for ctx in () if args.no_tile_copy else (16, 32):
                emit({"kernel": f"tile_copy{ctx}", **timed(lambda: [(_tile_copy(s[0], ctx), _copy4(s[1]))
                                                                     for s in states])[0]})
        decode.set_step_kernel_version(1)
        record, ref = timed(steps)
        emit({"kernel": "v1", **record})
        decode.set_step_kernel_version(2)
        tiles = [t for t in args.tiles.split(",") if t]
        variants = [(t, True) for t in tiles] + ([("default", False)] if args.no_stream_hints else [])
        for tile, hints in variants:
            if args.deadline is not None and time.perf_counter() - start > args.deadline:
                break
            decode._STREAM_HINTS = hints
            shape, _, per_sm = tile.partition("@")
            decode._V2_TX, decode._V2_RB = (tx, rb) if shape == "default" else map(int, shape.split("x"))
            decode._V2_BLOCKS_PER_SM = int(per_sm) if per_sm else blocks_per_sm
            record, got = timed(steps)
            emit({"kernel": "v2", **record, "tile": list(decode._v2_tile(B * NH, dqk, dv)),
                  "blocks_per_sm": decode._V2_BLOCKS_PER_SM, "stream_hints": hints,
                  "max_rel_diff_vs_v1": {"h": max(_rel(g[0], r[0]) for g, r in zip(got, ref)),
                                         "C": max(_rel(g[1][0], r[1][0]) for g, r in zip(got, ref))}})
            del got
        decode.set_step_kernel_version(3)
        v3_rb, v3_rows = decode._V3_RB, decode._V3_ROWS
        for setting in filter(None, args.v3.split(",")):
            if args.deadline is not None and time.perf_counter() - start > args.deadline:
                break
            decode._V3_RB, decode._V3_ROWS = map(int, setting.split("x"))
            record, got = timed(steps)
            emit({"kernel": "v3", **record, "rb": decode._V3_RB, "rows": decode._V3_ROWS,
                  "applies": decode._v3_rows(dqk, dv) is not None,
                  "max_rel_diff_vs_v1": {"h": max(_rel(g[0], r[0]) for g, r in zip(got, ref)),
                                         "C": max(_rel(g[1][0], r[1][0]) for g, r in zip(got, ref))}})
            del got
        decode._V3_RB, decode._V3_ROWS = v3_rb, v3_rows
        decode.set_step_kernel_version(4)
        v4_knobs = decode._V4_CH, decode._V4_STAGES, decode._V4_BLOCKS_PER_SM
        for setting in filter(None, args.v4.split(",")):
            if args.deadline is not None and time.perf_counter() - start > args.deadline:
                break
            shape, _, per_sm = setting.partition("@")
            ch, stages = (v4_knobs[0], v4_knobs[1]) if shape == "default" else map(int, shape.split("x"))
            decode._V4_CH, decode._V4_STAGES = ch, stages
            decode._V4_BLOCKS_PER_SM = int(per_sm) if per_sm else v4_knobs[2]
            launch = decode._v4_launch(B * NH, dqk, dv)
            record, got = timed(steps)
            emit({"kernel": "v4", **record, "launch": None if launch is None else list(launch[:4]),
                  "max_rel_diff_vs_v1": {"h": max(_rel(g[0], r[0]) for g, r in zip(got, ref)),
                                         "C": max(_rel(g[1][0], r[1][0]) for g, r in zip(got, ref))}})
            del got
        decode._V4_CH, decode._V4_STAGES, decode._V4_BLOCKS_PER_SM = v4_knobs
        if mx.default_device() == mx.gpu and mx.cuda.is_available():
            for setting in filter(None, args.bulk_copy.split(",")):
                if args.deadline is not None and time.perf_counter() - start > args.deadline:
                    break
                shape, _, per_sm = setting.partition("@")
                kb, stages = map(int, shape.split("x"))
                blocks = (int(per_sm) if per_sm else 2) * decode._SMS
                emit({"kernel": "bulk_copy", "chunk_kb": kb, "stages": stages, "blocks": blocks,
                      **timed(lambda: [(_bulk_copy(s[0], kb * 1024, stages, blocks), _copy4(s[1]))
                                       for s in states])[0]})
        decode._STREAM_HINTS, decode._V2_TX, decode._V2_RB = stream, tx, rb
        decode._V2_BLOCKS_PER_SM = blocks_per_sm
        decode.set_step_kernel_version(version)
        del ref, states
    emit({"kind": "done", "seconds_total": time.perf_counter() - start, "device": str(mx.default_device())})


if __name__ == "__main__":
    main()
