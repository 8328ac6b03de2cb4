"""Chunkwise mLSTM as two fused CUDA kernels on the tensor cores (``mx.fast.cuda_kernel``),
beside its references :func:`xlstm_metal.kernels.mlstm.mlstm_chunkwise` (the math) and
:func:`xlstm_metal.kernels.fast.chunkwise.mlstm_chunkwise_scan` (the fastest pure-ops form).

Why: the ops forms materialise float32 copies of q, k, v, the L x L decay matrices and the
scores of every chunk, one launch each; at 16k tokens on an H100 that costs more per block
than the block's projections' matmuls. Here the per-chunk work stays in registers and shared
memory:

- ``states`` kernel (phase 1): one thread block per (batch*head, 64 rows of C, 64 columns of
  C) walks the chunks in order with its tile of C in registers, writes the state entering each
  chunk (C, n, m), then applies the chunk: C <- exp(g + m - m') C + sum_t exp(a_t - m') k_t v_t^T
  with m' = max(g + m, max_t a_t), the reference loop's recurrence exactly. Each warp writes its
  tile of the entering state through shared memory in whole 16-byte rows (the float32 state
  written per chunk is the kernel's largest traffic: 134 MB per 7B layer at 2,048 tokens); when
  h is rounded to bf16 it writes the state as the two bf16 terms the outputs kernel multiplies
  then (the same bytes), which the outputs kernel copies as they are. Optionally in
  segments (a two-level scan: each segment of chunks from the zero state in parallel, a short
  chaining kernel, the outputs kernel adding the decayed segment-entering state on load).
- ``outputs`` kernel (phase 2): one thread block per (batch*head, chunk, 64 value columns)
  computes the chunk's q k^T, the stabilised decay mask, and h = (q C + (S * D) v) / den, as
  in the reference's ``_parallel_outputs``; the next DQK slab of q, k and C is copied
  (cp.async) while the current one multiplies, and the causal mask's zero tiles are skipped.
- Both prepare the gates themselves from the raw i, f (log-sigmoid, the chunk cumsums): no
  gate-prep launches (:func:`chunk_gates` / :func:`chunk_states` / :func:`chunk_outputs` keep the
  prepared-gates form for the backward); for the states kernel a one-warp-per-chunk gates pass
  does that arithmetic before its serial loop (the same values; :data:`_GATES_PASS_SOURCE`).
- Schedule settings that keep the arithmetic (:func:`_flag`), and diagnostic switches that leave
  work out (:func:`_probe`, for benchmarks/mlstm_probe.py).

Exactness: the matmuls run as bf16 x bf16 -> float32 ``mma.sync`` (products exact, float32
sums). q, k and v are bf16 already, so they enter exactly; float32 operands (the state C, the
weighted scores, the gate-weighted keys) are split as x = hi + mid + lo into three bf16
terms (24 significant bits, float32's precision) and multiplied term by term. Results agree
with the references to float32 round-off (tests/test_cuda_kernels.py). The one exception is
asked for by the output dtype: when h is rounded to bf16 / fp16 the outputs kernel splits its
float32 operands in two terms (16 bits, still 128x finer than bf16); the states, and h in
float32, keep three.

Runs for bf16 inputs with DQK and DV multiples of 64 and chunk sizes 16, 32, 48 or 64 on CUDA
(64 is fastest on an H100: larger chunks would need more than the 48 KB of static shared
memory per block); anything else (CPU, Metal, float32 or float16 inputs, other sizes) runs
:func:`mlstm_chunkwise_scan`, so a config naming this kernel works everywhere. Either way it is
differentiable (training): ``mx.custom_function`` with the vjp of :mod:`.chunkwise_grad`.
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..mlstm import MLSTMState, _cast_state, _state_f32
from ..mlstm import chunk_gates as _chunk_gates
from .step import cuda_available
from .tensor_cores import kernel_tag, launch_bounds

_TILE = 64  # rows of C per states block; value columns per outputs block
# Columns of C per states block: 32 (96 registers, 4-5 blocks per SM) beat 64 (133 registers)
# inside the 7B prefill on an H200 (round S5R2, CUPTI: 5.9 vs 6.3 ms per 2,048-token prefill,
# 48.9 vs 50.3 ms at 16,384), though the H100's first kernel version preferred 64.
_STATES_COLS = 32
_SLAB = 32  # DQK columns of q, k and C staged in shared memory at a time (outputs kernel)

_HEADER = """
// D (16x8, float32) += A (16x16, bf16, row-major) * B (16x8, bf16, column-major).
__device__ __forceinline__ void mma_bf16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(lo))
        | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}

// x = hi + mid + lo exactly to float32 precision (each term bf16).
__device__ __forceinline__ void split3(float x, __nv_bfloat16* parts) {
    parts[0] = __float2bfloat16_rn(x);
    float r = x - __bfloat162float(parts[0]);
    parts[1] = __float2bfloat16_rn(r);
    r -= __bfloat162float(parts[1]);
    parts[2] = __float2bfloat16_rn(r);
}

// The bf16x2 register of (x0, x1) rounded to nearest (x0 in the low half): one cvt for the pair.
__device__ __forceinline__ uint32_t bf16x2_rn(float x0, float x1) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// The NS bf16x2 registers (NS = 2: hi, lo; 3: hi, mid, lo) of the float pair (x0, x1), each
// term the round-to-nearest of what the terms before it left (hi + mid + lo = x to float32's
// precision), both elements of a pair converted by one instruction.
template <int NS>
__device__ __forceinline__ void splitn_pair(float x0, float x1, uint32_t* out) {
    #pragma unroll
    for (int p = 0; p < NS; ++p) {
        out[p] = bf16x2_rn(x0, x1);
        if (p + 1 < NS) {
            x0 -= __uint_as_float(out[p] << 16);
            x1 -= __uint_as_float(out[p] & 0xffff0000u);
        }
    }
}

// The three bf16x2 registers (hi, mid, lo) of the float pair (x0, x1); x0 in the low half.
__device__ __forceinline__ void split3_pair(float x0, float x1, uint32_t* out) {
    splitn_pair<3>(x0, x1, out);
}

// Two (four) floats stored as float32 or rounded to bf16 (the states' storage dtype).
__device__ __forceinline__ void store_pair(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}

__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

__device__ __forceinline__ void store_quad(float* p, float4 v) {
    *reinterpret_cast<float4*>(p) = v;
}

__device__ __forceinline__ void store_quad(__nv_bfloat16* p, float4 v) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    *reinterpret_cast<uint2*>(p) = make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
}

__device__ __forceinline__ uint32_t pack_pair(const __nv_bfloat16* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// Four 8x8 bf16 tiles from shared memory, transposed: lane l gives the address of row (l & 7)
// of tile (l >> 3); register i receives tile i as an mma fragment of its transpose.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t* r, const __nv_bfloat16* p) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}

// 16 bytes global -> shared without registers (completes at cp_async_wait_all).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\\n" :: "r"(a), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_all;\\n" ::: "memory");
}

// The same without a memory clobber (as CUTLASS's ldsm): the compiler may schedule shared loads
// around it; every shared tile it reads was written before a __syncthreads.
__device__ __forceinline__ void ldsm_x4t(uint32_t* r, const __nv_bfloat16* p) {
    const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

__device__ __forceinline__ float2 unpack_bf16(uint32_t x) {
    return make_float2(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
}

// One chunk's L steps of a states block, the inner loop of the forward states kernel and of the
// backward's reverse kernel: each warp's 16 state rows (rr, rr + 8) x JT columns get acc +=
// (w k)^T v, A[d][t] = w_t k[t][d] in TERMS bf16 terms and B[t][j] = v[t][j], both read with
// ldmatrix.trans from the row-major tiles ks [L][KX] and vs [L][VX]; (nsum0, nsum1) get the
// rows' sum_t u_t k[t][d], reduced over the quad (u = w in the forward: n += (w k)^T 1).
// w and u: [L] floats in shared memory, 8-byte aligned.
template <int L, int JT, int TERMS, int KX, int VX>
__device__ __forceinline__ void state_chunk_mma(
        float (*acc)[4], const __nv_bfloat16 (*ks)[KX], const __nv_bfloat16 (*vs)[VX],
        const float* w, const float* u, int warp, int tq, int lrow, int ltile,
        float& nsum0, float& nsum1, bool nsum = true) {
    #pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
        const int t0 = kk * 16 + 2 * tq;
        uint32_t kf[4];  // tiles (d 0-7 | 8-15) x (t 0-7 | 8-15) of A = k^T
        ldsm_x4t(kf, &ks[kk * 16 + (ltile >> 1) * 8 + lrow][warp * 16 + (ltile & 1) * 8]);
        const float2 w01 = *reinterpret_cast<const float2*>(w + t0);
        const float2 w89 = *reinterpret_cast<const float2*>(w + t0 + 8);
        const float2 u01 = *reinterpret_cast<const float2*>(u + t0);
        const float2 u89 = *reinterpret_cast<const float2*>(u + t0 + 8);
        uint32_t p[4][3];
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            const float2 kv = unpack_bf16(kf[r]);
            const float2 wr = r < 2 ? w01 : w89;
            const float2 ur = r < 2 ? u01 : u89;
            if (nsum) {  // (block-uniform: blocks that do not write n skip it)
                const float ns = ur.x * kv.x + ur.y * kv.y;
                if (r & 1) nsum1 += ns; else nsum0 += ns;
            }
            split3_pair(wr.x * kv.x, wr.y * kv.y, p[r]);
        }
        #pragma unroll
        for (int np = 0; np < JT / 16; ++np) {  // pairs of 8-column tiles
            uint32_t vf[4];  // (t 0-7 | 8-15) x (j 0-7 | 8-15) of B = v
            ldsm_x4t(vf, &vs[kk * 16 + (ltile & 1) * 8 + lrow][np * 16 + (ltile >> 1) * 8]);
            #pragma unroll
            for (int q3 = 0; q3 < TERMS; ++q3) {
                const uint32_t a[4] = {p[0][q3], p[1][q3], p[2][q3], p[3][q3]};
                mma_bf16(acc[2 * np], a, vf[0], vf[1]);
                mma_bf16(acc[2 * np + 1], a, vf[2], vf[3]);
            }
        }
    }
    if (nsum) {
        nsum0 += __shfl_xor_sync(0xffffffffu, nsum0, 1);
        nsum0 += __shfl_xor_sync(0xffffffffu, nsum0, 2);
        nsum1 += __shfl_xor_sync(0xffffffffu, nsum1, 1);
        nsum1 += __shfl_xor_sync(0xffffffffu, nsum1, 2);
    }
}
"""

# (load8 and stage8 below)
# Gate inputs of one chunk, lane-wise (step t = lane + 32 u), for the kernels that prepare the
# gates themselves (RAW) or read the prepared (b, i~) of :func:`chunk_gates`.
_GATES = """
// RAW: log-sigmoid of the forget-gate preactivation f~_t (0 past the sequence: such steps do not
// decay the state) and i~_t (-1e30 past the sequence: they write nothing), from the raw
// [B, NH, S] arrays at any strides. Else the prepared chunk cumsum b_t and i~_t ([B, NH, NC, L]).
template <typename P> struct xl_elem;  // the element type of an input pointer
template <typename T> struct xl_elem<const T*> { using type = T; };
template <typename T> struct xl_elem<const T* const> { using type = T; };

