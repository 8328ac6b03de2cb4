"""Skinny matrix products for decoding on NVIDIA GPUs: ``x @ w.T`` with 2-64 rows of x.

At 16 and 64 rows MLX runs these products through cuBLASLt, which read the 7B shape's weights at
0.7-2.8 TB/s on an H200 (copy rate 4.3 TB/s; benchmarks/NOTES.md). :func:`skinny_matmul` is an
``mx.fast.cuda_kernel`` on the tensor cores, laid out so that x, the small operand, is read from
L2 a few times rather than once per 16 weight rows:

- Weights are the A operand of ``mma.sync`` m16n8k16 (16 output features per tile, float32
  accumulation), x the B operand (8 rows per tile, up to 8 tiles), as in the fused dequantize
  kernel of :mod:`.quantized`, whose fragment order this reuses: a thread takes 16 bytes (8
  values) of each of its two weight rows per 32-wide span of k and feeds them to two mma steps
  in an order of its own; x is taken in the same order, so the dot products are unchanged.
- A block owns 128 weight rows (W warps of TM 16-row tiles each) and walks its share of k in
  steps of 64: each step's weight tile and x tile go global -> shared memory with ``cp.async``
  (whole 128-byte lines, L2 only) through a ring of STAGES steps, so STAGES - 1 steps are in
  flight without holding registers; every warp reads x's fragments from the one shared copy.
- Layers with few row tiles (4096 outputs: 32 tiles) split k across blocks so the GPU has
  :data:`TARGET_BLOCKS` of them; each split writes float32 partial sums and a second small
  kernel adds them (S5R3, the 128 products of a step compiled alone: 6.10 ms split against 9.36
  unsplit at 16 rows, 8.83 against 14.50 at 64; cuBLASLt 5.32 and 5.58).

A first version (S5R1: 16 weight rows per block, its 8 warps splitting k, x read per warp from
L1/L2) ran at 0.6-2.5 TB/s, below cuBLASLt on most shapes: at 64 rows every warp read 4 bytes of
x per byte of weights, and those reads, not the weights, set its pace.

The fast path takes bfloat16 or float16 x and w of the same dtype, w [N, K] with K a multiple of
8, 1 to :data:`MAX_ROWS` rows. :func:`linear_product` is the dispatch the model calls: with the
kernel switched on, the kernel for :data:`MIN_ROWS`..:data:`MAX_ROWS` rows on CUDA (with a
gradient: ``mx.custom_function`` whose vjp is the two plain products), ``x @ w.T`` (MLX's matmul,
the reference) otherwise.

This ``mma.sync`` kernel is **opt-in** (``XLSTM_METAL_SKINNY_GEMM=1``): on the H200 it did not beat
cuBLASLt in a decode step (round S5R2, 7B shape: 6.54 vs 5.98 ms per step at batch 16, 13.02 vs
9.90 ms at batch 64; benchmarks/NOTES.md). The default, ``auto``, runs :func:`decode_matmul` (the
decode kernel of :mod:`.quantized` on the float weights: no shared-memory ring, no k split in
memory, so no second launch) for :data:`AUTO_ROWS` rows on a compute-capability-9 GPU, where it
made the 7B decode step faster than both cuBLASLt and the Hopper ``wgmma`` kernel of
:mod:`.skinny_wgmma` (session 17), and MLX's matmul everywhere else; the wgmma kernel, the
default at 9-16 rows from session 7 to 16, is opt-in (``XLSTM_METAL_SKINNY_GEMM=wgmma``).

:class:`FastLinear` is ``nn.Linear`` with :func:`linear_product` in its ``__call__`` (same
parameters, same keys); :func:`use_fast_linear_layers` switches a model's plain linear layers to
it in place and back.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn

from . import quantized, rows_mma
from .step import cuda_available
from .tensor_cores import MMA_HEADER

#: Most rows of x the kernel takes (8 rows per tensor-core tile, 8 tiles).
MAX_ROWS = 64
#: Fewest rows :func:`linear_product` sends to the kernel: one row is MLX's own GEMV (3.7 TB/s on
#: the 7B shape, H200), which cuBLASLt does not serve.
MIN_ROWS = 2

#: The products :func:`linear_product` can run for 2-64 rows on CUDA: MLX's matmul ("off"), this
#: module's ``mma.sync`` kernel ("mma"), the Hopper ``wgmma`` kernel of :mod:`.skinny_wgmma`, the
#: decode kernel of :mod:`.quantized` reading the float weights as they are ("decode": 16 features
#: per block, its 8 warps splitting K, x's fragments from L1), the streaming tensor-core product
#: of :mod:`.rows_mma` ("stream", at most 16 rows; measured no faster in a step), or "auto": the
#: decode kernel on a compute-capability-9 GPU for :data:`AUTO_ROWS` rows of bf16, MLX's matmul
#: otherwise.
KERNELS = ("off", "mma", "wgmma", "decode", "stream", "auto")
#: Rows of x for which "auto" runs :func:`decode_matmul`. On an H200 (S17R2, 7B decode step, one
#: process, two rounds): 16 rows 6.44 / 6.99 ms per step against 6.81 / 7.94 with the wgmma
#: kernel (GPU busy 5.92 against 6.72 ms: 96 fewer launches, no split partial sums); 8 rows 5.56 /
#: 5.60 against MLX's 7.36 / 9.91 (host-bound: a matmul node costs the host more than a custom
#: kernel). The products alone (S17R1-R4, each waiting for the one before) ran within 1-13% of
#: cuBLASLt's GPU time at 4-16 rows. At 64 rows it lost badly (21.4 against 9.6-9.9 ms: x's eight
#: row tiles are re-read per warp and the registers are unbounded), so more rows keep cuBLASLt.
AUTO_ROWS = range(2, 17)


def _parse_choice(value) -> str:
    if value is True or value in ("1", "mma"):
        return "mma"
    if value is False or value in ("", "0", "off"):
        return "off"
    if value in ("wgmma", "decode", "stream", "auto"):
        return value
    raise ValueError(f"skinny product {value!r}: one of {', '.join(KERNELS)} (or True / False)")


_hopper: list[bool] = []


def _is_hopper() -> bool:
    """Whether the GPU has compute capability 9.x (the wgmma kernel's sm_90a)."""
    if not _hopper:
        try:
            _hopper.append(int(mx.device_info(mx.gpu).get("compute_capability_major", 0)) == 9)
        except (RuntimeError, ValueError, TypeError):
            _hopper.append(False)
    return _hopper[0]


def _kernel_for(x: mx.array, w: mx.array) -> str:
    """The product :func:`linear_product` runs for these operands: "off" or one of :data:`KERNELS`'
    kernels ("stream" takes at most :data:`.rows_mma.MAX_ROWS` rows)."""
    if _choice == "off" or not skinny_supported(x, w):
        return "off"
    rows = math.prod(x.shape[:-1])
    if rows < MIN_ROWS:
        return "off"
    if _choice == "auto":  # measured with bf16 weights only (fp16 runs on the kernel when chosen outright)
        return "decode" if rows in AUTO_ROWS and x.dtype == mx.bfloat16 and _is_hopper() else "off"
    if _choice == "stream":
        return "stream" if rows <= rows_mma.MAX_ROWS else "off"
    return _choice


_choice = _parse_choice(os.environ.get("XLSTM_METAL_SKINNY_GEMM", "auto"))


def skinny_gemm_enabled() -> bool:
    """Whether :func:`linear_product` may use a kernel of its own (``XLSTM_METAL_SKINNY_GEMM``:
    ``auto``, the default, :func:`decode_matmul` where it is faster; ``1`` or ``mma``: the ``mma.sync``
    kernel; ``wgmma``: the Hopper one for all 2-64 rows; ``decode``: :func:`decode_matmul` for
    all 2-64 rows; ``stream``: :mod:`.rows_mma`'s product for 2-16 rows; ``0``: MLX's matmul)."""
    return _choice != "off"


def skinny_gemm_kernel() -> str:
    """The product :func:`linear_product` runs for decode-sized inputs: one of :data:`KERNELS`."""
    return _choice


def set_skinny_gemm(enabled: bool | str) -> None:
    """Select the product for products traced from now on (compiled steps keep theirs): True or
    "mma" (this module's kernel), "wgmma" (:mod:`.skinny_wgmma`), "decode" (:func:`decode_matmul`),
    "stream" (:mod:`.rows_mma`), "auto" (see :data:`KERNELS`),
    False or "off" (MLX's matmul)."""
    global _choice
    _choice = _parse_choice(enabled)


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch shape of the kernel: ``w`` warps per block, each owning ``tm`` 16-row weight tiles
    (``16 tm w`` rows per block); k in steps of ``u`` spans of 32 through a ring of ``stages``
    shared-memory stages (``stages - 1`` in flight)."""

    tm: int = 1
    w: int = 8
    u: int = 2
    stages: int = 4

    def __post_init__(self):
        if min(self.tm, self.w) < 1 or self.u not in (2, 4) or self.stages < 2:
            raise ValueError(f"bad skinny kernel config {self}")
        if self.w > 32:
            raise ValueError(f"{self.w} warps per block: at most 32")

    def rows_per_block(self) -> int:
        return 16 * self.tm * self.w

    def k_step(self) -> int:
        return 32 * self.u

    def shared_bytes(self, mt: int) -> int:
        return self.stages * (self.rows_per_block() + 8 * mt) * self.k_step() * 2


#: Thread blocks a product aims for (two per SM of an H100/H200): fewer row tiles than this are
#: split along k, each split's float32 partial sums added by a second small kernel (0: never split).
TARGET_BLOCKS = 264


def default_config(rows: int, n: int) -> SkinnyConfig:
    """The launch shape for ``rows`` rows of x and ``n`` output features."""
    if rows <= 16:
        return SkinnyConfig(tm=1, w=8, u=2, stages=4)
    # 17-64 rows: two weight tiles per warp, so each x fragment read from shared memory feeds
    # two tensor-core products (x is as many bytes per k as 64 weight rows).
    return SkinnyConfig(tm=2, w=4, u=2, stages=4)


def k_splits(n: int, k: int, config: SkinnyConfig, requested: int | None = None) -> int:
    """Splits of k for ``n`` output features and ``k`` inputs: ``requested``, or by default enough
    for :data:`TARGET_BLOCKS` blocks, rounded so that each of the kernel's splits (ceil(steps /
    splits) k steps) is non-empty."""
    steps = -(-k // config.k_step())
    if requested is None:
        requested = -(-TARGET_BLOCKS // -(-n // config.rows_per_block())) if TARGET_BLOCKS > 0 else 1
    splits = max(1, min(requested, steps))
    return -(-steps // -(-steps // splits))


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
    // x [M, K], w [N, K] (T, row-contiguous, K % 8 == 0) -> y [M, N] (OT = T) when the block
    // takes all of K, else this split's float32 partial sums y [S, M, N] (OT = float).
    constexpr int BK = 32 * U;                  // k per stage
    constexpr int PIECES = BK / 8;              // 16-byte pieces of a row per stage
    constexpr int R = 16 * TM * W;              // weight rows per block
    constexpr int XR = 8 * MT;                  // x rows (zero-padded)
    constexpr int STAGE = (R + XR) * PIECES;    // uint4 per stage: R weight rows, then XR x rows
    constexpr int NT = 32 * W;
    const int M = x_shape[0];
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int KS = ((K + BK - 1) / BK + gridDim.y - 1) / gridDim.y * BK;  // k per split
    const int k0 = blockIdx.y * KS;
    const int k1 = min(K, k0 + KS);
    const int nsteps = (k1 - k0 + BK - 1) / BK;
    const int row0 = blockIdx.x * R;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;                    // mma group: weight rows g, g+8 of a tile; x row g
    const int tig = lane & 3;

    extern __shared__ uint4 xl_smem[];
    // Piece p of row r at [r][p ^ 4 (r & 1)]: a fragment read (rows 2i, 2i+1, pieces 4s..4s+3
    // per 8 lanes) touches 8 distinct 16-byte bank groups.
    auto piece = [&](int st, int r, int p) -> uint4* { return xl_smem + st * STAGE + r * PIECES + (p ^ ((r & 1) << 2)); };

    // Stage st <- k step s of the block's weight rows and of x: consecutive threads copy
    // consecutive 16-byte pieces of a row (whole 128-byte lines). One commit group per step.
    auto issue = [&](int s, int st) {
      const int kb = k0 + s * BK;
      #pragma unroll
      for (int i = threadIdx.x; i < (R + XR) * PIECES; i += NT) {
        const int r = i / PIECES, p = i % PIECES;
        const int k = kb + p * 8;
        const bool kin = s < nsteps && k < k1;
        const bool is_w = r < R;
        const int src_row = is_w ? row0 + r : r - R;
        const bool ok = kin && src_row < (is_w ? N : M);
        const T* src = (is_w ? w : x) + (size_t)src_row * K + k;
        xl_cp_async16(piece(st, r, p), ok ? static_cast<const void*>(src) : static_cast<const void*>(w), ok);
      }
      xl_cp_commit();
    };

    float acc[TM][MT][4];
    #pragma unroll
    for (int tm = 0; tm < TM; ++tm) {
      #pragma unroll
      for (int t = 0; t < MT; ++t) { acc[tm][t][0] = acc[tm][t][1] = acc[tm][t][2] = acc[tm][t][3] = 0.0f; }
    }

    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s, s);
    for (int s = 0; s < nsteps; ++s) {
      xl_cp_wait<STAGES - 2>();                 // this thread's copies of step s have landed
      __syncthreads();                          // everyone's have, and step s-1's stage is free
      issue(s + STAGES - 1, (s + STAGES - 1) % STAGES);
      const int st = s % STAGES;
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        uint4 xv[MT];
        #pragma unroll
        for (int t = 0; t < MT; ++t) xv[t] = *piece(st, R + t * 8 + g, u * 4 + tig);
        #pragma unroll
        for (int tm = 0; tm < TM; ++tm) {
          const int r = (warp * TM + tm) * 16 + g;
          const uint4 a = *piece(st, r, u * 4 + tig), b = *piece(st, r + 8, u * 4 + tig);
          // The thread's 8 k of each row feed two mma steps in an order of its own (the same for
          // x): step 0 takes pairs 0, 1 as k (2tig, 2tig+1), (2tig+8, 2tig+9); step 1 pairs 2, 3.
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
    xl_cp_wait<0>();

    // acc[tm][t] = {(row g, x row 2tig), (g, 2tig+1), (g+8, 2tig), (g+8, 2tig+1)} of the tile.
    const size_t out0 = (size_t)blockIdx.y * M * N;
    #pragma unroll
    for (int tm = 0; tm < TM; ++tm) {
      #pragma unroll
      for (int t = 0; t < MT; ++t) {
        #pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int n = row0 + (warp * TM + tm) * 16 + g + 8 * (c >> 1);
          const int m = t * 8 + 2 * tig + (c & 1);
          if (n < N && m < M) y[out0 + (size_t)m * N + n] = static_cast<OT>(acc[tm][t][c]);
        }
      }
    }
"""

