"""Weights times 2-16 rows on NVIDIA tensor cores, the weights streamed: ``x @ w.T`` for decoding.

At a few rows a decode step's products are paced by HBM (each weight is read once per step), so
what matters is how many weight bytes each SM keeps in flight. :func:`rows_mma_matmul` is the
one-row streaming GEMV of :mod:`.gemv` carried over to ``mma.sync``: a thread block owns a
16-feature tile of w at a time (thread blocks walk the tiles: blockIdx.x, + gridDim.x, ...), its
``WARPS`` warps split K into 32-wide spans (warp v takes spans v, v + WARPS, ...), and each lane
issues its 16-byte loads of ``U`` spans of both its weight rows before the first multiply, so
``2 U`` loads per lane are in flight with no shared-memory ring and no barrier. The next tile's
first loads are issued before the warps add their partial tiles through shared memory.

Fragment order (as :mod:`.skinny` and :mod:`.quantized`): lane (g, tig) holds 8 consecutive k of
weight rows g and g + 8 per span and feeds them to two m16n8k16 steps in an order of its own; x's
fragment for column g is read in the same order (16 bytes of x row g), so the dot products are
unchanged. x [M, K] is read through L1 (``MT`` tiles of 8 rows, M <= 8 MT; every warp of an SM
reads the same rows); ``XE`` 1 loads x's fragments with the weights, 0 just before their multiply
(fewer registers). Float32 accumulation; the result is rounded to x's dtype once.

The reference is ``x @ w.T`` (MLX's matmul): the sums agree to float32 round-off (their order
differs).

Opt-in (``XLSTM_METAL_SKINNY_GEMM=stream``; settings ``XLSTM_METAL_ROWS_MMA``, e.g. ``u4x2e``): on
an H200 (session 17, 7B shapes) its products alone were 3-7% faster than the decode kernel of
:mod:`.quantized` at 4-16 rows, but inside a decode step they were not (16 rows: 4.11 against 4.01
ms of products per step), so :func:`.skinny.decode_matmul` stays the default (benchmarks/NOTES.md).
"""

from __future__ import annotations

import math
import os
import re

import mlx.core as mx

from .quantized import SMS
from .step import cuda_available
from .tensor_cores import MMA_HEADER, compact_source, launch_bounds, tile_sums_source

#: Spans (32 k each) per lane in flight: 2 weight rows x U 16-byte loads.
UNROLL = 4
#: Warps per thread block (they split K of the block's tile).
WARPS = 8
#: Thread blocks per SM the registers are bounded for (and by default the grid's blocks per SM).
RESIDENT = 2
#: The weights' load: 0 plain, 1 non-coherent without L1, 2 the same asking L2 for 256 bytes.
LOAD_HINT = 2
#: Whether x's fragments are loaded with the weights (more registers, no L1 wait per multiply).
X_EARLY = True
#: Thread blocks per SM in the grid, walking the tiles (None: :data:`RESIDENT`; 0: one per tile).
BLOCKS_PER_SM: int | None = None
#: Most rows of x (two tiles of 8).
MAX_ROWS = 16


def parse_settings(spec: str) -> dict | None:
    """'u<unroll>x<resident>[e][h<hint>][b<blocks per SM>]' (e.g. 'u4x2e', 'u2x4h1b0'; 'e': x's
    fragments loaded with the weights, else just before use) -> keyword arguments of
    :func:`rows_mma_matmul`; None for anything else."""
    m = re.fullmatch(r"u(\d+)x(\d+)(e?)(?:h(\d))?(?:b(\d+))?", spec.strip())
    if not m:
        return None
    out = {"unroll": int(m.group(1)), "resident": int(m.group(2)), "x_early": bool(m.group(3))}
    if m.group(4) is not None:
        out["load_hint"] = int(m.group(4))
    if m.group(5) is not None:
        out["blocks_per_sm"] = int(m.group(5))
    return out


