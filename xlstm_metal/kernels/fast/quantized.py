"""Quantized matrix products on NVIDIA GPUs, beside MLX's reference ``mx.quantized_matmul``.

:func:`quantized_matmul` computes ``x @ dequantize(w).T`` for weights in MLX's affine layout
(``mx.quantize``: ``w`` [N, K * bits / 32] uint32, each word packing 32 / bits values, lowest
bits first; ``scales`` and ``biases`` [N, K / group_size]; value = scale * q + bias). Metal
runs the reference, and so does the CPU for a few rows of x (from 16, 65 for the float formats:
dequantize + GEMM, :func:`many_rows_on_cpu`); on CUDA:

- **decode** (at most 64 rows of x): one fused kernel dequantizes the weights in registers and
  multiplies on the tensor cores (``mma.sync`` m16n8k16, float32 accumulation). Weights are the
  A operand (16 output features per warp), x the B operand (8 rows per tile, up to 8 tiles), so
  one row of x wastes 7/8 of a small tile rather than 15/16. Each thread reads 16-byte chunks
  of two weight rows (32 four-bit or 16 eight-bit values each) through a ring of :data:`DEPTH`
  chunks in flight (the first ones requested before any prologue); the eight warps of a block
  split K and add their partial sums through shared memory. The order in which a
  thread feeds its k values to the mma is free (a dot product does not care) as long as x uses
  the same order: four-bit values pair as (e, e + 4) within a word, so two values become a
  bf16/fp16 pair with one shift and one mask (the 128.0 / 1024.0 exponent trick, exact), and
  x's pairs are regrouped to match with one byte permute.
- **prefill** (more rows): the weights are dequantized to x's dtype and multiplied by MLX's
  (cuBLAS) matmul; the dequantization is one pass over the weights, small next to a GEMM with
  thousands of rows.

The fast path takes bfloat16 or float16 x with scales and biases of the same dtype, bits 4 or 8
and group sizes 32, 64 or 128. The float formats (mxfp4, nvfp4, mxfp8: uint8 group scales, no
biases) with bf16 or fp16 x take the decode kernel's float-format form up to
:data:`DECODE_MAX_ROWS` rows (:func:`fused_float_format_matmul`) and dequantize + GEMM above;
anything else (float32 x, other bits) runs the reference, so a call is always valid
(``XLSTM_METAL_FLOAT_FORMAT_DECODE`` turns the kernel off: :data:`FLOAT_FORMAT_DECODE`).

The decode kernel's source has hooks (:func:`decode_source`: its sizes, a prologue, how x's
values are read, the store; thread blocks that walk several output tiles), which
:mod:`.decode_chain` fills with the norms and gates around a product, and a 16-bit case that
reads plain bf16/fp16 weights through the same loop.

:class:`FastQuantizedLinear` is ``nn.QuantizedLinear`` with this function in its ``__call__``
(same parameters and checkpoint keys); :func:`use_fast_quantized_layers` switches a model's
affine quantized layers to it in place.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ...errors import SettingError
from .step import cuda_available
from .tensor_cores import MMA_HEADER, compact_source, tile_sums_source
from .tensor_cores import launch_bounds as _launch_bounds  # (bound to 256 threads below)

#: Most rows of x the fused kernel takes (8 rows per tensor-core tile, 8 tiles); more rows take
#: dequantize + GEMM. On an H200 (7B decode, BENCHMARKS.md) the fused kernel beat MLX's quantized
#: matmul 6-8x at 16 and 64 rows, and dequantize + GEMM beat it at 256 rows and more.
DECODE_MAX_ROWS = 64
_WARPS = 8  # warps per block: they split K for the block's 16 output features
_FAST_BITS = (4, 8)
_FAST_GROUPS = (32, 64, 128)

def _per_bits(name: str, default: dict[int, int]) -> dict[int, int]:
    """``default`` with the environment variable's "bits:value,..." entries over it."""
    out, raw = dict(default), os.environ.get(name, "")
    try:
        out.update({int(b): int(v) for b, v in (part.split(":") for part in raw.split(",") if part.strip())})
    except ValueError:
        raise ValueError(f"{name} must read like '4:2,8:3,16:3' (bits:value, comma-separated), not {raw!r}") from None
    return out


#: Thread blocks of the decode kernels resident per SM, by bits (``XLSTM_METAL_DECODE_RESIDENT``,
#: e.g. "4:2,8:3,16:3"; 0: no bound): their registers are bounded so that this many blocks of 256
#: threads fit (2: 128 registers a thread, 3: 85).
RESIDENT = _per_bits("XLSTM_METAL_DECODE_RESIDENT", {4: 2, 8: 3, 16: 3})

#: Streaming multiprocessors of the GPU (``XLSTM_METAL_SMS``; H100 and H200 SXM: 132): thread blocks
#: that walk tiles are launched :data:`RESIDENT` per SM.
SMS = int(os.environ.get("XLSTM_METAL_SMS", "132"))


def launch_bounds(resident: int) -> str:
    """Header text bounding the decode kernel (256 threads) to ``resident`` blocks per SM (none
    for 0): :func:`.tensor_cores.launch_bounds`; it must end the header."""
    return _launch_bounds(256, resident)

_HEADER = MMA_HEADER + """
template <typename T> struct QPair;
template <> struct QPair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t MAGIC = 0x43004300u;  // (128.0, 128.0): 128 + q is exact for q < 128
  static __device__ __forceinline__ T2 bias2() { return __float2bfloat162_rn(128.0f); }
  static __device__ __forceinline__ T2 pack(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
  static __device__ __forceinline__ T2 splat(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
};
template <> struct QPair<__half> {
  using T2 = __half2;
  static constexpr uint32_t MAGIC = 0x64006400u;  // (1024.0, 1024.0)
  static __device__ __forceinline__ T2 bias2() { return __float2half2_rn(1024.0f); }
  static __device__ __forceinline__ T2 pack(float lo, float hi) { return __floats2half2_rn(lo, hi); }
  static __device__ __forceinline__ T2 splat(__half v) { return __half2half2(v); }
};

// Two 4-bit values (bits 0-3 and 16-19 of w) under the exponent of MAGIC: (w & 0x000F000F) |
// MAGIC in one lop3 (written as two operations, the compiler issued two, one per constant).
// H100, 7B products at one row (benchmarks/NOTES.md, session 37): 2-7% less GPU time each.
template <uint32_t MAGIC>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t w) {
  uint32_t v;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(w), "n"(0x000F000Fu), "n"(MAGIC));
  return v;
}

// A thread's 16-byte weight chunk. LDH 0: a plain load; 1: through the non-coherent path without
// allocating in L1 (each weight is read once); 2: the same, asking L2 to fetch 256 bytes around
// it (the neighbouring warps' chunks of the same rows).
template <int LDH>
__device__ __forceinline__ uint4 ld_weights(const uint32_t* p) {
  if constexpr (LDH == 0) {
    return *reinterpret_cast<const uint4*>(p);
  } else {
    uint4 v;
    if constexpr (LDH == 1) {
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    } else {
      asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    }
    return v;
  }
}

__device__ __forceinline__ void l2_prefetch(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}

// Two dequantized weights (one 32-bit pair register) of a thread's 16-byte weight chunk, for
// mma step `step` and pair `half` (0: k pair 2*tig, 1: k pair 2*tig + 8 of the 16 logical k).
// 4 bits: pair p = 2*step + half holds word p/4's values (p%4, p%4 + 4).
// 8 bits: pair p holds word p/2's bytes (2*(p%2), 2*(p%2) + 1). 16 bits (T weights): word p.
template <typename T, int BITS>
__device__ __forceinline__ uint32_t dequant_pair(const uint4& wv, int p, typename QPair<T>::T2 s2,
                                                 typename QPair<T>::T2 b2, float s, float b) {
  using Q = QPair<T>;
  const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
  if constexpr (BITS == 4) {
    const uint32_t v = nibble_pair<Q::MAGIC>(words[p >> 2] >> (4 * (p & 3)));
    const typename Q::T2 q = __hsub2(from_u32<typename Q::T2>(v), Q::bias2());
    return as_u32(__hfma2(q, s2, b2));
  } else if constexpr (BITS == 16) {  // plain T weights (the decode chain's float products): pair p as stored
    return words[p];
  } else {
    const uint32_t w = words[p >> 1];
    const int e = 2 * (p & 1);
    // Byte e of w as the low byte of the float 2^23 + q: exact, then subtract 2^23.
    const float lo = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540 + e)) - 8388608.0f;
    const float hi = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540 + e + 1)) - 8388608.0f;
    return as_u32(Q::pack(fmaf(s, lo, b), fmaf(s, hi, b)));
  }
}

// x's pair for the same k values as dequant_pair(p). xv holds the thread's chunk of x as
// consecutive pairs (element 2i in the low half of xv[i]); PRE: x was stored with each 8 values'
// pairs already in the 4-bit order (xl_xpos4), so pair p is xv[p] at every width.
template <int BITS, bool PRE>
__device__ __forceinline__ uint32_t x_pair(const uint32_t* xv, int p) {
  if constexpr (BITS == 4 && !PRE) {
    // values (8*wd + e, 8*wd + e + 4), wd = p/4, e = p%4: halves of xv[4wd + e/2] and xv[4wd + e/2 + 2]
    const int i = 4 * (p >> 2) + ((p & 3) >> 1);
    return __byte_perm(xv[i], xv[i + 2], (p & 1) ? 0x7632 : 0x5410);
  } else {
    return xv[p];
  }
}

// Where value k of x goes when stored in the 4-bit pair order: within each 8 values, the
// pairs (e, e + 4), e = 0..3, side by side.
__device__ __forceinline__ int xl_xpos4(int k) {
  return (k & ~7) | ((k & 3) << 1) | ((k >> 2) & 1);
}
"""