// In two parts: fetch_gates only loads (in the inputs' dtypes), so a prefetch stays in flight
// until prep_gates uses the values (arithmetic on a fresh load would wait for it right there).
template <int L, int GU, bool RAW, typename GF, typename GI, typename Str>
__device__ __forceinline__ void fetch_gates(const GF* gf, const Str& gf_st, const GI* gi, const Str& gi_st, int b,
                                            int hd, int c, size_t chunk_off, int S, int lane, GF* fx, GI* ix) {
    #pragma unroll
    for (int u = 0; u < GU; ++u) {
        const int t = lane + 32 * u;
        fx[u] = static_cast<GF>(0.0f);
        ix[u] = static_cast<GI>(0.0f);
        if (t < L) {
            if constexpr (RAW) {
                const int ts = c * L + t;
                if (ts < S) {
                    fx[u] = gf[b * gf_st[0] + hd * gf_st[1] + ts * gf_st[2]];
                    ix[u] = gi[b * gi_st[0] + hd * gi_st[1] + ts * gi_st[2]];
                }
            } else {
                fx[u] = gf[(chunk_off + c) * L + t];
                ix[u] = gi[(chunk_off + c) * L + t];
            }
        }
    }
}

template <int L, int GU, bool RAW, typename GF, typename GI>
__device__ __forceinline__ void prep_gates(const GF* fx, const GI* ix, int c, int S, int lane, float* fr, float* ir) {
    #pragma unroll
    for (int u = 0; u < GU; ++u) {
        const int t = lane + 32 * u;
        fr[u] = 0.0f;
        ir[u] = -1e30f;
        if (t < L && (!RAW || c * L + t < S)) {
            const float x = static_cast<float>(fx[u]);
            fr[u] = RAW ? -(fmaxf(-x, 0.0f) + log1pf(expf(-fabsf(x)))) : x;  // log sigmoid, as -softplus(-x)
            ir[u] = static_cast<float>(ix[u]);
        }
    }
}

template <int L, int GU, bool RAW, typename GF, typename GI, typename Str>
__device__ __forceinline__ void load_gates(const GF* gf, const Str& gf_st, const GI* gi, const Str& gi_st, int b,
                                           int hd, int c, size_t chunk_off, int S, int lane, float* fr, float* ir) {
    GF fx[GU];
    GI ix[GU];
    fetch_gates<L, GU, RAW>(gf, gf_st, gi, gi_st, b, hd, c, chunk_off, S, lane, fx, ix);
    prep_gates<L, GU, RAW>(fx, ix, c, S, lane, fr, ir);
}

// b_t: the inclusive cumsum of the log forget gates within the chunk (RAW; a warp scan), or the
// prepared b_t as loaded.
template <int L, int GU, bool RAW>
__device__ __forceinline__ void chunk_cumsum(const float* fr, int lane, float* bt) {
    float carry = 0.0f;
    #pragma unroll
    for (int u = 0; u < GU; ++u) {
        float x = fr[u];
        if constexpr (RAW) {
            #pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float y = __shfl_up_sync(0xffffffffu, x, o);
                if (lane >= o) x += y;
            }
            x += carry;
            carry = __shfl_sync(0xffffffffu, x, 31);
        }
        bt[u] = x;
    }
}
"""

# The rows' stabiliser, decay weights and denominator of a chunk's h, shared by the outputs kernel
# and the backward's rows kernel (:mod:`.chunkwise_bwd`), which must agree on them exactly.
_ROWS = """
// The decay weight of step s in row r of a chunk: exp(b_r - b_s + i~_s - m) for s <= r, else 0.
__device__ __forceinline__ float decay_weight(const float* bs, const float* is, int r, int s, float m) {
    return s <= r ? expf(bs[r] - bs[s] + is[s] - m) : 0.0f;
}

// Row r's stabiliser m_comb = max(b_r + m0, max_{s <= r} b_r - b_s + i~_s): each lane takes the
// columns 8 nt + 2 tq + {0, 1} of the row's mma fragment, then the row's four lanes (tq) reduce.
// *inter = exp(b_r + m0 - m_comb), the weight of the state entering the chunk.
template <int L>
__device__ __forceinline__ float row_stabiliser(const float* bs, const float* is, int r, int tq, float m0,
                                                float* inter) {
    float mx_ = -INFINITY;
    #pragma unroll
    for (int nt = 0; nt < L / 8; ++nt) {
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int s = nt * 8 + 2 * tq + e;
            if (s <= r) mx_ = fmaxf(mx_, bs[r] - bs[s] + is[s]);
        }
    }
    mx_ = fmaxf(mx_, __shfl_xor_sync(0xffffffffu, mx_, 1));
    mx_ = fmaxf(mx_, __shfl_xor_sync(0xffffffffu, mx_, 2));
    const float m_inter = bs[r] + m0;
    const float m_comb = fmaxf(m_inter, mx_);
    *inter = expf(m_inter - m_comb);
    return m_comb;
}

// h's denominator max(|dn|, e^-m_comb) + eps (dn = inter q.n + the row's weighted scores);
// *floor_ = e^-m_comb, the stabilised 1 (where it wins, den does not depend on dn).
__device__ __forceinline__ float row_denominator(float dn, float m_comb, float eps, float* floor_) {
    *floor_ = expf(-m_comb);
    return fmaxf(fabsf(dn), *floor_) + eps;
}
"""

# Global loads: 16 bytes (8 bf16) at a time when a row's elements are contiguous and aligned
# (always so for the model's projection views), else element by element.
_LOADS = """
template <typename In, typename Str>
__device__ __forceinline__ bool rows_vectorizable(const In* base, const Str& st) {
    return st[3] == 1 && st[2] % 8 == 0 && (reinterpret_cast<uintptr_t>(base) & 15) == 0;
}

