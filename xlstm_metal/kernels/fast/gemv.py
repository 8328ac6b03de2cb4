"""Weights times one or two rows on NVIDIA GPUs: a streaming GEMV beside ``x @ w.T``.

At one row a decode step's products read each weight once, so they are paced by HBM: the
7B step's 13.3 GB at 280 tok/s need ~3.7 TB/s. The decode kernel of :mod:`.quantized` runs bf16
weights through its tensor-core loop (16 output features per block, 8 warps splitting K, one
16-byte chunk of two rows per thread in flight) and read them at 3.1-3.3 TB/s on an H200
(benchmarks/NOTES.md, session 13). Here each warp owns whole output features instead: its 32
lanes read 512 contiguous bytes of a row per load, ``UNROLL`` loads per lane are in flight
before any is used, x sits in shared memory, and the dot product runs in float32 FMAs (no
tensor cores: at one row they would waste 7/8 of their work and need the weights in fragment
order). The warp's lanes then sum by shuffles. On an H200 (session 14) this read bf16 weights
at 3.6-4.2 TB/s and 8-bit ones at 2.3-3.4.

Weights are bf16/fp16 (``bits`` 16) or MLX's 8- or 4-bit affine layout (``bits`` 8 or 4: per
group s * sum(q x) + b * sum(x), no weight rounded to x's dtype first; a lane's 16-byte chunk is
16 or 32 values). :func:`rows_matmul` is the
product; the reference is ``x @ w.T`` (MLX's GEMV) or ``mx.quantized_matmul``. Results agree to
float32 round-off of the sums (then T's rounding of the output): the order of the K terms
differs from MLX's and from the tensor-core kernel's. :func:`rows_source` is the kernel with
hooks, which :mod:`.decode_chain` fills with its stages' norms and gates.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .quantized import SMS
from .step import cuda_available
from .tensor_cores import compact_source
from .tensor_cores import launch_bounds as _launch_bounds

#: 16-byte weight loads per lane in flight before the first is used (``unroll``).
UNROLL = 8
#: Output features a warp computes at once (their loads interleaved: twice the bytes in flight).
ROWS_PER_WARP = 1
WARPS = 8
#: Thread blocks per SM the registers are bounded for (``__launch_bounds__``): without a bound
#: ptxas issued 4 of a lane's 8 loads and sank the rest between the FMAs (34 registers), with
#: one it issues all 8 first (56 registers; SASS read with nvdisasm).
RESIDENT = 4
#: Most rows of x the kernel takes (each an accumulator per lane and feature).
MAX_ROWS = 2
#: Bytes of shared memory the staged rows of x may take (static shared memory: 48 KiB a block).
STAGE_BYTES = 44 * 1024

HEADER = """
// A lane's 16-byte chunk of weights, read once. Not ``volatile`` asm (as .quantized's
// ld_weights is): the compiler may then issue all of a lane's UNROLL loads before the first use,
// which is the point here. LDH 0: a plain load; 1: the non-coherent path, not allocated in L1;
// 2: evict-first (ld.global.cs).
template <int LDH>
__device__ __forceinline__ uint4 xl_ld16(const uint4* p) {
  if constexpr (LDH == 1) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
  } else if constexpr (LDH == 2) {
    return __ldcs(p);
  } else {
    return *p;
  }
}
// The first ``bytes`` of a weight row requested into L2 (no registers held while they come):
// one bulk request through the copy engine on Hopper and later, else a prefetch per 128-byte
// line. p 16-byte aligned, bytes a multiple of 16.
__device__ __forceinline__ void xl_prefetch_l2(const void* p, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"(bytes) : "memory");
#else
  for (int off = 0; off < bytes; off += 128) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"(reinterpret_cast<const char*>(p) + off));
  }
