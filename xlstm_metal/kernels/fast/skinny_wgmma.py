"""Skinny matrix products on Hopper's warpgroup tensor-core instructions: ``x @ w.T`` for 1-64
rows of x (decode), bf16 or fp16, float32 accumulation, on sm_90a GPUs (H100/H200).

MLX 0.32 compiles ``mx.fast.cuda_kernel`` sources for the device's architecture-specific target
(``--gpu-architecture=sm_90a`` on compute capability 9.x), so ``wgmma.mma_async`` is available.
:mod:`.skinny`'s ``mma.sync`` kernel (session 5) lost to cuBLASLt at 64 rows because every warp
read x's register fragments from shared memory (4.5 bytes of shared traffic per weight byte) and
190 registers capped occupancy. Here one warpgroup (128 threads) per block issues
``wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}``: A is 64 weight rows x 16 k, B is x
(N = the rows of x, padded to a multiple of 8, at most 64) x 16 k, both read by the tensor cores
straight from shared memory through matrix descriptors; the accumulators are 64 x N / 128
threads = N / 2 floats per thread per 64-row tile.

- A block owns ``64 tm`` weight rows and walks its share of k in steps of 64 (one 128-byte row
  of each operand per step): each step's weight tile and x tile go global -> shared memory with
  ``cp.async.cg`` 16-byte copies (L2 only) straight into the 128-byte-swizzled K-major layout
  the descriptors name (16-byte piece c of row r at ``r * 128 + 16 (c ^ (r % 8))``, 8-row groups
  1024 bytes apart), through a ring of ``stages`` steps (``stages - 1`` in flight).
- A step: wait for its copies, ``fence.proxy.async`` (the copies are generic-proxy writes, the
  tensor cores read through the async proxy), one barrier, the copies of step ``s + stages - 1``
  issued into the slot step ``s - 1`` used, then 4 x ``tm`` wgmma (k 16 each), committed and
  waited for before the next step reuses anything.
- Products with few row tiles split k across blocks (:func:`k_splits`: about
  :data:`TARGET_BLOCKS` blocks); each split writes float32 partial sums and :mod:`.skinny`'s
  reduction kernel adds them in float32 and rounds once. (A variant that ran a tile's splits as
  one thread-block cluster and added them through distributed shared memory, its cluster shape
  a compile-time attribute brought in through the header, was removed: in round S7R2, on the
  H200, launches that followed a clustered kernel in the same process left their outputs
  unwritten (stale memory), most likely because MLX's CUDA-graph cache updated a graph made
  with a clustered kernel to a plain one: its key does not see a compile-time cluster shape.)

:func:`wgmma_matmul` is the kernel; :func:`xlstm_metal.kernels.fast.skinny.linear_product`
dispatches to it at 2-64 rows with ``XLSTM_METAL_SKINNY_GEMM=wgmma``. From session 7 to 16 it was
the default at 9-16 rows on compute-capability-9 GPUs (it made the 7B decode step faster than
cuBLASLt on an H200); since session 17 the default there is
:func:`~xlstm_metal.kernels.fast.skinny.decode_matmul`, which made that step faster still.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import mlx.core as mx

from .skinny import product_kernel, reduce_splits
from .step import cuda_available

#: Most rows of x (the wgmma N dimension, padded to a multiple of 8).
MAX_ROWS = 64
#: k per pipeline step: one 128-byte swizzle row of bf16/fp16.
BK = 64
#: Thread blocks a product aims for where it splits k (two per SM of a 132-SM H100/H200).
TARGET_BLOCKS = 264
#: Whether split products take at most :data:`TARGET_BLOCKS` blocks (floor: one wave of two
#: blocks per SM; q|k|v|o|i|f at 16 rows 2 splits = 194 blocks, proj_down 8 = 256) rather than at
#: least that many (ceil: 291 and 288 blocks, a second wave of 27 and 24); ``XLSTM_METAL_WGMMA_SPLIT_FIT=1``.
SPLIT_FIT = os.environ.get("XLSTM_METAL_WGMMA_SPLIT_FIT", "0") == "1"
#: L2 prefetch size of the kernels' 16-byte copies (the ``.L2::NB`` qualifier of ``cp.async``: 64,
#: 128 or 256 bytes; 0: none): 256 has the copy of one 128-byte piece of a weight row bring the
#: row's next piece (the next k step) into L2 too. ``XLSTM_METAL_WGMMA_L2_PREFETCH``.
L2_PREFETCH = int(os.environ.get("XLSTM_METAL_WGMMA_L2_PREFETCH", "128"))
#: Whether the default launch lays its tiles out with the 128-byte swizzle (else interleaved);
#: ``XLSTM_METAL_WGMMA_SWIZZLE=0`` picks the interleaved layout.
SWIZZLE = os.environ.get("XLSTM_METAL_WGMMA_SWIZZLE", "1") != "0"
#: How a product's work is laid over the GPU: "split" (a block per row tile and k split; tiles
#: with few row tiles split k, float32 partial sums added by :mod:`.skinny`'s reduction kernel)
#: or "streamk" (a fixed grid of ``SMS`` x blocks-per-SM persistent blocks that share the tiles'
#: k steps equally; a block stores the tiles it computes whole and writes partial sums for the at
#: most two it shares, which the last of their blocks to finish adds: one launch, no waves).
#: "hybrid": stream-K where a row tile's k steps meet in at most a few blocks (2 U >= S G: units
#: per block at least half a tile's k steps), split elsewhere: the stream-K kernel's last segment
#: adds a tile's partial sums alone, and with many segments per tile that serial tail costs more
#: than the split kernel's reduction (S11R1, H200: out_proj, proj_down, q|k|v|o|i|f at 16 rows).
#: ``XLSTM_METAL_WGMMA_SCHEDULE`` picks it.
SCHEDULES = ("split", "streamk", "hybrid")
SCHEDULE = os.environ.get("XLSTM_METAL_WGMMA_SCHEDULE", "split")
#: Streaming multiprocessors the stream-K grid fills (``XLSTM_METAL_SMS``; an H100/H200 SXM: 132).
SMS = int(os.environ.get("XLSTM_METAL_SMS", "132"))
#: Shared memory per SM for thread blocks (sm_90: 228 KB) and what the GPU keeps per block (1 KB).
SM_SHARED_BYTES = 228 * 1024
BLOCK_RESERVED_BYTES = 1024
#: Most stream-K blocks per SM: 96-134 registers x 128 threads (NVRTC, sm_90a) leave room for 3.
STREAMK_MAX_PER_SM = 3
#: Blocks of a stream-K grid (None: :data:`SMS` x as many as fit an SM's shared memory).
STREAMK_BLOCKS: int | None = None


@dataclass(frozen=True)
class WgmmaConfig:
    """Launch shape: ``tm`` 64-row weight tiles per block (one warpgroup), a ring of ``stages``
    shared-memory steps of 64 k; ``swizzle``: the tiles in the 128-byte-swizzled layout (else the
    interleaved one, 8 x 16-byte core matrices)."""

    tm: int = 2
    stages: int = 4
    swizzle: bool = True

    def __post_init__(self):
        if self.tm not in (1, 2, 3, 4) or not 2 <= self.stages <= 12:
            raise ValueError(f"bad wgmma kernel config {self}")

    def rows_per_block(self) -> int:
        return 64 * self.tm

    def shared_bytes(self, nw: int) -> int:
        # + 1 KB: the ring is aligned to 1024 bytes (the 128-byte swizzle's period) inside it.
        return self.stages * (self.rows_per_block() + nw) * 128 + 1024


def padded_rows(rows: int) -> int:
    """The wgmma N for ``rows`` rows of x: the next multiple of 8."""
    return -(-rows // 8) * 8


def default_config(rows: int, n: int) -> WgmmaConfig:
    """The launch shape for ``rows`` rows of x and ``n`` output features."""
    if rows <= 16:
        return WgmmaConfig(tm=2, stages=6, swizzle=SWIZZLE)
    return WgmmaConfig(tm=2, stages=4, swizzle=SWIZZLE)


def k_splits(n: int, k: int, config: WgmmaConfig, requested: int | None = None) -> int:
    """Splits of k for ``n`` outputs and ``k`` inputs: ``requested``, or by default enough for about
    :data:`TARGET_BLOCKS` blocks where the row tiles are fewer than half of that; rounded so that
    every split (ceil(steps / splits) steps of 64 k) is non-empty."""
    steps = -(-k // BK)
    tiles = -(-n // config.rows_per_block())
    if requested is None:
        if TARGET_BLOCKS <= 0 or 2 * tiles >= TARGET_BLOCKS:
            requested = 1
        else:  # SPLIT_FIT: at most TARGET_BLOCKS blocks (one wave), else at least
            requested = max(1, TARGET_BLOCKS // tiles) if SPLIT_FIT else -(-TARGET_BLOCKS // tiles)
    splits = max(1, min(requested, steps))
    return -(-steps // -(-steps // splits))


def _wgmma_specializations() -> str:
    """``xl_wgmma<NW, T>(d, desc_a, desc_b)``: d[NW / 2] += A (64 x 16, K-major, shared memory) *
    B (16 x NW, K-major, shared memory), for NW = 8..64 in steps of 8 and T bf16 / fp16."""
    out = ["template <int NW, typename T> __device__ __forceinline__ void xl_wgmma(float* d, uint64_t a, uint64_t b);"]
    for nw in range(8, MAX_ROWS + 1, 8):
        n = nw // 2
        regs = ",".join(f"%{i}" for i in range(n))
        outs = ", ".join(f'"+f"(d[{i}])' for i in range(n))
        for ctype, ptx in (("__nv_bfloat16", "bf16"), ("__half", "f16")):
            out.append(
                f"template <> __device__ __forceinline__ void xl_wgmma<{nw}, {ctype}>(float* d, uint64_t a, uint64_t b) {{\n"
                f'  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{n + 2}, 0;\\n"\n'
                f'               "wgmma.mma_async.sync.aligned.m64n{nw}k16.f32.{ptx}.{ptx} '
                f'{{{regs}}}, %{n}, %{n + 1}, p, 1, 1, 0, 0;\\n}}\\n"\n'
                f"               : {outs}\n"
                f'               : "l"(a), "l"(b), "r"(1));\n'
                "}")
    return "\n".join(out)


_HEADER = """
// 16 bytes global -> shared, cached in L2 only (weights are read once); src_size 0 zero-fills.
__device__ __forceinline__ void xlw_cp_async16(uint32_t s, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\\n"
               :: "r"(s), "l"(gmem), "r"(pred ? 16 : 0) : "memory");
}
__device__ __forceinline__ void xlw_cp_commit() { asm volatile("cp.async.commit_group;\\n" ::: "memory"); }
template <int PENDING> __device__ __forceinline__ void xlw_cp_wait() {
  asm volatile("cp.async.wait_group %0;\\n" :: "n"(PENDING) : "memory");
}
// Shared-memory matrix descriptor, K-major. SWZ: 128-byte swizzle, 8-row groups 1024 bytes apart
// (the leading offset is unused in this mode), base offset 0 (the ring is 1024-byte aligned).
// Else no swizzle ("interleaved"): 8 x 16-byte core matrices of 128 contiguous bytes, the next
// one along k 128 bytes on (leading offset), the next 8 rows 1024 bytes on (stride offset).
template <bool SWZ> __device__ __forceinline__ uint64_t xlw_desc(uint32_t saddr) {
  return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)((SWZ ? 16 : 128) >> 4) << 16)
         | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)(SWZ ? 1 : 0) << 62);
}
// Byte offset of 16-byte piece c (k 8c..8c+7) of row r in a tile of 64 k: SWZ, rows of 128 bytes
// with the pieces XOR-permuted by r % 8; else 8-row groups of 8 core matrices.
template <bool SWZ> __device__ __forceinline__ uint32_t xlw_piece(int r, int c) {
  return SWZ ? r * 128 + ((c ^ (r & 7)) << 4) : (r >> 3) * 1024 + c * 128 + (r & 7) * 16;
}
// Start of the k16 slice kk (0..3) of a tile: SWZ, 32 bytes into each row; else 2 core matrices on.
template <bool SWZ> __device__ __forceinline__ uint32_t xlw_kslice(int kk) { return kk * (SWZ ? 32 : 256); }
__device__ __forceinline__ void xlw_fence_operand(float& r) { asm volatile("" : "+f"(r) :: "memory"); }
""" + _wgmma_specializations() + "\n"

_SOURCE = """
    // x [M, K], w [N, K] (T, row-contiguous, K % 8 == 0) -> y [M, N] (OT = T) when the block
    // takes all of K, else this split's float32 partial sums y [S, M, N] (OT = float).
    constexpr int R = 64 * TM;                  // weight rows per block
    constexpr int STAGE = (R + NW) * 128;       // bytes per ring slot: R weight rows, NW x rows
    constexpr int ACC = NW / 2;                 // accumulators per thread and 64-row tile
    const int M = x_shape[0];
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int KS = ((K + 63) / 64 + gridDim.y - 1) / gridDim.y * 64;   // k per split
    const int k0 = blockIdx.y * KS;
    const int k1 = min(K, k0 + KS);
    const int nsteps = k1 > k0 ? (k1 - k0 + 63) / 64 : 0;
    const int row0 = blockIdx.x * R;
    const int tid = threadIdx.x;

    extern __shared__ uint8_t xlw_smem[];
    const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(xlw_smem));
    const uint32_t ring = (raw + 1023u) & ~1023u;

    // Slot st <- k step s of the block's weight rows and of x, rows of 8 pieces of 16 bytes
    // (consecutive threads: consecutive pieces of a row, whole 128-byte lines), piece c of row r
    // at xlw_piece (SWZ: r * 128 + 16 (c ^ (r & 7)), the 128-byte swizzle). One commit group per step.
    auto issue = [&](int s, int st) {
      const int kb = k0 + s * 64;
      #pragma unroll 4
      for (int i = tid; i < (R + NW) * 8; i += 128) {
        const int r = i >> 3, c = i & 7;
        const int k = kb + c * 8;
        const bool is_w = r < R;
        const int src_row = is_w ? row0 + r : r - R;
        const bool ok = s < nsteps && k < k1 && src_row < (is_w ? N : M);
        const T* src = (is_w ? w : x) + (size_t)src_row * K + k;
        xlw_cp_async16(ring + st * STAGE + xlw_piece<SWZ>(r, c),
                       ok ? static_cast<const void*>(src) : static_cast<const void*>(w), ok);
      }
      xlw_cp_commit();
    };

    float acc[TM][ACC];
    #pragma unroll
    for (int t = 0; t < TM; ++t) {
      #pragma unroll
      for (int j = 0; j < ACC; ++j) acc[t][j] = 0.0f;
    }

    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s, s);
    for (int s = 0; s < nsteps; ++s) {
      xlw_cp_wait<STAGES - 2>();                // this thread's copies of step s have landed
      asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory");  // visible to the tensor cores
      __syncthreads();                          // everyone's, and step s-1's slot is free
      issue(s + STAGES - 1, (s + STAGES - 1) % STAGES);
      const uint32_t slot = ring + (s % STAGES) * STAGE;
      asm volatile("wgmma.fence.sync.aligned;\\n" ::: "memory");
      #pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t db = xlw_desc<SWZ>(slot + R * 128 + xlw_kslice<SWZ>(kk));
        #pragma unroll
        for (int t = 0; t < TM; ++t) xl_wgmma<NW, T>(acc[t], xlw_desc<SWZ>(slot + t * 64 * 128 + xlw_kslice<SWZ>(kk)), db);
      }
      asm volatile("wgmma.commit_group.sync.aligned;\\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;\\n" ::: "memory");
      #pragma unroll
      for (int t = 0; t < TM; ++t) {
        #pragma unroll
        for (int j = 0; j < ACC; ++j) xlw_fence_operand(acc[t][j]);
      }
    }
    xlw_cp_wait<0>();

    // acc[t][4j + e]: weight row 16 warp + lane / 4 + 8 (e >> 1) of tile t, x row 8j + 2 (lane % 4) + (e & 1).
    const int warp = tid >> 5, lane = tid & 31;
    const size_t out0 = (size_t)blockIdx.y * M * N;
    #pragma unroll
    for (int t = 0; t < TM; ++t) {
      #pragma unroll
      for (int j = 0; j < ACC; ++j) {
        const int n = row0 + t * 64 + warp * 16 + (lane >> 2) + 8 * ((j & 3) >> 1);
        const int m = (j >> 2) * 8 + 2 * (lane & 3) + (j & 1);
        if (n < N && m < M) y[out0 + (size_t)m * N + n] = static_cast<OT>(acc[t][j]);
      }
    }