_REDUCE_SOURCE = """
    // part [S, M, N] float32 -> y [M, N] (T): the k splits' partial sums added in float32.
    const size_t MN = (size_t)part_shape[1] * part_shape[2];
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < MN) {
      float sum = 0.0f;
      for (int s = 0; s < part_shape[0]; ++s) sum += part[s * MN + i];
      y[i] = static_cast<T>(sum);
    }
"""

_kernels: dict[tuple[str, int], object] = {}


def product_kernel(name: str, source: str, header: str, shared_bytes: int):
    """The ``mx.fast.cuda_kernel`` (x, w) -> y named ``{name}_{shared_bytes}``, built once: its
    dynamic shared memory is fixed per kernel object (and named so, for MLX's caches). Shared by
    this module's kernel and :mod:`.skinny_wgmma`'s."""
    kernel = _kernels.get((name, shared_bytes))
    if kernel is None:
        kernel = _kernels[(name, shared_bytes)] = mx.fast.cuda_kernel(
            name=f"{name}_{shared_bytes}",
            input_names=["x", "w"],
            output_names=["y"],
            source=source,
            header=header,
            shared_memory=shared_bytes,
        )
    return kernel


def _kernel(shared_bytes: int):
    return product_kernel("xlstm_skinny_matmul", _SOURCE, _HEADER, shared_bytes)