#endif
}
template <typename T> struct XlPair;
template <> struct XlPair<__nv_bfloat16> {
  static __device__ __forceinline__ float2 f2(uint32_t u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xFFFF0000u));
  }
};
template <> struct XlPair<__half> {
  static __device__ __forceinline__ float2 f2(uint32_t u) {
    return __half22float2(*reinterpret_cast<const __half2*>(&u));
  }
};
// acc + the dot product of 8 values of w and 8 of x (16 bytes each), in float32.
template <typename T>
__device__ __forceinline__ float xl_dot8(const uint4& w, const uint4& x, float acc) {
  const uint32_t wa[4] = {w.x, w.y, w.z, w.w}, xa[4] = {x.x, x.y, x.z, x.w};
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = XlPair<T>::f2(wa[i]), b = XlPair<T>::f2(xa[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
  return acc;
}
// The dot product of 16 unsigned bytes q (16 bytes) and 16 values of x (two 16-byte chunks), in
// float32: byte e as the low byte of the float 2^23 + q is exact, then 2^23 comes off.
template <typename T>
__device__ __forceinline__ float xl_dot16q(const uint4& w, const uint4& x0, const uint4& x1) {
  const uint32_t wa[4] = {w.x, w.y, w.z, w.w}, xa[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
  float acc = 0.0f;
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float2 b = XlPair<T>::f2(xa[2 * i + h]);
      const float q0 = __uint_as_float(__byte_perm(wa[i], 0x4B000000u, 0x7540 + 2 * h)) - 8388608.0f;
      const float q1 = __uint_as_float(__byte_perm(wa[i], 0x4B000000u, 0x7541 + 2 * h)) - 8388608.0f;
      acc = fmaf(q0, b.x, acc);
      acc = fmaf(q1, b.y, acc);
    }
  }
  return acc;
}
// (4 bits) where value k of a row sits among the staged x: each 32-value chunk's four 8-value
// pieces rotated by (chunk / 2) % 4. A warp's lanes read piece j of 32 consecutive chunks (64
// bytes apart) at once; unrotated, the 8 lanes of each 16-byte access phase would meet in 2 of
// the 8 bank groups (a 4-way conflict), rotated in all 8.
__device__ __forceinline__ int xl_xswz4(int k) { return (k & ~31) | ((((k >> 3) + (k >> 6)) & 3) << 3) | (k & 7); }
// The dot product of 32 unsigned 4-bit values q (16 bytes, MLX's order: value 8j + i at bits 4i of
// word j) and the 32 values of x at xc (a chunk staged by xl_xswz4, its pieces rotated by rot =
// (chunk / 2) % 4), in float32: the low and high nibbles of each byte masked out four at a time,
// each then the low byte of the float 2^23 + q (exact), 2^23 taken off.
template <typename T>
__device__ __forceinline__ float xl_dot32q4(const uint4& w, const uint4* xc, int rot) {
  const uint32_t wa[4] = {w.x, w.y, w.z, w.w};
  float acc = 0.0f;
  #pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint4 xv = xc[(j + rot) & 3];
    const uint32_t xa[4] = {xv.x, xv.y, xv.z, xv.w};
    const uint32_t lo = wa[j] & 0x0F0F0F0Fu, hi = (wa[j] >> 4) & 0x0F0F0F0Fu;  // values 2i, 2i + 1 in byte i
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 b = XlPair<T>::f2(xa[i]);
      const float q0 = __uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7540 + i)) - 8388608.0f;
      const float q1 = __uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7540 + i)) - 8388608.0f;
      acc = fmaf(q0, b.x, acc);
      acc = fmaf(q1, b.y, acc);
    }
  }
  return acc;
}
"""

_SOURCE = """
@SIZES@
    // w [N, KD] (T; or at BITS 8 / 4 MLX's affine values [N, KD * BITS / 32] uint32 with scales
    // and biases [N, KD / G] in T) times SR staged rows of x (xs_s [SR, KD], T, at 4 bits each
    // row in xl_xswz4's order; rows M..SR-1 unread) ->
    // the store hook at each (m, n) with the float32 sum. Warp v of the grid computes features
    // RPW * v .. RPW * v + RPW - 1, then those gridDim.x * WARPS * RPW further, ... With PAIR > 0
    // (RPW 2) warp v computes features v and v + PAIR, ..., for v < PAIR, and the pair store hook
    // gets both sums (sum0, sum1) at (m, n).
    const int N = w_shape[0];
    static_assert(PAIR == 0 || RPW == 2, "paired features take two rows per warp");
    const int NW = PAIR > 0 ? PAIR : N;      // features walked
    constexpr int RSTEP = PAIR > 0 ? 1 : RPW;  // of them per warp at once
    auto row = [](int nb, int r) { return PAIR > 0 ? nb + r * PAIR : nb + r; };
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    constexpr int SPAN = 8, SPLIT = 1;  // as .quantized's hooks know them: K is not split here
    const int k_lo = 0, k_hi = K;
    constexpr int VPC = 128 / BITS;  // values per 16-byte chunk of weights
    constexpr int CH = KD / VPC;     // chunks per row
    constexpr int ITER = (CH + 32 * U - 1) / (32 * U);
    constexpr bool FULL = CH % (32 * U) == 0;  // every lane's every chunk lies in the row
    constexpr int GPR = BITS == 16 ? 1 : KD / G;  // groups per row
    const uint4* wq = reinterpret_cast<const uint4*>(w);
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
    const int nstride = gridDim.x * WARPS * RSTEP;
    int n0 = (blockIdx.x * WARPS + warp) * RSTEP;
    uint4 wv[RPW][U];
    T sv[RPW][U], bv[RPW][U];  // (8, 4 bits) each chunk's group scale and bias
    // No branches in here (a chunk past the row or a feature past N is read clamped, then
    // zeroed by a select): the loads are one basic block, so ptxas puts them all ahead of the
    // first FMA (behind a branch each, it kept 4 of 8 in flight).
    auto issue = [&](int nb, int it) {
      #pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = (it * U + u) * 32 + lane;
        const int cc = c < CH ? c : CH - 1;
        #pragma unroll
        for (int r = 0; r < RPW; ++r) {
          const int n = row(nb, r) < N ? row(nb, r) : N - 1;
          const uint4 v = xl_ld16<LDH>(wq + (size_t)n * CH + cc);
          wv[r][u] = (FULL || c < CH) ? v : zero4;
@SB_LOAD@
        }
      }
    };
    if constexpr (PF > 0) {
      // The first PF bytes of this warp's first features asked of L2 before the prologue: its
      // reads of the stage's inputs and its reductions then no longer leave HBM idle.
      if (lane < RPW && n0 < NW && row(n0, lane) < N) {
        xl_prefetch_l2(wq + (size_t)row(n0, lane) * CH, PF < CH * 16 ? PF : CH * 16);
      }
    }
    bool issued = PRE && n0 < NW;
    if (issued) issue(n0, 0);  // the first weights fly while the prologue reads its inputs