"""

_STREAMK_HEADER = '#include "mlx/backend/cuda/device/unary_ops.cuh"\n' + _HEADER


def _prefetch(header: str, name: str) -> tuple[str, str]:
    """``header`` with the copies' L2 prefetch of :data:`L2_PREFETCH` bytes, and the kernel ``name``
    marked where that is not the 128 the sources are written with (MLX caches kernels by name)."""
    if L2_PREFETCH not in (0, 64, 128, 256):
        raise ValueError(f"XLSTM_METAL_WGMMA_L2_PREFETCH={L2_PREFETCH}: one of 0, 64, 128, 256")
    if L2_PREFETCH == 128:
        return header, name
    qualifier = f".L2::{L2_PREFETCH}B" if L2_PREFETCH else ""
    return header.replace(".L2::128B", qualifier), f"{name}_p{L2_PREFETCH}"

_STREAMK_SOURCE = """
    // x [M, K], w [N, K] (T, row-contiguous, K % 8 == 0) -> y [M, N] (T); part [G, 2, 128, TM * ACC]
    // float32: the partial sums of the (at most two) tiles a block shares with other blocks, then
    // G x 2 arrival flags of 8 bytes.
    // The work is T tiles x S k steps ("units", tile-major); block b of the G blocks takes units
    // [b U / G, (b + 1) U / G): whole tiles it stores itself, pieces of tiles (a segment) it
    // writes as partial sums; the segment that arrives last at a tile adds them all, in the order
    // of the blocks, so the result does not depend on which one arrives last. No state outlives
    // the launch (no counters in module memory), and no block waits for another.
    constexpr int R = 64 * TM;                  // weight rows per tile
    constexpr int STAGE = (R + NW * (SWIGLU ? 2 : 1) + @NG_ROWS@) * 128;  // ring slot: R weight rows, NW x rows (+ NW of up)
    constexpr int ACC = NW / 2;                 // accumulators per thread and 64-row tile
    const int M = x_shape[0];
    const int XS = x_shape[1];                  // x's row stride
    const int K = SWIGLU ? XS / 2 : XS;
    const int N = w_shape[0];
    const int S = (K + 63) / 64;
    const long long G = gridDim.x;
    const long long U = (long long)((N + R - 1) / R) * S;
    const int b = blockIdx.x;
    const long long u0 = (long long)b * U / G;
    const long long u1 = (long long)(b + 1) * U / G;
    const int nunits = (int)(u1 - u0);
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    // The block that owns unit u (the largest bb with bb U / G <= u), and which of a block's two
    // partial-sum slots its segment of the tile starting at unit ts uses (0: the tile it starts in).
    auto owner = [&](long long u) -> int { return (int)(((u + 1) * G - 1) / U); };
    auto slot_of = [&](int bb, long long ts) -> int { return ts < (long long)bb * U / G ? 0 : 1; };

    extern __shared__ uint8_t xlw_smem[];
    __shared__ int s_last;
    const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(xlw_smem));
    const uint32_t ring = (raw + 1023u) & ~1023u;

    // Slot st <- local unit i (tile (u0 + i) / S, k step (u0 + i) % S): as the split kernel's issue.
    // SWIGLU: x is a gate|up product [M, 2K]: the product's x is silu(gate) * up, each op rounded
    // to T as cells.ffn.swiglu's ops are. A thread copies a piece of gate into x's tile and the
    // same piece of up into the slot's last NW rows, and after its copies land it makes the
    // piece silu(gate) * up in place (its own pieces only: no barrier before).
    auto issue = [&](int i, int st) {
      const long long u = u0 + i;
      const int tile = (int)(u / S);
      const int kb = (int)(u - (long long)tile * S) * 64;
      const int row0 = tile * R;
      const bool live = i < nunits;
      #pragma unroll 4
      for (int e = tid; e < R * 8; e += 128) {
        const int r = e >> 3, c = e & 7;
        const int k = kb + c * 8;
        const bool ok = live && k < K && row0 + r < N;
        const T* src = w + (size_t)(row0 + r) * K + k;
        xlw_cp_async16(ring + st * STAGE + xlw_piece<SWZ>(r, c),
                       ok ? static_cast<const void*>(src) : static_cast<const void*>(w), ok);
      }
      #pragma unroll
      for (int e = tid; e < NW * 8; e += 128) {
        const int r = e >> 3, c = e & 7;
        const int k = kb + c * 8;
        const bool ok = live && k < K && r < M;
        const T* src = x + (size_t)r * XS + k;
        xlw_cp_async16(ring + st * STAGE + xlw_piece<SWZ>(R + r, c),
                       ok ? static_cast<const void*>(src) : static_cast<const void*>(w), ok);
        if constexpr (SWIGLU)
          xlw_cp_async16(ring + st * STAGE + (R + NW) * 128 + e * 16,
                         ok ? static_cast<const void*>(src + K) : static_cast<const void*>(w), ok);
@NG_ISSUE@
      }
      xlw_cp_commit();
    };
    // acc[t][4j + e]: weight row 16 warp + lane / 4 + 8 (e >> 1) of tile t, x row 8j + 2 (lane % 4) + (e & 1).
    auto store = [&](int row0, float (&v)[TM][ACC]) {
      #pragma unroll
      for (int t = 0; t < TM; ++t) {
        #pragma unroll
        for (int j = 0; j < ACC; ++j) {
          const int n = row0 + t * 64 + warp * 16 + (lane >> 2) + 8 * ((j & 3) >> 1);
          const int m = (j >> 2) * 8 + 2 * (lane & 3) + (j & 1);
          if (n < N && m < M) y[(size_t)m * N + n] = static_cast<T>(v[t][j]);
        }
      }
    };
    auto part_at = [&](int bb, int which) -> float* {
      return part + ((size_t)(bb * 2 + which) * 128 + tid) * (TM * ACC);
    };
    // After the partial sums: a flag per (block, slot), 8 bytes each (the partial sums' size is a
    // multiple of 16 bytes), read and written through volatile accesses (L2, not L1).
    volatile unsigned long long* flags = reinterpret_cast<volatile unsigned long long*>(part + (size_t)G * 2 * 128 * TM * ACC);

    float acc[TM][ACC];
    #pragma unroll
    for (int t = 0; t < TM; ++t) {
      #pragma unroll
      for (int j = 0; j < ACC; ++j) acc[t][j] = 0.0f;
    }
    int shared_tiles[2] = {0, 0}, nshared = 0;  // the (at most two) tiles this block shares

    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s, s);