// Eight consecutive elements of a row (x[0], x[col_stride], ...) as bf16x8; zeros when !in.
template <typename In>
__device__ __forceinline__ uint4 load8(const In* x, int64_t col_stride, bool vec, bool in) {
    if (!in) return make_uint4(0u, 0u, 0u, 0u);
    if (vec) return *reinterpret_cast<const uint4*>(x);
    uint32_t w[4];
    #pragma unroll
    for (int u = 0; u < 4; ++u)
        w[u] = pack_bf16(static_cast<__nv_bfloat16>(x[2 * u * col_stride]),
                         static_cast<__nv_bfloat16>(x[(2 * u + 1) * col_stride]));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Chunk c's rows of x (8 columns per 16-byte load; load idx = tid + u NT takes row idx / (W / 8),
// columns 8 (idx % (W / 8)).. of the W at xb) into registers: zeros past the sequence.
template <int L, int W, int NT, int N, typename Str>
__device__ __forceinline__ void prefetch_rows(uint4* dst, const __nv_bfloat16* xb, const Str& st, bool vec, int c,
                                              int S, int tid) {
    #pragma unroll
    for (int u = 0; u < N; ++u) {
        const int idx = tid + u * NT;
        const int ts = idx < L * W / 8 ? c * L + idx / (W / 8) : S;
        dst[u] = load8(xb + ts * st[2] + ((idx % (W / 8)) * 8) * st[3], st[3], vec, ts < S);
    }
}

// load8 into shared memory: cp.async when the row is contiguous and aligned and in range.
template <typename In>
__device__ __forceinline__ void stage8(__nv_bfloat16* dst, const In* x, int64_t col_stride, bool vec, bool in) {
    if (vec && in) cp_async16(dst, x);
    else *reinterpret_cast<uint4*>(dst) = load8(x, col_stride, vec, in);
}
"""

# Phase 1. Grid: x = DV/JT tiles of 128 threads, y = (DQK/64 row tiles) x (segments), z = B*NH.
# Warp w owns rows 16w..16w+15 of the block's 64-row tile of C; its accumulators hold C as mma
# fragments: acc[nt][0..1] = C[16w+g][8nt+2tq+{0,1}], acc[nt][2..3] = the same columns of row
# 16w+g+8. The update's A operand is (w_t k_t)^T, split in three bf16 terms by the warp that
# owns those rows; B is v, exact in bf16. The chunks run in sequence, so each iteration's latency
# counts: the next chunk's k, v and gates are loaded into registers while this one computes, and
# the shared tiles are double-buffered (one barrier per chunk).
#
# Segments (two-level scan): with gridDim.y = (DQK/64) * NSEG, segment s walks only its own
# chunks [s*CPS, (s+1)*CPS), the first from the initial state, the others from the zero state
# (m = -inf), and writes each chunk's *local* entering state, the local log decay P since the
# segment's start (sum of g) and the segment's final local state; :data:`_COMBINE_SOURCE` then
# chains the segments and the outputs kernel adds the decayed segment-entering state on load.
# RAW: the gate inputs are the raw i, f [B, NH, S] (any strides; log-sigmoid and the chunk
# cumsum computed here) instead of the prepared (b, i~) [B, NH, NC, L].
_STATES_SOURCE = """
    constexpr int NT = 128;
    constexpr int PAD = 8;  // bf16 elements of row padding: keeps ldmatrix rows on distinct banks
    constexpr int KV = (L * 8 + NT - 1) / NT;       // 16-byte k loads per thread per chunk
    constexpr int VV = (L * JT / 8 + NT - 1) / NT;  // 16-byte v loads per thread per chunk
    constexpr int GU = (L + 31) / 32;               // gate steps per lane
    constexpr int RT = DQK / 64;
    const int S = k_shape[2];
    const int NC = (S + L - 1) / L;
    const int bh = blockIdx.z;
    const int b = bh / NH;
    const int hd = bh % NH;
    const int seg = blockIdx.y / RT;
    const int nseg = gridDim.y / RT;
    const int cps = (NC + nseg - 1) / nseg;
    const int c_begin = seg * cps;
    const int c_end = min(NC, c_begin + cps);
    const int d0 = (blockIdx.y % RT) * 64;
    const int j0 = blockIdx.x * JT;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int tq = lane & 3;
    const int lrow = lane & 7;
    const int ltile = lane >> 3;

    __shared__ __align__(16) __nv_bfloat16 ks[2][L][64 + PAD];  // k[t][d0 + dd]
    __shared__ __align__(16) __nv_bfloat16 vs[2][L][JT + PAD];  // v[t][j0 + jj]
    __shared__ __align__(16) float ws[2][L];                                  // w_t = exp(a_t - m'), a_t = g - b_t + i~_t
    __shared__ __align__(16) float cst[STAGE ? 4 : 1][16][JT + 8];                // STAGE: each warp's C tile, for the stores

    const __nv_bfloat16* kb = k + b * k_strides[0] + hd * k_strides[1] + d0 * k_strides[3];
    const __nv_bfloat16* vb = v + b * v_strides[0] + hd * v_strides[1] + j0 * v_strides[3];
    const bool k_vec = rows_vectorizable(kb, k_strides);
    const bool v_vec = rows_vectorizable(vb, v_strides);
    const size_t chunk_off = static_cast<size_t>(bh) * NC;
    const size_t seg_off = static_cast<size_t>(bh) * nseg + seg;

    float acc[JT / 8][4];
    const int rr = warp * 16 + g;
    const int r0 = d0 + rr;
    float n_reg0 = 0.0f, n_reg1 = 0.0f;  // n of rows r0 and r0 + 8 (the first column tile writes it)
    float m = -INFINITY;
    if (seg == 0) {
        // The initial state at its strides (a zero state may be a broadcast view: no fill kernel).
        const float* C0b = C0 + b * C0_strides[0] + hd * C0_strides[1];
        #pragma unroll
        for (int nt = 0; nt < JT / 8; ++nt) {
            const int col = j0 + nt * 8 + 2 * tq;
            #pragma unroll
            for (int e = 0; e < 4; ++e)
                acc[nt][e] = C0b[(r0 + 8 * (e >> 1)) * C0_strides[2] + (col + (e & 1)) * C0_strides[3]];
        }
        const float* n0b = n0 + b * n0_strides[0] + hd * n0_strides[1];
        n_reg0 = n0b[r0 * n0_strides[2]];
        n_reg1 = n0b[(r0 + 8) * n0_strides[2]];
        m = m0[b * m0_strides[0] + hd * m0_strides[1]];
    } else {
        #pragma unroll
        for (int nt = 0; nt < JT / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    }
    const bool writes_n = blockIdx.x == 0 && tq == 0;
    const bool writes_m = blockIdx.x == 0 && blockIdx.y % RT == 0 && tid == 0;
    float P = 0.0f;  // log decay since the segment's start

    // Registers holding the next chunk: k, v (zeros past the sequence) and the gate inputs.
    uint4 kpre[KV], vpre[VV];
    using GFT = typename xl_elem<decltype(gf)>::type;
    using GIT = typename xl_elem<decltype(gi)>::type;
    GFT fpre[GU];  // as loaded: prepared (log-sigmoid) when the chunk runs
    GIT ipre[GU];
    float apre[PREG ? GU : 1];  // PREG: a_t and (g, max_t a_t) of the chunk, from the gates pass
    float2 gpre;
    auto prefetch = [&](int c) {
        prefetch_rows<L, 64, NT, KV>(kpre, kb, k_strides, k_vec, c, S, tid);
        prefetch_rows<L, JT, NT, VV>(vpre, vb, v_strides, v_vec, c, S, tid);
        if constexpr (PREG) {
            #pragma unroll
            for (int u = 0; u < GU; ++u) apre[u] = lane + 32 * u < L ? ga[(chunk_off + c) * L + lane + 32 * u] : 0.0f;
            gpre = *reinterpret_cast<const float2*>(gg + 2 * (chunk_off + c));
        } else {
            fetch_gates<L, GU, RAW>(gf, gf_strides, gi, gi_strides, b, hd, c, chunk_off, S, lane, fpre, ipre);
        }
    };
    if (c_begin < c_end) prefetch(c_begin);

    for (int c = c_begin; c < c_end; ++c) {
        const int buf = c & 1;
        // The (local) state entering chunk c.
        // C_enter: float32 [.., DQK, DV] per chunk, bf16 for a one-term reader (chunk_states' c_dtype), or
        // (CSPLIT) the two bf16 terms (hi, lo: the outputs kernel's operands for bf16 h) as
        // [.., DQK, DV / 32, 2, 32]: twice the bf16 elements per chunk, float32's bytes.
        auto* Ce = C_enter + (chunk_off + c) * DQK * DV * (CSPLIT ? 2 : 1);
        if constexpr (PROBE & 2) {  // diagnostic: no entering-state stores
        } else if constexpr (STAGE) {
            // Through the warp's tile in shared memory, then whole rows of JT floats in 16-byte
            // stores: the fragment layout's 8-byte stores (8 rows x 32 bytes per instruction)
            // held the kernel back (round S6R2: 0.191 -> 0.115 ms per layer at 2,048 tokens; with
            // no C stores at all 0.106).
            if constexpr (CSPLIT) {
                // The two bf16 terms (splitn_pair<2>, as the outputs kernel would split the float
                // values) in the layout [DQK][DV / 32][2][32] per chunk: each 32-column group of a
                // row holds its hi terms, then its lo terms, so the tile's row (JT = 32 columns) is
                // one whole 128-byte line. (As planes [2][DQK][DV], two half lines per row, split
                // after the float staging, the kernel took 1.28 instead of 0.86 ms per 7B layer at
                // 16,384 tokens, round S8R1.) Split from the fragments into the warp's staging tile
                // (rows of 2 x 32 bf16 + 8 padding: conflict-free), then 16-byte pieces: piece
                // q = lane + 32 u is row q / 8, bytes 16 (q % 8).. of its line.
                static_assert(!CSPLIT || JT == 32, "split entering states: 32-column tiles");  // checked even where discarded (the kernel is no template)
                auto stg = reinterpret_cast<__nv_bfloat16 (*)[72]>(&cst[warp][0][0]);
                #pragma unroll
                for (int nt = 0; nt < JT / 8; ++nt) {
                    uint32_t t0[2], t1[2];
                    splitn_pair<2>(acc[nt][0], acc[nt][1], t0);
                    splitn_pair<2>(acc[nt][2], acc[nt][3], t1);
                    #pragma unroll
                    for (int p = 0; p < 2; ++p) {
                        *reinterpret_cast<uint32_t*>(&stg[g][p * 32 + nt * 8 + 2 * tq]) = t0[p];
                        *reinterpret_cast<uint32_t*>(&stg[g + 8][p * 32 + nt * 8 + 2 * tq]) = t1[p];
                    }
                }
                __syncwarp();
                __nv_bfloat16* Ch = reinterpret_cast<__nv_bfloat16*>(Ce);
                #pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int q = lane + 32 * u;
                    const int row = q >> 3;
                    const size_t off = (static_cast<size_t>(d0 + warp * 16 + row) * (DV / 32) + j0 / 32) * 64 + (q & 7) * 8;
                    *reinterpret_cast<uint4*>(Ch + off) = *reinterpret_cast<const uint4*>(&stg[row][(q & 7) * 8]);
                }
            } else {
                #pragma unroll
                for (int nt = 0; nt < JT / 8; ++nt) {
                    *reinterpret_cast<float2*>(&cst[warp][g][nt * 8 + 2 * tq]) = make_float2(acc[nt][0], acc[nt][1]);
                    *reinterpret_cast<float2*>(&cst[warp][g + 8][nt * 8 + 2 * tq]) = make_float2(acc[nt][2], acc[nt][3]);
                }
                __syncwarp();
                #pragma unroll
                for (int u = 0; u < 16 * JT / 4 / 32; ++u) {
                    const int idx = lane + 32 * u;
                    const int row = idx / (JT / 4);
                    const int c4 = (idx % (JT / 4)) * 4;
                    store_quad(Ce + static_cast<size_t>(d0 + warp * 16 + row) * DV + j0 + c4,
                               *reinterpret_cast<const float4*>(&cst[warp][row][c4]));
                }
            }
            __syncwarp();
        } else {
            #pragma unroll
            for (int nt = 0; nt < JT / 8; ++nt) {
                const int col = j0 + nt * 8 + 2 * tq;
                store_pair(Ce + static_cast<size_t>(r0) * DV + col, acc[nt][0], acc[nt][1]);
                store_pair(Ce + static_cast<size_t>(r0 + 8) * DV + col, acc[nt][2], acc[nt][3]);
            }
        }
        if (writes_n) {
            n_enter[(chunk_off + c) * DQK + r0] = n_reg0;
            n_enter[(chunk_off + c) * DQK + r0 + 8] = n_reg1;
        }
        if (writes_m) {
            m_enter[chunk_off + c] = m;
            P_enter[chunk_off + c] = P;
        }

        // This chunk's tiles and gates from the registers, then the next chunk's loads go in flight.
        #pragma unroll
        for (int u = 0; u < KV; ++u) {
            const int idx = tid + u * NT;
            if (idx < L * 8) *reinterpret_cast<uint4*>(&ks[buf][idx >> 3][(idx & 7) * 8]) = kpre[u];
        }
        #pragma unroll
        for (int u = 0; u < VV; ++u) {
            const int idx = tid + u * NT;
            if (idx < L * JT / 8) *reinterpret_cast<uint4*>(&vs[buf][idx / (JT / 8)][(idx % (JT / 8)) * 8]) = vpre[u];
        }
        // Every warp: b_t (chunk cumsum), g = b_{L-1}, a_t = g - b_t + i~_t, m' = max(g + m,
        // max_t a_t); warp 0 stores the weights w_t = exp(a_t - m') for all.
        float fr[GU], ir[GU], bt[GU], at[GU];
        float gc = 0.0f, amax = -INFINITY;
        if constexpr (PREG) {  // prepared by the gates pass (the same arithmetic, same bits)
            #pragma unroll
            for (int u = 0; u < GU; ++u) at[u] = apre[u];
            gc = gpre.x;
            amax = gpre.y;
        } else if constexpr (PROBE & 1) {  // diagnostic: no gate arithmetic (wrong results)
            #pragma unroll
            for (int u = 0; u < GU; ++u) at[u] = static_cast<float>(fpre[u]) * 1e-30f;
            amax = 0.0f;
        } else {
        prep_gates<L, GU, RAW>(fpre, ipre, c, S, lane, fr, ir);
        chunk_cumsum<L, GU, RAW>(fr, lane, bt);
        gc = __shfl_sync(0xffffffffu, bt[(L - 1) / 32], (L - 1) % 32);
        #pragma unroll
        for (int u = 0; u < GU; ++u) {
            at[u] = gc - bt[u] + ir[u];
            if (lane + 32 * u < L) amax = fmaxf(amax, at[u]);
        }
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        }
        const float m_next = fmaxf(gc + m, amax);
        if (warp == 0) {
            #pragma unroll
            for (int u = 0; u < GU; ++u)
                if (lane + 32 * u < L) ws[buf][lane + 32 * u] = expf(at[u] - m_next);
        }
        if (c + 1 < c_end) prefetch(c + 1);
        __syncthreads();

        // C and n decay.
        const float decay = expf(gc + m - m_next);
        #pragma unroll
        for (int nt = 0; nt < JT / 8; ++nt) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][e] *= decay;
        }
        // C += (w k)^T v, w k in TERMS bf16 terms (3: float32-exact products); n += (w k)^T 1.
        float nsum0 = 0.0f, nsum1 = 0.0f;  // rows rr and rr + 8
        if constexpr (!(PROBE & 4))  // diagnostic 4: no products
        state_chunk_mma<L, JT, TERMS>(acc, ks[buf], vs[buf], ws[buf], ws[buf], warp, tq, lrow, ltile, nsum0, nsum1,
                                      !NSKIP || blockIdx.x == 0);  // NSKIP: n only where it is written
        n_reg0 = decay * n_reg0 + nsum0;
        n_reg1 = decay * n_reg1 + nsum1;
        m = m_next;
        P += gc;
    }

    const size_t fin_off = seg_off * DQK * DV;
    #pragma unroll
    for (int nt = 0; nt < JT / 8; ++nt) {
        const int col = j0 + nt * 8 + 2 * tq;
        *reinterpret_cast<float2*>(C_final + fin_off + static_cast<size_t>(r0) * DV + col) = make_float2(acc[nt][0], acc[nt][1]);
        *reinterpret_cast<float2*>(C_final + fin_off + static_cast<size_t>(r0 + 8) * DV + col) = make_float2(acc[nt][2], acc[nt][3]);
    }
    if (writes_n) {
        n_final[seg_off * DQK + r0] = n_reg0;
        n_final[seg_off * DQK + r0 + 8] = n_reg1;
    }
    if (writes_m) {
        m_final[seg_off] = m;
        P_final[seg_off] = P;
    }