#: Header text of the integer-weights kernels only (:data:`INT_WEIGHTS`; MLX hashes a kernel's
#: whole source at every launch, so the other kernels do not carry it).
INT_HEADER = """
// A pair of 8-bit (4-bit) weights as exact fp16 integers, the pair of dequant_pair(p) (int_weights):
// 1024 + q built under fp16's exponent of 1024 in one byte permute (4 bits: a shift and a
// mask-or, word p/4's values (p%4, p%4 + 4)), then 1024 subtracted (exact; OFF: kept, and taken
// out through the bias: b - 1024 s).
template <int BITS, bool OFF>
__device__ __forceinline__ uint32_t int_pair(const uint4& wv, int p) {
  static_assert(BITS == 8 || BITS == 4, "the integer-weights path takes 4 or 8 bits (int_weights_apply)");
  const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
  const uint32_t v = BITS == 4 ? nibble_pair<0x64006400u>(words[p >> 2] >> (4 * (p & 3)))
                               : __byte_perm(words[p >> 1], 0x64646464u, (p & 1) ? 0x4342u : 0x4140u);
  if constexpr (OFF) return v;
  return as_u32(__hsub2(from_u32<__half2>(v), __float2half2_rn(1024.0f)));
}

// d = A * B (fp16 operands, float32 sums starting from zero).
__device__ __forceinline__ void mma16816_zero(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};\\n"
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
}

"""

_SOURCE = """
    // x [M, K] (T), w [N, K*BITS/32] (uint32; or [N, K] in T at BITS 16), scales/biases [N, K/G] (T)
    // -> y [M, N] (T). Each thread block walks output tiles blockIdx.x, + gridDim.x, ... (16
    // features each; one tile per block when the grid covers them all) after one prologue.
    using Q = QPair<T>;
    constexpr int VALS = 128 / BITS;        // values in a thread's 16-byte weight chunk
    constexpr int STEPS = VALS / 4;         // mma steps per chunk (4 k values per thread each)
    constexpr int SPAN = 4 * VALS;          // k covered by one warp per chunk
@SIZES@
    const int N = w_shape[0];
    const uint32_t* wq = reinterpret_cast<const uint32_t*>(w);  // packed words (or T pairs at 16 bits)
    const int WPR = K / (32 / BITS);        // uint32 words per weight row
    const int GPR = K / G;                  // groups per row
    const int nspans = (K + SPAN - 1) / SPAN;
    const int ntiles = (N + 15) / 16;
    // Split K (SPLIT > 1): work item w is feature tile w / SPLIT, spans [sp_lo, sp_hi) of share
    // w % SPLIT; gridDim.x is a multiple of SPLIT, so a block keeps its share (and its prologue's
    // k range [k_lo, k_hi)) for every tile it walks.
    const int split = static_cast<int>(blockIdx.x) % SPLIT;
    const int sp_lo = static_cast<int>((static_cast<long long>(split) * nspans) / SPLIT);
    const int sp_hi = static_cast<int>((static_cast<long long>(split + 1) * nspans) / SPLIT);
    const int k_lo = sp_lo * SPAN;
    const int k_hi = sp_hi * SPAN < K ? sp_hi * SPAN : K;
    const int nwork = ntiles * SPLIT;

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;                // mma group: weight rows g, g+8; x row g of a tile
    const int tig = lane & 3;
    int tile = blockIdx.x;

    float acc[MT][4];
    #pragma unroll
    for (int t = 0; t < MT; ++t) { acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f; }

    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
    const T zt = static_cast<T>(0.0f);
    // A ring of DEPTH chunks per thread, each 16 bytes of weights from rows g and g+8 of a tile
    // with their group's scale/bias: slot d holds span warp + (i * DEPTH + d) * WARPS. The first
    // DEPTH chunks are requested before the prologue; a slot is refilled as soon as its chunk is
    // taken, with the next span it serves: in this tile, or past the tile's end the same slot's
    // first span of the block's next tile. So DEPTH chunks are in flight while one is
    // multiplied, across tiles and their reductions too (DEPTH 1 with a block per tile is
    // session 6's schedule; see DEPTH in quantized.py for what each width runs).
    uint4 ra[DEPTH], rb[DEPTH];
    T rsa[DEPTH], rba[DEPTH], rsb[DEPTH], rbb[DEPTH];
    auto load_chunk = [&](int tl, int sp, uint4& wa_, uint4& wb_, T& sa_, T& ba_, T& sb_, T& bb_) {
      const int row0 = (tl / SPLIT) * 16 + g, row1 = row0 + 8;
      const bool ok0 = tl < nwork && row0 < N, ok1 = tl < nwork && row1 < N;
      const int kc = sp * SPAN + tig * VALS;  // this thread's first k; K % VALS == 0
      const bool kin = sp < sp_hi && kc < K;
      const int gi = kin ? kc / G : 0;
      wa_ = (kin && ok0) ? ld_weights<LDH>(wq + (size_t)row0 * WPR + kc / (32 / BITS)) : zero4;
      wb_ = (kin && ok1) ? ld_weights<LDH>(wq + (size_t)row1 * WPR + kc / (32 / BITS)) : zero4;
      sa_ = (BITS != 16 && kin && ok0) ? scales[(size_t)row0 * GPR + gi] : zt;
      ba_ = (BITS != 16 && kin && ok0) ? biases[(size_t)row0 * GPR + gi] : zt;
      sb_ = (BITS != 16 && kin && ok1) ? scales[(size_t)row1 * GPR + gi] : zt;
      bb_ = (BITS != 16 && kin && ok1) ? biases[(size_t)row1 * GPR + gi] : zt;
    };
    auto load_x = [&](int sp, int t, uint32_t* xv) {
      const int kc = sp * SPAN + tig * VALS;
      const int m = t * 8 + g;
      if (kc < K && m < M) {
@LOAD_X@
      } else {
        #pragma unroll
        for (int i = 0; i < VALS / 2; ++i) xv[i] = 0u;
      }
    };
    #pragma unroll
    for (int d = 0; d < DEPTH; ++d) load_chunk(tile, sp_lo + warp + d * WARPS, ra[d], rb[d], rsa[d], rba[d], rsb[d], rbb[d]);
    if (PF) {  // the rest of the first tile's weights towards L2 while the prologue runs
      const int row0 = (tile / SPLIT) * 16 + g, row1 = row0 + 8;
      for (int sp = sp_lo + warp + DEPTH * WARPS; sp < sp_hi; sp += WARPS) {
        const int kc = sp * SPAN + tig * VALS;
        if (kc < K && row0 < N) l2_prefetch(wq + (size_t)row0 * WPR + kc / (32 / BITS));
        if (kc < K && row1 < N) l2_prefetch(wq + (size_t)row1 * WPR + kc / (32 / BITS));
      }
    }
@PROLOGUE@
    __shared__ float red[WARPS * MT * 4 * 32];
    for (;;) {
      for (int sp0 = sp_lo + warp; sp0 < sp_hi; sp0 += DEPTH * WARPS) {
        #pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
          const int sp = sp0 + d * WARPS;
          if (sp < sp_hi) {  // the same for the whole warp
            // The slot's chunk moves to registers of its own and the slot is refilled at once.
            const uint4 wa = ra[d], wb = rb[d];
            const T sa = rsa[d], ba = rba[d], sb = rsb[d], bb = rbb[d];
            const int nsp = sp + DEPTH * WARPS;
            const bool here = nsp < sp_hi;
            load_chunk(here ? tile : tile + gridDim.x, here ? nsp : sp_lo + warp + d * WARPS,
                       ra[d], rb[d], rsa[d], rba[d], rsb[d], rbb[d]);
            uint32_t xv[VALS / 2];
            load_x(sp, 0, xv);
            const typename Q::T2 sa2 = Q::splat(sa), ba2 = Q::splat(ba), sb2 = Q::splat(sb), bb2 = Q::splat(bb);
            const float saf = static_cast<float>(sa), baf = static_cast<float>(ba);
            const float sbf = static_cast<float>(sb), bbf = static_cast<float>(bb);
            // A fragments of step j: {row g pair 2tig, row g+8 pair 2tig, row g pair 2tig+8, row g+8 pair 2tig+8}.
            if constexpr (MT == 1) {  // each step's fragments made as it runs: 4 registers, not 4 * STEPS
@MT1_BODY@            } else {  // dequantized once for all of x's row tiles
              uint32_t af[STEPS][4];
              #pragma unroll
              for (int j = 0; j < STEPS; ++j) {
                af[j][0] = dequant_pair<T, BITS>(wa, 2 * j, sa2, ba2, saf, baf);
                af[j][1] = dequant_pair<T, BITS>(wb, 2 * j, sb2, bb2, sbf, bbf);
                af[j][2] = dequant_pair<T, BITS>(wa, 2 * j + 1, sa2, ba2, saf, baf);
                af[j][3] = dequant_pair<T, BITS>(wb, 2 * j + 1, sb2, bb2, sbf, bbf);
              }
              #pragma unroll
              for (int t = 0; t < MT; ++t) {
                if (t > 0) load_x(sp, t, xv);
                #pragma unroll
                for (int j = 0; j < STEPS; ++j) {
                  mma16816<T>(acc[t], af[j], x_pair<BITS, XPRE>(xv, 2 * j), x_pair<BITS, XPRE>(xv, 2 * j + 1));
                }
              }
            }
          }
        }
      }
      const int cur = tile / SPLIT;  // the feature tile just done
      tile += gridDim.x;  // the ring holds its first chunks already

      // Sum the warps' partial tiles. acc[t] = {(row g, col 2tig), (g, 2tig+1), (g+8, 2tig), (g+8, 2tig+1)}.
      #pragma unroll
      for (int t = 0; t < MT; ++t) {
        #pragma unroll
        for (int c = 0; c < 4; ++c) { red[((warp * MT + t) * 4 + c) * 32 + lane] = acc[t][c]; acc[t][c] = 0.0f; }
      }
      __syncthreads();
""" + tile_sums_source("@TILE_STORE@") + """@SPLIT_FINISH@
      if (tile >= nwork) break;
      __syncthreads();  // the partial tiles in shared memory are read
    }
"""