def _settings_from_env() -> None:
    """The module defaults from ``XLSTM_METAL_ROWS_MMA`` (:func:`parse_settings`' syntax)."""
    global UNROLL, RESIDENT, X_EARLY, LOAD_HINT, BLOCKS_PER_SM
    spec = os.environ.get("XLSTM_METAL_ROWS_MMA", "")
    if not spec:
        return
    kw = parse_settings(spec)
    if kw is None:
        raise ValueError(f"XLSTM_METAL_ROWS_MMA={spec!r}: expected e.g. 'u4x2e', 'u2x4b0', 'u4x2eh1'")
    UNROLL, RESIDENT, X_EARLY = kw["unroll"], kw["resident"], kw["x_early"]
    LOAD_HINT = kw.get("load_hint", LOAD_HINT)
    BLOCKS_PER_SM = kw.get("blocks_per_sm", BLOCKS_PER_SM)


_settings_from_env()

_HEADER = MMA_HEADER + """
template <int LDH>
__device__ __forceinline__ uint4 xm_ld16(const uint4* p) {
  if constexpr (LDH == 0) {
    return *p;
  } else {
    uint4 v;
    if constexpr (LDH == 1) {
      asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
          : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    } else {
      asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
          : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    }
    return v;
  }
}
"""

_SOURCE = """
    const int M = x_shape[0];
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int CH = K / 8;                       // 16-byte chunks per row
    const int nspans = (K + 31) / 32;
    const int iters = (nspans + WARPS * U - 1) / (WARPS * U);
    const int ntiles = (N + 15) / 16;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tig = lane & 3;
    const uint4* wq = reinterpret_cast<const uint4*>(w);
    const uint4* xq = reinterpret_cast<const uint4*>(x);
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
    size_t xoff[MT];  // x rows past M read row M - 1: their columns of the product are not stored
    #pragma unroll
    for (int t = 0; t < MT; ++t) xoff[t] = (size_t)(8 * t + g < M ? 8 * t + g : M - 1) * CH;

    uint4 wa[U], wb[U], xv[XE ? U : 1][MT];
    // No branches here (a chunk past the row reads chunk 0 and is zeroed by a select): the loads
    // are one basic block, all issued before the first multiply.
    auto issue = [&](int tile, int it) {
      const size_t r0 = (size_t)min(tile * 16 + g, N - 1) * CH, r1 = (size_t)min(tile * 16 + g + 8, N - 1) * CH;
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = (warp + WARPS * (it * U + u)) * 4 + tig;
        const bool in = c < CH;
        const int cc = in ? c : 0;
        const uint4 a = xm_ld16<LDH>(wq + r0 + cc), b = xm_ld16<LDH>(wq + r1 + cc);
        wa[u] = in ? a : zero4;
        wb[u] = in ? b : zero4;
        if constexpr (XE) {
          #pragma unroll
          for (int t = 0; t < MT; ++t) { const uint4 v = __ldg(xq + xoff[t] + cc); xv[u][t] = in ? v : zero4; }
        }
      }
    };

    __shared__ float red[WARPS * MT * 4 * 32];
    int tile = blockIdx.x;
    bool issued = tile < ntiles;
    if (issued) issue(tile, 0);
    for (; tile < ntiles; tile += gridDim.x) {
      float acc[MT][4];
      #pragma unroll
      for (int t = 0; t < MT; ++t) { acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f; }
      #pragma unroll 1
      for (int it = 0; it < iters; ++it) {
        if (!issued) issue(tile, it);
        issued = false;
        #pragma unroll
        for (int u = 0; u < U; ++u) {
          const uint32_t a0[4] = {wa[u].x, wb[u].x, wa[u].y, wb[u].y};
          const uint32_t a1[4] = {wa[u].z, wb[u].z, wa[u].w, wb[u].w};
          #pragma unroll
          for (int t = 0; t < MT; ++t) {
            uint4 xf;
            if constexpr (XE) {
              xf = xv[u][t];
            } else {
              const int c = (warp + WARPS * (it * U + u)) * 4 + tig;
              xf = c < CH ? __ldg(xq + xoff[t] + c) : zero4;
            }
            mma16816<T>(acc[t], a0, xf.x, xf.y);
            mma16816<T>(acc[t], a1, xf.z, xf.w);
          }
        }
      }
      const int cur = tile;
      if (tile + (int)gridDim.x < ntiles) {  // the next tile's first loads fly while the warps add
        issue(tile + gridDim.x, 0);
        issued = true;
      }
      // acc[t] = {(row g, x row 2tig), (g, 2tig+1), (g+8, 2tig), (g+8, 2tig+1)} of x tile t.
      #pragma unroll
      for (int t = 0; t < MT; ++t) {
        #pragma unroll
        for (int c = 0; c < 4; ++c) red[((warp * MT + t) * 4 + c) * 32 + lane] = acc[t][c];
      }
      __syncthreads();
""" + tile_sums_source("y[(size_t)m * N + n] = static_cast<T>(sum);") + """      __syncthreads();
    }
"""