"""

# Gates pass (before the states kernel, ``XLSTM_METAL_STATES_PREGATES``): per chunk, one warp does
# the states kernel's gate arithmetic (log-sigmoid, chunk cumsum b_t, g = b_{L-1}, a_t = g - b_t
# + i~_t, max_t a_t), the same code in the same order, so the states kernel's serial chunk loop
# only adds and takes one max per chunk (m' = max(g + m, max_t a_t)) instead of a warp scan and
# two butterflies. Grid: x = NC warps (4 per block), z = B*NH. ga [B*NH*NC, L]: a_t (0 past L);
# gg [B*NH*NC, 2]: (g, max_t a_t).
_GATES_PASS_SOURCE = """
    constexpr int GU = (L + 31) / 32;
    const int S = gf_shape[2];
    const int NC = (S + L - 1) / L;
    const int bh = blockIdx.z;
    const int b = bh / NH;
    const int hd = bh % NH;
    const int lane = threadIdx.x & 31;
    const int c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (c >= NC) return;
    const size_t chunk_off = static_cast<size_t>(bh) * NC;
    float fr[GU], ir[GU], bt[GU];
    load_gates<L, GU, true>(gf, gf_strides, gi, gi_strides, b, hd, c, chunk_off, S, lane, fr, ir);
    chunk_cumsum<L, GU, true>(fr, lane, bt);
    const float gc = __shfl_sync(0xffffffffu, bt[(L - 1) / 32], (L - 1) % 32);
    float amax = -INFINITY;
    #pragma unroll
    for (int u = 0; u < GU; ++u) {
        const float at = gc - bt[u] + ir[u];
        if (lane + 32 * u < L) {
            amax = fmaxf(amax, at);
            ga[(chunk_off + c) * L + lane + 32 * u] = at;
        }
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) *reinterpret_cast<float2*>(gg + 2 * (chunk_off + c)) = make_float2(gc, amax);
"""

# Phase 2. Grid: x = DV/64 tiles of 2L threads (L/16 warps), y = NC chunks, z = B*NH. Warp w
# owns rows (time steps) 16w..16w+15 of the chunk. sacc holds S = q k^T as mma fragments over
# the chunk's L columns, nacc the block's 64 value columns of the numerator. The entering
# state's slab is split into NSPLIT bf16 terms once, in shared memory, for all warps (3: float32's
# 24 bits). SEGC: the states kernel ran in segments; a chunk of segment s >= 1 enters with
# exp(P + m_s - m) C_s + exp(m_loc - m) C_loc, m = max(P + m_s, m_loc), combined on load from the
# segment's entering state (C_s, n_s, m_s; :data:`_COMBINE_SOURCE`) and the chunk's local state.
_OUTPUTS_SOURCE = """
    constexpr int NW = L / 16;
    constexpr int NT = 32 * NW;
    constexpr int KS = SLAB;
    constexpr int PAD = 8;
    const int S = q_shape[2];
    const int NC = (S + L - 1) / L;
    const int bh = blockIdx.z;
    const int b = bh / NH;
    const int hd = bh % NH;
    const int c = blockIdx.y;
    const int j0 = blockIdx.x * 64;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int tq = lane & 3;
    const float scale = rsqrtf(static_cast<float>(DQK));

    // q and k slabs during the DQK loop, then the chunk's 64 value columns (transposed).
    static_assert(!CPRE || ((NSPLIT == 2 || NSPLIT == 1) && !SEGC), "stored entering states: one or two terms, one segment");
    constexpr int QK_BYTES = 2 * L * (KS + PAD) * 2;
    constexpr int V_BYTES = L * (64 + PAD) * 2;
    constexpr int BUF_BYTES = 2 * QK_BYTES;  // two q/k slab buffers
    __shared__ __align__(16) unsigned char raw[BUF_BYTES > V_BYTES ? BUF_BYTES : V_BYTES];
    auto vs = reinterpret_cast<__nv_bfloat16 (*)[64 + PAD]>(raw);
    // C[d][j]: hi, (mid,) lo terms; CPRE: double-buffered, the terms copied as stored.
    __shared__ __align__(16) __nv_bfloat16 Cs[CPRE ? 2 : 1][NSPLIT][KS][64 + PAD];
    __shared__ __align__(16) float ns[DQK];
    __shared__ __align__(16) float Cst[CPRE ? 1 : KS][64];  // the next C slab, as copied (not CPRE)
    __shared__ float bs[L];
    __shared__ float is[L];
    __shared__ float qn_s[L];

    const size_t chunk = static_cast<size_t>(bh) * NC + c;
    const __nv_bfloat16* qb = q + b * q_strides[0] + hd * q_strides[1] + static_cast<int64_t>(c) * L * q_strides[2];
    const __nv_bfloat16* kb = k + b * k_strides[0] + hd * k_strides[1] + static_cast<int64_t>(c) * L * k_strides[2];
    const __nv_bfloat16* vb = v + b * v_strides[0] + hd * v_strides[1] + static_cast<int64_t>(c) * L * v_strides[2]
                            + j0 * v_strides[3];
    const bool q_vec = rows_vectorizable(qb, q_strides);
    const bool k_vec = rows_vectorizable(kb, k_strides);
    const bool v_vec = rows_vectorizable(vb, v_strides);
    const int rows_left = S - c * L;  // rows of this chunk inside the sequence
    // C_enter: float32 [.., DQK, DV] per chunk, or (CPRE) the states kernel's two bf16 terms (hi,
    // lo) [.., DQK, DV / 32, 2, 32]: the same bytes per chunk, or (CPRE, one term) C rounded to
    // bf16 [.., DQK, DV].
    static_assert(sizeof(C_enter[0]) == (CPRE ? 2 : 4), "entering states: float32, or bf16 terms");
    const unsigned char* Ceb = reinterpret_cast<const unsigned char*>(C_enter) + chunk * DQK * DV * (CPRE ? 2 * NSPLIT : 4);
    const float* Ce = reinterpret_cast<const float*>(Ceb) + j0;
    const __nv_bfloat16* Cp = reinterpret_cast<const __nv_bfloat16*>(Ceb);
    const float* ne = n_enter + chunk * DQK;
    float m0 = m_enter[chunk];
    // The segment's entering state, where the chunk's entering state is a local one.
    const float* Cg = nullptr;
    const float* ng = nullptr;
    float w_loc = 1.0f, w_seg = 0.0f;
    if constexpr (SEGC) {
        const int nseg = C_seg_shape[2] + 1;
        const int seg = c / ((NC + nseg - 1) / nseg);
        if (seg > 0) {
            const size_t so = static_cast<size_t>(bh) * (nseg - 1) + seg - 1;
            const float m_in = P_enter[chunk] + m_seg[so];
            const float m_c = fmaxf(m_in, m0);
            w_seg = expf(m_in - m_c);
            w_loc = expf(m0 - m_c);
            m0 = m_c;
            Cg = C_seg + so * DQK * DV + j0;
            ng = n_seg + so * DQK;
        }
    }

    float sacc[L / 8][4];
    float nacc[8][4];
    #pragma unroll
    for (int nt = 0; nt < L / 8; ++nt) sacc[nt][0] = sacc[nt][1] = sacc[nt][2] = sacc[nt][3] = 0.0f;
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) nacc[nt][0] = nacc[nt][1] = nacc[nt][2] = nacc[nt][3] = 0.0f;
    float qn_part = 0.0f;  // q[row] . n over half the columns: row = tid / 2
    const int qn_row = tid >> 1;
    const int qn_half = tid & 1;
    // Causal: rows of tile wt see keys 0 .. 16 wt + 15 only, so its warp skips the S tiles and
    // the S.V steps past them; the tile each warp owns rotates from block to block so the
    // skipped work spreads over the SM's schedulers.
    const int wt = (warp + blockIdx.x + blockIdx.y) % NW;
    const int rr = wt * 16 + g;
    const int lrow = lane & 7;
    const int ltile = lane >> 3;

    {
        // Slab d0 + KS's q, k (cp.async into the other buffer) and C (cp.async into Cst; the
        // segment's C into registers) load while slab d0 computes; Cst is split into Cs at the
        // top of the next slab.
        constexpr int CV = (KS * 16 + NT - 1) / NT;
        float4 cgpre[CV];
        auto issue = [&](int d0) {
            auto qd = reinterpret_cast<__nv_bfloat16 (*)[KS + PAD]>(raw + ((d0 / KS) & 1) * QK_BYTES);
            auto kd = reinterpret_cast<__nv_bfloat16 (*)[KS + PAD]>(raw + ((d0 / KS) & 1) * QK_BYTES + L * (KS + PAD) * 2);
            for (int idx = tid; idx < L * (KS / 8); idx += NT) {
                const int t = idx / (KS / 8);
                const int e = (idx % (KS / 8)) * 8;
                const bool in = t < rows_left;
                stage8(&qd[t][e], qb + t * q_strides[2] + (d0 + e) * q_strides[3], q_strides[3], q_vec, in);
                stage8(&kd[t][e], kb + t * k_strides[2] + (d0 + e) * k_strides[3], k_strides[3], k_vec, in);
            }
            if constexpr (CPRE && NSPLIT == 1 && !(PROBE & 1)) {
                // Row d0 + d's 64 bf16 columns: 128 contiguous bytes, 8 pieces.
                auto cd = Cs[(d0 / KS) & 1];
                for (int idx = tid; idx < KS * 8; idx += NT) {
                    const int d = idx >> 3;
                    cp_async16(&cd[0][d][(idx & 7) * 8], Cp + static_cast<size_t>(d0 + d) * DV + j0 + (idx & 7) * 8);
                }
            } else if constexpr (CPRE && !(PROBE & 1)) {  // diagnostic 1: no C copies
                // Row d0 + d's 64 columns: 256 contiguous bytes, 16 pieces (group piece / 8, plane
                // (piece / 4) % 2, columns 8 (piece % 4).. of the group).
                auto cd = Cs[(d0 / KS) & 1];
                for (int idx = tid; idx < KS * 16; idx += NT) {
                    const int d = idx >> 4;
                    const int piece = idx & 15;
                    const int e = (piece >> 3) * 32 + (piece & 3) * 8;
                    cp_async16(&cd[(piece >> 2) & 1][d][e],
                               Cp + (static_cast<size_t>(d0 + d) * (DV / 32) + j0 / 32) * 64 + piece * 8);
                }
            }
            #pragma unroll
            for (int u = 0; u < (CPRE ? 0 : CV); ++u) {
                const int idx = tid + u * NT;
                if (idx < KS * 16) {
                    const int d = idx >> 4;
                    const int e = (idx & 15) * 4;
                    cp_async16(&Cst[d][e], Ce + static_cast<size_t>(d0 + d) * DV + e);
                    if (Cg != nullptr) cgpre[u] = *reinterpret_cast<const float4*>(Cg + static_cast<size_t>(d0 + d) * DV + e);
                }
            }
        };
        // The first slab's copies go in flight before the gates' and n's loads, which wait for theirs.
        issue(0);
        if (warp == 0) {  // the chunk's gates: b_t (cumsum of the log forget gates) and i~_t
            constexpr int GU = (L + 31) / 32;
            float fr[GU], ir[GU], bt[GU];
            load_gates<L, GU, RAW>(gf, gf_strides, gi, gi_strides, b, hd, c, static_cast<size_t>(bh) * NC, S, lane, fr, ir);
            chunk_cumsum<L, GU, RAW>(fr, lane, bt);
            #pragma unroll
            for (int u = 0; u < GU; ++u) {
                if (lane + 32 * u < L) {
                    bs[lane + 32 * u] = bt[u];
                    is[lane + 32 * u] = ir[u];
                }
            }
        }
        for (int d = tid; d < DQK; d += NT) ns[d] = ng != nullptr ? w_loc * ne[d] + w_seg * ng[d] : ne[d];
        for (int d0 = 0; d0 < DQK; d0 += KS) {
            cp_async_wait_all();
            __syncthreads();  // slab d0 staged; every warp is past the previous slab's products
            #pragma unroll
            for (int u = 0; u < (CPRE ? 0 : CV); ++u) {  // CPRE: the terms came as stored
                const int idx = tid + u * NT;
                if (idx < KS * 16) {
                    const int d = idx >> 4;
                    const int e = (idx & 15) * 4;
                    float4 cv = *reinterpret_cast<const float4*>(&Cst[d][e]);
                    if (Cg != nullptr) {
                        const float4 cg = cgpre[u];
                        cv = make_float4(w_loc * cv.x + w_seg * cg.x, w_loc * cv.y + w_seg * cg.y,
                                         w_loc * cv.z + w_seg * cg.z, w_loc * cv.w + w_seg * cg.w);
                    }
                    uint32_t lo[NSPLIT], hi[NSPLIT];
                    splitn_pair<NSPLIT>(cv.x, cv.y, lo);
                    splitn_pair<NSPLIT>(cv.z, cv.w, hi);
                    #pragma unroll
                    for (int p = 0; p < NSPLIT; ++p)
                        *reinterpret_cast<uint2*>(&Cs[0][p][d][e]) = make_uint2(lo[p], hi[p]);
                }
            }
            if constexpr (!CPRE) __syncthreads();  // Cs ready, Cst free
            if (d0 + KS < DQK) issue(d0 + KS);
            auto qs = reinterpret_cast<__nv_bfloat16 (*)[KS + PAD]>(raw + ((d0 / KS) & 1) * QK_BYTES);
            auto kst = reinterpret_cast<__nv_bfloat16 (*)[KS + PAD]>(raw + ((d0 / KS) & 1) * QK_BYTES + L * (KS + PAD) * 2);
            if constexpr (VEARLY) {
                // The last slab: the chunk's value columns go in flight into the free slab buffer
                // (buffer 0: DQK / KS is even), so the epilogue does not wait for their loads.
                if (d0 + KS >= DQK) {
                    for (int idx = tid; idx < L * 8; idx += NT) {
                        const int t = idx >> 3;
                        const int e = (idx & 7) * 8;
                        stage8(&vs[t][e], vb + t * v_strides[2] + e * v_strides[3], v_strides[3], v_vec, t < rows_left);
                    }
                }
                // q . n in the same order, from 16-byte loads of q and n.
                #pragma unroll
                for (int e8 = 0; e8 < KS / 2; e8 += 8) {
                    __align__(16) __nv_bfloat16 qv[8];
                    *reinterpret_cast<uint4*>(qv) = *reinterpret_cast<const uint4*>(&qs[qn_row][qn_half * (KS / 2) + e8]);
                    const float4 n0 = *reinterpret_cast<const float4*>(&ns[d0 + qn_half * (KS / 2) + e8]);
                    const float4 n1 = *reinterpret_cast<const float4*>(&ns[d0 + qn_half * (KS / 2) + e8 + 4]);
                    const float nv[8] = {n0.x, n0.y, n0.z, n0.w, n1.x, n1.y, n1.z, n1.w};
                    #pragma unroll
                    for (int e = 0; e < 8; ++e) qn_part += __bfloat162float(qv[e]) * nv[e];
                }
            } else {
            #pragma unroll
            for (int e = 0; e < KS / 2; ++e)
                qn_part += __bfloat162float(qs[qn_row][qn_half * (KS / 2) + e]) * ns[d0 + qn_half * (KS / 2) + e];
            }

            #pragma unroll
            for (int kk = 0; kk < KS / 16; ++kk) {
                const int e0 = kk * 16 + 2 * tq;
                uint32_t a[4];
                a[0] = pack_pair(&qs[rr][e0]);
                a[1] = pack_pair(&qs[rr + 8][e0]);
                a[2] = pack_pair(&qs[rr][e0 + 8]);
                a[3] = pack_pair(&qs[rr + 8][e0 + 8]);
                // S += q k^T: B[d][s] = k[s][d], exact bf16.
                #pragma unroll
                for (int nt = 0; nt < L / 8; ++nt)
                    if (!(PROBE & 4) && nt < 2 * (wt + 1))  // diagnostic 4: no q k^T
                        mma_bf16(sacc[nt], a, pack_pair(&kst[nt * 8 + g][e0]), pack_pair(&kst[nt * 8 + g][e0 + 8]));
                // num += q C: B[d][j] = C[d][j] in NSPLIT bf16 terms (ldmatrix.trans, row-major).
                #pragma unroll
                for (int p = 0; p < ((PROBE & 2) ? 0 : NSPLIT); ++p) {  // diagnostic 2: no q C
                    #pragma unroll
                    for (int np = 0; np < 4; ++np) {
                        uint32_t cf[4];
                        ldsm_x4t(cf, &Cs[CPRE ? (d0 / KS) & 1 : 0][p][kk * 16 + (ltile & 1) * 8 + lrow][np * 16 + (ltile >> 1) * 8]);
                        mma_bf16(nacc[2 * np], a, cf[0], cf[1]);
                        mma_bf16(nacc[2 * np + 1], a, cf[2], cf[3]);
                    }
                }
            }
        }
        __syncthreads();  // the slab buffers are free for v
    }
    qn_part += __shfl_xor_sync(0xffffffffu, qn_part, 1);
    if (qn_half == 0) qn_s[qn_row] = qn_part * scale;

    // Stage the chunk's value columns (the q/k slab space is free now).
    if constexpr (VEARLY) cp_async_wait_all();
    else
    for (int idx = tid; idx < L * 8; idx += NT) {
        const int t = idx >> 3;
        const int e = (idx & 7) * 8;
        *reinterpret_cast<uint4*>(&vs[t][e]) = load8(vb + t * v_strides[2] + e * v_strides[3], v_strides[3], v_vec, t < rows_left);
    }
    __syncthreads();

    // Decay mask, stabiliser and denominator of rows rr (h = 0) and rr + 8 (h = 1).
    float inter[2], den[2];
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = rr + 8 * h;
        const float m_comb = row_stabiliser<L>(bs, is, r, tq, m0, &inter[h]);
        float sum = 0.0f;
        #pragma unroll
        for (int nt = 0; nt < L / 8; ++nt) {
            #pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float sc = sacc[nt][2 * h + e] * scale * decay_weight(bs, is, r, nt * 8 + 2 * tq + e, m_comb);
                sacc[nt][2 * h + e] = sc;
                sum += sc;
            }
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        float floor_;
        den[h] = row_denominator(inter[h] * qn_s[r] + sum, m_comb, EPS, &floor_);
    }

    // num = inter * (q C) + scores v; scores (float32) split in NSPLIT bf16 terms.
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        nacc[nt][0] *= scale * inter[0];
        nacc[nt][1] *= scale * inter[0];
        nacc[nt][2] *= scale * inter[1];
        nacc[nt][3] *= scale * inter[1];
    }
    #pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
        if (kk > wt) continue;  // keys past the tile's last row: zero scores
        uint32_t a0[NSPLIT], a1[NSPLIT], a2[NSPLIT], a3[NSPLIT];
        splitn_pair<NSPLIT>(sacc[2 * kk][0], sacc[2 * kk][1], a0);
        splitn_pair<NSPLIT>(sacc[2 * kk][2], sacc[2 * kk][3], a1);
        splitn_pair<NSPLIT>(sacc[2 * kk + 1][0], sacc[2 * kk + 1][1], a2);
        splitn_pair<NSPLIT>(sacc[2 * kk + 1][2], sacc[2 * kk + 1][3], a3);
        #pragma unroll
        for (int np = 0; np < 4; ++np) {
            uint32_t vf[4];  // (s 0-7 | 8-15) x (j 0-7 | 8-15) of B = v
            ldsm_x4t(vf, &vs[kk * 16 + (ltile & 1) * 8 + lrow][np * 16 + (ltile >> 1) * 8]);
            #pragma unroll
            for (int p = 0; p < NSPLIT; ++p) {
                const uint32_t a[4] = {a0[p], a1[p], a2[p], a3[p]};
                mma_bf16(nacc[2 * np], a, vf[0], vf[1]);
                mma_bf16(nacc[2 * np + 1], a, vf[2], vf[3]);
            }
        }
    }

    // The C slabs' space holds every warp's tile only with two or more terms (or split states).
    constexpr bool STAGE_H = OSTAGE && sizeof(HT) == 2 && sizeof(Cs) >= sizeof(HT) * NW * 16 * (64 + 8);
    if constexpr (STAGE_H) {
        // The warp's 16 x 64 tile of h through shared memory (the C slabs' space: free since the
        // DQK loop), then whole 128-byte rows in 16-byte stores (not 2-byte ones per element).
        auto st = reinterpret_cast<HT (*)[64 + 8]>(&Cs[0][0][0][0]) + warp * 16;
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            #pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                __align__(4) HT pr[2] = {static_cast<HT>(nacc[nt][2 * h] / den[h]), static_cast<HT>(nacc[nt][2 * h + 1] / den[h])};
                *reinterpret_cast<uint32_t*>(&st[g + 8 * h][nt * 8 + 2 * tq]) = *reinterpret_cast<const uint32_t*>(pr);
            }
        }
        __syncwarp();
        #pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int q = lane + 32 * u;
            const int ts = c * L + wt * 16 + (q >> 3);
            if (ts < S)
                *reinterpret_cast<uint4*>(h_out + (static_cast<size_t>(bh) * S + ts) * DV + j0 + (q & 7) * 8) =
                    *reinterpret_cast<const uint4*>(&st[q >> 3][(q & 7) * 8]);
        }
    } else
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int ts = c * L + rr + 8 * h;
        if (ts < S) {
            HT* out = h_out + (static_cast<size_t>(bh) * S + ts) * DV + j0;
            #pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                const int col = nt * 8 + 2 * tq;
                out[col] = static_cast<HT>(nacc[nt][2 * h] / den[h]);
                out[col + 1] = static_cast<HT>(nacc[nt][2 * h + 1] / den[h]);
            }
        }
    }