@NG_PROLOGUE@
    for (int i = 0; i < nunits; ++i) {
      xlw_cp_wait<STAGES - 2>();                // this thread's copies of unit i have landed
@NG_TRANSFORM@
      if constexpr (SWIGLU) {
        uint8_t* sl = xlw_smem + (ring - raw) + (i % STAGES) * STAGE;
        #pragma unroll
        for (int e = tid; e < NW * 8; e += 128) {
          uint4* gp = reinterpret_cast<uint4*>(sl + xlw_piece<SWZ>(R + (e >> 3), e & 7));
          const uint4 uv = *reinterpret_cast<const uint4*>(sl + (R + NW) * 128 + e * 16);
          uint4 gv = *gp;
          T* g = reinterpret_cast<T*>(&gv);
          const T* up = reinterpret_cast<const T*>(&uv);
          #pragma unroll
          for (int q = 0; q < 8; ++q) {
            const T sg = Sigmoid{}(g[q]);
            const T silu = g[q] * sg;
            g[q] = silu * up[q];
          }
          *gp = gv;
        }
      }
      asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory");  // visible to the tensor cores
      __syncthreads();                          // everyone's, and unit i-1's slot is free
      issue(i + STAGES - 1, (i + STAGES - 1) % STAGES);
      const uint32_t slot = ring + (i % STAGES) * STAGE;
      asm volatile("wgmma.fence.sync.aligned;\\n" ::: "memory");
      #pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t db = xlw_desc<SWZ>(slot + R * 128 + xlw_kslice<SWZ>(kk));
        #pragma unroll
        for (int t = 0; t < TM; ++t) xl_wgmma<NW, T>(acc[t], xlw_desc<SWZ>(slot + t * 64 * 128 + xlw_kslice<SWZ>(kk)), db);
      }
      asm volatile("wgmma.commit_group.sync.aligned;\\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;\\n" ::: "memory");
      #pragma unroll
      for (int t = 0; t < TM; ++t) {
        #pragma unroll
        for (int j = 0; j < ACC; ++j) xlw_fence_operand(acc[t][j]);
      }

      const long long u = u0 + i;
      const int tile = (int)(u / S);
      const long long ts = (long long)tile * S;
      if (u != ts + S - 1 && i != nunits - 1) continue;   // the tile's segment goes on
      if (ts >= u0 && ts + S <= u1) {
        store(tile * R, acc);                   // the whole tile here
      } else {
        // A piece of a tile: its partial sums out (no wait: the ring keeps streaming); the
        // tile's segments meet after the loop.
        float* mine = part_at(b, slot_of(b, ts));
        #pragma unroll
        for (int t = 0; t < TM; ++t) {
          #pragma unroll
          for (int j = 0; j < ACC; j += 4)
            __stcg(reinterpret_cast<float4*>(mine + t * ACC + j), make_float4(acc[t][j], acc[t][j + 1], acc[t][j + 2], acc[t][j + 3]));
        }
        shared_tiles[nshared++] = tile;
      }
      #pragma unroll
      for (int t = 0; t < TM; ++t) {
        #pragma unroll
        for (int j = 0; j < ACC; ++j) acc[t][j] = 0.0f;
      }
    }
    xlw_cp_wait<0>();

    // Arrival at each shared tile: this segment's flag <- the launch's token for the tile (the
    // flags live in this launch's own part buffer: launches that run side by side share
    // nothing), then a look at the others' flags. Sequentially consistent fences order each
    // segment's flag store before its loads, so the last segment to arrive sees every flag set
    // (an earlier one may too: it then adds the same sums in the same order and stores the same
    // values). Whoever finishes the tile clears its flags, so no later launch given this memory
    // meets them.
    if (nshared > 0) __threadfence();           // this block's partial sums visible before its flags
    for (int p = 0; p < nshared; ++p) {
      const int tile = shared_tiles[p];
      const long long ts = (long long)tile * S;
      const int first = owner(ts), last = owner(ts + S - 1);
      const unsigned long long token = (reinterpret_cast<unsigned long long>(y) ^ 0x9E3779B97F4A7C15ull)
                                       + 0x100000001B3ull * (unsigned long long)(tile + 1);
      __syncthreads();
      if (warp == 0) {                          // the first warp looks at up to 32 flags at once
        if (lane == 0) {
          flags[b * 2 + slot_of(b, ts)] = token;
          __threadfence();
        }
        __syncwarp();
        __threadfence();
        bool set = true;
        for (int bb = first + lane; bb <= last; bb += 32) set = set && flags[bb * 2 + slot_of(bb, ts)] == token;
        const bool done = __all_sync(0xffffffffu, set);
        if (done) {
          for (int bb = first + lane; bb <= last; bb += 32) flags[bb * 2 + slot_of(bb, ts)] = 0ull;
        }
        if (lane == 0) s_last = done;
      }
      __syncthreads();
      if (s_last) {
        __threadfence();
        // The tile's sum: every segment's partial sums (this block's too, read back from L2),
        // in the order of the blocks.
        #pragma unroll
        for (int t = 0; t < TM; ++t) {
          #pragma unroll
          for (int j = 0; j < ACC; ++j) acc[t][j] = 0.0f;
        }
        // UNR segments' loads in flight at once, added in the blocks' order.
        constexpr int CH = TM * ACC / 4;        // float4 per thread and segment
        constexpr int UNR = CH <= 4 ? 4 : (CH <= 8 ? 2 : 1);
        for (int bb = first; bb <= last; bb += UNR) {
          float4 v[UNR][CH];
          #pragma unroll
          for (int g = 0; g < UNR; ++g) {
            if (bb + g <= last) {
              const float4* q = reinterpret_cast<const float4*>(part_at(bb + g, slot_of(bb + g, ts)));
              #pragma unroll
              for (int c = 0; c < CH; ++c) v[g][c] = __ldcg(q + c);
            }
          }
          #pragma unroll
          for (int g = 0; g < UNR; ++g) {
            if (bb + g <= last) {
              #pragma unroll
              for (int t = 0; t < TM; ++t) {
                #pragma unroll
                for (int j = 0; j < ACC; j += 4) {
                  const float4 q = v[g][(t * ACC + j) / 4];
                  acc[t][j] += q.x; acc[t][j + 1] += q.y; acc[t][j + 2] += q.z; acc[t][j + 3] += q.w;
                }
              }
            }
          }
        }
        store(tile * R, acc);
      }
    }