# One chunk at one x tile (MT 1), the weights dequantized to T pairs before the mma.
_MT1_DEQUANT = """\
              #pragma unroll
              for (int j = 0; j < STEPS; ++j) {
                const uint32_t af[4] = {dequant_pair<T, BITS>(wa, 2 * j, sa2, ba2, saf, baf),
                                        dequant_pair<T, BITS>(wb, 2 * j, sb2, bb2, sbf, bbf),
                                        dequant_pair<T, BITS>(wa, 2 * j + 1, sa2, ba2, saf, baf),
                                        dequant_pair<T, BITS>(wb, 2 * j + 1, sb2, bb2, sbf, bbf)};
                mma16816<T>(acc[0], af, x_pair<BITS, XPRE>(xv, 2 * j), x_pair<BITS, XPRE>(xv, 2 * j + 1));
              }
"""

# The same chunk with the weights as exact integers (int_weights): q in fp16 (int_pair: a byte
# permute or a mask, and one hsub2 per pair; template IW 2: 1024 + q, no hsub2), x staged as fp16 scaled by 2^e per (row, span)
# (xl_int_stage), the span's integer products summed by the mma in a float32 tile of their own,
# then folded: acc += (s * 2^-e) * tile + b * (the span's sum of x). A span lies in one group
# (G >= SPAN), so the tile's rows g, g + 8 have this thread's scales and biases.
_MT1_INT = """\
              float tq[4];
              #pragma unroll
              for (int j = 0; j < STEPS; ++j) {
                const uint32_t af[4] = {int_pair<BITS, IW == 2>(wa, 2 * j), int_pair<BITS, IW == 2>(wb, 2 * j),
                                        int_pair<BITS, IW == 2>(wa, 2 * j + 1), int_pair<BITS, IW == 2>(wb, 2 * j + 1)};
                if (j == 0) {
                  mma16816_zero(tq, af, x_pair<BITS, XPRE>(xv, 0), x_pair<BITS, XPRE>(xv, 1));
                } else {
                  mma16816<__half>(tq, af, x_pair<BITS, XPRE>(xv, 2 * j), x_pair<BITS, XPRE>(xv, 2 * j + 1));
                }
              }
              const int m0 = 2 * tig < M ? 2 * tig : 0, m1 = 2 * tig + 1 < M ? 2 * tig + 1 : 0;
              const float2 c0 = xg_s[m0 * (K / SPAN) + sp], c1 = xg_s[m1 * (K / SPAN) + sp];  // (2^-e, sum) of the span
              const float ba_ = IW == 2 ? fmaf(-1024.0f, saf, baf) : baf, bb_ = IW == 2 ? fmaf(-1024.0f, sbf, bbf) : bbf;
              acc[0][0] = fmaf(saf * c0.x, tq[0], fmaf(ba_, c0.y, acc[0][0]));
              acc[0][1] = fmaf(saf * c1.x, tq[1], fmaf(ba_, c1.y, acc[0][1]));
              acc[0][2] = fmaf(sbf * c0.x, tq[2], fmaf(bb_, c0.y, acc[0][2]));
              acc[0][3] = fmaf(sbf * c1.x, tq[3], fmaf(bb_, c1.y, acc[0][3]));
"""

#: How the float-format kernel's ``fp_pair`` puts a pair of codes under T's bits, by (T, bits):
#: 8 (E4M3, the code in a 16-bit half's high byte): (right shift, mask of the exponent|mantissa
#: bits after it, 2^D as a T pair); 4 (E2M1 codes at bits 0-3 and 16-19): (left shift of the
#: three low bits, 0, 2^D). T then reads each value times 2^-D, exactly (e = 0 codes as T's
#: subnormals), and one multiply by 2^D gives the value.
FP_PAIR_BITS = {
    ("bfloat16", 8): (4, 0x07F007F0, 0x7B807B80),  # e m to bits 4-10; 2^120
    ("float16", 8): (1, 0x3F803F80, 0x5C005C00),   # to bits 7-13; 2^8
    ("bfloat16", 4): (6, 0, 0x7E807E80),           # e1 e0 m to bits 6-8; 2^126
    ("float16", 4): (9, 0, 0x74007400),            # to bits 9-11; 2^14
}

#: Header text of the float-format decode kernel only (:func:`fused_float_format_matmul`).
FLOAT_FORMAT_HEADER = """
template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

// A pair of a float format's weights, the pair of dequant_pair(p) (4 bits: word p/4's codes (p%4,
// p%4 + 4); 8 bits: word p/2's bytes (2(p%2), 2(p%2) + 1)): the codes' bits under T's sign,
// exponent and mantissa as FP_PAIR_BITS says (quantized.py), times 2^D (the codes' values,
// exact), times the group's scale s2 (exact: at most 6 significant bits, in T's range; fp16
// flushes a group whose scale is below 2^-24, weights below 2^-22).
template <typename T, int FMT>
__device__ __forceinline__ uint32_t fp_pair(const uint4& wv, int p, typename QPair<T>::T2 s2) {
  using T2 = typename QPair<T>::T2;
  constexpr bool BF = IsBf16<T>::value;
  const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
  uint32_t v, up;
  if constexpr (FMT == 3) {
    // bytes e, e + 1 as the high bytes of the two 16-bit halves
    const uint32_t t = __byte_perm(words[p >> 1], 0u, (p & 1) ? 0x3424u : 0x1404u);
    v = ((t >> (BF ? @R8B@ : @R8H@)) & (BF ? @M8B@u : @M8H@u)) | (t & 0x80008000u);
    up = BF ? @U8B@u : @U8H@u;
  } else {
    const uint32_t w = words[p >> 2] >> (4 * (p & 3));  // codes at bits 0-3 and 16-19
    v = ((w & 0x00070007u) << (BF ? @L4B@ : @L4H@)) | ((w & 0x00080008u) << 12);
    up = BF ? @U4B@u : @U4H@u;
  }
  return as_u32(__hmul2(__hmul2(from_u32<T2>(v), from_u32<T2>(up)), s2));
}

// A group's scale as float: E8M0 (mxfp4, mxfp8) 2^(s - 127), 255 NaN; E4M3 (nvfp4) through fp16
// as fp_pair reads it.
template <int FMT>
__device__ __forceinline__ float fp_scale(uint8_t s) {
  if constexpr (FMT == 2) {
    const unsigned short h = static_cast<unsigned short>(((s & 0x80u) << 8) | ((s & 0x7Fu) << 7));
    return __half2float(__ushort_as_half(h)) * 256.0f;
  } else {
    return s == 0 ? __uint_as_float(0x00400000u) : (s == 255 ? __uint_as_float(0x7FC00000u)
                                                             : __uint_as_float(static_cast<uint32_t>(s) << 23));
  }
}
""".replace("@R8B@", str(FP_PAIR_BITS["bfloat16", 8][0])).replace("@R8H@", str(FP_PAIR_BITS["float16", 8][0])) \
    .replace("@M8B@", hex(FP_PAIR_BITS["bfloat16", 8][1])).replace("@M8H@", hex(FP_PAIR_BITS["float16", 8][1])) \
    .replace("@U8B@", hex(FP_PAIR_BITS["bfloat16", 8][2])).replace("@U8H@", hex(FP_PAIR_BITS["float16", 8][2])) \
    .replace("@L4B@", str(FP_PAIR_BITS["bfloat16", 4][0])).replace("@L4H@", str(FP_PAIR_BITS["float16", 4][0])) \
    .replace("@U4B@", hex(FP_PAIR_BITS["bfloat16", 4][2])).replace("@U4H@", hex(FP_PAIR_BITS["float16", 4][2]))

# A float format's chunk at one x tile (MT 1), the weights dequantized to T pairs before the mma:
# a chunk lies in one group (mxfp4: 32 values, mxfp8: 16; groups of 32), or in two at nvfp4
# (groups of 16: steps 0 to STEPS/2 - 1 take the first's scales, sa / sb, the rest the second's,
# ba / bb; elsewhere ba = sa and bb = sb). Scales apply before the mma, as affine weights'
# do: the four threads of an mma row hold chunks of different groups.
_MT1_FLOAT_FORMAT = """\
              #pragma unroll
              for (int j = 0; j < STEPS; ++j) {
                const bool second = FMT == 2 && j >= STEPS / 2;
                const uint32_t af[4] = {fp_pair<T, FMT>(wa, 2 * j, second ? ba2 : sa2),
                                        fp_pair<T, FMT>(wb, 2 * j, second ? bb2 : sb2),
                                        fp_pair<T, FMT>(wa, 2 * j + 1, second ? ba2 : sa2),
                                        fp_pair<T, FMT>(wb, 2 * j + 1, second ? bb2 : sb2)};
                mma16816<T>(acc[0], af, x_pair<BITS, XPRE>(xv, 2 * j), x_pair<BITS, XPRE>(xv, 2 * j + 1));
              }
"""