"""

# Segment chaining (after a segmented states kernel). Grid: x = (DQK * DV + DQK) / 4 threads (four
# floats of C or n each), z = B*NH. Segment 0 began from the initial state, so its final state is
# the one entering segment 1; each later segment's local final state adds to the decayed chain:
# X <- exp(P_s + m - m') X + exp(m_s - m') X_s, m' = max(P_s + m, m_s).
_COMBINE_SOURCE = """
    const int nseg = m_loc_shape[2];
    const int bh = blockIdx.z;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    constexpr int C4 = DQK * DV / 4;
    if (idx >= C4 + DQK / 4) return;
    const bool is_c = idx < C4;
    const int width = is_c ? DQK * DV : DQK;
    const float* src = is_c ? C_loc : n_loc;
    const int e = is_c ? idx * 4 : (idx - C4) * 4;
    const size_t seg0 = static_cast<size_t>(bh) * nseg;
    float4 x = *reinterpret_cast<const float4*>(src + seg0 * width + e);
    float m = m_loc[seg0];
    for (int s = 1; s < nseg; ++s) {
        float* dst = is_c ? C_seg : n_seg;
        *reinterpret_cast<float4*>(dst + (static_cast<size_t>(bh) * (nseg - 1) + s - 1) * width + e) = x;
        if (idx == 0) m_seg[static_cast<size_t>(bh) * (nseg - 1) + s - 1] = m;
        const float m_in = P_loc[seg0 + s] + m;
        const float m_loc_s = m_loc[seg0 + s];
        const float m_next = fmaxf(m_in, m_loc_s);
        const float a = expf(m_in - m_next), w = expf(m_loc_s - m_next);
        const float4 y = *reinterpret_cast<const float4*>(src + (seg0 + s) * width + e);
        x = make_float4(a * x.x + w * y.x, a * x.y + w * y.y, a * x.z + w * y.z, a * x.w + w * y.w);
        m = m_next;
    }
    *reinterpret_cast<float4*>((is_c ? C_final : n_final) + static_cast<size_t>(bh) * width + e) = x;
    if (idx == 0) m_final[bh] = m;