"""


# The output cell's norm and gate inside out_proj's launch (NG): x is h [M, NH DV] of the step,
# and the product's x is sigmoid(o~) * LayerNorm_head(h) * norm weight, each op rounded to T as
# decode.output_norm_gate rounds it. Before its loop a block takes, for each head its units touch,
# every row's mean and 1 / std over the head's DV values of h (a warp per row and head, while the
# ring's first copies fly). A ring slot holds besides x's tile (h) NW rows of o~ and one row (of
# 8, for the 1024-byte period) of the norm weight; each thread makes its own pieces of x in place.
# o~ is a column slice of the projections' product: copied 16 bytes at a time where its rows are
# 16-byte aligned, else read element by element.
_NG_ROWS = "NW + 8"
_NG_ISSUE = """
        if (o_vec) {
          const size_t oo = (size_t)r * o_strides[0] + (size_t)k * o_strides[2];
          xlw_cp_async16(ring + st * STAGE + (R + NW) * 128 + e * 16,
                         ok ? static_cast<const void*>(o + oo) : static_cast<const void*>(w), ok);
        }
        if (e < 8) {
          const bool okw = live && k < K;
          xlw_cp_async16(ring + st * STAGE + (R + 2 * NW) * 128 + e * 16,
                         okw ? static_cast<const void*>(nw + k) : static_cast<const void*>(w), okw);
        }