# The float-format form of the decode kernel (decode_source(float_format=True); template FMT 1
# mxfp4, 2 nvfp4, 3 mxfp8): the uint8 group scales read as T (exact: powers of two, or E4M3's 4
# significant bits), no biases (the ring's bias slots hold nvfp4's second group's scales), and
# the weights of several x tiles (MT > 1) dequantized as in _MT1_FLOAT_FORMAT.
_FLOAT_FORMAT = (
    ("""      sa_ = (BITS != 16 && kin && ok0) ? scales[(size_t)row0 * GPR + gi] : zt;
      ba_ = (BITS != 16 && kin && ok0) ? biases[(size_t)row0 * GPR + gi] : zt;
      sb_ = (BITS != 16 && kin && ok1) ? scales[(size_t)row1 * GPR + gi] : zt;
      bb_ = (BITS != 16 && kin && ok1) ? biases[(size_t)row1 * GPR + gi] : zt;""",
     """      sa_ = (kin && ok0) ? static_cast<T>(fp_scale<FMT>(scales[(size_t)row0 * GPR + gi])) : zt;
      sb_ = (kin && ok1) ? static_cast<T>(fp_scale<FMT>(scales[(size_t)row1 * GPR + gi])) : zt;
      ba_ = (FMT == 2 && kin && ok0) ? static_cast<T>(fp_scale<FMT>(scales[(size_t)row0 * GPR + gi + 1])) : sa_;
      bb_ = (FMT == 2 && kin && ok1) ? static_cast<T>(fp_scale<FMT>(scales[(size_t)row1 * GPR + gi + 1])) : sb_;"""),
    ("""                af[j][0] = dequant_pair<T, BITS>(wa, 2 * j, sa2, ba2, saf, baf);
                af[j][1] = dequant_pair<T, BITS>(wb, 2 * j, sb2, bb2, sbf, bbf);
                af[j][2] = dequant_pair<T, BITS>(wa, 2 * j + 1, sa2, ba2, saf, baf);
                af[j][3] = dequant_pair<T, BITS>(wb, 2 * j + 1, sb2, bb2, sbf, bbf);""",
     """                const bool second = FMT == 2 && j >= STEPS / 2;
                af[j][0] = fp_pair<T, FMT>(wa, 2 * j, second ? ba2 : sa2);
                af[j][1] = fp_pair<T, FMT>(wb, 2 * j, second ? bb2 : sb2);
                af[j][2] = fp_pair<T, FMT>(wa, 2 * j + 1, second ? ba2 : sa2);
                af[j][3] = fp_pair<T, FMT>(wb, 2 * j + 1, second ? bb2 : sb2);"""),
)

#: The plain product's hooks: x [M, K] read as 16-byte chunks, y [M, N] written in T.
_SIZES = """\
    const int M = x_shape[0];
    const int K = x_shape[1];
    constexpr bool XPRE = false;  // x read as it is stored
"""
#: :data:`_SIZES` for x of any leading axes [..., K] (row-contiguous): the products of
#: :func:`fused_quantized_matmul` and :func:`fused_swiglu_matmul` take x and give y as the model
#: holds them, with no reshape nodes around the launch (MLX's host walks each node every step).
_ND_SIZES = """\
    const int K = x_shape[x_ndim - 1];
    int M = 1;
    for (int i = 0; i < x_ndim - 1; ++i) M *= x_shape[i];
    constexpr bool XPRE = false;  // x read as it is stored
"""
_LOAD_X = """\
        const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)m * K + kc);
        #pragma unroll
        for (int i = 0; i < VALS / 8; ++i) {
          const uint4 u = xp[i];
          xv[4 * i] = u.x; xv[4 * i + 1] = u.y; xv[4 * i + 2] = u.z; xv[4 * i + 3] = u.w;
        }
"""
_STORE = "y[(size_t)m * N + n] = static_cast<T>(sum);"


# Split K: each (feature tile, share) writes its float32 partial sums to ``part`` [SPLIT, M, N];
# the share that arrives last at a tile (``count``: a counter per tile, an output zeroed at each
# launch; counters in the module's own memory are shared by launches that MLX's CUDA graph runs
# side by side, which can then count each other's shares) adds the SPLIT partials in a fixed
# order and runs the store: the same output and rounding as one block over all of K, but up to
# SPLIT times the thread blocks on a product with few tiles (out_proj and proj_down at 4,096
# features: 256).
_SPLIT_STORE = "part[((size_t)split * M + m) * N + n] = sum;"
_SPLIT_FINISH = """
      {
        __shared__ int s_last;
        __threadfence();  // this block's partials visible to the share that finishes the tile
        __syncthreads();
        if (threadIdx.x == 0) {
          s_last = atomicAdd(&count[cur], 1u) == SPLIT - 1;
        }
        __syncthreads();
        if (s_last) {
          __threadfence();
          for (int e = threadIdx.x; e < 16 * M; e += WARPS * 32) {
            const int n = cur * 16 + (e & 15), m = e >> 4;
            if (n < N) {
              float sum = 0.0f;
              #pragma unroll
              for (int sh = 0; sh < SPLIT; ++sh) sum += __ldcg(part + ((size_t)sh * M + m) * N + n);
              @STORE@
            }
          }
        }
      }
"""
# The paired form of the decode kernel (decode_source(pair_store=...)): the row mapping of its
# weight loads and its epilogue. Warp sums are added in the order of tile_sums_source.
_PAIR_SUMS = """      for (int e = threadIdx.x; e < MT * 2 * 32; e += WARPS * 32) {
        const int l = e & 31, c = (e >> 5) & 1, t = e >> 6;
        const int ea = (t * 4 + c) * 32 + l;  // row g's sum (A); row g + 8's (B) is 64 further
        float sum0 = 0.0f, sum1 = 0.0f;
        #pragma unroll
        for (int v = 0; v < WARPS; ++v) { sum0 += red[v * MT * 4 * 32 + ea]; sum1 += red[v * MT * 4 * 32 + ea + 64]; }
        const int n = cur * 8 + (l >> 2);
        const int m = t * 8 + 2 * (l & 3) + c;
        if (n < PAIR && m < M) @TILE_STORE@
      }
"""
_PAIR_ROWS = (
    ("const int ntiles = (N + 15) / 16;", "const int PAIR = N / 2;\n    const int ntiles = PAIR / 8;"),
    ("const int row0 = (tl / SPLIT) * 16 + g, row1 = row0 + 8;", "const int row0 = (tl / SPLIT) * 8 + g, row1 = row0 + PAIR;"),
    ("const int row0 = (tile / SPLIT) * 16 + g, row1 = row0 + 8;", "const int row0 = (tile / SPLIT) * 8 + g, row1 = row0 + PAIR;"),
    (tile_sums_source("@TILE_STORE@"), _PAIR_SUMS),
)

# The x-ahead form of the decode kernel (decode_source(x_ahead=True)): x's values of every row tile
# in a ring beside the weights' (slot d: the span its weight chunk is for).
_X_AHEAD = (
    ("    for (int d = 0; d < DEPTH; ++d) load_chunk(tile, sp_lo + warp + d * WARPS, ra[d], rb[d], rsa[d], rba[d], rsb[d], rbb[d]);",
     "    uint32_t rx[DEPTH][MT][VALS / 2];\n"
     "    for (int d = 0; d < DEPTH; ++d) load_chunk(tile, sp_lo + warp + d * WARPS, ra[d], rb[d], rsa[d], rba[d], rsb[d], rbb[d]);\n"
     "    #pragma unroll\n    for (int d = 0; d < DEPTH; ++d) {\n"
     "      #pragma unroll\n      for (int t = 0; t < MT; ++t) load_x(sp_lo + warp + d * WARPS, t, rx[d][t]);\n    }"),
    ("            uint32_t xv[VALS / 2];\n            load_x(sp, 0, xv);\n",
     "            uint32_t xw[MT][VALS / 2];\n"
     "            #pragma unroll\n            for (int t = 0; t < MT; ++t) {\n"
     "              #pragma unroll\n              for (int i = 0; i < VALS / 2; ++i) xw[t][i] = rx[d][t][i];\n"
     "              load_x(here ? nsp : sp_lo + warp + d * WARPS, t, rx[d][t]);\n            }\n"
     "            uint32_t* xv = xw[0];\n"),
    ("                if (t > 0) load_x(sp, t, xv);\n", "                xv = xw[t];\n"),
)