_reduce_kernel_cache: list = []


def _reduce_kernel():
    if not _reduce_kernel_cache:
        _reduce_kernel_cache.append(mx.fast.cuda_kernel(
            name="xlstm_skinny_matmul_splits", input_names=["part"], output_names=["y"], source=_REDUCE_SOURCE))
    return _reduce_kernel_cache[0]


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


def skinny_matmul(x: mx.array, w: mx.array, config: SkinnyConfig | None = None, splits: int | None = None) -> mx.array:
    """x [..., K] @ w.T -> [..., N] through the kernel (CUDA only; the cases
    :func:`skinny_supported` accepts; ``config`` defaults to :func:`default_config`, ``splits`` of
    k to :func:`k_splits`). No gradient:
    :func:`linear_product` is the differentiable entry point."""
    if not skinny_supported(x, w):
        raise ValueError(f"skinny_matmul: needs CUDA, bf16/fp16 x and w of one dtype, K % 8 == 0 and "
                         f"1..{MAX_ROWS} rows; got x {x.shape} {x.dtype}, w {w.shape} {w.dtype}")
    lead, K, N = x.shape[:-1], x.shape[-1], w.shape[0]
    M = math.prod(lead)
    mt = -(-M // 8)
    cfg = config or default_config(M, N)
    splits = k_splits(N, K, cfg, splits)
    (y,) = _kernel(cfg.shared_bytes(mt))(
        inputs=[x.reshape(M, K), w],
        template=[("T", x.dtype), ("OT", x.dtype if splits == 1 else mx.float32), ("MT", mt), ("TM", cfg.tm),
                  ("W", cfg.w), ("U", cfg.u), ("STAGES", cfg.stages)],
        grid=(-(-N // cfg.rows_per_block()) * 32 * cfg.w, splits, 1),
        threadgroup=(32 * cfg.w, 1, 1),
        output_shapes=[(M, N) if splits == 1 else (splits, M, N)],
        output_dtypes=[x.dtype if splits == 1 else mx.float32],
    )
    if splits > 1:
        y = reduce_splits(y, x.dtype)
    return y.reshape(*lead, N)


def reduce_splits(part: mx.array, dtype) -> mx.array:
    """part [S, M, N] float32 (the k splits' partial sums) -> [M, N] of ``dtype``: added in float32,
    rounded once (CUDA)."""
    _, M, N = part.shape
    (y,) = _reduce_kernel()(
        inputs=[part], template=[("T", dtype)], grid=(M * N, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(M, N)], output_dtypes=[dtype])
    return y


def plain_products_vjp(primals, cotangent, output):
    """The gradients of ``x @ w.T`` (x [..., K], w [N, K]) as two plain matmuls: ``g @ w`` and the
    weight's ``g.T @ x`` [N, K], row-major (the kernels' gradient, and that of
    :func:`~xlstm_metal.cells.fused.linear_rows_grad`)."""
    x, w = primals
    K, N = w.shape[1], w.shape[0]
    return cotangent @ w, (cotangent.reshape(-1, N).T @ x.reshape(-1, K)).astype(w.dtype)


def _with_plain_vjp(product: Callable[[mx.array, mx.array], mx.array]):
    """``product(x, w)``, a kernel without a gradient, made differentiable: an
    ``mx.custom_function`` whose vjp is :func:`plain_products_vjp`."""
    fn = mx.custom_function(product)
    fn.vjp(plain_products_vjp)
    return fn


def _wgmma_matmul(x: mx.array, w: mx.array) -> mx.array:
    from .skinny_wgmma import wgmma_matmul  # (skinny_wgmma imports this module)

    return wgmma_matmul(x, w)


# Each kernel looked up when called (tests put the plain product in its place).
_skinny_product = _with_plain_vjp(lambda x, w: skinny_matmul(x, w))


#: The weights' load instruction in :func:`decode_matmul` (``XLSTM_METAL_SKINNY_DECODE_HINT``; see
#: :func:`.quantized.decode_template`): 2, non-coherent without L1 and asking L2 for the 256 bytes
#: around each chunk (the neighbouring warps' pieces of the same rows). On an H200 (S17R4, 7B
#: products at 16 rows, each waiting for the one before) it took 3-5% off every product against
#: 1 (the quantized kernels' hint): gate|up 50.3 vs 52.5 us, proj_down 27.8 vs 29.4, q|k|v|o
#: 28.1 vs 29.7, out_proj 12.0 vs 12.4.
DECODE_LOAD_HINT = int(os.environ.get("XLSTM_METAL_SKINNY_DECODE_HINT", "2"))
if DECODE_LOAD_HINT not in (0, 1, 2):
    raise ValueError(f"XLSTM_METAL_SKINNY_DECODE_HINT={DECODE_LOAD_HINT}: 0 (plain loads), 1 (non-coherent, "
                     "no L1) or 2 (the same asking L2 for 256 bytes)")


def decode_matmul(x: mx.array, w: mx.array) -> mx.array:
    """x [..., K] @ w.T through :func:`.quantized.fused_quantized_matmul`'s tensor-core loop on
    the float weights as they are (bits 16: its scales and biases are not read; loads
    :data:`DECODE_LOAD_HINT`), 1 to :data:`MAX_ROWS` rows (CUDA; the cases
    :func:`skinny_supported` accepts). No gradient."""
    if not skinny_supported(x, w):
        raise ValueError(f"decode_matmul: needs CUDA, bf16/fp16 x and w of one dtype, K % 8 == 0 and "
                         f"1..{MAX_ROWS} rows; got x {x.shape} {x.dtype}, w {w.shape} {w.dtype}")
    return quantized.fused_quantized_matmul(x, w, w, w, group_size=32, bits=16, load_hint=DECODE_LOAD_HINT)


#: Whether the FFN's gate|up product on :func:`decode_matmul` applies SwiGLU in its epilogue
#: (:func:`gate_up_swiglu_product`; ``XLSTM_METAL_SKINNY_DECODE_SWIGLU``, "0" off): one launch per
#: block less, and no [rows, 2F] gate|up output written and read back. On an H200 (S20R1, 7B, 16
#: rows, one process each): GPU busy 5.61 against 5.66 ms per step, 2,775 / 2,799 against 2,758 /
#: 2,475 tok/s; with the deferred state 5.00 against 5.06 ms.
DECODE_SWIGLU = os.environ.get("XLSTM_METAL_SKINNY_DECODE_SWIGLU", "1") == "1"


def uses_gate_up_swiglu(x: mx.array, w: mx.array) -> bool:
    """Whether :func:`gate_up_swiglu_product` runs one kernel for x [..., K] and the joined gate|up weights
    ``w`` [2F, K]: where :func:`linear_product` would run :func:`decode_matmul`, F % 8 == 0, and
    :data:`DECODE_SWIGLU`."""
    return DECODE_SWIGLU and _kernel_for(x, w) == "decode" and quantized.swiglu_kernel_takes(x, w)


def _decode_swiglu_bare(x: mx.array, w: mx.array) -> mx.array:
    return quantized.fused_swiglu_matmul(x, w, w, w, group_size=32, bits=16, load_hint=DECODE_LOAD_HINT)


_decode_swiglu_product = mx.custom_function(_decode_swiglu_bare)


@_decode_swiglu_product.vjp
def _decode_swiglu_product_vjp(primals, cotangent, output):
    _, grads = mx.vjp(lambda x, w: _swiglu_reference(x @ w.T), list(primals), [cotangent])
    return tuple(grads)


def gate_up_swiglu_product(x: mx.array, w: mx.array) -> mx.array:
    """``silu(x @ gate.T) * (x @ up.T)`` for x [..., K] and the joined weights ``w`` = [gate; up]
    [2F, K] -> [..., F]: the decode kernel with SwiGLU in its epilogue where
    :func:`uses_gate_up_swiglu` (:func:`.quantized.fused_swiglu_matmul`), else
    :func:`linear_product` then SwiGLU's kernel (``train_rows.swiglu_joined``) or the ops.
    Differentiable (the fused launch's vjp is that of the ops)."""
    if uses_gate_up_swiglu(x, w):
        return (_decode_swiglu_bare if _BARE.get() else _decode_swiglu_product)(x, w)
    from .train_rows import swiglu_joined, swiglu_joined_supported
    joined = linear_product(x, w)
    F = w.shape[0] // 2
    return swiglu_joined(joined) if swiglu_joined_supported(joined.dtype, F) else _swiglu_reference(joined)


_decode_product = _with_plain_vjp(lambda x, w: decode_matmul(x, w))
_stream_product = _with_plain_vjp(lambda x, w: rows_mma.rows_mma_matmul(x, w))
_wgmma_product = _with_plain_vjp(lambda x, w: _wgmma_matmul(x, w))


#: Whether the wgmma product takes SwiGLU into its loads of x for the FFN's down projection
#: (:func:`swiglu_linear_product`; ``XLSTM_METAL_WGMMA_SWIGLU=1``: on; off by default until a
#: whole decode step measures it faster).
SWIGLU_IN_PRODUCT = os.environ.get("XLSTM_METAL_WGMMA_SWIGLU", "0") == "1"


def _swiglu_reference(joined: mx.array) -> mx.array:
    K = joined.shape[-1] // 2
    return nn.silu(joined[..., :K]) * joined[..., K:]


@mx.custom_function
def _wgmma_swiglu_product(joined: mx.array, w: mx.array) -> mx.array:
    from .skinny_wgmma import wgmma_swiglu_matmul
    return wgmma_swiglu_matmul(joined, w)


@_wgmma_swiglu_product.vjp
def _wgmma_swiglu_product_vjp(primals, cotangent, output):
    _, grads = mx.vjp(lambda j, w: _swiglu_reference(j) @ w.T, list(primals), [cotangent])
    return tuple(grads)


def uses_swiglu_product(joined: mx.array, w: mx.array) -> bool:
    """Whether :func:`swiglu_linear_product` runs one kernel for ``(silu(gate) * up) @ w.T`` from
    the gate|up product ``joined`` [..., 2K]: where :func:`linear_product` would run the wgmma
    kernel for x [..., K] and ``w``, and :data:`SWIGLU_IN_PRODUCT`."""
    if not SWIGLU_IN_PRODUCT or joined.ndim < 1 or w.ndim != 2 or joined.shape[-1] != 2 * w.shape[1]:
        return False
    from . import skinny_wgmma as wg
    x_like = mx.zeros((*joined.shape[:-1], w.shape[1]), dtype=joined.dtype)  # lazy: never evaluated
    return _kernel_for(x_like, w) == "wgmma" and wg.wgmma_swiglu_supported(joined, w)


def swiglu_linear_product(joined: mx.array, w: mx.array) -> mx.array:
    """``(silu(gate) * up) @ w.T`` for the gate|up product ``joined`` [..., 2K] (gate first) and
    ``w`` [N, K]: one launch of the wgmma stream-K kernel where :func:`uses_swiglu_product`
    (the bits of SwiGLU's kernel then the product), else :func:`linear_product` of
    :func:`~xlstm_metal.kernels.fast.train_rows.swiglu_joined`'s output. Differentiable (the
    fused launch's vjp is that of the ops)."""
    if uses_swiglu_product(joined, w):
        return _wgmma_swiglu_product(joined, w)
    from .train_rows import swiglu_joined
    return linear_product(swiglu_joined(joined), w)


#: Whether the wgmma product takes the mLSTM output cell's norm and gate into out_proj's loads of
#: x (:func:`norm_gate_linear_product`; ``XLSTM_METAL_WGMMA_NORM_GATE=1``: on; off by default
#: until a whole decode step measures it faster).
NORM_GATE_IN_PRODUCT = os.environ.get("XLSTM_METAL_WGMMA_NORM_GATE", "0") == "1"


def uses_norm_gate_product(h: mx.array, o_preact: mx.array, norm: nn.Module, w: mx.array) -> bool:
    """Whether :func:`norm_gate_linear_product` runs one kernel for ``out_proj(sigmoid(o~) * norm(h))``
    (h [B, NH, 1, DV] of one token, ``norm`` the layer's MultiHeadLayerNorm, ``w`` out_proj's
    weight): where the fused decode kernels are on, :func:`linear_product` would run the wgmma
    kernel on x [B, NH DV], and :data:`NORM_GATE_IN_PRODUCT`."""
    from ...cells.norms import MultiHeadLayerNorm
    from . import decode
    from . import skinny_wgmma as wg
    if not NORM_GATE_IN_PRODUCT or not decode._kernels_on() \
            or type(norm) is not MultiHeadLayerNorm or "weight" not in norm or "bias" in norm:
        return False
    if h.ndim != 4 or not wg.wgmma_norm_gate_supported(h, o_preact, norm.weight, w):
        return False
    x_like = mx.zeros((h.shape[0], h.shape[1] * h.shape[3]), dtype=h.dtype)  # lazy: never evaluated
    return _kernel_for(x_like, w) == "wgmma"


def norm_gate_linear_product(h: mx.array, o_preact: mx.array, norm: nn.Module, w: mx.array) -> mx.array:
    """``sigmoid(o~) * norm(h)`` through ``w`` [N, NH DV] -> [B, 1, N]: one launch where
    :func:`uses_norm_gate_product` (:func:`~.skinny_wgmma.wgmma_norm_gate_matmul`), else
    :func:`~xlstm_metal.kernels.fast.decode.output_norm_gate` then :func:`linear_product`.
    Inference only (no gradient through the fused launch)."""
    if uses_norm_gate_product(h, o_preact, norm, w):
        from .skinny_wgmma import wgmma_norm_gate_matmul
        return wgmma_norm_gate_matmul(h, o_preact, norm.weight, norm.eps, w)
    from .decode import output_norm_gate
    return linear_product(output_norm_gate(h, o_preact, norm), w)


_BARE = contextvars.ContextVar("xlstm_metal_bare_products", default=False)


@contextlib.contextmanager
def inference_products() -> Iterator[None]:
    """Inside: :func:`linear_product` and :func:`gate_up_swiglu_product` call their kernels bare,
    without the ``mx.custom_function`` that gives them a gradient. For the fused decode step,
    which has no gradient anyway (its step kernel has none): the wrapper puts two more nodes per
    product in the graph (CustomTransforms, StopGradient), and MLX's host walks every node of
    every step (a 16-row 7B step: 256 of its ~1,100 nodes)."""
    token = _BARE.set(True)
    try:
        yield
    finally:
        _BARE.reset(token)


def uses_skinny_kernel(x: mx.array, w: mx.array) -> bool:
    """Whether :func:`linear_product` runs a kernel of its own (the selected one) for these operands."""
    return _kernel_for(x, w) != "off"


def linear_product(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T`` for x [..., K], w [N, K]: with a kernel selected (:func:`set_skinny_gemm`), that
    kernel for :data:`MIN_ROWS` to :data:`MAX_ROWS` rows on CUDA (bf16/fp16; "auto": see
    :data:`KERNELS`); MLX's matmul otherwise. Differentiable."""
    kernel = _kernel_for(x, w)
    if kernel == "off":
        return x @ w.T
    if _BARE.get():  # inside inference_products()
        return {"wgmma": _wgmma_matmul, "decode": decode_matmul, "stream": rows_mma.rows_mma_matmul}.get(
            kernel, skinny_matmul)(x, w)
    return {"wgmma": _wgmma_product, "decode": _decode_product, "stream": _stream_product}.get(
        kernel, _skinny_product)(x, w)


class FastLinear(nn.Linear):
    """``nn.Linear`` whose product runs :func:`linear_product` (the skinny kernel for decode-sized
    inputs on NVIDIA GPUs when switched on, MLX's matmul otherwise). Same parameters, same
    checkpoint keys; with a bias it is ``nn.Linear`` exactly (``addmm``)."""

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