"""
_NG_PROLOGUE = """
    {
      unsigned int heads = 0u;
@NG_HEADS@
      for (int pair = warp; pair < NH * M; pair += 4) {
        const int hd = pair / M, m = pair % M;
        if (!((heads >> hd) & 1u)) continue;
        const T* hp = x + (size_t)m * XS + hd * DV;
        float v[DV / 32];
        float sum = 0.0f;
        #pragma unroll
        for (int j = 0; j < DV / 32; ++j) { v[j] = static_cast<float>(hp[lane + 32 * j]); sum += v[j]; }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        const float mean = sum / DV;
        float sq = 0.0f;
        #pragma unroll
        for (int j = 0; j < DV / 32; ++j) { const float d = v[j] - mean; sq += d * d; }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
        if (lane == 0) { ng_mean[hd * NW + m] = mean; ng_rstd[hd * NW + m] = rsqrtf(sq / DV + eps[0]); }
      }
      __syncthreads();
    }
"""
_NG_TRANSFORM = """
      __syncthreads();                          // the norm weight's row: copied by 8 threads, read by all
      {
        uint8_t* sl = xlw_smem + (ring - raw) + (XSTEP % STAGES) * STAGE;
        const int kb = XKB;
        const int hd = kb / DV;
        #pragma unroll
        for (int e = tid; e < NW * 8; e += 128) {
          const int r = e >> 3, c = e & 7;
          uint4* hpc = reinterpret_cast<uint4*>(sl + xlw_piece<SWZ>(R + r, c));
          if (r >= M) continue;             // zero rows stay zero
          uint4 hv = *hpc;
          uint4 ov;
          if (o_vec) {
            ov = *reinterpret_cast<const uint4*>(sl + (R + NW) * 128 + e * 16);
          } else {
            T* op = reinterpret_cast<T*>(&ov);
            #pragma unroll
            for (int q = 0; q < 8; ++q) op[q] = o[(size_t)r * o_strides[0] + (size_t)(kb + c * 8 + q) * o_strides[2]];
          }
          const uint4 wv = *reinterpret_cast<const uint4*>(sl + (R + 2 * NW) * 128 + c * 16);
          T* hh = reinterpret_cast<T*>(&hv);
          const T* og = reinterpret_cast<const T*>(&ov);
          const T* ww = reinterpret_cast<const T*>(&wv);
          const float mean = ng_mean[hd * NW + r], rstd = ng_rstd[hd * NW + r];
          #pragma unroll
          for (int q = 0; q < 8; ++q) {
            const float normed = static_cast<float>(static_cast<T>((static_cast<float>(hh[q]) - mean) * rstd));
            const float scaled = static_cast<float>(static_cast<T>(normed * static_cast<float>(ww[q])));
            const float gate = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-static_cast<float>(og[q])))));
            hh[q] = static_cast<T>(gate * scaled);
          }
          *hpc = hv;
        }
      }
"""
_NG_DECL = """
    constexpr int NH_MAX = 16;
    const int NH = K / DV;
    __shared__ float ng_mean[NH_MAX * NW], ng_rstd[NH_MAX * NW];
    const bool o_vec = (reinterpret_cast<uintptr_t>(o) & 15) == 0 && o_strides[2] == 1 && o_strides[0] % 8 == 0;
"""


# The split kernel with x made in shared memory (SwiGLU of a gate|up product, or the output
# cell's norm and gate), the stream-K kernel's pieces in its loop: a block's k range [k0, k1).
_SPLIT_X_SOURCE = """
    // x [M, K] (SWIGLU: a gate|up product [M, 2K]; NG: h of the step), w [N, K] -> y [M, N] (OT = T)
    // when the block takes all of K, else this split's float32 partial sums y [S, M, N] (OT = float).
    constexpr int R = 64 * TM;
    constexpr int STAGE = (R + NW * (SWIGLU ? 2 : 1) + @NG_ROWS@) * 128;
    constexpr int ACC = NW / 2;
    const int M = x_shape[0];
    const int XS = x_shape[1];
    const int K = SWIGLU ? XS / 2 : XS;
    const int N = w_shape[0];
    const int KS = ((K + 63) / 64 + gridDim.y - 1) / gridDim.y * 64;   // k per split
    const int k0 = blockIdx.y * KS;
    const int k1 = min(K, k0 + KS);
    const int nsteps = k1 > k0 ? (k1 - k0 + 63) / 64 : 0;
    const int row0 = blockIdx.x * R;
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
@NG_DECL@
    extern __shared__ uint8_t xlw_smem[];
    const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(xlw_smem));
    const uint32_t ring = (raw + 1023u) & ~1023u;

    auto issue = [&](int s, int st) {
      const int kb = k0 + s * 64;
      const bool live = s < nsteps;
      #pragma unroll 4
      for (int e = tid; e < R * 8; e += 128) {
        const int r = e >> 3, c = e & 7;
        const int k = kb + c * 8;
        const bool ok = live && k < k1 && row0 + r < N;
        const T* src = w + (size_t)(row0 + r) * K + k;
        xlw_cp_async16(ring + st * STAGE + xlw_piece<SWZ>(r, c),
                       ok ? static_cast<const void*>(src) : static_cast<const void*>(w), ok);
      }
      #pragma unroll
      for (int e = tid; e < NW * 8; e += 128) {
        const int r = e >> 3, c = e & 7;
        const int k = kb + c * 8;
        const bool ok = live && k < k1 && r < M;
        const T* src = x + (size_t)r * XS + k;
        xlw_cp_async16(ring + st * STAGE + xlw_piece<SWZ>(R + r, c),
                       ok ? static_cast<const void*>(src) : static_cast<const void*>(w), ok);
        if constexpr (SWIGLU)
          xlw_cp_async16(ring + st * STAGE + (R + NW) * 128 + e * 16,
                         ok ? static_cast<const void*>(src + K) : static_cast<const void*>(w), ok);
@NG_ISSUE@
      }
      xlw_cp_commit();
    };

    float acc[TM][ACC];
    #pragma unroll
    for (int t = 0; t < TM; ++t) {
      #pragma unroll
      for (int j = 0; j < ACC; ++j) acc[t][j] = 0.0f;
    }

    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s, s);