_kernels: dict[tuple, object] = {}


def _kernel(resident: int):
    if resident not in _kernels:
        _kernels[resident] = mx.fast.cuda_kernel(
            name=f"xlstm_rows_mma_r{resident}",
            input_names=["x", "w"],
            output_names=["y"],
            source=compact_source(_SOURCE),
            header=compact_source(_HEADER + launch_bounds(32 * WARPS, resident)),
        )
    return _kernels[resident]


def rows_mma_supported(x: mx.array, w: mx.array) -> bool:
    """Whether :func:`rows_mma_matmul` runs its kernel: CUDA, bf16/fp16 x and w of one dtype,
    w [N, K] with K a multiple of 8, 1 to :data:`MAX_ROWS` rows of x."""
    return (cuda_available() and x.dtype in (mx.bfloat16, mx.float16) and w.dtype == x.dtype and w.ndim == 2
            and x.ndim >= 1 and x.shape[-1] == w.shape[1] and w.shape[1] % 8 == 0
            and 0 < math.prod(x.shape[:-1]) <= MAX_ROWS)


def rows_mma_matmul(x: mx.array, w: mx.array, *, unroll: int | None = None, resident: int | None = None,
                    load_hint: int | None = None, x_early: bool | None = None,
                    blocks_per_sm: int | None = None) -> mx.array:
    """x [..., K] @ w.T -> [..., N] (x's dtype) through the streaming tensor-core kernel where
    :func:`rows_mma_supported`, else ``x @ w.T``. ``unroll``: spans per lane in flight (U);
    ``resident``: thread blocks per SM the registers are bounded for (0: no bound);
    ``load_hint``: the weights' load (:data:`LOAD_HINT`); ``x_early``: x's fragments loaded with
    the weights; ``blocks_per_sm``: the grid's thread blocks per SM walking the tiles (0: one
    block per tile). Each defaults to the module's setting (:data:`UNROLL`, ...; the environment's
    ``XLSTM_METAL_ROWS_MMA``). No gradient."""
    unroll = UNROLL if unroll is None else unroll
    resident = RESIDENT if resident is None else resident
    load_hint = LOAD_HINT if load_hint is None else load_hint
    x_early = X_EARLY if x_early is None else x_early
    blocks_per_sm = BLOCKS_PER_SM if blocks_per_sm is None else blocks_per_sm
    if unroll < 1 or load_hint not in (0, 1, 2) or resident < 0 or (blocks_per_sm is not None and blocks_per_sm < 0):
        raise ValueError(f"rows_mma_matmul: unroll >= 1, load_hint 0-2, resident >= 0, blocks_per_sm >= 0; got "
                         f"{unroll}, {load_hint}, {resident}, {blocks_per_sm}")
    if not rows_mma_supported(x, w):
        return x @ w.T
    lead, K, N = x.shape[:-1], x.shape[-1], w.shape[0]
    M = math.prod(lead)
    tiles = -(-N // 16)
    blocks = tiles if blocks_per_sm == 0 else min(tiles, (blocks_per_sm or resident or 2) * SMS)
    (y,) = _kernel(resident)(
        inputs=[x.reshape(M, K), w],
        template=[("T", x.dtype), ("MT", -(-M // 8)), ("U", unroll), ("WARPS", WARPS), ("LDH", load_hint),
                  ("XE", bool(x_early))],
        grid=(blocks * 32 * WARPS, 1, 1),
        threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(M, N)],
        output_dtypes=[x.dtype],
    )
    return y.reshape(*lead, N)