"""

_kernels: dict[tuple, object] = {}


def _kernel(which: str, eps: float = 0.0, bound: tuple[int, int] = (0, 0)):
    """The kernel ``which`` (states, combine, outputs); ``bound`` (threads, blocks per SM) caps the
    outputs kernel's registers through ``__launch_bounds__`` ((0, 0): none)."""
    key = (which, eps, bound)
    kernel = _kernels.get(key)
    if kernel is None:
        header = _HEADER + _GATES + _ROWS + _LOADS
        if which == "gates":
            kernel = mx.fast.cuda_kernel(
                name="xlstm_mlstm_chunk_gates_pass", input_names=["gi", "gf"], output_names=["ga", "gg"],
                source=_GATES_PASS_SOURCE, header=header, ensure_row_contiguous=False,
            )
        elif which == "states":
            kernel = mx.fast.cuda_kernel(
                name="xlstm_mlstm_chunk_states",
                input_names=["k", "v", "gi", "gf", "C0", "n0", "m0", "ga", "gg"],
                output_names=["C_enter", "n_enter", "m_enter", "P_enter", "C_final", "n_final", "m_final", "P_final"],
                # At most 128 registers (4 blocks of 128 threads per SM; the staged stores took it
                # to 133, 3 blocks): MLX writes the kernel's signature, so the bound comes through
                # the header, as __global__'s definition.
                source=_STATES_SOURCE, header=launch_bounds(128, 4) + header, ensure_row_contiguous=False,
            )
        elif which == "combine":
            kernel = mx.fast.cuda_kernel(
                name="xlstm_mlstm_chunk_combine",
                input_names=["C_loc", "n_loc", "m_loc", "P_loc"],
                output_names=["C_seg", "n_seg", "m_seg", "C_final", "n_final", "m_final"],
                source=_COMBINE_SOURCE, ensure_row_contiguous=True,
            )
        else:
            kernel = mx.fast.cuda_kernel(
                name=f"xlstm_mlstm_chunk_outputs_{kernel_tag(key)}",
                input_names=["q", "k", "v", "gi", "gf", "C_enter", "n_enter", "m_enter", "P_enter",
                             "C_seg", "n_seg", "m_seg"],
                output_names=["h_out"],
                source=_OUTPUTS_SOURCE.replace("EPS", f"{float(eps)!r}f").replace("SLAB", str(_SLAB)),
                header=launch_bounds(*bound) + header, ensure_row_contiguous=False,
            )
        _kernels[key] = kernel
    return kernel