@NG_PROLOGUE@
    for (int s = 0; s < nsteps; ++s) {
      xlw_cp_wait<STAGES - 2>();                // this thread's copies of step s have landed
@NG_TRANSFORM@
      if constexpr (SWIGLU) {
        uint8_t* sl = xlw_smem + (ring - raw) + (s % STAGES) * STAGE;
        #pragma unroll
        for (int e = tid; e < NW * 8; e += 128) {
          uint4* gp = reinterpret_cast<uint4*>(sl + xlw_piece<SWZ>(R + (e >> 3), e & 7));
          const uint4 uv = *reinterpret_cast<const uint4*>(sl + (R + NW) * 128 + e * 16);
          uint4 gv = *gp;
          T* g = reinterpret_cast<T*>(&gv);
          const T* up = reinterpret_cast<const T*>(&uv);
          #pragma unroll
          for (int q = 0; q < 8; ++q) {
            const T sg = Sigmoid{}(g[q]);
            const T silu = g[q] * sg;
            g[q] = silu * up[q];
          }
          *gp = gv;
        }
      }
      asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory");  // visible to the tensor cores
      __syncthreads();                          // everyone's, and step s-1's slot is free
      issue(s + STAGES - 1, (s + STAGES - 1) % STAGES);
      const uint32_t slot = ring + (s % STAGES) * STAGE;
      asm volatile("wgmma.fence.sync.aligned;\\n" ::: "memory");
      #pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t db = xlw_desc<SWZ>(slot + R * 128 + xlw_kslice<SWZ>(kk));
        #pragma unroll
        for (int t = 0; t < TM; ++t) xl_wgmma<NW, T>(acc[t], xlw_desc<SWZ>(slot + t * 64 * 128 + xlw_kslice<SWZ>(kk)), db);
      }
      asm volatile("wgmma.commit_group.sync.aligned;\\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;\\n" ::: "memory");
      #pragma unroll
      for (int t = 0; t < TM; ++t) {
        #pragma unroll
        for (int j = 0; j < ACC; ++j) xlw_fence_operand(acc[t][j]);
      }
    }
    xlw_cp_wait<0>();

    const size_t out0 = (size_t)blockIdx.y * M * N;
    #pragma unroll
    for (int t = 0; t < TM; ++t) {
      #pragma unroll
      for (int j = 0; j < ACC; ++j) {
        const int n = row0 + t * 64 + warp * 16 + (lane >> 2) + 8 * ((j & 3) >> 1);
        const int m = (j >> 2) * 8 + 2 * (lane & 3) + (j & 1);
        if (n < N && m < M) y[out0 + (size_t)m * N + n] = static_cast<OT>(acc[t][j]);
      }
    }
"""
_SPLIT_NG_HEADS = """
      if (nsteps > 0) for (int hd = k0 / DV; hd <= (k1 - 1) / DV; ++hd) heads |= 1u << hd;
"""


def _split_x_source(norm_gate: bool) -> str:
    """The split kernel's source with x made in shared memory: SwiGLU (template SWIGLU) or, with
    ``norm_gate``, the output cell's norm and gate."""
    src = _SPLIT_X_SOURCE
    if norm_gate:
        parts = {"@NG_ROWS@": _NG_ROWS, "@NG_ISSUE@": _NG_ISSUE.replace("okw = live && k < K", "okw = live && k < k1"),
                 "@NG_PROLOGUE@": _NG_PROLOGUE.replace("@NG_HEADS@", _SPLIT_NG_HEADS),
                 "@NG_TRANSFORM@": _NG_TRANSFORM.replace("XSTEP", "s").replace("XKB", "k0 + s * 64"),
                 "@NG_DECL@": _NG_DECL}
    else:
        parts = dict.fromkeys(("@NG_ISSUE@", "@NG_PROLOGUE@", "@NG_TRANSFORM@", "@NG_DECL@"), "") | {"@NG_ROWS@": "0"}
    for key, text in parts.items():
        src = src.replace(key, text)
    return src


_STREAMK_NG_HEADS = """
      if (nunits >= S) heads = ~0u;
      else for (long long uu = u0; uu < u1; ++uu) heads |= 1u << (int)(((uu % S) * 64) / DV);
"""


def _streamk_source(norm_gate: bool) -> str:
    """The stream-K kernel's source, with the output cell's norm and gate in its loads of x or not."""
    parts = {"@NG_ROWS@": _NG_ROWS, "@NG_ISSUE@": _NG_ISSUE,
             "@NG_PROLOGUE@": _NG_PROLOGUE.replace("@NG_HEADS@", _STREAMK_NG_HEADS),
             "@NG_TRANSFORM@": _NG_TRANSFORM.replace("XSTEP", "i").replace("XKB", "(int)((u0 + i) % S) * 64")} \
        if norm_gate else dict.fromkeys(("@NG_ISSUE@", "@NG_PROLOGUE@", "@NG_TRANSFORM@"), "") | {"@NG_ROWS@": "0"}
    src = _STREAMK_SOURCE
    for key, text in parts.items():
        src = src.replace(key, text)
    if norm_gate:  # its declarations once the sizes are known
        anchor = "    // The block that owns unit u"
        src = src.replace(anchor, _NG_DECL + anchor, 1)
    return src


def _kernel(shared_bytes: int):
    header, name = _prefetch(_HEADER, "xlstm_wgmma_matmul")
    return product_kernel(name, _SOURCE, header, shared_bytes)


_streamk_kernels: dict[tuple[int, bool, int], object] = {}


def _streamk_kernel(shared_bytes: int, norm_gate: bool = False):
    kernel = _streamk_kernels.get((shared_bytes, norm_gate, L2_PREFETCH))
    if kernel is None:
        header, name = _prefetch(_STREAMK_HEADER, f"xlstm_wgmma_streamk{'_ng' if norm_gate else ''}_{shared_bytes}")
        kernel = _streamk_kernels[(shared_bytes, norm_gate, L2_PREFETCH)] = mx.fast.cuda_kernel(
            name=name,
            input_names=["x", "w", "o", "nw", "eps"] if norm_gate else ["x", "w"], output_names=["y", "part"],
            source=_streamk_source(norm_gate), header=header, shared_memory=shared_bytes,
            ensure_row_contiguous=not norm_gate)  # o~: a strided column slice, read where it is
    return kernel