#: Whether the chain's decode products take the weights as exact integers, by bits
#: (``XLSTM_METAL_DECODE_INT``, e.g. "4:0,8:1"; see :func:`int_weights_apply` for where they can):
#: 0 off, 1 the integers q, 2 the integers 1024 + q (one instruction less per pair of weights;
#: 1024 times the group's sum of x comes off through the bias, b - 1024 s: float32 sums ~2^10
#: larger, their rounding still ~2^-14 of the result, far below an ulp of bf16).
#: y = sum over groups of s * (sum q x) + b * (sum x): a pair of 8-bit weights becomes two fp16
#: integers in one byte permute and one subtraction, where dequantizing them costs two permutes,
#: two subtractions, two FMAs and a pack; x enters the mma as fp16, scaled by a power of two per
#: (row, group) so that bf16's 8 significant bits stay exact, and each span's float32 sums take
#: the group's scale and bias once. The numbers differ from MLX's product by float32 rounding only
#: (no weight is rounded to bf16 first).
INT_WEIGHTS = _per_bits("XLSTM_METAL_DECODE_INT", {4: 0, 8: 0})


def span(bits: int) -> int:
    """Values of K a warp covers per weight chunk (16 bytes a thread, four threads a row): 128 at
    4 bits, 64 at 8 (the decode kernel's SPAN)."""
    return 512 // bits


def int_weights_apply(bits: int, group_size: int, rows: int, split: int = 1, kind: int | None = None) -> bool:
    """Whether a chain product of ``rows`` rows takes :data:`INT_WEIGHTS`' path: switched on for
    ``bits`` (or ``kind`` given: that setting instead), 4 or 8 bits, one tile of x rows (at most
    8), K unsplit, and each warp's span of K (512 / bits values: 64 at 8 bits, 128 at 4) inside
    one group. On an H200 (S25, 7B, one row, products alone) the 4-bit form at groups of 128 ran
    level with dequantizing first (gate|up 27.0 against 26.7 us); groups of 64 through chunks
    split in two halves (each half of a span in one group) ran 37-46 us and were not kept."""
    on = INT_WEIGHTS.get(bits) if kind is None else kind
    return bool(on) and bits in (4, 8) and group_size >= span(bits) and rows <= 8 and split == 1