def fused_chunkwise_supported(q: mx.array, v: mx.array, chunk_size: int) -> bool:
    """Whether :func:`mlstm_chunkwise_fused` runs its CUDA kernels for these inputs."""
    dqk, dv = q.shape[-1], v.shape[-1]
    return (cuda_available() and q.dtype == mx.bfloat16 and dqk % _TILE == 0 and dv % _TILE == 0
            and chunk_size % 16 == 0 and 16 <= chunk_size <= 64)


def mlstm_chunkwise_fused(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    i: mx.array,
    f: mx.array,
    state: MLSTMState | None = None,
    *,
    eps: float = 1e-6,
    chunk_size: int = 64,
    state_dtype: mx.Dtype | None = mx.float32,
) -> tuple[mx.array, MLSTMState]:
    """Same contract as :func:`xlstm_metal.kernels.mlstm.mlstm_chunkwise`.

    q, k [B, NH, S, DQK]; v [B, NH, S, DV] (any strides); i, f [B, NH, S]; state (C, n, m) or
    None. Returns h [B, NH, S, DV] (q's dtype) and the final (C, n, m) in ``state_dtype``.
    Differentiable: the backward (``chunkwise_grad``) recomputes the entering states with the
    states kernel and keeps no per-chunk state from the forward.
    """
    from .chunkwise_grad import chunkwise_differentiable

    # Differentiable (training) through its own vjp; the forward is the kernels' (or the scan's).
    return chunkwise_differentiable(q, k, v, i, f, state, eps=eps, chunk_size=chunk_size, state_dtype=state_dtype,
                                    fused=fused_chunkwise_supported(q, v, chunk_size))


def _launch(q, k, v, i, f, state, eps: float, L: int, h_dtype: mx.Dtype, state_dtype, segments: int | None = None):
    """The forward for bf16 q, k, v; h in ``h_dtype`` (float32 lets tests see every bit)."""
    h, final = fused_forward(q, k, v, i, f, _state_f32(k, v, state), eps, L, h_dtype, segments)
    return h, _cast_state(final, state_dtype)


def state_segments(num_chunks: int) -> int:
    """How many segments the states kernel's chunks are split into (its two-level scan): one,
    unless ``XLSTM_METAL_CHUNK_SEGMENTS`` asks for more.

    More segments put more thread blocks on the sequential part, at the cost of a chaining pass
    and a second state read per chunk in the outputs kernel. Measured on the 7B shape (H200,
    rounds S5R1/S5R2, benchmarks/NOTES.md) that never paid: the states kernel was 10-18% faster
    with 4 segments, the outputs kernel 16% slower, the whole prefill no faster."""
    forced = os.environ.get("XLSTM_METAL_CHUNK_SEGMENTS")
    return max(1, min(int(forced), num_chunks)) if forced else 1