@PROLOGUE@
    // (8 and 4 bits) each chunk's sum of x, for its bias: sum_j (s q_j + b) x_j = s sum q_j x_j + b sum x_j
    __shared__ float xc_s[BITS == 16 ? 1 : SR * CH];
    if constexpr (BITS != 16) {
      for (int i = threadIdx.x; i < M * CH; i += blockDim.x) {
        const uint4* xp = reinterpret_cast<const uint4*>(xs_s + (size_t)i * VPC);
        float t = 0.0f;
        #pragma unroll
        for (int p = 0; p < VPC / 8; ++p) {
          const uint32_t xa[4] = {xp[p].x, xp[p].y, xp[p].z, xp[p].w};
          #pragma unroll
          for (int j = 0; j < 4; ++j) { const float2 f = XlPair<T>::f2(xa[j]); t += f.x + f.y; }
        }
        xc_s[i] = t;
      }
      __syncthreads();
    }
    for (; n0 < NW; n0 += nstride) {
      float acc[RPW][SR];
      #pragma unroll
      for (int r = 0; r < RPW; ++r) {
        #pragma unroll
        for (int m = 0; m < SR; ++m) acc[r][m] = 0.0f;
      }
      #pragma unroll 1
      for (int it = 0; it < ITER; ++it) {
        if (!issued) issue(n0, it);
        issued = false;
        #pragma unroll
        for (int u = 0; u < U; ++u) {
          const int c = (it * U + u) * 32 + lane;
          const int cc = c < CH ? c : CH - 1;  // its weights are zero (8, 4 bits: its scale and bias zeroed below)
          #pragma unroll
          for (int m = 0; m < SR; ++m) {
            const uint4* xp = reinterpret_cast<const uint4*>(xs_s + m * KD + cc * VPC);
            #pragma unroll
            for (int r = 0; r < RPW; ++r) {
              if constexpr (BITS == 16) {
                acc[r][m] = xl_dot8<T>(wv[r][u], xp[0], acc[r][m]);
              } else {
                const bool in = FULL || c < CH;
                const float sc = in ? static_cast<float>(sv[r][u]) : 0.0f, bc = in ? static_cast<float>(bv[r][u]) : 0.0f;
                const float dot = BITS == 8 ? xl_dot16q<T>(wv[r][u], xp[0], xp[1]) : xl_dot32q4<T>(wv[r][u], xp, (cc >> 1) & 3);
                acc[r][m] = fmaf(sc, dot, fmaf(bc, xc_s[m * CH + cc], acc[r][m]));
              }
            }
          }
        }
      }
      #pragma unroll
      for (int r = 0; r < RPW; ++r) {
        #pragma unroll
        for (int m = 0; m < SR; ++m) {
          float sum = acc[r][m];
          #pragma unroll
          for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
          if constexpr (PAIR > 0) {
            acc[r][m] = sum;
          } else {
            const int n = n0 + r;
            if (lane == 0 && n < N && m < M) @STORE@
          }
        }
      }
      if constexpr (PAIR > 0) {
        #pragma unroll
        for (int m = 0; m < SR; ++m) {
          const int n = n0;
          const float sum0 = acc[0][m], sum1 = acc[1][m];
          if (lane == 0 && m < M) @PAIR_STORE@
        }
      }
    }