def int_weights_reference(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int,
                          bits: int) -> mx.array:
    """The integer-weights product (:data:`INT_WEIGHTS`) as the kernel computes it, in float32
    ops (any device): x [M, K] -> [M, N] float32. Per (row, span) of x, a span being the
    512 / bits values a warp covers per chunk (inside one group: G >= the span), the power of two
    2^e that puts its largest magnitude in [2^14, 2^15) (e within +-60; 0 for an all-zero span),
    x as fp16 times 2^e; per output feature and span the integer product sum q * x16 (q the
    stored integers), then y = sum over spans of (s * 2^-e) * that + b * (sum of x16) * 2^-e,
    s and b the span's group's. Only the order of the float32 sums differs from the kernel's."""
    M, K = x.shape
    N = w.shape[0]
    G = group_size
    S = min(G, span(bits))  # (a group smaller than the span, which the kernel does not take: per group)
    xf = x.astype(mx.float32).reshape(M, K // S, S)
    big = mx.max(mx.abs(xf), axis=-1, keepdims=True)
    biased = (big.view(mx.uint32) >> 23) & 255
    ex = mx.where(big > 0, 141 - biased.astype(mx.int32), 0)
    ex = mx.clip(ex, -60, 60).astype(mx.float32)
    x16 = (xf * mx.power(2.0, ex)).astype(mx.float16).astype(mx.float32)
    down = mx.power(2.0, -ex)  # [M, K/S, 1]
    xsum = mx.sum(x16, axis=-1, keepdims=True) * down
    one = mx.ones(scales.shape, dtype=mx.float32)
    q = mx.dequantize(w, one, mx.zeros_like(one), group_size=G, bits=bits).reshape(N, K // S, S)  # exact integers
    tq = mx.einsum("msk,nsk->mns", x16, q)  # [M, N, K/S]
    per_span = G // S  # spans per group
    s = mx.repeat(scales.astype(mx.float32), per_span, axis=1)  # [N, K/S]
    b = mx.repeat(biases.astype(mx.float32), per_span, axis=1)
    return mx.sum(s[None] * down[:, None, :, 0] * tq + b[None] * xsum[:, None, :, 0], axis=-1)


#: The prologue's last part for int_weights (after the stage's values are in ``T xs_s[M * K]``
#: and the block has synchronised): each (row, span) of SPAN values (what a warp's chunk covers,
#: inside one group), SPAN / 8 threads of 8 values each, takes the power of two 2^e that puts
#: its largest magnitude in [2^14, 2^15), stores its values as fp16 times 2^e in place (exact for
#: bf16 values: 8 significant bits, in range) and (2^-e, their sum times 2^-e) in ``float2
#: xg_s``. Per span, not per group: each span's sums take the bias once, with its own x's sum.
INT_STAGE = """
    {
      constexpr int TPG = SPAN / 8;
      const int units = M * (K / 8);
      for (int base = 0; base < units; base += 32 * WARPS) {
        const int u = base + static_cast<int>(threadIdx.x);
        const bool ok = u < units;
        const uint4 raw = ok ? *reinterpret_cast<const uint4*>(xs_s + static_cast<size_t>(u) * 8) : make_uint4(0u, 0u, 0u, 0u);
        const T* v8 = reinterpret_cast<const T*>(&raw);
        float f[8];
        float big = 0.0f;
        #pragma unroll
        for (int i = 0; i < 8; ++i) { f[i] = static_cast<float>(v8[i]); big = fmaxf(big, fabsf(f[i])); }
        #pragma unroll
        for (int sh = 1; sh < TPG; sh <<= 1) big = fmaxf(big, __shfl_xor_sync(0xffffffffu, big, sh));
        int ex = big > 0.0f ? 141 - static_cast<int>((__float_as_uint(big) >> 23) & 255u) : 0;
        ex = ex < -60 ? -60 : (ex > 60 ? 60 : ex);
        const float up = __uint_as_float(static_cast<uint32_t>(127 + ex) << 23);
        const float down = __uint_as_float(static_cast<uint32_t>(127 - ex) << 23);
        uint4 o;
        __half* h8 = reinterpret_cast<__half*>(&o);
        float sum = 0.0f;
        #pragma unroll
        for (int i = 0; i < 8; ++i) { h8[i] = __float2half_rn(f[i] * up); sum += __half2float(h8[i]); }
        #pragma unroll
        for (int sh = 1; sh < TPG; sh <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, sh);
        if (ok) {
          *reinterpret_cast<uint4*>(xs_s + static_cast<size_t>(u) * 8) = o;
          if ((threadIdx.x & (TPG - 1)) == 0) xg_s[u / TPG] = make_float2(down, sum * down);
        }
      }
      __syncthreads();
    }
"""

def _substituted(source: str, edits: tuple, form: str) -> str:
    """``source`` with each (old, new) of ``edits`` made; each old text must occur exactly once
    (a changed kernel body fails loudly here, not in a kernel that reads the wrong rows)."""
    for old, new in edits:
        if source.count(old) != 1:
            raise AssertionError(f"decode_source: the {form} form's anchor {old!r} is not in the source once")
        source = source.replace(old, new)
    return source


def decode_source(sizes: str = _SIZES, prologue: str = "", load_x: str = _LOAD_X, store: str = _STORE,
                  split: bool = False, int_weights: bool = False, pair_store: str | None = None,
                  x_ahead: bool = False, float_format: bool = False) -> str:
    """The decode kernel's body with its hooks filled: ``sizes`` defines ``int M, K`` (rows of x,
    the product's inner size), ``constexpr bool XPRE`` (whether ``load_x`` gives x's values at 4
    bits in the pair order of ``xl_xpos4``, which saves the kernel a byte permute per pair) and any
    shared memory the other hooks use; ``prologue`` runs once
    per thread block after its first weight chunks are requested (every thread reaches it: it
    may synchronise; with K split it needs x's values in ``[k_lo, k_hi)`` only); ``load_x`` fills
    ``uint32_t xv[VALS / 2]`` with x's values of row ``m``, k
    ``kc .. kc + VALS`` as consecutive T pairs (value 2i in the low half of ``xv[i]``); ``store``
    (one statement) writes ``float sum``, the product's float32 value at row ``m``, output
    feature ``n`` (M x N output). Each thread block walks output tiles ``blockIdx.x + i *
    gridDim.x`` after its one prologue (:func:`decode_launch` with ``max_blocks`` launches fewer
    blocks than tiles). ``split``: K split in SPLIT shares (template argument; the kernel takes a
    float32 output ``part`` [SPLIT, M, N] for the partial sums and a uint32 output ``count``, one
    counter per 16-feature tile, zero at launch). The fused decode chain (:mod:`.decode_chain`)
    puts its norms and gates in these hooks.

    ``int_weights``: the weights enter the mma as exact integers (fp16) and each group's scale
    and bias apply to the float32 sums (see :data:`INT_WEIGHTS`); then x (one tile of rows: MT 1;
    K unsplit; G >= the span a warp covers, 512 / BITS values) is read as fp16 values scaled by a
    power of two per (row, span), and ``float2 xg_s[M * K / SPAN]`` holds (2^-e, the span's sum
    of x) for each: the prologue stages both (:data:`INT_STAGE`).

    ``pair_store`` (one statement; K unsplit): the weights' rows are two halves [A; B] of PAIR =
    N / 2 rows each (PAIR % 8 == 0), tile t computes rows 8t..8t+7 of both (A's as the mma's
    rows g, B's as its rows g + 8) and ``pair_store`` writes output ``n`` < PAIR of row ``m``
    from ``float sum0`` (A's row n) and ``sum1`` (B's): e.g. SwiGLU of the gate|up product in
    the epilogue. ``store`` is then unused.

    ``x_ahead`` (no prologue: ``load_x`` may run before it): x's values ride in the weights' ring,
    each slot's x of all MT row tiles requested with its weight chunk, so a span's mma waits on
    nothing but the chunk that arrived (without it, each span loads its x when it starts,
    one L2 round trip per row tile on the critical path).

    ``float_format``: the weights are a float format's codes (template ``FMT``: 1 mxfp4, 2 nvfp4,
    3 mxfp8, with BITS 4, 4, 8 and G 32, 16, 32) and ``scales`` its uint8 group scales, with no
    biases; the header needs :data:`FLOAT_FORMAT_HEADER`. Each pair of codes becomes its two
    weights in T, exactly (``fp_pair``), before the mma."""
    finish = _SPLIT_FINISH.replace("@STORE@", store) if split else ""
    source = _SOURCE
    if float_format:
        if int_weights or x_ahead:
            raise ValueError("decode_source: the float-format form takes neither int_weights nor x_ahead")
        source = _substituted(source, _FLOAT_FORMAT, "float-format")
    if pair_store is not None:
        if split:
            raise ValueError("decode_source: paired rows take K unsplit")
        source = _substituted(source, _PAIR_ROWS, "paired")
        store = pair_store
    if x_ahead:
        if prologue:
            raise ValueError("decode_source: x_ahead reads x before any prologue; give none")
        source = _substituted(source, _X_AHEAD, "x-ahead")
    return (source.replace("@SIZES@\n", sizes).replace("@PROLOGUE@\n", prologue)
            .replace("@MT1_BODY@", _MT1_FLOAT_FORMAT if float_format else _MT1_INT if int_weights else _MT1_DEQUANT)
            .replace("@LOAD_X@\n", load_x).replace("@TILE_STORE@", _SPLIT_STORE if split else store)
            .replace("@SPLIT_FINISH@\n", finish))


#: Weight chunks in flight per thread (the ring's depth) by bits (``XLSTM_METAL_DECODE_DEPTH``,
#: e.g. "4:4,8:1,16:1"), and the load hint (see ``ld_weights``): what the decode products use
#: unless a caller passes its own. With :data:`RESIDENT` and the chain's blocks walking tiles
#: (``decode_chain.WALK_BLOCKS``) the defaults are the schedules measured best on an H200 (7B,
#: one row; benchmarks/NOTES.md, session 7): at 4 bits 4 chunks, 2 blocks per SM, the chain's
#: blocks walking tiles (GPU time per step 2.88-2.89 ms, S7R2/S7R3, against 3.13 with session 6's
#: kernel); at 8 and 16 bits session 6's schedule, one chunk in flight while one is multiplied,
#: 3 blocks per SM, a block per tile (S6R3: 4.13 / 4.74 ms; depth 2 walking tiles with the L2
#: prefetch below took 4.28 / 5.65 ms in S7R3).
DEPTH = _per_bits("XLSTM_METAL_DECODE_DEPTH", {4: 4, 8: 1, 16: 1})
LOAD_HINT = 1

#: Whether a thread asks L2 to fetch the rest of its first tile's weights before the prologue
#: (``prefetch.global.L2``, no registers held; ``XLSTM_METAL_DECODE_PREFETCH=1``). Off: S7R3 (H200,
#: 4 bits, q|k|v|o) ran 15.7 us per product without it, 17.2 with it (the chain's stage 17.1 / 18.3),
#: and every block asking for its whole first tile at once can outrun L2 (gate|up's first tiles
#: at 16 bits are 44 MB, proj_down's 89 MB).
PREFETCH = os.environ.get("XLSTM_METAL_DECODE_PREFETCH", "0") == "1"

#: Most thread blocks :func:`fused_quantized_matmul` launches, each walking output tiles
#: (``XLSTM_METAL_DECODE_BLOCKS``); 0: one block per 16-feature tile.
DECODE_BLOCKS = int(os.environ.get("XLSTM_METAL_DECODE_BLOCKS", "0"))


def decode_template(dtype: mx.Dtype, bits: int, group_size: int, rows: int, depth: int | None = None,
                    load_hint: int | None = None, split: int = 1) -> list:
    """The decode kernel's template arguments (see :func:`decode_source`): ``depth`` weight
    chunks in flight per thread (default :data:`DEPTH` for ``bits``), ``load_hint`` the weights'
    load instruction (default :data:`LOAD_HINT`), ``split`` the shares of K (1: none)."""
    return [("T", dtype), ("BITS", bits), ("G", group_size), ("MT", -(-rows // 8)), ("WARPS", _WARPS),
            ("DEPTH", depth or DEPTH[bits]), ("LDH", LOAD_HINT if load_hint is None else load_hint),
            ("PF", int(PREFETCH)), ("SPLIT", split)]


def decode_launch(n_out: int, max_blocks: int | None = None, split: int = 1) -> dict:
    """The decode kernel's grid and thread block for ``n_out`` output features (one thread block
    per 16-feature tile; or ``max_blocks``, rounded down to a multiple of ``split``, walking the
    tiles with the grid's stride), with K in ``split`` shares: that many work items per tile.

    All ``max_blocks`` blocks, though some then walk one tile more than others: blocks share their
    SM's issue slots, so what bounds a product is the tiles per SM, and 1,368 tiles on 264 blocks
    (2 per SM) give each SM 10 or 11 as 48 blocks of 6 and 216 of 5, where 228 equal blocks of 6
    (sessions 7-25) left 36 SMs one block and gave the other 96 twelve. On an H200 (S26, 7B
    gate|up 21,888 x 4,096, the chain's RMSNorm stage, CUPTI, two rounds each): 4 bits one row
    27.2 -> 25.0 us, two rows 28.9 -> 26.7-26.8; 8 bits two rows (396 blocks) 39.3 -> 37.4-37.6.
    q|k|v|o (768 tiles) is the same either way (at most 6 per SM)."""
    tiles = -(-n_out // 16) * split
    blocks = tiles
    if max_blocks and max_blocks < tiles:
        blocks = max(split, max_blocks // split * split)
    return dict(grid=(blocks * 32 * _WARPS, 1, 1), threadgroup=(32 * _WARPS, 1, 1))


#: Most rows of x for which the decode kernel's registers are bounded (:data:`RESIDENT`): more x
#: tiles' accumulators would spill, so those kernels keep the registers they need.
BOUNDED_ROWS = 16

#: Whether the plain decode products (:func:`fused_quantized_matmul`, :func:`fused_swiglu_matmul`)
#: carry x in the weights' ring, by bits (``XLSTM_METAL_DECODE_X_AHEAD``, e.g. "16:0"; see
#: :func:`decode_source`'s ``x_ahead``). On for bf16 weights: on an H200 (S20R3, 16 rows, 7B
#: products alone, us each) gate|up 52.1 -> 51.3, proj_down 29.3 -> 27.9, q|k|v|o 28.7 -> 28.7,
#: out_proj 12.5 -> 12.2; whole 16-row steps 5.20 -> 5.09 ms of GPU work (2,897-2,920 tok/s
#: against 2,549-2,862). Quantized widths were not measured (at 4 bits its ring spills).
X_AHEAD = _per_bits("XLSTM_METAL_DECODE_X_AHEAD", {4: 0, 8: 0, 16: 1})

_kernel_cache: dict[tuple, object] = {}


def _kernel(resident: int, x_ahead: bool = False, swiglu: bool = False):
    """The plain decode kernel (``swiglu``: its paired form with SwiGLU in the epilogue, for
    :func:`fused_swiglu_matmul`), its registers bounded for ``resident`` blocks per SM (0: not),
    x carried in the ring with ``x_ahead``."""
    key = (resident, x_ahead, swiglu)
    if key not in _kernel_cache:
        _kernel_cache[key] = mx.fast.cuda_kernel(
            name=f"xlstm_quantized_matmul_decode{'_swiglu' if swiglu else ''}{'_xa' if x_ahead else ''}_r{resident}",
            input_names=["x", "w", "scales", "biases"],
            output_names=["y"],
            source=compact_source(decode_source(sizes=_ND_SIZES, x_ahead=x_ahead,
                                                pair_store=_SWIGLU_STORE if swiglu else None)),
            # SwiGLU's store calls MLX's Sigmoid (the bits of swiglu_joined)
            header=compact_source(('#include "mlx/backend/cuda/device/unary_ops.cuh"\n' if swiglu else "")
                                  + _HEADER + launch_bounds(resident)),
        )
    return _kernel_cache[key]


def fast_path_supported(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None,
                        group_size: int, bits: int, mode: str = "affine") -> bool:
    """True when :func:`quantized_matmul` runs its own CUDA path (else MLX's reference)."""
    return cuda_available() and kernel_takes(x, w, scales, biases, group_size, bits, mode)


def kernel_takes(x, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
                 mode: str = "affine") -> bool:
    """:func:`fast_path_supported` without the device check: whether the kernels take these
    dtypes and shapes (``x`` needs only ``dtype`` and ``shape``)."""
    return (
        mode == "affine"
        and biases is not None
        and bits in _FAST_BITS
        and group_size in _FAST_GROUPS
        and x.dtype in (mx.bfloat16, mx.float16)
        and scales.dtype == x.dtype
        and biases.dtype == x.dtype
        and w.dtype == mx.uint32
        and w.ndim == 2
        and x.shape[-1] == w.shape[1] * 32 // bits
        and x.shape[-1] % group_size == 0
    )


def one_group_per_row_on_cuda(x: mx.array, group_size: int, mode: str = "affine") -> bool:
    """Whether :func:`quantized_matmul` takes the dequantized product to avoid MLX's own: on
    CUDA, affine weights whose every row is one group (K <= group_size). MLX 0.32.4 sends such a
    product of several rows to its Hopper kernel (``supports_qmm_sm90`` asks ``group_size >= K``),
    which returned wrong values (relative error ~1 at 12 and 40 rows, 4 and 8 bits, float32 x,
    K = 64, g64; an H100, session 41) and hung at 2 rows. The weights are small (K <= 128), so
    dequantizing them costs little."""
    return mode == "affine" and group_size >= x.shape[-1] and cuda_available()


def float_format_prefill_on_cuda(x: mx.array, w: mx.array, scales: mx.array, mode: str) -> bool:
    """Whether :func:`quantized_matmul` takes dequantize + GEMM for a float format (mxfp4, nvfp4,
    mxfp8: uint8 scales, no biases): on CUDA, bf16 or fp16 x of more than
    :data:`DECODE_MAX_ROWS` rows. MLX 0.32.4's own product is slow there: a 7B 2,048-token
    prefill with mxfp4 weights ran at 5,875 tok/s against 4-bit affine's 29,516 through
    dequantize + GEMM (H100, session 44). Fewer rows keep MLX's product (its decode reads the
    packed weights: 196 tok/s at batch 1, bf16's speed at a quarter of the bytes)."""
    return (mode != "affine" and scales.dtype == mx.uint8 and w.dtype == mx.uint32 and w.ndim == 2
            and x.dtype in (mx.bfloat16, mx.float16) and math.prod(x.shape[:-1]) > DECODE_MAX_ROWS
            and cuda_available())


#: Rows of x from which the CPU's quantized product is dequantize + GEMM (:func:`many_rows_on_cpu`),
#: affine weights and the float formats (whose dequantization MLX's CPU code does ~6x slower).
CPU_DEQUANTIZE_ROWS = {"affine": 16, "float": 65}


def many_rows_on_cpu(x: mx.array, mode: str = "affine") -> bool:
    """Whether :func:`quantized_matmul` takes dequantize + GEMM on the CPU: at least
    :data:`CPU_DEQUANTIZE_ROWS` rows of x. MLX 0.32.4's CPU product goes row by row, its time
    linear in the rows (at 64 rows ~44x a float32 GEMM's, at 512 ~88x), while dequantizing is one
    pass over the weights and the GEMM is OpenBLAS's. On this project's 2-core EPYC (session 49,
    ad hoc, 768 x 2,048 and 50,304 x 768 layers) affine 4/8-bit at 16 rows took 1.1-6x less time
    (at 4 rows 0.5-1.8x), 64 rows 6-21x, 256 rows 18-32x; mxfp4 at 16 rows 0.6-0.8x, 64 rows
    2.2-3.2x, 256 rows 7-9x. Scoring a text, training on a quantized model and prefill outside the
    C path (:mod:`xlstm_metal.kernels.cpu`) run such products."""
    rows = CPU_DEQUANTIZE_ROWS["affine" if mode == "affine" else "float"]
    return mx.default_device() == mx.cpu and math.prod(x.shape[:-1]) >= rows


#: MLX's quantization modes: None (affine: any of its bit widths and group sizes, float scales
#: and biases) or the one (bits, group size) of a microscaling float format (uint8 scales, no
#: biases). Defined here, the lower layer, so this module and ``quantization`` share it.
MODES: dict[str, tuple[int, int] | None] = {"affine": None, "mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}

#: The float formats the decode kernel takes: mode -> its template number FMT (bits and group
#: size: :data:`MODES`).
FLOAT_FORMAT_TEMPLATES = {"mxfp4": 1, "nvfp4": 2, "mxfp8": 3}

def _float_format_decode(raw: str) -> frozenset[str]:
    """The formats ``XLSTM_METAL_FLOAT_FORMAT_DECODE`` names: "1" all, "0" none, or a comma list."""
    if raw.strip() in ("0", "1"):
        return frozenset(FLOAT_FORMAT_TEMPLATES if raw.strip() == "1" else ())
    modes = frozenset(part.strip() for part in raw.split(",") if part.strip())
    if not modes <= FLOAT_FORMAT_TEMPLATES.keys():
        raise SettingError(f"XLSTM_METAL_FLOAT_FORMAT_DECODE must be 0, 1 or a comma list of "
                           f"{', '.join(FLOAT_FORMAT_TEMPLATES)}, not {raw!r}")
    return modes


#: The float formats whose decode rows on CUDA take :func:`fused_float_format_matmul`; the others
#: run MLX's product, the reference (``XLSTM_METAL_FLOAT_FORMAT_DECODE``: 1 all, 0 none, or a comma
#: list; read at the first product, so a bad value is a command's error, not the import's). The
#: default is all three: their kernel matched the exact product at 1-64 rows (mxfp4 and mxfp8 on an
#: H200 in session 47, nvfp4 on an H100 in session 49) and decoded a 7B model at batch 16 ~9-12x as
#: fast as MLX's product, which runs row by row (at batch 1: mxfp4 1.18x on the H200; nvfp4 0.99x
#: on the H100, within a round's spread).
FLOAT_FORMAT_DECODE: frozenset[str] | None = None


def float_format_decode() -> frozenset[str]:
    """:data:`FLOAT_FORMAT_DECODE`, read from the environment the first time."""
    global FLOAT_FORMAT_DECODE
    if FLOAT_FORMAT_DECODE is None:
        FLOAT_FORMAT_DECODE = _float_format_decode(os.environ.get("XLSTM_METAL_FLOAT_FORMAT_DECODE", "1"))
    return FLOAT_FORMAT_DECODE


def float_format_kernel_takes(x, w: mx.array, scales: mx.array, group_size: int, bits: int, mode: str) -> bool:
    """Whether :func:`fused_float_format_matmul` takes these (``x`` needs only ``dtype`` and
    ``shape``): mxfp4, nvfp4 or mxfp8 as MLX quantizes them (codes uint32 [N, K * bits / 32],
    uint8 scales [N, K / group_size]), bf16 or fp16 x of 1 to :data:`DECODE_MAX_ROWS` rows, K a
    multiple of 32."""
    K = x.shape[-1]
    return (mode in FLOAT_FORMAT_TEMPLATES and MODES[mode] == (bits, group_size)
            and x.dtype in (mx.bfloat16, mx.float16)
            and 0 < math.prod(x.shape[:-1]) <= DECODE_MAX_ROWS
            and K % 32 == 0
            and w.dtype == mx.uint32 and w.shape == (w.shape[0], K * bits // 32)
            and scales.dtype == mx.uint8 and scales.shape == (w.shape[0], K // group_size))


_float_format_kernels: dict[int, object] = {}


def fused_float_format_matmul(x: mx.array, w: mx.array, scales: mx.array, *, group_size: int, bits: int,
                              mode: str, depth: int | None = None, max_blocks: int | None = None) -> mx.array:
    """x [..., K] @ dequantize(w, scales, mode=mode).T -> [..., N] in x's dtype, in the decode
    kernel's float-format form (CUDA only; the cases :func:`float_format_kernel_takes` accepts):
    the packed codes stream through the ring as affine weights do, and each pair of codes becomes
    its two weights in x's dtype in a few bit operations and two multiplies (by 2^D, by the group's
    scale). The weights are exact in x's dtype (fp16: but those of a group scaled below 2^-24), so
    the result differs from MLX's product by the float32 sums' order only. MLX 0.32.4's own product
    reads the weights at bf16's pace (7B decode at batch 1: mxfp4 201.5 tok/s, 4-bit affine
    through our kernel 348.0, an H100, session 44)."""
    fmt = FLOAT_FORMAT_TEMPLATES[mode]
    lead, N = x.shape[:-1], w.shape[0]
    M = math.prod(lead)
    if not float_format_kernel_takes(x, w, scales, group_size, bits, mode):
        raise ValueError(f"fused_float_format_matmul: {mode} ({bits} bits, groups of {group_size}) does not take "
                         f"x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, scales {scales.shape} {scales.dtype}")
    resident = RESIDENT.get(bits, 0) if M <= BOUNDED_ROWS else 0
    if resident not in _float_format_kernels:
        _float_format_kernels[resident] = mx.fast.cuda_kernel(
            name=f"xlstm_float_format_matmul_decode_r{resident}",
            input_names=["x", "w", "scales"],
            output_names=["y"],
            source=compact_source(decode_source(sizes=_ND_SIZES, float_format=True)),
            header=compact_source(_HEADER + FLOAT_FORMAT_HEADER + launch_bounds(resident)),
        )
    (y,) = _float_format_kernels[resident](
        inputs=[x, w, scales],
        template=decode_template(x.dtype, bits, group_size, M, depth) + [("FMT", fmt)],
        **decode_launch(N, DECODE_BLOCKS if max_blocks is None else max_blocks),
        output_shapes=[(*lead, N)],
        output_dtypes=[x.dtype],
    )
    return y


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, *,
                     group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """x [..., K] @ dequantize(w, scales, biases).T -> [..., N].

    w: packed [N, K * bits / 32] uint32; scales, biases: [N, K / group_size]. On CUDA (bf16 or
    fp16 x, bits 4 or 8, affine): up to :data:`DECODE_MAX_ROWS` rows of x the fused kernel,
    more rows dequantize + GEMM, as for the float formats (:func:`float_format_prefill_on_cuda`).
    On the CPU from :data:`CPU_DEQUANTIZE_ROWS` rows dequantize + GEMM as well
    (:func:`many_rows_on_cpu`). Everywhere else this is ``mx.quantized_matmul(...,
    transpose=True)`` (the reference: the CPU's few rows, Metal, the other cases).
    """
    check_quantized_rows(w, scales, biases)
    if one_group_per_row_on_cuda(x, group_size, mode):
        return dequantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    if float_format_prefill_on_cuda(x, w, scales, mode) or many_rows_on_cpu(x, mode):
        return dequantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits, mode=mode)
    if mode != "affine" and cuda_available() and mode in float_format_decode() \
            and float_format_kernel_takes(x, w, scales, group_size, bits, mode):
        return fused_float_format_matmul(x, w, scales, group_size=group_size, bits=bits, mode=mode)
    if fast_path_supported(x, w, scales, biases, group_size, bits, mode):
        rows = math.prod(x.shape[:-1])
        if rows == 0:
            return mx.zeros((*x.shape[:-1], w.shape[0]), dtype=x.dtype)
        if rows <= DECODE_MAX_ROWS:
            return fused_quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
        return dequantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    return mx.quantized_matmul(x, w, scales=scales, biases=biases, transpose=True,
                               group_size=group_size, bits=bits, mode=mode)


def check_quantized_rows(w: mx.array, scales: mx.array, biases: mx.array | None) -> None:
    """Refuses scales or biases whose leading axes are not the packed weight's (shapes only, no
    host sync). MLX's quantized_matmul checks only their last axis and read a weight row's
    scales and biases past their end (a layer whose scales were replaced by fewer rows through
    ``load_weights(strict=False)``: garbage logits, or a segmentation fault), as its gather
    did for a quantized table's rows."""
    for name, array in (("scales", scales), ("biases", biases)):
        if array is not None and tuple(array.shape[:-1]) != tuple(w.shape[:-1]):
            raise ValueError(f"a quantized weight of shape {tuple(w.shape)} has {name} of shape "
                             f"{tuple(array.shape)}: one row of {name} per weight row is needed")


def fused_quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *,
                           group_size: int, bits: int, depth: int | None = None,
                           load_hint: int | None = None, max_blocks: int | None = None) -> mx.array:
    """The fused dequantize + tensor-core kernel (CUDA only; x of at most
    :data:`DECODE_MAX_ROWS` rows; the cases :func:`fast_path_supported` accepts, and at ``bits``
    16 plain weights ``w`` [N, K] of x's dtype, ``scales`` and ``biases`` unread). ``depth``,
    ``load_hint``: see :func:`decode_template`; ``max_blocks``: see :func:`decode_launch` (default
    :data:`DECODE_BLOCKS`; 0 one block per tile)."""
    lead, N = x.shape[:-1], w.shape[0]
    M = math.prod(lead)
    if not 0 < M <= DECODE_MAX_ROWS:
        raise ValueError(f"the fused kernel takes 1 to {DECODE_MAX_ROWS} rows, got {M}")
    (y,) = _kernel(RESIDENT.get(bits, 0) if M <= BOUNDED_ROWS else 0, bool(X_AHEAD.get(bits)))(
        inputs=[x, w, scales, biases],
        template=decode_template(x.dtype, bits, group_size, M, depth, load_hint),
        **decode_launch(N, DECODE_BLOCKS if max_blocks is None else max_blocks),
        output_shapes=[(*lead, N)],
        output_dtypes=[x.dtype],
    )
    return y


#: SwiGLU in the paired decode kernel's epilogue: gate and up rounded to T as the unpaired
#: product stores them, then the ops of SwiGLU's kernel (``train_rows.swiglu_joined``) in their order.
_SWIGLU_STORE = """{
        const T gt = static_cast<T>(sum0);
        const T si = gt * Sigmoid{}(gt);
        y[(size_t)m * PAIR + n] = si * static_cast<T>(sum1);
      }"""
def swiglu_kernel_takes(x, w: mx.array) -> bool:
    """Whether :func:`fused_swiglu_matmul` takes ``x`` (only its shape is read) and the joined
    gate|up weights ``w`` [2F, ...]: 1 to :data:`DECODE_MAX_ROWS` rows, F a multiple of 8."""
    return w.ndim == 2 and w.shape[0] % 16 == 0 and 0 < math.prod(x.shape[:-1]) <= DECODE_MAX_ROWS


def fused_swiglu_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *,
                        group_size: int, bits: int, load_hint: int | None = None) -> mx.array:
    """``silu(x @ gate.T) * (x @ up.T)`` for the joined weights ``w`` = [gate; up] (dequantized:
    [2F, K]; F % 8 == 0) -> [..., F] in x's dtype, in one launch of the decode kernel (CUDA only;
    the cases :func:`fused_quantized_matmul` takes, and :func:`swiglu_kernel_takes`): each thread
    block computes 8 features of gate and the same 8 of up, and its epilogue applies SwiGLU.
    Gate and up are the unpaired kernel's sums (the same k order per warp), rounded to x's dtype,
    and SwiGLU runs the ops of ``swiglu_joined`` on them, so the output is that of
    :func:`fused_quantized_matmul` followed by the SwiGLU kernel (to the mma's own rounding, which
    may differ between its rows g and g + 8). The gate|up product is never stored."""
    lead, N = x.shape[:-1], w.shape[0]
    M = math.prod(lead)
    if not swiglu_kernel_takes(x, w):
        raise ValueError(f"fused_swiglu_matmul: 1 to {DECODE_MAX_ROWS} rows and 2F joined rows with F % 8 == 0, "
                         f"got x {x.shape}, w {w.shape}")
    (y,) = _kernel(RESIDENT.get(bits, 0) if M <= BOUNDED_ROWS else 0, bool(X_AHEAD.get(bits)), swiglu=True)(
        inputs=[x, w, scales, biases],
        template=decode_template(x.dtype, bits, group_size, M, None, load_hint),
        **decode_launch(N, DECODE_BLOCKS),
        output_shapes=[(*lead, N // 2)],
        output_dtypes=[x.dtype],
    )
    return y


def dequantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, *,
                       group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """Prefill: the weights dequantized to x's dtype (one pass over them), then MLX's GEMM. A
    float format's values (mxfp4, nvfp4, mxfp8) are exact in bf16 and fp16: dequantized there."""
    if mode != "affine":
        return x @ mx.dequantize(w, scales, None, group_size=group_size, bits=bits, mode=mode, dtype=x.dtype).T
    return x @ mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(x.dtype).T


class FastQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` whose product runs :func:`quantized_matmul` (the fused CUDA
    kernels on NVIDIA GPUs, MLX's reference elsewhere). Same parameters, same checkpoint keys."""

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                             group_size=self.group_size, bits=self.bits, mode=getattr(self, "mode", "affine"))
        if "bias" in self:
            y = y + self["bias"]
        return y

    # The same math as the base class: fuse_projections() may group it with plain quantized layers.
    __call__.computes_as = nn.QuantizedLinear.__call__


def format_dtype(scales: mx.array) -> mx.Dtype:
    """The dtype of a quantized table's rows as looked up (and dequantized): its scales' for
    affine; float32 for a float format (uint8 scales), whose values (at most 6 significant bits)
    every float dtype holds exactly: MLX gives them in bf16, which put a float32 model's first
    products in bf16."""
    return mx.float32 if scales.dtype == mx.uint8 else scales.dtype


class FastQuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose ``as_linear`` (a tied LM head) runs :func:`quantized_matmul`.
    Same parameters, same checkpoint keys, the same lookup (a float format's rows in float32:
    :func:`format_dtype`)."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = super().__call__(x)
        dtype = format_dtype(self["scales"])
        return rows if rows.dtype == dtype else rows.astype(dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                                group_size=self.group_size, bits=self.bits, mode=getattr(self, "mode", "affine"))


def use_fast_quantized_layers(model: nn.Module) -> int:
    """Switch every ``nn.QuantizedLinear`` in ``model`` to :class:`FastQuantizedLinear` and every
    ``nn.QuantizedEmbedding`` to :class:`FastQuantizedEmbedding` in place (the class changes; the
    module object, its arrays and its place in the tree stay, so nothing is copied and parameter
    names are unchanged). Returns the number of linear layers switched (affine and float formats:
    :func:`quantized_matmul` routes each)."""
    switched = 0
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = FastQuantizedLinear
            switched += 1
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = FastQuantizedEmbedding
    return switched


class FastQuantizedTree:
    """A mixin of a model (before ``nn.Module`` in its bases): quantized layers that
    ``update_modules`` brings in (``nn.quantize`` calls it, as do adapters and a user's swaps)
    become our classes (:func:`use_fast_quantized_layers`), as :func:`~xlstm_metal.quantization.quantize_model`
    and loading leave them: on CUDA around MLX's faulty kernel where one group spans a row, and
    through our decode kernels."""

    def update_modules(self, modules: dict, strict: bool = True):
        super().update_modules(modules, strict=strict)
        # Only what came in: quantize_model brings one layer per call, and a walk of the whole
        # tree each time would grow with the square of the layer count.
        for _, module in tree_flatten(modules, is_leaf=lambda m: isinstance(m, nn.Module)):
            if isinstance(module, nn.Module):
                use_fast_quantized_layers(module)
        return self