def fused_forward(q, k, v, i, f, state: MLSTMState, eps: float, L: int, h_dtype: mx.Dtype,
                  segments: int | None = None, terms: int | None = None, keep_states: bool = False):
    """The kernels from the raw gates: q, k [B, NH, S, DQK], v [B, NH, S, DV] (bf16, any
    strides), i, f [B, NH, S] (any float dtype and strides), state (C, n, m) in float32 ->
    h [B, NH, S, DV] in ``h_dtype`` and the final (C, n, m) in float32. The gates' log-sigmoid
    and chunk cumsums are computed inside both kernels (no gate-prep launches). ``terms``: bf16
    terms per float32 operand of both kernels' products (None: their defaults; training's
    ``chunkwise_grad.product_terms``). ``keep_states`` (a backward's forward): one segment, and
    the states entering every chunk returned too, (h, final, (C [B, NH, NC, DQK, DV], n [B, NH,
    NC, DQK], m [B, NH, NC])): n, m float32; C as the outputs kernel reads it: bf16 (rounded to
    nearest by the states kernel) where its products take one bf16 term (``terms=1``, unless
    ``XLSTM_METAL_MLSTM_KEEP_BF16=0``: then float32), else float32."""
    B, NH, S, dqk = k.shape
    dv = v.shape[-1]
    NC = -(-S // L)
    if keep_states and segments not in (None, 1):
        raise ValueError(f"keep_states needs one segment, got segments={segments}")
    nseg = 1 if keep_states else segments or state_segments(NC)
    nseg = -(-NC // -(-NC // nseg))  # no empty segment: ceil(NC / chunks per segment)
    # Kept for a backward that reads them in bf16 (one term): stored so by the states kernel.
    c16 = keep_states and _split_terms(h_dtype, terms) == 1 and _kept_bf16()
    C_loc, n_loc, m_loc, P_loc, C_fin, n_fin, m_fin, P_fin = _states(
        k, v, i, f, state, NC, L, nseg, raw=True, terms=terms, c_dtype=mx.bfloat16 if c16 else mx.float32,
        csplit=nseg == 1 and not keep_states and _split_terms(h_dtype, terms) == 2 and _entering_split())
    if nseg == 1:
        final = (C_fin.reshape(B, NH, dqk, dv), n_fin.reshape(B, NH, dqk), m_fin.reshape(B, NH, 1))
        seg = None
    else:
        C_seg, n_seg, m_seg, *final = _kernel("combine")(
            inputs=[C_fin, n_fin, m_fin, P_fin],
            template=[("DQK", dqk), ("DV", dv)],
            grid=(-(-(dqk * dv + dqk) // 4 // 128) * 128, 1, B * NH),
            threadgroup=(128, 1, 1),
            output_shapes=[(B, NH, nseg - 1, dqk, dv), (B, NH, nseg - 1, dqk), (B, NH, nseg - 1),
                           (B, NH, dqk, dv), (B, NH, dqk), (B, NH, 1)],
            output_dtypes=[mx.float32] * 6,
        )
        seg = (C_seg, n_seg, m_seg)
    h = _outputs(q, k, v, i, f, C_loc, n_loc, m_loc, P_loc, seg, eps, L, h_dtype, raw=True, terms=terms,
                 cpre=C_loc.dtype == mx.bfloat16)
    if keep_states:
        return h, tuple(final), (C_loc, n_loc, m_loc)
    return h, tuple(final)


def _states(k, v, gi, gf, state: MLSTMState, NC: int, L: int, nseg: int, raw: bool, terms: int | None = None,
            c_dtype: mx.Dtype = mx.float32, csplit: bool = False):
    """The states kernel's eight outputs (entering and final C, n, m, P). The entering C: in
    ``c_dtype`` [B, NH, NC, DQK, DV], or (``csplit``) as its two bf16 terms (hi, lo) [B, NH, NC,
    DQK, DV / 32, 2, 32] for the outputs kernel's two-term form (needs the staged stores)."""
    B, NH, _, dqk = k.shape
    dv = v.shape[-1]
    C0, n0, m0 = state  # read at their strides
    cols = _states_cols()
    stage = cols == 32 and os.environ.get("XLSTM_METAL_STATES_STAGE") != "0"
    csplit = csplit and stage
    pregates = raw and nseg == 1 and _pregates()
    ga, gg = _gates_pass(gi, gf, NC, L) if pregates else (m0, m0)  # else placeholders, not read
    return _kernel("states")(
        inputs=[k, v, gi, gf, C0, n0, m0, ga, gg],
        template=[("NH", NH), ("L", L), ("JT", cols), ("DQK", dqk), ("DV", dv), ("RAW", raw), ("PREG", pregates), ("NSKIP", _flag("STATES_NSKIP")),
                  ("STAGE", stage), ("TERMS", terms or 3), ("CSPLIT", csplit), ("PROBE", _probe("STATES"))],
        grid=(dv // cols * 128, dqk // _TILE * nseg, B * NH),
        threadgroup=(128, 1, 1),
        output_shapes=[(B, NH, NC, dqk, dv // 32, 2, 32) if csplit else (B, NH, NC, dqk, dv), (B, NH, NC, dqk), (B, NH, NC),
                       (B, NH, NC), (B, NH, nseg, dqk, dv), (B, NH, nseg, dqk), (B, NH, nseg), (B, NH, nseg)],
        output_dtypes=[mx.bfloat16 if csplit else c_dtype] + [mx.float32] * 7,
    )


def _outputs(q, k, v, gi, gf, C_enter, n_enter, m_enter, P_enter, seg, eps: float, L: int, h_dtype: mx.Dtype,
             raw: bool, terms: int | None = None, cpre: bool = False) -> mx.array:
    """h from the entering states: float32 C_enter, or (``cpre``) the two bf16 terms of
    :func:`_states` (``csplit``)."""
    B, NH, S, dqk = q.shape
    dv = v.shape[-1]
    NC = -(-S // L)
    if seg is None:  # not read (SEGC false): placeholders for the kernel's fixed inputs
        seg = (m_enter, m_enter, m_enter)
    (h,) = _kernel("outputs", eps, _outputs_bound(L, cpre))(
        inputs=[q, k, v, gi, gf, C_enter, n_enter, m_enter, P_enter, *seg],
        template=[("HT", h_dtype), ("NH", NH), ("L", L), ("DQK", dqk), ("DV", dv), ("RAW", raw),
                  ("SEGC", seg[0] is not m_enter), ("NSPLIT", _split_terms(h_dtype, terms)),
                  ("CPRE", cpre),
                  ("VEARLY", _flag("OUTPUTS_VEARLY")), ("OSTAGE", _flag("OUTPUTS_STAGE")),
                  ("PROBE", _probe("OUTPUTS"))],
        grid=(dv // _TILE * 2 * L, NC, B * NH),
        threadgroup=(2 * L, 1, 1),
        output_shapes=[(B, NH, S, dv)],
        output_dtypes=[h_dtype],
    )
    return h


def _gates_pass(gi: mx.array, gf: mx.array, NC: int, L: int) -> tuple[mx.array, mx.array]:
    """The states kernel's per-chunk gate values from the raw i, f [B, NH, S] (any strides):
    a_t [B*NH*NC, L] and (g, max_t a_t) [B*NH*NC, 2], float32 (:data:`_GATES_PASS_SOURCE`)."""
    B, NH = gf.shape[:2]
    return _kernel("gates")(
        inputs=[gi, gf],
        template=[("NH", NH), ("L", L)],
        grid=(-(-NC // 4) * 128, 1, B * NH),
        threadgroup=(128, 1, 1),
        output_shapes=[(B * NH * NC, L), (B * NH * NC, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )


def _pregates() -> bool:
    """Whether the raw-gate states kernel reads its chunks' gate values from a gates pass
    (:func:`_gates_pass`) instead of computing them in its serial loop (the same values).
    On unless ``XLSTM_METAL_STATES_PREGATES=0``."""
    return _flag("STATES_PREGATES")


def _flag(name: str) -> bool:
    """The kernels' schedule settings that keep their arithmetic (the same bits either way; on
    unless ``XLSTM_METAL_<name>=0``):

    - ``STATES_PREGATES``: the states kernel's chunk gate values from the gates pass;
    - ``STATES_NSKIP``: only the states blocks that write n (the first column tile) sum it;
    - ``OUTPUTS_VEARLY``: the outputs kernel copies the chunk's value columns during its last
      DQK slab (cp.async) and reads q, n for q.n in 16-byte loads (the same order);
    - ``OUTPUTS_STAGE``: the outputs kernel writes h (2-byte types) through shared memory in
      16-byte row stores instead of element by element."""
    return os.environ.get(f"XLSTM_METAL_{name}") != "0"


def _probe(kernel: str) -> int:
    """Diagnostic switches of the states / outputs kernel (``XLSTM_METAL_PROBE_<KERNEL>``, bits; 0, the
    default, computes): they leave work out to time the rest, so their results are wrong
    (benchmarks/mlstm_probe.py). States: 1 no gate arithmetic, 2 no entering-state stores, 4 no
    products. Outputs: 1 no copies of C, 2 no q C products, 4 no q k^T products."""
    value = os.environ.get(f"XLSTM_METAL_PROBE_{kernel}", "")
    return int(value) if value.isdigit() else 0


def _states_cols() -> int:
    """Columns of C per states block: ``_STATES_COLS``, or ``XLSTM_METAL_STATES_COLS`` (32 or 64)."""
    forced = os.environ.get("XLSTM_METAL_STATES_COLS")
    return int(forced) if forced in ("32", "64") else _STATES_COLS


def _entering_split() -> bool:
    """Whether the states kernel stores the entering states as the two bf16 terms that the outputs
    kernel multiplies when h is bf16 / fp16 (the same bytes as float32; the outputs kernel copies
    them into shared memory as they are instead of splitting each slab itself: the same h, bit
    for bit). On unless ``XLSTM_METAL_STATES_CSPLIT=0``."""
    return os.environ.get("XLSTM_METAL_STATES_CSPLIT") != "0"


def _kept_bf16() -> bool:
    """Whether :func:`fused_forward` with ``keep_states`` and one product term has the states
    kernel store the entering C in bf16 (read so by the outputs kernel and kept for the backward:
    the bits of the float32 C rounded by the outputs kernel and cast for the backward, without
    the float32 C and the cast). ``XLSTM_METAL_MLSTM_KEEP_BF16``, default on (0: float32 C)."""
    return os.environ.get("XLSTM_METAL_MLSTM_KEEP_BF16", "1") != "0"


def _outputs_bound(L: int, cpre: bool) -> tuple[int, int]:
    """(threads, blocks per SM) of the outputs kernel's ``__launch_bounds__``: 4 blocks of 2L
    threads (128 registers) with split entering states, which fit them without spilling (150
    unbounded: 3 blocks per SM; 0.83 vs 0.94 ms per 7B layer at 16,384 tokens, round S8R1); no
    bound otherwise (142-144 registers; 128 would spill). ``XLSTM_METAL_OUTPUTS_BLOCKS=N``
    overrides (0: no bound)."""
    forced = os.environ.get("XLSTM_METAL_OUTPUTS_BLOCKS", "")
    blocks = int(forced) if forced.isdigit() else (4 if cpre else 0)
    return (2 * L, blocks) if blocks > 0 else (0, 0)


def _split_terms(h_dtype: mx.Dtype, terms: int | None = None) -> int:
    """bf16 terms per float32 operand (the entering state, the weighted scores) in the outputs
    kernel. Three (float32's 24 bits) when h is float32; two (16 bits) when h is rounded to
    bf16 / fp16 anyway: the operands' error (2^-17 relative) is then far below the result's own
    rounding (2^-9 for bf16), and the kernel does a third fewer products (H200, 7B shape:
    tests/test_cuda_kernels.py compares both). ``XLSTM_METAL_CHUNK_SPLIT=2|3`` overrides; else
    ``terms`` (training's setting, 1-3) where given."""
    forced = os.environ.get("XLSTM_METAL_CHUNK_SPLIT")
    if forced in ("2", "3"):
        return int(forced)
    if terms is not None:
        return terms
    return 3 if h_dtype == mx.float32 else 2


def chunk_gates(i: mx.array, f: mx.array, L: int) -> tuple[mx.array, mx.array]:
    """The reference's gate prep (:func:`xlstm_metal.kernels.mlstm.chunk_gates`), as the
    row-contiguous arrays the kernels index directly: (b, i~), both [B, NH, NC, L] float32."""
    return tuple(mx.contiguous(x) for x in _chunk_gates(i, f, L))


def chunk_states(k: mx.array, v: mx.array, bcum: mx.array, igc: mx.array, state: MLSTMState | None,
                 terms: int | None = None, c_dtype: mx.Dtype = mx.float32):
    """Phase 1 kernel from the prepared gates of :func:`chunk_gates`: the (C, n, m) entering
    every chunk ([B, NH, NC, DQK, DV], [B, NH, NC, DQK], [B, NH, NC], float32) and the final
    state. (One segment: every block walks all chunks.) ``terms``: bf16 terms of the products'
    float32 operand (None: 3); ``c_dtype``: the entering C's storage (bf16 for a reader that
    takes it as one bf16 term; the final state stays float32)."""
    B, NH, _, dqk = k.shape
    dv = v.shape[-1]
    NC, L = bcum.shape[2:]
    C_enter, n_enter, m_enter, _, C_fin, n_fin, m_fin, _ = _states(
        k, v, igc, bcum, _state_f32(k, v, state), NC, L, 1, raw=False, terms=terms, c_dtype=c_dtype)
    return C_enter, n_enter, m_enter, (C_fin.reshape(B, NH, dqk, dv), n_fin.reshape(B, NH, dqk),
                                       m_fin.reshape(B, NH, 1))


def chunk_outputs(q, k, v, bcum, igc, C_enter, n_enter, m_enter, eps: float, h_dtype: mx.Dtype) -> mx.array:
    """Phase 2 kernel from the prepared gates and the entering states of :func:`chunk_states`:
    h [B, NH, S, DV] in ``h_dtype``."""
    return _outputs(q, k, v, igc, bcum, C_enter, n_enter, m_enter, m_enter, None, eps, bcum.shape[-1], h_dtype,
                    raw=False)