"""

# (8, 4 bits) a chunk's group scale and bias, requested with its weights.
_SB_LOAD = """\
          {
            const size_t gi = (size_t)n * GPR + (cc * VPC) / G;
            sv[r][u] = scales[gi];
            bv[r][u] = biases[gi];
          }
"""

#: The plain product's hooks: x [M, K] staged as it is, y [M, N] in T.
_SIZES = """\
    const int M = x_shape[0];
    constexpr int K = KD;
    __shared__ __align__(16) T xs_s[SR * KD];
"""
STAGE_X = """\
    for (int i = threadIdx.x; i < M * (KD / 8); i += blockDim.x) {
      const int row = i / (KD / 8), k = (i - row * (KD / 8)) * 8;  // 4 bits: pieces of 8 rotated in their chunk
      reinterpret_cast<uint4*>(xs_s + row * KD + (BITS == 4 ? xl_xswz4(k) : k))[0] = reinterpret_cast<const uint4*>(x)[i];
    }
    __syncthreads();
"""
STORE = "y[(size_t)m * N + n] = static_cast<T>(sum);"


def launch_bounds(resident: int) -> str:
    """Header text bounding a kernel of :data:`WARPS` warps to ``resident`` blocks per SM (it must
    end the header; see :data:`RESIDENT`)."""
    return _launch_bounds(32 * WARPS, resident)


def rows_source(sizes: str = _SIZES, prologue: str = STAGE_X, store: str = STORE, bits: int = 16,
                pair_store: str = ";") -> str:
    """The kernel's body with its hooks filled, as :func:`.quantized.decode_source`'s (whose
    prologues :mod:`.decode_chain` puts here too): ``sizes`` defines ``int M`` (rows of x),
    ``constexpr int K`` (= template ``KD``) and ``T xs_s[SR * KD]`` in shared memory;
    ``prologue`` (every thread reaches it; it may synchronise and must end with the rows in
    ``xs_s``; at 4 bits value k of a row at ``xl_xswz4(k)``) stages x's M rows there; ``store``
    (one statement) writes ``float sum`` at row ``m``, feature ``n`` (an M x N output). ``bits``
    16: float weights ``w`` [N, K]; 8 or 4: MLX's affine values ``w`` [N, K * bits / 32]
    (uint32) with inputs ``scales`` and ``biases`` [N, K / G].
    ``pair_store`` (one statement): with template ``PAIR`` > 0, what is written at row ``m``,
    feature ``n`` < PAIR from ``float sum0`` (feature n's sum) and ``sum1`` (feature n + PAIR's).
    Template arguments: :func:`rows_template`."""
    return (_SOURCE.replace("@SIZES@\n", sizes).replace("@PROLOGUE@\n", prologue).replace("@STORE@", store)
            .replace("@PAIR_STORE@", pair_store).replace("@SB_LOAD@\n", _SB_LOAD if bits != 16 else ""))


def rows_template(dtype: mx.Dtype, k: int, staged_rows: int, unroll: int = UNROLL, rows_per_warp: int = ROWS_PER_WARP,
                  load_hint: int = 1, early: bool = True, bits: int = 16, group_size: int = 32,
                  prefetch: int = 0, pair: int = 0) -> list:
    """Template arguments of :func:`rows_source`'s kernels: ``staged_rows`` (SR) rows of x in
    shared memory, ``early``: the first weights requested before the prologue (PRE); ``bits``
    and ``group_size``: the weights' format; ``prefetch``: bytes of each warp's first features
    asked of L2 before the prologue (PF, a multiple of 16; 0 none); ``pair``: features n and
    n + pair computed together for the pair store (PAIR; ``rows_per_warp`` 2; 0 not)."""
    if prefetch < 0 or prefetch % 16:
        raise ValueError(f"prefetch must be a non-negative multiple of 16 bytes, got {prefetch}")
    if pair and rows_per_warp != 2:
        raise ValueError("paired features take rows_per_warp=2")
    return [("T", dtype), ("KD", k), ("SR", staged_rows), ("U", unroll), ("RPW", rows_per_warp), ("WARPS", WARPS),
            ("LDH", load_hint), ("PRE", bool(early)), ("BITS", bits), ("G", group_size), ("PF", prefetch),
            ("PAIR", pair)]


def rows_launch(n_out: int, rows_per_warp: int = ROWS_PER_WARP, blocks: int = 0) -> dict:
    """Grid and thread block for ``n_out`` features: one warp per ``rows_per_warp`` features, or
    ``blocks`` thread blocks per SM (:data:`.quantized.SMS`) walking them (0: not)."""
    n_blocks = -(-n_out // (WARPS * rows_per_warp))
    if blocks:
        n_blocks = min(n_blocks, blocks * SMS)
    return dict(grid=(n_blocks * 32 * WARPS, 1, 1), threadgroup=(32 * WARPS, 1, 1))


_kernels: dict[tuple, object] = {}


def _kernel(resident: int, bits: int):
    key = (resident, bits)
    if key not in _kernels:
        _kernels[key] = mx.fast.cuda_kernel(
            name=f"xlstm_rows_matmul_{bits}_r{resident}",
            input_names=["x", "w"] + (["scales", "biases"] if bits != 16 else []),
            output_names=["y"],
            source=compact_source(rows_source(bits=bits)),
            header=compact_source(HEADER + launch_bounds(resident)),
        )
    return _kernels[key]


def rows_supported(x: mx.array, w: mx.array, scales: mx.array | None = None, biases: mx.array | None = None,
                   group_size: int = 64, bits: int = 16) -> bool:
    """Whether :func:`rows_matmul` runs its kernel (else its reference): CUDA, bf16/fp16 x, 1 to
    :data:`MAX_ROWS` rows whose values fit shared memory; ``bits`` 16: w [N, K] of x's dtype, K a
    multiple of 8; 8 or 4: MLX's affine layout (w [N, K * bits / 32] uint32, scales and biases
    [N, K / G] of x's dtype, G 32, 64 or 128)."""
    rows = math.prod(x.shape[:-1])
    K = x.shape[-1]
    if not (cuda_available() and x.dtype in (mx.bfloat16, mx.float16) and 0 < rows <= MAX_ROWS and w.ndim == 2
            and staged_rows(rows) * K * x.dtype.size <= STAGE_BYTES):
        return False
    if bits == 16:
        return w.dtype == x.dtype and w.shape[1] == K and K % 8 == 0
    return (bits in (8, 4) and group_size in (32, 64, 128) and w.dtype == mx.uint32 and w.shape[1] * 32 == K * bits
            and K % group_size == 0 and scales is not None and biases is not None
            and scales.dtype == x.dtype and biases.dtype == x.dtype and scales.shape == (w.shape[0], K // group_size)
            and biases.shape == scales.shape)


def staged_rows(rows: int) -> int:
    """Rows staged in shared memory for ``rows`` rows of x: a power of two (fewer kernels)."""
    return 1 << (rows - 1).bit_length()


def rows_matmul(x: mx.array, w: mx.array, scales: mx.array | None = None, biases: mx.array | None = None, *,
                group_size: int = 64, bits: int = 16, unroll: int = UNROLL, rows_per_warp: int = ROWS_PER_WARP,
                blocks: int = 0, resident: int = RESIDENT, load_hint: int = 1, early: bool = True,
                prefetch: int = 0) -> mx.array:
    """x [..., K] @ W.T -> [..., N], at most :data:`MAX_ROWS` rows of x: ``bits`` 16, W = w [N, K]
    of x's dtype (bf16/fp16); 8 or 4, W = MLX's affine dequantization of w [N, K * bits / 32]
    (uint32) with ``scales`` and ``biases`` [N, K / group_size], computed as s * sum(q x) + b * sum(x) per group
    in float32 (no weight rounded to x's dtype first). Elsewhere (:func:`rows_supported`) the
    reference, ``x @ w.T`` or ``mx.quantized_matmul``.

    ``unroll``: 16-byte loads per lane in flight; ``rows_per_warp``: features per warp at once;
    ``blocks``: thread blocks per SM walking the features (0: one warp per ``rows_per_warp``
    features); ``resident``: registers bounded for that many blocks per SM (0: not; see
    :data:`RESIDENT`); ``load_hint``: the weights' load instruction (0 plain, 1 non-coherent
    without L1, 2 evict-first); ``early``: the first loads issued before x is staged;
    ``prefetch``: bytes of each warp's first features asked of L2 before x is staged (a
    multiple of 16; 0 none)."""
    if not rows_supported(x, w, scales, biases, group_size, bits):
        if bits == 16:
            return x @ w.T
        return mx.quantized_matmul(x, w, scales=scales, biases=biases, transpose=True, group_size=group_size,
                                   bits=bits)
    lead, K, N = x.shape[:-1], x.shape[-1], w.shape[0]
    M = math.prod(lead)
    (y,) = _kernel(resident, bits)(
        inputs=[x.reshape(M, K), w] + ([scales, biases] if bits != 16 else []),
        template=rows_template(x.dtype, K, staged_rows(M), unroll, rows_per_warp, load_hint, early, bits, group_size,
                               prefetch),
        **rows_launch(N, rows_per_warp, blocks),
        output_shapes=[(M, N)],
        output_dtypes=[x.dtype],
    )
    return y.reshape(*lead, N)