def streamk_grid(n: int, k: int, config: WgmmaConfig, nw: int, blocks: int | None = None) -> int:
    """Blocks of a stream-K launch for ``n`` outputs, ``k`` inputs and ``nw`` padded rows of x:
    ``blocks``, or by default :data:`SMS` x as many as fit in an SM's shared memory (at most
    :data:`STREAMK_MAX_PER_SM`): every block resident at once, no second wave; at most one
    per unit (a row tile's k step)."""
    units = -(-n // config.rows_per_block()) * -(-k // BK)
    if blocks is None:
        per_sm = SM_SHARED_BYTES // (config.shared_bytes(nw) + BLOCK_RESERVED_BYTES)
        blocks = SMS * max(1, min(STREAMK_MAX_PER_SM, per_sm))
    return max(1, min(units, blocks))


def streamk_segments(tiles: int, steps: int, blocks: int) -> list[list[tuple[int, int, int, int]]]:
    """The stream-K kernel's partition, as its integer arithmetic computes it: for each block, its
    segments (tile, first k step, end k step, partial-sum slot or -1 for a whole tile). Every
    tile's steps are covered once, a block shares at most two tiles, and its shared segments
    use slots 0 (the tile it starts in) and 1 (the tile it ends in). For tests and docs."""
    units = tiles * steps
    out = []
    for b in range(blocks):
        u0, u1 = b * units // blocks, (b + 1) * units // blocks
        segs, u = [], u0
        while u < u1:
            tile = u // steps
            ts = tile * steps
            end = min(u1, ts + steps)
            whole = ts >= u0 and ts + steps <= u1
            segs.append((tile, u - ts, end - ts, -1 if whole else (0 if ts < u0 else 1)))
            u = end
        out.append(segs)
    return out


def streamk_owner(u: int, units: int, blocks: int) -> int:
    """The block that computes unit ``u`` (the kernel's ``owner``)."""
    return ((u + 1) * blocks - 1) // units


def wgmma_supported(x: mx.array, w: mx.array) -> bool:
    """True when :func:`wgmma_matmul` takes ``x`` [..., K] and ``w`` [N, K] (CUDA, bf16/fp16 of one
    dtype, K a multiple of 8, 1 to :data:`MAX_ROWS` rows). It does not check the GPU: the kernel
    needs compute capability 9.0 (sm_90a)."""
    return (
        cuda_available()
        and x.dtype in (mx.bfloat16, mx.float16)
        and w.dtype == x.dtype
        and w.ndim == 2
        and x.ndim >= 1
        and x.shape[-1] == w.shape[1]
        and w.shape[1] % 8 == 0
        and 0 < math.prod(x.shape[:-1]) <= MAX_ROWS
    )


def wgmma_matmul(x: mx.array, w: mx.array, config: WgmmaConfig | None = None,
                 splits: int | None = None, schedule: str | None = None, blocks: int | None = None) -> mx.array:
    """x [..., K] @ w.T -> [..., N] (x's dtype) through the wgmma kernel (CUDA sm_90a only; the
    cases :func:`wgmma_supported` accepts; ``config`` defaults to :func:`default_config`,
    ``splits`` of k to :func:`k_splits`; ``schedule`` one of :data:`SCHEDULES`, by default
    :data:`SCHEDULE`; ``blocks``: the stream-K grid, by default :func:`streamk_grid`'s). No
    gradient: :func:`.skinny.linear_product` is the differentiable entry point."""
    if not wgmma_supported(x, w):
        raise ValueError(f"wgmma_matmul: needs CUDA, bf16/fp16 x and w of one dtype, K % 8 == 0 and "
                         f"1..{MAX_ROWS} rows; got x {x.shape} {x.dtype}, w {w.shape} {w.dtype}")

    lead, K, N = x.shape[:-1], x.shape[-1], w.shape[0]
    M = math.prod(lead)
    nw = padded_rows(M)
    cfg = config or default_config(M, N)
    schedule = schedule or SCHEDULE
    if schedule not in SCHEDULES:
        raise ValueError(f"wgmma schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    if _resolved_schedule(schedule, N, K, cfg, nw, blocks) == "streamk":
        return _streamk_launch(x.reshape(M, K), w, cfg, blocks, False).reshape(*lead, N)
    splits = k_splits(N, K, cfg, splits)
    (y,) = _kernel(cfg.shared_bytes(nw))(
        inputs=[x.reshape(M, K), w],
        template=[("T", x.dtype), ("OT", x.dtype if splits == 1 else mx.float32), ("NW", nw), ("TM", cfg.tm),
                  ("STAGES", cfg.stages), ("SWZ", cfg.swizzle)],
        grid=(-(-N // cfg.rows_per_block()) * 128, splits, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(M, N) if splits == 1 else (splits, M, N)],
        output_dtypes=[x.dtype if splits == 1 else mx.float32],
    )
    if splits > 1:
        y = reduce_splits(y, x.dtype)
    return y.reshape(*lead, N)


def _resolved_schedule(schedule: str, n: int, k: int, cfg: WgmmaConfig, slot_rows: int, blocks: int | None) -> str:
    """"split" or "streamk" for a product (``hybrid``: stream-K where 2 U >= S G)."""
    if schedule != "hybrid":
        return schedule
    steps = -(-k // BK)
    units = -(-n // cfg.rows_per_block()) * steps
    return "streamk" if 2 * units >= steps * streamk_grid(n, k, cfg, slot_rows, blocks or STREAMK_BLOCKS) else "split"


_split_x_kernels: dict[tuple[int, bool, int], object] = {}


def _split_x_launch(x: mx.array, w: mx.array, cfg: WgmmaConfig, splits: int | None, swiglu: bool,
                    ng: tuple | None = None) -> mx.array:
    """The split kernel with x made in shared memory: SwiGLU of x [M, 2K] (``swiglu``) or the norm
    and gate of h [M, K] (``ng`` = (o~, norm weight, eps array, DV)); w [N, K] -> [M, N]."""
    M, N, K = x.shape[0], w.shape[0], w.shape[1]
    nw = padded_rows(M)
    slot_rows = 2 * nw if swiglu else (2 * nw + 8 if ng else nw)
    splits = k_splits(N, K, cfg, splits)
    shared = cfg.shared_bytes(slot_rows)
    kernel = _split_x_kernels.get((shared, ng is not None, L2_PREFETCH))
    if kernel is None:
        header, name = _prefetch(_STREAMK_HEADER, f"xlstm_wgmma_split_x{'_ng' if ng else ''}_{shared}")
        kernel = _split_x_kernels[(shared, ng is not None, L2_PREFETCH)] = mx.fast.cuda_kernel(
            name=name,
            input_names=["x", "w", "o", "nw", "eps"] if ng else ["x", "w"], output_names=["y"],
            source=_split_x_source(ng is not None), header=header, shared_memory=shared,
            ensure_row_contiguous=ng is None)
    inputs = [x, w] if ng is None else [mx.contiguous(x), mx.contiguous(w), ng[0], mx.contiguous(ng[1]), ng[2]]
    template = [("T", x.dtype), ("OT", x.dtype if splits == 1 else mx.float32), ("NW", nw), ("TM", cfg.tm),
                ("STAGES", cfg.stages), ("SWZ", cfg.swizzle), ("SWIGLU", swiglu)] + ([("DV", ng[3])] if ng else [])
    (y,) = kernel(
        inputs=inputs, template=template,
        grid=(-(-N // cfg.rows_per_block()) * 128, splits, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(M, N) if splits == 1 else (splits, M, N)],
        output_dtypes=[x.dtype if splits == 1 else mx.float32],
    )
    return reduce_splits(y, x.dtype) if splits > 1 else y


def _streamk_launch(x: mx.array, w: mx.array, cfg: WgmmaConfig, blocks: int | None, swiglu: bool) -> mx.array:
    """The stream-K kernel on x [M, K] (or, with ``swiglu``, a gate|up product [M, 2K]) and w [N, K]."""
    M, N, K = x.shape[0], w.shape[0], w.shape[1]
    nw = padded_rows(M)
    slot_rows = 2 * nw if swiglu else nw  # x's rows in a ring slot (+ up's)
    grid = streamk_grid(N, K, cfg, slot_rows, blocks or STREAMK_BLOCKS)
    y, _ = _streamk_kernel(cfg.shared_bytes(slot_rows))(
        inputs=[x, w],
        template=[("T", x.dtype), ("NW", nw), ("TM", cfg.tm), ("STAGES", cfg.stages), ("SWZ", cfg.swizzle),
                  ("SWIGLU", swiglu)],
        grid=(grid * 128, 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(M, N), (grid * 2 * (cfg.rows_per_block() * nw + 2),)],  # + the flags
        output_dtypes=[x.dtype, mx.float32],
    )
    return y


def swiglu_config(rows: int, n: int) -> WgmmaConfig:
    """The launch shape of :func:`wgmma_swiglu_matmul`: :func:`default_config`'s, with as many
    ring stages fewer as keep two blocks in an SM's shared memory (a slot holds up's NW rows too)."""
    cfg = default_config(rows, n)
    nw2 = 2 * padded_rows(rows)
    stages = cfg.stages
    while stages > 2 and 2 * (WgmmaConfig(cfg.tm, stages, cfg.swizzle).shared_bytes(nw2) + BLOCK_RESERVED_BYTES) \
            > SM_SHARED_BYTES:
        stages -= 1
    return WgmmaConfig(cfg.tm, stages, cfg.swizzle)


def wgmma_swiglu_supported(y: mx.array, w: mx.array) -> bool:
    """True when :func:`wgmma_swiglu_matmul` takes the gate|up product ``y`` [..., 2K] and ``w``
    [N, K] (:func:`wgmma_supported`'s conditions with x = silu(gate) * up)."""
    return (y.ndim >= 1 and w.ndim == 2 and y.shape[-1] == 2 * w.shape[1]
            and wgmma_supported(y[..., : w.shape[1]], w))


def wgmma_swiglu_matmul(y: mx.array, w: mx.array, config: WgmmaConfig | None = None,
                        blocks: int | None = None, schedule: str | None = None, splits: int | None = None) -> mx.array:
    """``(silu(gate) * up) @ w.T`` for the gate|up product ``y`` [..., 2K] (gate the first K
    columns) and ``w`` [N, K], in one launch: the stream-K kernel makes each piece of x from y as
    it lands in shared memory, with the ops of :func:`xlstm_metal.cells.ffn.swiglu` in their
    order and rounding (so the bits of ``wgmma_matmul(swiglu_joined(y), w, schedule="streamk")``
    with the same launch shape), and the SwiGLU launch and its output are gone. ``schedule``
    (default :data:`SCHEDULE`): the split kernel (``splits`` of k) or the stream-K one (``blocks``).
    CUDA sm_90a only; no gradient (:func:`.skinny.swiglu_linear_product` is the differentiable entry point)."""
    if not wgmma_swiglu_supported(y, w):
        raise ValueError(f"wgmma_swiglu_matmul: needs CUDA, bf16/fp16 y [..., 2K] and w [N, K] of one dtype, "
                         f"K % 8 == 0 and 1..{MAX_ROWS} rows; got y {y.shape} {y.dtype}, w {w.shape} {w.dtype}")
    lead, N = y.shape[:-1], w.shape[0]
    M = math.prod(lead)
    cfg = config or swiglu_config(M, N)
    x2 = y.reshape(M, y.shape[-1])
    if _resolved_schedule(schedule or SCHEDULE, N, w.shape[1], cfg, 2 * padded_rows(M), blocks) == "streamk":
        return _streamk_launch(x2, w, cfg, blocks, True).reshape(*lead, N)
    return _split_x_launch(x2, w, cfg, splits, True).reshape(*lead, N)


#: Largest head count and width the norm-and-gate launch takes (its statistics live in shared memory).
NORM_GATE_MAX_HEADS = 16
NORM_GATE_MAX_DV = 1024
_eps_arrays: dict[float, mx.array] = {}


def wgmma_norm_gate_supported(h: mx.array, o_preact: mx.array, norm_weight: mx.array, w: mx.array) -> bool:
    """True when :func:`wgmma_norm_gate_matmul` takes h [B, NH, 1, DV], o~ [B, 1, NH DV] (any
    strides), the norm weight [NH DV] and w [N, NH DV]: one dtype (bf16/fp16), DV a multiple of 64
    up to :data:`NORM_GATE_MAX_DV`, at most :data:`NORM_GATE_MAX_HEADS` heads, 1 to
    :data:`MAX_ROWS` rows, CUDA."""
    if h.ndim != 4 or h.shape[2] != 1:
        return False
    B, NH, _, DV = h.shape
    return (DV % 64 == 0 and DV <= NORM_GATE_MAX_DV and NH <= NORM_GATE_MAX_HEADS
            and o_preact.shape == (B, 1, NH * DV) and norm_weight.shape == (NH * DV,)
            and o_preact.dtype == h.dtype and norm_weight.dtype == h.dtype
            and wgmma_supported(h.reshape(B, NH * DV), w))


def wgmma_norm_gate_matmul(h: mx.array, o_preact: mx.array, norm_weight: mx.array, eps: float, w: mx.array,
                           config: WgmmaConfig | None = None, blocks: int | None = None,
                           schedule: str | None = None, splits: int | None = None) -> mx.array:
    """``(sigmoid(o~) * MultiHeadLayerNorm(h)) @ w.T`` [B, 1, N] in one launch of the stream-K
    kernel: the output cell's norm and gate (as :func:`~xlstm_metal.kernels.fast.decode.output_norm_gate`
    computes them, each op rounded to the dtype; the heads' mean and variance summed in another
    order, so float32 round-off apart) made in shared memory as x's tiles land; o~ read where it
    is (a column slice of the projections' product). CUDA sm_90a; no gradient (inference)."""
    if not wgmma_norm_gate_supported(h, o_preact, norm_weight, w):
        raise ValueError(f"wgmma_norm_gate_matmul: unsupported h {h.shape} {h.dtype}, o {o_preact.shape} "
                         f"{o_preact.dtype}, norm weight {norm_weight.shape}, w {w.shape} {w.dtype}")
    B, NH, _, DV = h.shape
    K, N = NH * DV, w.shape[0]
    nw = padded_rows(B)
    cfg = config or norm_gate_config(B, N)
    slot_rows = 2 * nw + 8  # x's rows, o~'s rows, the norm weight's row (of 8)
    grid = streamk_grid(N, K, cfg, slot_rows, blocks or STREAMK_BLOCKS)
    e = _eps_arrays.get(float(eps))
    if e is None:
        e = _eps_arrays[float(eps)] = mx.array([float(eps)], dtype=mx.float32)
    if _resolved_schedule(schedule or SCHEDULE, N, K, cfg, slot_rows, blocks) != "streamk":
        return _split_x_launch(h.reshape(B, K), w, cfg, splits, False, (o_preact, norm_weight, e, DV)).reshape(B, 1, N)
    y, _ = _streamk_kernel(cfg.shared_bytes(slot_rows), True)(
        inputs=[mx.contiguous(h.reshape(B, K)), mx.contiguous(w), o_preact, mx.contiguous(norm_weight), e],
        template=[("T", h.dtype), ("NW", nw), ("TM", cfg.tm), ("STAGES", cfg.stages), ("SWZ", cfg.swizzle),
                  ("SWIGLU", False), ("DV", DV)],
        grid=(grid * 128, 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(B, N), (grid * 2 * (cfg.rows_per_block() * nw + 2),)],
        output_dtypes=[h.dtype, mx.float32],
    )
    return y.reshape(B, 1, N)


def norm_gate_config(rows: int, n: int) -> WgmmaConfig:
    """The launch shape of :func:`wgmma_norm_gate_matmul`: :func:`default_config`'s, with as many
    ring stages fewer as keep two blocks in an SM's shared memory."""
    cfg = default_config(rows, n)
    slot_rows = 2 * padded_rows(rows) + 8
    stages = cfg.stages
    static = 2 * NORM_GATE_MAX_HEADS * padded_rows(rows) * 4 + 16  # the statistics, the flag word
    while stages > 2 and 2 * (WgmmaConfig(cfg.tm, stages, cfg.swizzle).shared_bytes(slot_rows) + static
                              + BLOCK_RESERVED_BYTES) > SM_SHARED_BYTES:
        stages -= 1
    return WgmmaConfig(cfg.tm, stages, cfg.swizzle)
