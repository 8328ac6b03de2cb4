"""Skinny matrix products for decoding on NVIDIA GPUs: ``x @ w.T`` with 2-64 rows of x.

At 16 and 64 rows MLX runs these products through cuBLASLt, which read the 7B shape's weights at
0.9-2.9 TB/s on an H200 (copy rate 4.3 TB/s; benchmarks/NOTES.md): a decode step at batch 16 or
64 spent more time in its 128 products than the whole step's target. :func:`skinny_matmul` is
one ``mx.fast.cuda_kernel`` built to stream each weight once, on the tensor cores:

- Weights are the A operand of ``mma.sync`` m16n8k16 (16 output features per tile, float32
  accumulation), x the B operand (8 rows per tile, up to 8 tiles), as in the fused dequantize
  kernel of :mod:`.quantized`, whose fragment order this reuses: a thread reads 16 bytes (8
  values) of each of its two weight rows per 32-wide span of k and feeds them to two mma steps
  in an order of its own; x is read with the same order, so the dot products are unchanged.
- A warp owns TM 16-row tiles (x fragments reused across them); the WK warps of a block split K
  (chunks of U spans, interleaved) and add their partial tiles through shared memory; WN warps
  side by side take further rows and read the same x (so it comes from L1 once per block).
- Weight chunks go global -> shared memory with ``cp.async`` (L2 only, no L1 allocation) in a
  ring of STAGES chunks per warp, each lane reading back only what it copied itself (no block
  barrier in the loop): STAGES - 1 chunks per thread in flight without holding registers, which
  is what a bandwidth-bound kernel needs. x (small, read by every block) goes through L1.

The fast path takes bfloat16 or float16 x and w of the same dtype, w [N, K] with K a multiple of
8, 1 to :data:`MAX_ROWS` rows. :func:`linear_product` is the dispatch the model calls: the kernel
for :data:`MIN_ROWS`..:data:`MAX_ROWS` rows on CUDA (with a gradient: ``mx.custom_function``
whose vjp is the two plain products), ``x @ w.T`` (MLX's matmul, the reference) otherwise.
``XLSTM_METAL_SKINNY_GEMM=0`` (or :func:`set_skinny_gemm`) switches the kernel off.

:class:`FastLinear` is ``nn.Linear`` with :func:`linear_product` in its ``__call__`` (same
parameters, same keys); :func:`use_fast_linear_layers` switches a model's plain linear layers to
it in place and back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .step import cuda_available
from .tensor_cores import MMA_HEADER

#: Most rows of x the kernel takes (8 rows per tensor-core tile, 8 tiles).
MAX_ROWS = 64
#: Fewest rows :func:`linear_product` sends to the kernel: one row is MLX's own GEMV (3.7 TB/s on
#: the 7B shape, H200), which cuBLASLt does not serve.
MIN_ROWS = 2
_SPAN = 32  # k of one 16-byte chunk per weight row across the 4 lanes of a mma group

_enabled = os.environ.get("XLSTM_METAL_SKINNY_GEMM", "1") != "0"


def skinny_gemm_enabled() -> bool:
    """Whether :func:`linear_product` uses the kernel (default on; ``XLSTM_METAL_SKINNY_GEMM=0`` off)."""
    return _enabled


def set_skinny_gemm(enabled: bool) -> None:
    """Switch the kernel on or off for products traced from now on (compiled steps keep theirs)."""
    global _enabled
    _enabled = bool(enabled)


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch shape of the kernel: ``tm`` 16-row weight tiles per warp, ``wn`` x ``wk`` warps per
    block (``wk`` a power of two splitting K), chunks of ``u`` spans of 32 k, ``stages`` chunks
    in each warp's ring (``stages - 1`` in flight)."""

    tm: int = 1
    wn: int = 1
    wk: int = 8
    u: int = 2
    stages: int = 4

    def __post_init__(self):
        if min(self.tm, self.wn, self.wk, self.u) < 1 or self.wk & (self.wk - 1) or self.stages < 2:
            raise ValueError(f"bad skinny kernel config {self}")
        if self.wn * self.wk > 32:
            raise ValueError(f"{self.wn * self.wk} warps per block: at most 32")

    def rows_per_block(self) -> int:
        return 16 * self.tm * self.wn

    def shared_bytes(self, mt: int) -> int:
        ring = self.wn * self.wk * self.stages * self.u * self.tm * 2 * 32 * 16
        reduce = (self.wk // 2) * self.wn * self.tm * mt * 4 * 32 * 4
        return max(ring, reduce)


def default_config(rows: int, n: int) -> SkinnyConfig:
    """The launch shape for ``rows`` rows of x and ``n`` output features."""
    if rows <= 16:
        return SkinnyConfig(tm=1, wn=1, wk=8, u=2, stages=4)
    # 17-64 rows: x is 4x the weights' bytes per span at 64 rows; two warps side by side on the
    # same k read it once per block (from L1), keeping >= 128 blocks for the 4096-row layers.
    return SkinnyConfig(tm=1, wn=2, wk=4, u=2, stages=4)


_HEADER = MMA_HEADER + """
// 16 bytes global -> shared, cached in L2 only (weights are read once); src_size 0 zero-fills.
__device__ __forceinline__ void xl_cp_async16(void* smem, const void* gmem, bool pred) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\\n"
               :: "r"(s), "l"(gmem), "r"(pred ? 16 : 0) : "memory");
}
__device__ __forceinline__ void xl_cp_commit() { asm volatile("cp.async.commit_group;\\n" ::: "memory"); }
template <int PENDING> __device__ __forceinline__ void xl_cp_wait() {
  asm volatile("cp.async.wait_group %0;\\n" :: "n"(PENDING) : "memory");
}
"""

_SOURCE = """
    // x [M, K], w [N, K] (T, row-contiguous, K % 8 == 0) -> y [M, N] = x @ w.T (T).
    constexpr int SPAN = 32;
    constexpr int WARPS = WN * WK;
    constexpr int SLOTS = U * TM * 2;          // 16-byte pieces per lane per chunk
    constexpr int TILE = MT * 4 * 32;           // accumulator floats of one weight tile per warp
    const int M = x_shape[0];
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int nchunks = (K + SPAN * U - 1) / (SPAN * U);
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int wn = warp % WN;
    const int wk = warp / WN;
    const int g = lane >> 2;                    // mma group: weight rows g, g+8 of a tile; x row g
    const int tig = lane & 3;
    const int rbase = (blockIdx.x * WN + wn) * 16 * TM + g;

    extern __shared__ uint4 xl_smem[];
    uint4* ring = xl_smem + warp * STAGES * SLOTS * 32;

    float acc[TM][MT][4];
    #pragma unroll
    for (int tm = 0; tm < TM; ++tm) {
      #pragma unroll
      for (int t = 0; t < MT; ++t) { acc[tm][t][0] = acc[tm][t][1] = acc[tm][t][2] = acc[tm][t][3] = 0.0f; }
    }

    // Chunk c: spans c*U .. c*U+U-1; piece (u, tm, h) of this lane: row rbase + 16 tm + 8 h,
    // k from (c*U + u)*32 + 8 tig. One commit group per chunk, empty ones too (uniform counts).
    auto issue = [&](int c, int stage) {
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kc = (c * U + u) * SPAN + tig * 8;
        const bool kin = c < nchunks && kc < K;
        #pragma unroll
        for (int tm = 0; tm < TM; ++tm) {
          #pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = rbase + 16 * tm + 8 * h;
            const bool ok = kin && row < N;
            xl_cp_async16(ring + (stage * SLOTS + (u * TM + tm) * 2 + h) * 32 + lane,
                          ok ? static_cast<const void*>(w + (size_t)row * K + kc) : static_cast<const void*>(w), ok);
          }
        }
      }
      xl_cp_commit();
    };

    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(wk + s * WK, s);
    int stage = 0;
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
    for (int c = wk; c < nchunks; c += WK) {
      xl_cp_wait<STAGES - 2>();                 // chunk c has landed
      uint4 wc[SLOTS];
      #pragma unroll
      for (int i = 0; i < SLOTS; ++i) wc[i] = ring[(stage * SLOTS + i) * 32 + lane];
      // The stage read one iteration ago is free again (its values are in registers).
      issue(c + (STAGES - 1) * WK, (stage + STAGES - 1) % STAGES);
      stage = (stage + 1) % STAGES;
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kc = (c * U + u) * SPAN + tig * 8;
        uint4 xv[MT];
        #pragma unroll
        for (int t = 0; t < MT; ++t) {
          const int m = t * 8 + g;
          xv[t] = (kc < K && m < M) ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + kc)) : zero4;
        }
        #pragma unroll
        for (int tm = 0; tm < TM; ++tm) {
          const uint4 a = wc[(u * TM + tm) * 2], b = wc[(u * TM + tm) * 2 + 1];
          // Step 0 takes the chunk's pairs 0, 1 (as k 2tig.., 2tig+8..), step 1 pairs 2, 3.
          const uint32_t a0[4] = {a.x, b.x, a.y, b.y};
          const uint32_t a1[4] = {a.z, b.z, a.w, b.w};
          #pragma unroll
          for (int t = 0; t < MT; ++t) {
            mma16816<T>(acc[tm][t], a0, xv[t].x, xv[t].y);
            mma16816<T>(acc[tm][t], a1, xv[t].z, xv[t].w);
          }
        }
      }
    }
    xl_cp_wait<0>();                            // the ring is reused below
    __syncthreads();

    // Sum the WK warps' partial tiles (a tree through shared memory), then warps wk == 0 write.
    float* red = reinterpret_cast<float*>(xl_smem);
    #pragma unroll
    for (int s = WK / 2; s > 0; s >>= 1) {
      if (wk >= s && wk < 2 * s) {
        float* dst = red + ((wk - s) * WN + wn) * TM * TILE;
        #pragma unroll
        for (int tm = 0; tm < TM; ++tm) {
          #pragma unroll
          for (int t = 0; t < MT; ++t) {
            #pragma unroll
            for (int c = 0; c < 4; ++c) dst[((tm * MT + t) * 4 + c) * 32 + lane] = acc[tm][t][c];
          }
        }
      }
      __syncthreads();
      if (wk < s) {
        const float* src = red + (wk * WN + wn) * TM * TILE;
        #pragma unroll
        for (int tm = 0; tm < TM; ++tm) {
          #pragma unroll
          for (int t = 0; t < MT; ++t) {
            #pragma unroll
            for (int c = 0; c < 4; ++c) acc[tm][t][c] += src[((tm * MT + t) * 4 + c) * 32 + lane];
          }
        }
      }
      __syncthreads();
    }
    if (wk == 0) {
      // acc[tm][t] = {(row g, x row 2tig), (g, 2tig+1), (g+8, 2tig), (g+8, 2tig+1)} of the tile.
      #pragma unroll
      for (int tm = 0; tm < TM; ++tm) {
        #pragma unroll
        for (int t = 0; t < MT; ++t) {
          #pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int n = rbase + 16 * tm + 8 * (c >> 1);
            const int m = t * 8 + 2 * tig + (c & 1);
            if (n < N && m < M) y[(size_t)m * N + n] = static_cast<T>(acc[tm][t][c]);
          }
        }
      }
    }
"""

_kernels: dict[int, object] = {}


def _kernel(shared_bytes: int):
    # The dynamic shared memory is fixed per kernel object (and named so, for MLX's caches).
    kernel = _kernels.get(shared_bytes)
    if kernel is None:
        kernel = _kernels[shared_bytes] = mx.fast.cuda_kernel(
            name=f"xlstm_skinny_matmul_{shared_bytes}",
            input_names=["x", "w"],
            output_names=["y"],
            source=_SOURCE,
            header=_HEADER,
            shared_memory=shared_bytes,
        )
    return kernel


def skinny_supported(x: mx.array, w: mx.array) -> bool:
    """True when :func:`skinny_matmul` takes ``x`` [..., K] and ``w`` [N, K] (CUDA, bf16/fp16 of one
    dtype, K a multiple of 8, 1 to :data:`MAX_ROWS` rows), whether or not the kernel is switched on."""
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


def skinny_matmul(x: mx.array, w: mx.array, config: SkinnyConfig | None = None) -> mx.array:
    """x [..., K] @ w.T -> [..., N] through the kernel (CUDA only; the cases
    :func:`skinny_supported` accepts; ``config`` defaults to :func:`default_config`). No gradient:
    :func:`linear_product` is the differentiable entry point."""
    if not skinny_supported(x, w):
        raise ValueError(f"skinny_matmul: needs CUDA, bf16/fp16 x and w of one dtype, K % 8 == 0 and "
                         f"1..{MAX_ROWS} rows; got x {x.shape} {x.dtype}, w {w.shape} {w.dtype}")
    lead, K, N = x.shape[:-1], x.shape[-1], w.shape[0]
    M = math.prod(lead)
    mt = -(-M // 8)
    cfg = config or default_config(M, N)
    (y,) = _kernel(cfg.shared_bytes(mt))(
        inputs=[x.reshape(M, K), w],
        template=[("T", x.dtype), ("MT", mt), ("TM", cfg.tm), ("WN", cfg.wn), ("WK", cfg.wk),
                  ("U", cfg.u), ("STAGES", cfg.stages)],
        grid=(-(-N // cfg.rows_per_block()) * 32 * cfg.wn * cfg.wk, 1, 1),
        threadgroup=(32 * cfg.wn * cfg.wk, 1, 1),
        output_shapes=[(M, N)],
        output_dtypes=[x.dtype],
    )
    return y.reshape(*lead, N)


@mx.custom_function
def _skinny_product(x: mx.array, w: mx.array) -> mx.array:
    return skinny_matmul(x, w)


@_skinny_product.vjp
def _skinny_product_vjp(primals, cotangent, output):
    x, w = primals
    K, N = w.shape[1], w.shape[0]
    return cotangent @ w, (cotangent.reshape(-1, N).T @ x.reshape(-1, K)).astype(w.dtype)


def uses_skinny_kernel(x: mx.array, w: mx.array) -> bool:
    """Whether :func:`linear_product` runs the kernel for these operands."""
    return _enabled and skinny_supported(x, w) and math.prod(x.shape[:-1]) >= MIN_ROWS


def linear_product(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T`` for x [..., K], w [N, K]: the skinny kernel for :data:`MIN_ROWS` to
    :data:`MAX_ROWS` rows on CUDA (bf16/fp16), MLX's matmul otherwise. Differentiable."""
    if uses_skinny_kernel(x, w):
        return _skinny_product(x, w)
    return x @ w.T


class FastLinear(nn.Linear):
    """``nn.Linear`` whose product runs :func:`linear_product` (the skinny kernel for decode-sized
    inputs on NVIDIA GPUs, MLX's matmul otherwise). Same parameters, same checkpoint keys; with a
    bias it is ``nn.Linear`` exactly (``addmm``)."""

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return nn.Linear.__call__(self, x)
        return linear_product(x, self["weight"])

    # The same math as the base class: fuse_projections() may group it with plain linear layers.
    __call__.computes_as = nn.Linear.__call__


def use_fast_linear_layers(model: nn.Module, enabled: bool = True) -> int:
    """Switch every plain ``nn.Linear`` in ``model`` to :class:`FastLinear` in place (or, with
    ``enabled=False``, every :class:`FastLinear` back): the module object, its arrays and its
    place in the tree stay, so nothing is copied and parameter names are unchanged. Returns the
    number switched."""
    old, new = (nn.Linear, FastLinear) if enabled else (FastLinear, nn.Linear)
    switched = 0
    for _, module in model.named_modules():
        if type(module) is old:
            module.__class__ = new
            switched += 1
    return switched
