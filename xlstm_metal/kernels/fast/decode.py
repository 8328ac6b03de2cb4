"""Fused CUDA kernels for one decode step of an xLSTM-Large block, each beside its ops reference.

On an NVIDIA GPU a decode step is bound by the number of kernels MLX launches, not by bytes
(benchmarks/NOTES.md): every primitive of the compiled step is one kernel node. Per block the
reference launches 16 (17 with quantized projections and float gates;
`benchmarks/decode_primitives.py --pretend-cuda`): two RMSNorms and their residual adds, four
matmuls (five), two soft-capped gate chains, the step kernel, two casts, the multi-head
LayerNorm, the output gate and the SwiGLU product. These kernels fold the small ones, to 9:

- :func:`mlstm_step_gated`: the fused step kernel (:mod:`.step`, re-laid out for bytes in flight)
  with the i/f gate bias and soft cap computed inside it from the raw projection outputs, and,
  for a float gate projection beside quantized ones, at <= 4 rows, that product too;
- :func:`output_norm_gate`: ``sigmoid(o~) * MultiHeadLayerNorm(h)`` in one launch (from 4);
- :func:`add_rms_norm`: a residual add and the RMSNorm that follows it in one launch (from 2).

With quantized projections at a few rows, :mod:`.decode_chain` goes further (5 launches per
block): the norms, the output gate and SwiGLU run inside the quantized products themselves.

Each computes in float32 and rounds where the reference rounds (every intermediate the reference
holds in bf16/fp16 is rounded to it here too), so results agree with the ops to float32
round-off and at most an ulp of the narrow dtype where a transcendental differs in its last bit.
Elsewhere (CPU, Metal) every function here runs its reference ops.

``XLSTM_METAL_FUSED_DECODE=0`` (or :func:`set_fused_decode`) switches them off: the model then
runs the first fused step kernel and the ops around it, as before these kernels (for
comparisons; compiled steps and prefill traces keep what they were traced with).

The step kernel has four layouts of the state's traffic (``XLSTM_METAL_STEP_KERNEL=1|2|3|4`` or
:func:`set_step_kernel_version`): 1, column strips of 32 per block; 2 (the default), strips
sized by the batch, loads issued first, one reduction pass; 3, tiles of whole rows with a second
small kernel that sums their partial products (float32 state, DV a multiple of 128; else 2); 4,
whole heads per block streamed through a shared-memory ring by bulk asynchronous copies (Hopper;
float32 state, DV a multiple of 4 up to 1024; else 2), level with 2 in the 7B step on an H200.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from ...cells.activations import sigmoid
from ...cells.norms import MultiHeadLayerNorm, RMSNorm, soft_cap
from ..mlstm import MLSTMState, is_deferred, log_sigmoid, mlstm_step, mlstm_step_deferred, zero_state
from .norm_rows import add_rms_norm_rows, add_rms_norm_rows_supported, norm_gate_rows, norm_gate_rows_supported
from .step import GATE_STABILISER, cuda_available
from .tensor_cores import compact_source

_enabled = os.environ.get("XLSTM_METAL_FUSED_DECODE", "1") != "0"


def fused_decode_enabled() -> bool:
    """Whether the model uses these kernels (default on; ``XLSTM_METAL_FUSED_DECODE=0`` off)."""
    return _enabled


def set_fused_decode(enabled: bool) -> None:
    """Switch the kernels of this module on or off for functions traced from now on."""
    global _enabled
    _enabled = bool(enabled)


def _kernels_on() -> bool:
    return _enabled and cuda_available()


_GATE_HEADER = """
// Rounds x to T and back, as the reference does when it holds a value in T.
template <typename T>
__device__ __forceinline__ float xl_round(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// Gate pre-activation as the projection cell computes it: (raw + bias) in T, then the soft cap
// cap * tanh(x / cap), each op rounded to T.
template <typename T>
__device__ __forceinline__ float xl_gate(float a, float bias, bool has_bias, float cap) {
  if (has_bias) a = xl_round<T>(a + bias);
  if (cap > 0.0f) {
    a = xl_round<T>(a / cap);
    a = xl_round<T>(tanhf(a));
    a = xl_round<T>(cap * a);
  }
  return a;
}
"""

# What every layout computes first for its (batch row, head): the gates and the offsets of its
# q, k and n; layouts 1 and 2 also the gate product (at <= 4 rows) and their outputs' offsets.
_GATES = """    // Gates, as the projection cell and the reference step compute them.
    const float ig = xl_gate<GT>(IRAW, IBIAS, HAS_BIAS, CAP);
    const float fg = xl_gate<GT>(FRAW, FBIAS, HAS_BIAS, CAP);
GATE_STABILISER

    const int64_t q_off = b * q_strides[0] + hd * q_strides[1];
    const int64_t k_off = b * k_strides[0] + hd * k_strides[1];
    const int64_t n_off = b * n_strides[0] + hd * n_strides[1];
""".replace("GATE_STABILISER", GATE_STABILISER)
_GATES_AND_OFFSETS = "INPROJ_PROLOGUE\n" + _GATES + """    const size_t qk_off = static_cast<size_t>(bh) * DQK;
    const size_t v_off = static_cast<size_t>(bh) * DV;
"""

# The step of :mod:`.step` with the gates computed inside, and laid out for bytes in flight: a
# block covers TX * V value columns of one (batch row, head) with TX x TD threads, each thread V
# adjacent columns (V = 4: one 16-byte load of a float32 state row) and DQK / TD rows, all its
# loads issued before use. On the 7B shape (DQK 256, DV 512) that is 16 blocks per head (128 at
# batch 1) and eight 16-byte loads in flight per thread; the first kernel had 64 blocks at batch 1
# and four 4-byte loads per thread, so at batch 1 it waited on latency, not bandwidth.
_STEP_GATED_SOURCE = """
    const int bh = blockIdx.z;
    const int b = bh / NH;
    const int hd = bh % NH;
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int tid = ty * TX + tx;
    constexpr int NT = TX * TD;
    constexpr int COLS = TX * V;  // value columns per block
    const int j0 = blockIdx.x * COLS + tx * V;
    __shared__ float s_red[NT * V];

GATES_AND_OFFSETS

    // n' = fa n + ia k and the head's scalar q.n' (every block of the head computes it).
    float part = 0.0f;
    for (int d = tid; d < DQK; d += NT) {
        const float kd = static_cast<float>(k[k_off + d * k_strides[3]]);
        const float nd = fa * static_cast<float>(n[n_off + d * n_strides[2]]) + ia * kd;
        part += (static_cast<float>(q[q_off + d * q_strides[3]]) * scale) * nd;
        if (blockIdx.x == 0) n_out[qk_off + d] = static_cast<ST>(nd);
    }
    s_red[tid] = part;
    __syncthreads();
    for (int s = NT / 2; s > 0; s >>= 1) {
        if (tid < s) s_red[tid] += s_red[tid + s];
        __syncthreads();
    }
    const float qn = s_red[0];
    __syncthreads();

    // C' = fa C + ia k v^T for this thread's V columns (C row-contiguous), and q.C' over its rows.
    float acc[V];
    #pragma unroll
    for (int c = 0; c < V; ++c) acc[c] = 0.0f;
    if (j0 < DV) {
        float vj[V];
        #pragma unroll
        for (int c = 0; c < V; ++c) {
            vj[c] = j0 + c < DV ? ia * static_cast<float>(v[b * v_strides[0] + hd * v_strides[1] + (j0 + c) * v_strides[3]]) : 0.0f;
        }
        const size_t c_base = static_cast<size_t>(bh) * DQK * DV + j0;
        // RB rows at a time: every load of the batch is issued before the first store (C and
        // C_out could alias as far as the compiler knows, so it would not move loads past stores).
        constexpr int RB = 8;
        for (int d0 = ty; d0 < DQK; d0 += TD * RB) {
            float cv[RB][V];
            float kd[RB], qd[RB];
            #pragma unroll
            for (int r = 0; r < RB; ++r) {
                const int d = d0 + r * TD;
                if (d < DQK) {
                    kd[r] = static_cast<float>(k[k_off + d * k_strides[3]]);
                    qd[r] = static_cast<float>(q[q_off + d * q_strides[3]]) * scale;
                    const size_t off = c_base + static_cast<size_t>(d) * DV;
                    if (LOAD4) {
                        const float4 c4 = *reinterpret_cast<const float4*>(C + off);
                        cv[r][0] = c4.x; cv[r][1] = c4.y; cv[r][2] = c4.z; cv[r][3] = c4.w;
                    } else {
                        #pragma unroll
                        for (int c = 0; c < V; ++c) cv[r][c] = j0 + c < DV ? static_cast<float>(C[off + c]) : 0.0f;
                    }
                }
            }
            #pragma unroll
            for (int r = 0; r < RB; ++r) {
                const int d = d0 + r * TD;
                if (d < DQK) {
                    const size_t off = c_base + static_cast<size_t>(d) * DV;
                    #pragma unroll
                    for (int c = 0; c < V; ++c) {
                        cv[r][c] = fa * cv[r][c] + kd[r] * vj[c];
                        acc[c] += qd[r] * cv[r][c];
                    }
                    if (LOAD4) {
                        *reinterpret_cast<float4*>(C_out + off) = make_float4(cv[r][0], cv[r][1], cv[r][2], cv[r][3]);
                    } else {
                        #pragma unroll
                        for (int c = 0; c < V; ++c) if (j0 + c < DV) C_out[off + c] = static_cast<ST>(cv[r][c]);
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int c = 0; c < V; ++c) s_red[ty * COLS + tx * V + c] = acc[c];
    __syncthreads();
    for (int col = tid; col < COLS; col += NT) {
        const int j = blockIdx.x * COLS + col;
        if (j < DV) {
            float num = 0.0f;
            for (int t = 0; t < TD; ++t) num += s_red[t * COLS + col];
            const float den = fmaxf(fabsf(qn), expf(-m_new)) + EPS;
            h[v_off + j] = static_cast<HT>(num / den);
        }
    }
    if (blockIdx.x == 0 && tid == 0) m_out[bh] = static_cast<ST>(m_new);
""".replace("GATES_AND_OFFSETS\n", _GATES_AND_OFFSETS)

#: Layout 2's thread and tile constants: TX x TD threads, each V adjacent columns; tiles of COLS
#: value columns, NCT per head. Shared with :mod:`.step_deferred`.
TILE_THREADS = """    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int tid = ty * TX + tx;
    constexpr int NT = TX * TD;
    constexpr int NW = NT / 32;
    constexpr int COLS = TX * V;  // value columns per tile
    constexpr int NCT = (DV + COLS - 1) / COLS;  // tiles per head
"""
#: Where tile ``tile`` lies: its (batch row, head) bh = b * NH + hd, its column tile ct, this
#: thread's first column j0 and its offset in C [B, NH, DQK, DV] (row-contiguous).
TILE_POSITION = """    const int bh = tile / NCT;
    const int ct = tile % NCT;
    const int b = bh / NH;
    const int hd = bh % NH;
    const int j0 = ct * COLS + tx * V;
    const bool cols_ok = j0 < DV;
    const size_t c_base = static_cast<size_t>(bh) * DQK * DV + j0;
"""
#: Layout 2's per-column sums over a tile's rows (acc[V], already summed over the lanes of a warp
#: holding the same columns) to shared memory s_red: a row per warp, or per row of threads with
#: TX >= 32; NSUM rows to add up. Shared with :mod:`.step_deferred`.
ROW_SUMS_TO_SHARED = """    // With TX >= 32 every lane of a warp holds other columns: the rows of threads' sums instead.
    constexpr int NSUM = TX >= 32 ? TD : NW;
    const int lane = tid & 31, warp = tid >> 5;
    if (TX >= 32) {
        #pragma unroll
        for (int c = 0; c < V; ++c) s_red[ty * COLS + tx * V + c] = acc[c];
    } else if (lane < TX) {
        #pragma unroll
        for (int c = 0; c < V; ++c) s_red[warp * COLS + lane * V + c] = acc[c];
    }
"""

# The second layout of the gated step, for streaming the state faster at 16-64 rows. A tile is
# COLS = TX * V value columns of one (batch row, head), all rows: TX x TD threads, each V adjacent
# columns (one 16-byte access of a float32 row) and rows ty, ty + TD, ... in batches of RB. What
# differs from the first layout: the first batch of state loads is issued before anything else
# (before the gates, q, k and n), so the state is in flight while the block reads its scalars; q
# and k go through shared memory once per tile instead of a 2-byte global load per row and
# thread; the scalar q.n' is summed in the same pass as q.C' (warp shuffles, then one
# shared-memory exchange and a single barrier) instead of a barrier tree before the state loop;
# the tile's width follows the batch (_v2_tile); the state is read and written with streaming
# cache hints (it is not reused within a step); and a capped grid can walk several tiles per block.
_STEP_GATED_SOURCE_V2 = """
    // Tiles of COLS value columns x all DQK rows of one (batch row, head), tile = bh * NCT + ct.
    // Block i takes tiles i, i + gridDim.x, ...: one each when the grid has a block per tile,
    // several when it is capped (persistent blocks: no launch per tile, and the next tile's first
    // loads fly during this tile's reduction and the next one's gates).
TILE_THREADS
    constexpr int NRED = NW * COLS > NT ? NW * COLS : NT;
    const int n_tiles = q_shape[0] * NH * NCT;
    __shared__ float s_q[DQK];
    __shared__ float s_k[DQK];
    __shared__ float s_red[NRED];
    __shared__ float s_qn[NW];

    // RB rows of this thread's state from row d0 of a tile; row r sits r * TD * DV elements
    // after row d0 (a constant offset).
    float cv[RB][V];
    auto load_rows = [&](int tile, int d0) {
        const int bh_t = tile / NCT;
        const int j = (tile % NCT) * COLS + tx * V;
        if (j >= DV) return;
        const size_t base = static_cast<size_t>(bh_t) * DQK * DV + j + static_cast<size_t>(d0) * DV;
        #pragma unroll
        for (int r = 0; r < RB; ++r) {
            if (d0 + r * TD < DQK) {
                if (LOAD4) {
                    const float4* p4 = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(C) + base + r * TD * DV);
                    const float4 c4 = STREAM ? __ldcs(p4) : *p4;
                    cv[r][0] = c4.x; cv[r][1] = c4.y; cv[r][2] = c4.z; cv[r][3] = c4.w;
                } else {
                    #pragma unroll
                    for (int c = 0; c < V; ++c) cv[r][c] = j + c < DV ? static_cast<float>(C[base + r * TD * DV + c]) : 0.0f;
                }
            }
        }
    };
    if (static_cast<int>(blockIdx.x) < n_tiles) load_rows(blockIdx.x, ty);  // before anything else

    for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
TILE_POSITION

GATES_AND_OFFSETS

    // q (scaled) and k to shared memory; n' = fa n + ia k and this thread's part of q.n'.
    float qn = 0.0f;
    for (int d = tid; d < DQK; d += NT) {
        const float kd = static_cast<float>(k[k_off + d * k_strides[3]]);
        const float qd = static_cast<float>(q[q_off + d * q_strides[3]]) * scale;
        const float nd = fa * static_cast<float>(n[n_off + d * n_strides[2]]) + ia * kd;
        qn += qd * nd;
        s_q[d] = qd;
        s_k[d] = kd;
        if (ct == 0) n_out[qk_off + d] = static_cast<ST>(nd);
    }
    float vj[V];
    #pragma unroll
    for (int c = 0; c < V; ++c) {
        vj[c] = j0 + c < DV ? ia * static_cast<float>(v[b * v_strides[0] + hd * v_strides[1] + (j0 + c) * v_strides[3]]) : 0.0f;
    }
    __syncthreads();

    // C' = fa C + ia k v^T for this thread's columns (C row-contiguous), and q.C' over its rows.
    float acc[V];
    #pragma unroll
    for (int c = 0; c < V; ++c) acc[c] = 0.0f;
    for (int d0 = ty; d0 < DQK; d0 += TD * RB) {
        if (d0 != ty) load_rows(tile, d0);
        float* dst = reinterpret_cast<float*>(C_out) + c_base + static_cast<size_t>(d0) * DV;
        #pragma unroll
        for (int r = 0; r < RB; ++r) {
            const int d = d0 + r * TD;
            if (cols_ok && d < DQK) {
                const float kd = s_k[d], qd = s_q[d];
                #pragma unroll
                for (int c = 0; c < V; ++c) {
                    cv[r][c] = fa * cv[r][c] + kd * vj[c];
                    acc[c] += qd * cv[r][c];
                }
                if (LOAD4) {
                    const float4 o4 = make_float4(cv[r][0], cv[r][1], cv[r][2], cv[r][3]);
                    float4* p4 = reinterpret_cast<float4*>(dst + r * TD * DV);
                    if (STREAM) __stcs(p4, o4);
                    else *p4 = o4;
                } else {
                    const size_t off = c_base + static_cast<size_t>(d) * DV;
                    #pragma unroll
                    for (int c = 0; c < V; ++c) if (j0 + c < DV) C_out[off + c] = static_cast<ST>(cv[r][c]);
                }
            }
        }
    }
    // The next tile's first rows, in flight from here on.
    if (tile + static_cast<int>(gridDim.x) < n_tiles) load_rows(tile + gridDim.x, ty);

    // One exchange for both sums: over the rows within a warp by shuffles (lanes tx, tx + TX,
    // ... hold the same columns), then the warps' partial sums through shared memory.
    #pragma unroll
    for (int c = 0; c < V; ++c) {
        #pragma unroll
        for (int o = TX; o < 32; o <<= 1) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], o);
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) qn += __shfl_xor_sync(0xffffffffu, qn, o);
ROW_SUMS_TO_SHARED
    if (lane == 0) s_qn[warp] = qn;
    __syncthreads();
    for (int col = tid; col < COLS; col += NT) {
        const int j = ct * COLS + col;
        if (j < DV) {
            float num = 0.0f, qn_all = 0.0f;
            #pragma unroll
            for (int w = 0; w < NSUM; ++w) num += s_red[w * COLS + col];
            #pragma unroll
            for (int w = 0; w < NW; ++w) qn_all += s_qn[w];
            const float den = fmaxf(fabsf(qn_all), expf(-m_new)) + EPS;
            h[v_off + j] = static_cast<HT>(num / den);
        }
    }
    if (ct == 0 && tid == 0) m_out[bh] = static_cast<ST>(m_new);
    __syncthreads();  // shared memory is the next tile's from here
    }
""".replace("GATES_AND_OFFSETS\n", _GATES_AND_OFFSETS).replace("ROW_SUMS_TO_SHARED\n", ROW_SUMS_TO_SHARED) \
    .replace("TILE_THREADS\n", TILE_THREADS).replace("TILE_POSITION\n", TILE_POSITION)

# The third layout: row tiles. S6R2 showed the column strips of layouts 1 and 2 (each block
# walking 64-256 bytes of every row of a head) are what holds the state's streaming below the
# copy rate: a plain copy in that pattern was slower than the step kernel itself. Here a tile is
# R full rows of one head's C (R x DV x 4 contiguous bytes): each warp reads whole rows (lane l
# the 16-byte groups l, l + 32, ... of a row), the 8 warps of a block rows r0 + warp + 8 i. The
# sums over rows then span tiles: each tile writes its partial q.C' per column and its partial
# q.n' to ``part`` [B * NH, DQK / R, DV + 1] (float32), and a second, small kernel adds them up
# and writes h (an extra read and write of DV + 1 floats per tile: 1.6% of the state's bytes at
# R = 32 and DV = 512).
_STEP_GATED_SOURCE_V3 = """
    constexpr int NWARP = 8;  // 256 threads
    constexpr int NRT = DQK / R;  // row tiles per head
    constexpr int ROWS_W = R / NWARP;  // rows per warp
    constexpr int W = DV / 128;  // 16-byte groups per lane and row
    const int tile = blockIdx.x;
    const int bh = tile / NRT;
    const int rt = tile % NRT;
    const int b = bh / NH;
    const int hd = bh % NH;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int r0 = rt * R;
    __shared__ float4 s_acc[NWARP][DV / 4];
    __shared__ float4 s_v[DV / 4];
    __shared__ float s_qn[NWARP];

    // This warp's rows r0 + warp + NWARP i, RB at a time, issued before anything else.
    const size_t base = static_cast<size_t>(bh) * DQK * DV + static_cast<size_t>(r0 + warp) * DV + 4 * lane;
    float4 cv[RB][W];
    auto load_rows = [&](int i0) {
        #pragma unroll
        for (int r = 0; r < RB; ++r) {
            #pragma unroll
            for (int w = 0; w < W; ++w) {
                cv[r][w] = __ldcs(reinterpret_cast<const float4*>(C + base + static_cast<size_t>((i0 + r) * NWARP) * DV + 128 * w));
            }
        }
    };
    load_rows(0);

GATES
    // ia v in shared memory (registers go to the rows in flight).
    for (int col = threadIdx.x; col < DV; col += NWARP * 32) {
        reinterpret_cast<float*>(s_v)[col] = ia * static_cast<float>(v[b * v_strides[0] + hd * v_strides[1] + col * v_strides[3]]);
    }
    __syncthreads();

    // C' = fa C + ia k v^T on this warp's rows, and q.C' summed over them per column.
    float4 acc[W];
    #pragma unroll
    for (int w = 0; w < W; ++w) acc[w] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int i0 = 0; i0 < ROWS_W; i0 += RB) {
        if (i0 != 0) load_rows(i0);
        #pragma unroll
        for (int r = 0; r < RB; ++r) {
            const int d = r0 + warp + NWARP * (i0 + r);
            const float kd = static_cast<float>(k[k_off + d * k_strides[3]]);
            const float qd = static_cast<float>(q[q_off + d * q_strides[3]]) * scale;
            #pragma unroll
            for (int w = 0; w < W; ++w) {
                const float4 vw = s_v[32 * w + lane];
                float4 c = cv[r][w];
                c.x = fa * c.x + kd * vw.x; c.y = fa * c.y + kd * vw.y;
                c.z = fa * c.z + kd * vw.z; c.w = fa * c.w + kd * vw.w;
                acc[w].x += qd * c.x; acc[w].y += qd * c.y; acc[w].z += qd * c.z; acc[w].w += qd * c.w;
                __stcs(reinterpret_cast<float4*>(C_out + base + static_cast<size_t>((i0 + r) * NWARP) * DV + 128 * w), c);
            }
        }
    }

    // n' = fa n + ia k on the tile's rows and their part of q.n'.
    float qn = 0.0f;
    for (int d = r0 + threadIdx.x; d < r0 + R; d += NWARP * 32) {
        const float kd = static_cast<float>(k[k_off + d * k_strides[3]]);
        const float nd = fa * static_cast<float>(n[n_off + d * n_strides[2]]) + ia * kd;
        qn += (static_cast<float>(q[q_off + d * q_strides[3]]) * scale) * nd;
        n_out[static_cast<size_t>(bh) * DQK + d] = static_cast<ST>(nd);
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) qn += __shfl_xor_sync(0xffffffffu, qn, o);
    if (lane == 0) s_qn[warp] = qn;
    #pragma unroll
    for (int w = 0; w < W; ++w) s_acc[warp][32 * w + lane] = acc[w];
    __syncthreads();
    // The tile's partial sums: per column over its rows, and q.n'.
    float* out = part + static_cast<size_t>(tile) * (DV + 1);
    const float* s_flat = reinterpret_cast<const float*>(&s_acc[0][0]);
    for (int col = threadIdx.x; col < DV; col += NWARP * 32) {
        float s = 0.0f;
        #pragma unroll
        for (int t = 0; t < NWARP; ++t) s += s_flat[t * DV + col];
        out[col] = s;
    }
    if (threadIdx.x == 0) {
        float s = 0.0f;
        #pragma unroll
        for (int t = 0; t < NWARP; ++t) s += s_qn[t];
        out[DV] = s;
        if (rt == 0) {
            m_out[bh] = static_cast<ST>(m_new);
            m_f32[bh] = m_new;
        }
    }
""".replace("GATES\n", _GATES)

# The fourth layout: each head's state streamed through shared memory by the copy engine. S6-S7
# found every layout that moves C through registers below a flat copy (3.1 against 3.65 TB/s at
# 64 rows): column strips hold DRAM below the copy rate, and whole rows per warp fit only one or
# two rows in flight. Here a block takes whole heads (persistent: head blockIdx.x, + gridDim.x,
# ...) and one thread moves their C in contiguous chunks of CH rows (CH * DV * 4 bytes) with
# bulk asynchronous copies (``cp.async.bulk``, Hopper's TMA without a tensor map) into a ring of
# STAGES chunks, completion counted by an mbarrier per slot; the threads update the chunk in
# shared memory (C' = fa C + ia k v^T, q.C' summed per column in registers) and the same thread
# writes it back with a bulk store. The next chunks (also the next head's first ones) stay in
# flight meanwhile, without registers, so DRAM sees long contiguous reads and writes. A head's
# sums need no second pass: the block holds all its rows. NT = (DV / 4) * RT threads: thread t
# owns 16-byte column group t % (DV / 4) and rows t / (DV / 4) + RT i of every chunk.
_STEP_GATED_SOURCE_V4 = """
    constexpr int G = DV / 4;         // 16-byte column groups per row
    constexpr int NT = G * RT;        // a multiple of 32
    constexpr int NC = DQK / CH;      // chunks per head
    constexpr uint32_t CHUNK = CH * DV * 4;
    constexpr int NW = NT / 32;
    constexpr int QPT = (DQK + NT - 1) / NT;  // q, k, n entries per thread
    constexpr int VPT = (DV + NT - 1) / NT;   // v entries per thread
    const int tid = threadIdx.x;
    const int tx = tid % G, ty = tid / G;
    const int n_heads = q_shape[0] * NH;
    const int my_heads = (n_heads - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
    const int total = my_heads * NC;  // chunks this block moves
    extern __shared__ __align__(128) uint8_t xl_ring[];
    __shared__ __align__(8) uint64_t s_full[STAGES];
    __shared__ float s_q[DQK];
    __shared__ float s_k[DQK];
    __shared__ __align__(16) float s_v[DV];
    __shared__ float s_red[RT > 1 ? RT * DV : 1];
    __shared__ float s_qn[NW];
    const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(xl_ring));
    const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(s_full));

    // Chunk g of this block: head blockIdx.x + (g / NC) gridDim.x, rows (g % NC) CH on.
    auto chunk_off = [&](int g) -> size_t {
        const size_t bh_g = static_cast<size_t>(blockIdx.x) + static_cast<size_t>(g / NC) * gridDim.x;
        return (bh_g * DQK + static_cast<size_t>(g % NC) * CH) * DV;
    };
    auto load_chunk = [&](int g) {  // thread 0 only
        const int s = g % STAGES;
        const uint32_t bar = full0 + 8 * s;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\\n" :: "r"(bar), "r"(CHUNK) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\\n"
                     :: "r"(ring + s * CHUNK), "l"(C + chunk_off(g)), "r"(CHUNK), "r"(bar) : "memory");
    };
    if (tid == 0) {
        #pragma unroll
        for (int s = 0; s < STAGES; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\\n" :: "r"(full0 + 8 * s) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;\\n" ::: "memory");
    }
    __syncthreads();
    if (tid == 0) {
        for (int g = 0; g < STAGES - 1 && g < total; ++g) load_chunk(g);  // before anything else
    }

    // A head's small inputs (raw gates, m, this thread's q, k, n and v entries), fetched into
    // registers one head ahead: a new head then starts without waiting on global loads.
    float r_i = 0.0f, r_f = 0.0f, r_m = 0.0f, r_q[QPT], r_k[QPT], r_n[QPT], r_v[VPT];
    auto fetch = [&](int bh) {
        if (bh >= n_heads) return;
        const int b = bh / NH;
        const int hd = bh % NH;
        r_i = IRAW;
        r_f = FRAW;
        r_m = static_cast<float>(m[b * m_strides[0] + hd * m_strides[1]]);
        const int64_t q_off = b * q_strides[0] + hd * q_strides[1];
        const int64_t k_off = b * k_strides[0] + hd * k_strides[1];
        const int64_t n_off = b * n_strides[0] + hd * n_strides[1];
        #pragma unroll
        for (int e = 0; e < QPT; ++e) {
            const int d = tid + e * NT;
            r_q[e] = d < DQK ? static_cast<float>(q[q_off + d * q_strides[3]]) : 0.0f;
            r_k[e] = d < DQK ? static_cast<float>(k[k_off + d * k_strides[3]]) : 0.0f;
            r_n[e] = d < DQK ? static_cast<float>(n[n_off + d * n_strides[2]]) : 0.0f;
        }
        #pragma unroll
        for (int e = 0; e < VPT; ++e) {
            const int j = tid + e * NT;
            r_v[e] = j < DV ? static_cast<float>(v[b * v_strides[0] + hd * v_strides[1] + j * v_strides[3]]) : 0.0f;
        }
    };
    fetch(blockIdx.x);

    float fa_h = 0.0f, den = 1.0f, m_h = 0.0f;
    float4 v4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float4 acc = v4, comp = v4;  // the head's column sums, Kahan-compensated over its chunks
    for (int g = 0; g < total; ++g) {
    const int c = g % NC;
    const int bh = static_cast<int>(blockIdx.x) + (g / NC) * static_cast<int>(gridDim.x);
    if (c == 0) {
        // A new head: its gates, q (scaled), k and ia v to shared memory, n' = fa n + ia k, q.n'.
        const int b = bh / NH;
        const int hd = bh % NH;
        const float ig = xl_gate<GT>(r_i, IBIAS, HAS_BIAS, CAP);
        const float fg = xl_gate<GT>(r_f, FBIAS, HAS_BIAS, CAP);
STABILISER
        fa_h = fa;
        m_h = m_new;
        float qn = 0.0f;
        #pragma unroll
        for (int e = 0; e < QPT; ++e) {
            const int d = tid + e * NT;
            if (d < DQK) {
                const float qd = r_q[e] * scale;
                const float nd = fa * r_n[e] + ia * r_k[e];
                qn += qd * nd;
                s_q[d] = qd;
                s_k[d] = r_k[e];
                n_out[static_cast<size_t>(bh) * DQK + d] = static_cast<ST>(nd);
            }
        }
        #pragma unroll
        for (int e = 0; e < VPT; ++e) {
            if (tid + e * NT < DV) s_v[tid + e * NT] = ia * r_v[e];
        }
        fetch(bh + gridDim.x);  // the next head's, in flight while this one streams
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) qn += __shfl_xor_sync(0xffffffffu, qn, o);
        if ((tid & 31) == 0) s_qn[tid >> 5] = qn;
        __syncthreads();
        float qn_all = 0.0f;
        #pragma unroll
        for (int w = 0; w < NW; ++w) qn_all += s_qn[w];
        den = fmaxf(fabsf(qn_all), expf(-m_new)) + EPS;
        v4 = reinterpret_cast<const float4*>(s_v)[tx];
        acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        comp = acc;
    }
    const int s = g % STAGES;
    {   // wait for chunk g's bytes
        const uint32_t bar = full0 + 8 * s;
        const uint32_t parity = (g / STAGES) & 1;
        uint32_t done = 0;
        while (!done) {
            asm volatile("{\\n.reg .pred p;\\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\\nselp.u32 %0, 1, 0, p;\\n}\\n"
                         : "=r"(done) : "r"(bar), "r"(parity) : "memory");
        }
    }
    float4* slot = reinterpret_cast<float4*>(xl_ring + s * CHUNK);
    float4 part = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    #pragma unroll
    for (int r = ty; r < CH; r += RT) {
        const int d = c * CH + r;
        const float kd = s_k[d], qd = s_q[d];
        float4 cv = slot[r * G + tx];
        cv.x = fa_h * cv.x + kd * v4.x; cv.y = fa_h * cv.y + kd * v4.y;
        cv.z = fa_h * cv.z + kd * v4.z; cv.w = fa_h * cv.w + kd * v4.w;
        part.x += qd * cv.x; part.y += qd * cv.y; part.z += qd * cv.z; part.w += qd * cv.w;
        slot[r * G + tx] = cv;
    }
    {   // acc += part, compensated (a head's 256 rows summed by one thread otherwise lose ~2e-5)
        float y, t;
        y = part.x - comp.x; t = acc.x + y; comp.x = (t - acc.x) - y; acc.x = t;
        y = part.y - comp.y; t = acc.y + y; comp.y = (t - acc.y) - y; acc.y = t;
        y = part.z - comp.z; t = acc.z + y; comp.z = (t - acc.z) - y; acc.z = t;
        y = part.w - comp.w; t = acc.w + y; comp.w = (t - acc.w) - y; acc.w = t;
    }
    asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory");  // the bulk store reads what we wrote
    __syncthreads();
    if (tid == 0) {
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\\n"
                     :: "l"(C_out + chunk_off(g)), "r"(ring + s * CHUNK), "r"(CHUNK) : "memory");
        asm volatile("cp.async.bulk.commit_group;\\n" ::: "memory");
        // The slot of chunk g - 1 is free once its store has read it: refill it with g + STAGES - 1.
        asm volatile("cp.async.bulk.wait_group.read 1;\\n" ::: "memory");
        if (g + STAGES - 1 < total) load_chunk(g + STAGES - 1);
    }
    if (c == NC - 1) {
        // The head's h: the column sums of the RT rows of threads, over q.n'.
        const size_t v_off = static_cast<size_t>(bh) * DV;
        if (RT > 1) {
            s_red[ty * DV + 4 * tx] = acc.x; s_red[ty * DV + 4 * tx + 1] = acc.y;
            s_red[ty * DV + 4 * tx + 2] = acc.z; s_red[ty * DV + 4 * tx + 3] = acc.w;
            __syncthreads();
            for (int j = tid; j < DV; j += NT) {
                float num = 0.0f;
                #pragma unroll
                for (int t = 0; t < RT; ++t) num += s_red[t * DV + j];
                h[v_off + j] = static_cast<HT>(num / den);
            }
        } else {
            h[v_off + 4 * tx] = static_cast<HT>(acc.x / den); h[v_off + 4 * tx + 1] = static_cast<HT>(acc.y / den);
            h[v_off + 4 * tx + 2] = static_cast<HT>(acc.z / den); h[v_off + 4 * tx + 3] = static_cast<HT>(acc.w / den);
        }
        if (tid == 0) m_out[bh] = static_cast<ST>(m_h);
        __syncthreads();  // s_red, s_q, s_k, s_v are the next head's from here
    }
    }
    if (tid == 0) asm volatile("cp.async.bulk.wait_group 0;\\n" ::: "memory");
""".replace("STABILISER\n", GATE_STABILISER.replace(
    "static_cast<float>(m[b * m_strides[0] + hd * m_strides[1]])", "r_m") + "\n")
assert "r_m;" in _STEP_GATED_SOURCE_V4  # the stabiliser reads the fetched m

# Layout 3's second kernel: h = (sum of the tiles' q.C') / (max(|sum of their q.n'|, exp(-m')) + eps).
_STEP_FINISH_SOURCE = """
    const int bh = blockIdx.x;
    const float* p = part + static_cast<size_t>(bh) * NRT * (DV + 1);
    float qn = 0.0f;
    #pragma unroll
    for (int t = 0; t < NRT; ++t) qn += p[t * (DV + 1) + DV];
    const float den = fmaxf(fabsf(qn), expf(-m_f32[bh])) + EPS;
    for (int col = threadIdx.x; col < DV; col += blockDim.x) {
        float num = 0.0f;
        #pragma unroll
        for (int t = 0; t < NRT; ++t) num += p[t * (DV + 1) + col];
        h[static_cast<size_t>(bh) * DV + col] = static_cast<HT>(num / den);
    }
"""

# With the gate projections' product inside (quantized models keep those in float, one more
# matmul launch per block otherwise): i~, f~ = x . W_if[hd], x . W_if[NH + hd], summed in float32
# and rounded to GT as the matmul's output; x [B, 1, E] and W_if [2 NH, E] row-contiguous.
_INPROJ_PROLOGUE = """
    float pi = 0.0f, pf = 0.0f;
    {
        // x [B, 1, E] and w [2 NH, E] as they are (any strides: no copy node before the launch);
        // 16-byte loads where both are dense and aligned (the decode chain's normed x and fused
        // gate weight), then one shuffle reduction per warp and one exchange between the warps.
        const int64_t xb = b * x_strides[0];
        const int64_t wi = hd * w_strides[0];
        const int64_t wf = (NH + hd) * w_strides[0];
        constexpr int VEC = 16 / sizeof(GT);
        const bool dense = x_strides[2] == 1 && w_strides[1] == 1 && E % VEC == 0
            && ((reinterpret_cast<uintptr_t>(x + xb) | reinterpret_cast<uintptr_t>(w + wi)
                 | reinterpret_cast<uintptr_t>(w + wf)) & 15) == 0;
        if (dense) {
            const uint4* xv = reinterpret_cast<const uint4*>(x + xb);
            const uint4* iv = reinterpret_cast<const uint4*>(w + wi);
            const uint4* fv = reinterpret_cast<const uint4*>(w + wf);
            for (int c = tid; c < E / VEC; c += NT) {
                const uint4 xu = xv[c], iu = iv[c], fu = fv[c];
                const GT* x8 = reinterpret_cast<const GT*>(&xu);
                const GT* i8 = reinterpret_cast<const GT*>(&iu);
                const GT* f8 = reinterpret_cast<const GT*>(&fu);
                #pragma unroll
                for (int u = 0; u < VEC; ++u) {
                    const float xe = static_cast<float>(x8[u]);
                    pi += xe * static_cast<float>(i8[u]);
                    pf += xe * static_cast<float>(f8[u]);
                }
            }
        } else {
            for (int e = tid; e < E; e += NT) {
                const float xe = static_cast<float>(x[xb + e * x_strides[2]]);
                pi += xe * static_cast<float>(w[wi + e * w_strides[1]]);
                pf += xe * static_cast<float>(w[wf + e * w_strides[1]]);
            }
        }
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            pi += __shfl_xor_sync(0xffffffffu, pi, o);
            pf += __shfl_xor_sync(0xffffffffu, pf, o);
        }
        constexpr int NWP = NT / 32;  // NT is a multiple of 32
        if ((tid & 31) == 0) {
            s_red[2 * (tid >> 5)] = pi;
            s_red[2 * (tid >> 5) + 1] = pf;
        }
        __syncthreads();
        float si = 0.0f, sf = 0.0f;
        #pragma unroll
        for (int w8 = 0; w8 < NWP; ++w8) {
            si += s_red[2 * w8];
            sf += s_red[2 * w8 + 1];
        }
        pi = xl_round<GT>(si);
        pf = xl_round<GT>(sf);
        __syncthreads();
    }
"""

_step_kernels: dict[tuple, object] = {}

# Which layout of the gated step kernel runs: 1 (the first, ``_STEP_GATED_SOURCE``), 2
# (``_STEP_GATED_SOURCE_V2``, the default: faster than 1 at batch 1, 16 and 64 on an H200, S6R2
# and S6R3) or 3 (``_STEP_GATED_SOURCE_V3``, row tiles: slower than 2 in S6R3);
# ``XLSTM_METAL_STEP_KERNEL`` picks it, for comparisons.
_step_version = int(os.environ.get("XLSTM_METAL_STEP_KERNEL", "2"))
if _step_version not in (1, 2, 3, 4):
    raise ValueError(f"XLSTM_METAL_STEP_KERNEL must be 1, 2, 3 or 4, got {_step_version}")
#: Streaming cache hints on the state's loads and stores in layout 2 (it is not reused in a step).
_STREAM_HINTS = True
#: Layout 2's threads along the value columns (4, 8, 16, 32, 64 or 128 with 16-byte columns; 128
#: covers the 7B heads' whole 512-column rows, so a block walks a head's state contiguously) or
#: None for the choice of :func:`_v2_tile`; a benchmark knob.
_V2_TX: int | None = None
#: Layout 2's most rows per thread in flight at once (registers: 4 V per row); a benchmark knob.
_V2_RB = 8
#: Layout 3's rows per tile (a multiple of 8 warps x its rows in flight) and each warp's rows in
#: flight at once (DV / 128 16-byte loads per lane and row); benchmark knobs.
_V3_ROWS = 32
_V3_RB = 1  # 78 registers (3 blocks of 256 per SM); 2 rows take 86 (2 blocks)
#: Layout 2's blocks per SM when its grid is capped (persistent blocks, each taking several tiles),
#: or None for one block per tile; a benchmark knob.
_V2_BLOCKS_PER_SM: int | None = None
_SMS = 132  # enough blocks for an H100/H200's streaming multiprocessors at every batch
#: Layout 4's rows per chunk (None: the most, a power of 2 dividing DQK, within 32 KB), chunks in
#: its ring, and blocks per SM (None: as many as fit beside each other, at most 2); benchmark knobs.
_V4_CH: int | None = None
_V4_STAGES = 3
_V4_BLOCKS_PER_SM: int | None = None
#: Shared memory a block may hold on an H100/H200 (227 KB) and an SM (228 KB; 1 KB per block reserved).
_SMEM_BLOCK, _SMEM_SM = 227 * 1024, 228 * 1024


def step_kernel_version() -> int:
    """Which layout of :func:`mlstm_step_gated`'s CUDA kernel runs (1, 2, 3 or 4)."""
    return _step_version


def set_step_kernel_version(version: int) -> None:
    """Pick the layout of the gated step kernel (1, 2, 3 or 4) for functions traced from now on."""
    global _step_version
    if version not in (1, 2, 3, 4):
        raise ValueError(f"step kernel version must be 1, 2, 3 or 4, got {version}")
    _step_version = version


def _v4_launch(batch_heads: int, dqk: int, dv: int) -> tuple[int, int, int, int, int] | None:
    """Layout 4's (CH, STAGES, RT, blocks, dynamic shared bytes) for B * NH heads, or None where it
    does not apply (DV a multiple of 4 up to 1024, and RT rows of DV / 4 threads, one per 16-byte
    column group, making whole warps within 256 threads). CH rows per chunk: :data:`_V4_CH` or the
    most (a power of 2 dividing DQK) within 32 KB; blocks: :data:`_V4_BLOCKS_PER_SM` (or as many as
    fit, at most 2) per SM, no more than there are heads."""
    if dv % 4 or dv > 1024:
        return None
    g = dv // 4
    # RT rows of threads: the most that keep NT = g RT <= 256 a whole number of warps
    rt = next((r for r in range(256 // g, 0, -1) if g * r % 32 == 0), None)
    if rt is None:
        return None
    ch = _V4_CH
    if ch is None:
        ch = dqk & -dqk  # the largest power of 2 dividing DQK
        while ch > 1 and ch * dv * 4 > 32 * 1024:
            ch //= 2
    if dqk % ch:
        return None
    dyn = _V4_STAGES * ch * dv * 4
    static = 4 * (2 * dqk + dv + (rt * dv if rt > 1 else 1) + 8) + 8 * _V4_STAGES + 64
    if dyn + static > _SMEM_BLOCK:
        return None
    per_sm = _V4_BLOCKS_PER_SM or max(1, min(2, _SMEM_SM // (dyn + static + 1024)))
    return ch, _V4_STAGES, rt, min(batch_heads, per_sm * _SMS), dyn


def _v2_tile(batch_heads: int, dqk: int, dv: int) -> tuple[int, int, int, int]:
    """Layout 2's (TX, TD, V, RB) for B * NH heads: 256 threads, V = 4 (16-byte state accesses)
    where DV allows; TX the widest of 16, 8, 4 threads along the columns (64, 32, 16 columns per
    tile) that still gives two tiles per SM, else 4; TD rows of threads (no more than DQK needs)
    and RB rows per thread in flight at once. On an H200, the kernel alone (S6R1, S6R2), 16
    column-threads were fastest at batch 16 and 64, 8 rows in flight at 16 (4 equal at 64), and
    persistent blocks gained nothing."""
    vec = 4 if dv % 4 == 0 else 1
    if vec == 1:
        tx = 32
    elif _V2_TX is not None:
        tx = _V2_TX
    else:
        fits = [t for t in (16, 8, 4) if t * vec <= max(dv, 16)]
        tx = next((t for t in fits if batch_heads * -(-dv // (t * vec)) >= 2 * _SMS), fits[-1])
    td_needed = 1 << max(dqk - 1, 0).bit_length()  # DQK rounded up to a power of 2
    td = min(256 // tx, max(32 // tx, td_needed))
    rows = -(-dqk // td)
    return tx, td, vec, min(_V2_RB, rows)


# The packed form (:func:`mlstm_step_gated_packed`): q, k, v (and raw gates) are columns of one
# input y [B, 1, W] (the fused q|k|v|o(|i|f) product as it comes out of its kernel), at the
# template offsets QOFF, KOFF, VOFF (IOFF, FOFF): the layouts' reads of q, k, v become reads of y.
_PACKED_HEAD = """
    const auto* q = y + QOFF;
    const auto* k = y + KOFF;
    const auto* v = y + VOFF;
"""
_PACKED_STRIDES = (("q_shape[0]", "y_shape[0]"), ("q_strides[0]", "y_strides[0]"), ("q_strides[1]", "DQK"),
                   ("q_strides[3]", "1"), ("k_strides[0]", "y_strides[0]"), ("k_strides[1]", "DQK"),
                   ("k_strides[3]", "1"), ("v_strides[0]", "y_strides[0]"), ("v_strides[1]", "DV"),
                   ("v_strides[3]", "1"))


def step_source(eps: float, cap: float, has_bias: bool, inproj: bool, version: int, packed: bool = False) -> str:
    """The gated step kernel's body for these settings (layout ``version``; ``packed``: q, k, v
    and the raw gates read as columns of ``y``); :mod:`.decode_chain` runs layout 2's as a phase
    of its one-launch block."""
    source = {1: _STEP_GATED_SOURCE, 2: _STEP_GATED_SOURCE_V2, 3: _STEP_GATED_SOURCE_V3,
              4: _STEP_GATED_SOURCE_V4}[version]
    return fill_step_source(source, eps, cap, has_bias, inproj, packed)


def fill_step_source(source: str, eps: float, cap: float, has_bias: bool, inproj: bool = False,
                     packed: bool = False) -> str:
    """A step kernel's body with its placeholders filled: EPS, CAP, HAS_BIAS, the gate biases'
    and raw gates' reads (IBIAS, FBIAS, IRAW, FRAW), INPROJ_PROLOGUE and the packed form's reads."""
    source = source.replace("EPS", f"{float(eps)!r}f").replace("CAP", f"{float(cap)!r}f")
    source = source.replace("HAS_BIAS", "true" if has_bias else "false")
    for name, bias in (("IBIAS", "ib"), ("FBIAS", "fb")):
        read = f"static_cast<float>({bias}[hd * {bias}_strides[0]])" if has_bias else "0.0f"
        source = source.replace(name, read)
    source = source.replace("INPROJ_PROLOGUE", _INPROJ_PROLOGUE if inproj else "")
    for name, gate, value in (("IRAW", "i", "pi"), ("FRAW", "f", "pf")):
        if inproj:
            read = value
        elif packed:
            read = f"static_cast<float>(y[b * y_strides[0] + {gate.upper()}OFF + hd])"
        else:
            read = f"static_cast<float>({gate}[b * {gate}_strides[0] + hd * {gate}_strides[1]])"
        source = source.replace(name, read)
    if packed:
        for old, new in _PACKED_STRIDES:
            source = source.replace(old, new)
        source = _PACKED_HEAD + source
    return source


def _step_kernel(eps: float, cap: float, has_bias: bool, inproj: bool, version: int, packed: bool = False,
                 shared: int = 0):
    key = (eps, cap, has_bias, inproj, version, packed, shared)
    kernel = _step_kernels.get(key)
    if kernel is None:
        source = step_source(eps, cap, has_bias, inproj, version, packed)
        heads = ["y"] if packed else ["q", "k", "v"]
        gates = ["x", "w"] if inproj else ([] if packed else ["i", "f"])
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_mlstm_step_gated{'' if version == 1 else f'_v{version}'}{'_packed' if packed else ''}"
            f"_{len(_step_kernels)}",
            input_names=heads + gates + (["ib", "fb"] if has_bias else []) + ["C", "n", "m"],
            output_names=["part", "C_out", "n_out", "m_out", "m_f32"] if version == 3
            else ["h", "C_out", "n_out", "m_out"],
            source=compact_source(source),  # the host hashes it at every launch
            header=compact_source(_GATE_HEADER),
            ensure_row_contiguous=False,
            shared_memory=shared,
        )
        _step_kernels[key] = kernel
    return kernel


_finish_kernels: dict[float, object] = {}


def _finish_kernel(eps: float):
    kernel = _finish_kernels.get(eps)
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_mlstm_step_finish_{len(_finish_kernels)}", input_names=["part", "m_f32"],
            output_names=["h"], source=compact_source(_STEP_FINISH_SOURCE.replace("EPS", f"{float(eps)!r}f")))
        _finish_kernels[eps] = kernel
    return kernel


def _v3_rows(dqk: int, dv: int) -> int | None:
    """Layout 3's rows per tile for these heads, or None where it does not apply (DV a multiple
    of 128 up to 1024: whole rows per warp in 16-byte groups; DQK a multiple of the tile)."""
    rows = _V3_ROWS
    return rows if dv % 128 == 0 and dv <= 1024 and dqk % rows == 0 and rows % (8 * _V3_RB) == 0 else None


def gate_preactivation(raw: mx.array, bias: mx.array | None, cap: float | None) -> mx.array:
    """The reference gate math, as the projection cell: ``cap * tanh((raw + bias) / cap)`` for
    raw [B, NH, S] and bias [NH] (or None)."""
    return soft_cap(raw if bias is None else raw + bias[:, None], cap)


def gate_product_in_kernel(x: mx.array) -> bool:
    """Whether :func:`mlstm_step_gated` takes the gate projections' product for input ``x``
    [B, 1, E] itself (CUDA, at most 4 rows: each block of a head repeats the two dot products)."""
    return _kernels_on() and x.shape[0] <= 4 and x.shape[1] == 1


def mlstm_step_gated(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    i_raw: mx.array | None,
    f_raw: mx.array | None,
    i_bias: mx.array | None,
    f_bias: mx.array | None,
    state: MLSTMState | None = None,
    *,
    gate_soft_cap: float | None = 15.0,
    eps: float = 1e-6,
    state_dtype: mx.Dtype | None = mx.float32,
    x: mx.array | None = None,
    w_if: mx.array | None = None,
) -> tuple[mx.array, MLSTMState]:
    """One mLSTM step from raw gate projections: :func:`xlstm_metal.kernels.mlstm.mlstm_step` of
    ``gate_preactivation(i_raw, i_bias, cap)`` and the same for f.

    q, k [B, NH, 1, DQK]; v [B, NH, 1, DV]; i_raw, f_raw [B, NH, 1] (any strides); i_bias, f_bias
    [NH] or None (both or neither, same dtype as the raw gates); state (C, n, m) or None.
    Or, in place of i_raw and f_raw, x [B, 1, E] and w_if [2 NH, E]: the raw gates are
    ``x @ w_if.T`` (i's rows first), computed inside the kernel.
    Returns h [B, NH, 1, DV] (q's dtype) and the new state in ``state_dtype``.
    """
    if (i_bias is None) != (f_bias is None):
        raise ValueError("mlstm_step_gated: give both gate biases or neither")
    if (w_if is None) == (i_raw is None and f_raw is None) or (w_if is not None and x is None):
        raise ValueError("mlstm_step_gated: give i_raw and f_raw, or x and w_if")
    B, NH, _, dqk = q.shape
    inproj = w_if is not None
    gate_dtype = x.dtype if inproj else i_raw.dtype
    fused = q.shape[2] == 1 and _step_fuses(B, NH, x, w_if, gate_dtype, i_raw, f_raw, i_bias, f_bias)
    deferred = is_deferred(state)  # (C, n, m) with its last steps' terms apart (see mlstm_step_deferred)
    if inproj and (not fused or deferred):  # the deferred kernel reads raw gates
        y = x @ w_if.T  # [B, 1, 2 NH]
        i_raw, f_raw = y[..., :NH].transpose(0, 2, 1), y[..., NH:].transpose(0, 2, 1)
        inproj = False
    if deferred and fused:
        from .step_deferred import deferred_kernel_applies, mlstm_step_gated_deferred  # noqa: PLC0415 (imports this)

        if deferred_kernel_applies(state):
            return mlstm_step_gated_deferred(q, k, v, i_raw, f_raw, i_bias, f_bias, state,
                                             gate_soft_cap=gate_soft_cap, eps=eps, state_dtype=state_dtype)
        fused = False
    if not fused:
        i = gate_preactivation(i_raw, i_bias, gate_soft_cap)
        f = gate_preactivation(f_raw, f_bias, gate_soft_cap)
        step = mlstm_step_deferred if deferred else mlstm_step
        return step(q, k, v, i, f, state, eps=eps, state_dtype=state_dtype)
    gates = [x, w_if] if inproj else [i_raw, f_raw]
    return _step_launch([q, k, v], [], gates, inproj, i_bias, f_bias, state, B, NH, dqk, v.shape[-1], q.dtype,
                        gate_dtype, gate_soft_cap, eps, state_dtype)


def _step_fuses(B: int, NH: int, x, w_if, gate_dtype, i_raw, f_raw, i_bias, f_bias) -> bool:
    """Whether the gated step's CUDA kernel takes these gates (one token)."""
    inproj = w_if is not None
    return (
        _kernels_on()
        and (not inproj or (w_if.dtype == x.dtype and w_if.shape == (2 * NH, x.shape[-1])
                            and x.shape == (B, 1, x.shape[-1])))
        and (inproj or i_raw.dtype == f_raw.dtype)
        and (i_bias is None or (i_bias.dtype == gate_dtype and f_bias.dtype == gate_dtype))
    )


def _step_launch(heads, packed_template, gates, inproj, i_bias, f_bias, state, B, NH, dqk, dv, h_dtype, gate_dtype,
                 gate_soft_cap, eps, state_dtype):
    """Launch the gated step kernel: ``heads`` [q, k, v], or [y] with ``packed_template`` the
    column offsets of the packed form; ``gates`` [x, w_if] (the product inside) or the raw gates
    ([] when packed in y)."""
    packed = bool(packed_template)
    has_bias = i_bias is not None
    out_dtype = state_dtype or mx.float32
    if state is None:
        state = zero_state(B, NH, dqk, dv, out_dtype)
    C, n, m = state
    # The kernel indexes C as row-contiguous (a no-op for the kernel's own output and for zeros).
    C = mx.contiguous(C)
    version = _step_version
    load4 = dv % 4 == 0 and C.dtype == mx.float32 and out_dtype == mx.float32
    cap = float(gate_soft_cap) if gate_soft_cap is not None else 0.0
    inputs = heads + gates + ([i_bias, f_bias] if has_bias else []) + [C, n, m]
    template = [("HT", h_dtype), ("ST", out_dtype), ("GT", gate_dtype), ("NH", NH), ("DQK", dqk), ("DV", dv)]
    template += packed_template
    rows = _v3_rows(dqk, dv)
    if version == 3 and load4 and not inproj and rows and B * NH * (dqk // rows) >= 2 * _SMS:
        # Row tiles, then the kernel that adds up their partial sums (see _STEP_GATED_SOURCE_V3).
        tiles = B * NH * (dqk // rows)
        part, C_new, n_new, m_new, m_f32 = _step_kernel(eps, cap, has_bias, inproj, 3, packed)(
            inputs=inputs, template=template + [("R", rows), ("RB", _V3_RB)],
            grid=(tiles * 256, 1, 1), threadgroup=(256, 1, 1),
            output_shapes=[(B * NH, dqk // rows, dv + 1), (B, NH, dqk, dv), (B, NH, dqk), (B, NH, 1), (B * NH,)],
            output_dtypes=[mx.float32, out_dtype, out_dtype, out_dtype, mx.float32],
        )
        (h,) = _finish_kernel(eps)(
            inputs=[part, m_f32], template=[("HT", h_dtype), ("DV", dv), ("NRT", dqk // rows)],
            grid=(B * NH * 128, 1, 1), threadgroup=(128, 1, 1),
            output_shapes=[(B, NH, 1, dv)], output_dtypes=[h_dtype],
        )
        return h, (C_new, n_new, m_new)
    v4 = _v4_launch(B * NH, dqk, dv) if version == 4 and load4 and not inproj else None
    if v4 is not None:
        # Whole heads streamed through shared memory by bulk copies (see _STEP_GATED_SOURCE_V4).
        ch, stages, rt, blocks, dyn = v4
        h, C_new, n_new, m_new = _step_kernel(eps, cap, has_bias, inproj, 4, packed, shared=dyn)(
            inputs=inputs, template=template + [("CH", ch), ("STAGES", stages), ("RT", rt)],
            grid=(blocks * rt * (dv // 4), 1, 1), threadgroup=(rt * (dv // 4), 1, 1),
            output_shapes=[(B, NH, 1, dv), (B, NH, dqk, dv), (B, NH, dqk), (B, NH, 1)],
            output_dtypes=[h_dtype, out_dtype, out_dtype, out_dtype],
        )
        return h, (C_new, n_new, m_new)
    if version in (3, 4):
        version = 2  # layout 4 needs a float32 state, DV a multiple of 4 up to 1024, the raw gates;
        # row tiles need a float32 state, whole 128-column groups, the raw gates, and
        # two tiles per SM (at batch 1 the 7B heads make 64)
    if version == 2:
        tx, td, vec, rb = _v2_tile(B * NH, dqk, dv)
        extra = [("RB", rb), ("STREAM", _STREAM_HINTS)]
        tiles = B * NH * -(-dv // (tx * vec))
        blocks = tiles if _V2_BLOCKS_PER_SM is None else min(tiles, _SMS * _V2_BLOCKS_PER_SM)
        grid = (blocks * tx, td, 1)
    else:
        vec = 4 if dv % 4 == 0 else 1
        tx = 32 // vec  # 32 value columns per block
        td = 32 if vec == 4 else 8
        extra = []
        grid = (-(-dv // (tx * vec)) * tx, td, B * NH)
    h, C_new, n_new, m_new = _step_kernel(eps, cap, has_bias, inproj, version, packed)(
        inputs=inputs,
        template=template + [("TX", tx), ("TD", td), ("V", vec), ("E", gates[0].shape[-1] if inproj else 0),
                             ("LOAD4", vec == 4 and load4)] + extra,
        grid=grid,
        threadgroup=(tx, td, 1),
        output_shapes=[(B, NH, 1, dv), (B, NH, dqk, dv), (B, NH, dqk), (B, NH, 1)],
        output_dtypes=[h_dtype, out_dtype, out_dtype, out_dtype],
    )
    return h, (C_new, n_new, m_new)


def mlstm_step_gated_packed(
    y: mx.array,
    columns: tuple[int, ...],
    num_heads: int,
    i_bias: mx.array | None,
    f_bias: mx.array | None,
    state: MLSTMState | None = None,
    *,
    gate_soft_cap: float | None = 15.0,
    eps: float = 1e-6,
    state_dtype: mx.Dtype | None = mx.float32,
    x: mx.array | None = None,
    w_if: mx.array | None = None,
) -> tuple[mx.array, MLSTMState]:
    """:func:`mlstm_step_gated` on q, k, v (and the raw gates) packed as columns of one array, as
    the fused q|k|v|o(|i|f) product writes them: the kernel reads them there, so the step's graph
    holds no slices or reshapes of the product (each is a node MLX's host walks per step).

    y [B, 1, W]; ``columns`` (q, k, v start, v end[, i start, f start]): q [q, k), k [k, v),
    v [v, v end), each NH heads wide, i~ and f~ NH columns each; or, without the gate columns,
    x [B, 1, E] and w_if [2 NH, E] as in :func:`mlstm_step_gated`. Returns h [B, NH, 1, DV] and
    the new state. Where the kernel does not apply: slices of y through :func:`mlstm_step_gated`.
    """
    if len(columns) not in (4, 6):
        raise ValueError(f"mlstm_step_gated_packed: columns are (q, k, v, v end[, i, f]), got {columns}")
    if (len(columns) == 6) == (w_if is not None):
        raise ValueError("mlstm_step_gated_packed: give the gate columns, or x and w_if")
    if (i_bias is None) != (f_bias is None):
        raise ValueError("mlstm_step_gated: give both gate biases or neither")
    B, NH = y.shape[0], num_heads
    q0, k0, v0, v1 = columns[:4]
    dqk, dv = (k0 - q0) // NH, (v1 - v0) // NH
    if min(dqk, dv) <= 0 or (k0 - q0) != dqk * NH or (v0 - k0) != dqk * NH or (v1 - v0) != dv * NH:
        raise ValueError(f"mlstm_step_gated_packed: columns {columns} are not q, k, v of {NH} heads")
    gate_dtype = y.dtype if w_if is None else x.dtype
    fuses = y.ndim == 3 and y.shape[1] == 1 and _step_fuses(B, NH, x, w_if, gate_dtype, y, y, i_bias, f_bias)
    if fuses and is_deferred(state) and w_if is None:  # the deferred kernel reads raw gates (here: columns of y)
        from .step_deferred import deferred_kernel_applies, mlstm_step_gated_deferred_packed  # noqa: PLC0415

        if deferred_kernel_applies(state):
            return mlstm_step_gated_deferred_packed(y, columns, NH, i_bias, f_bias, state, gate_soft_cap=gate_soft_cap,
                                                    eps=eps, state_dtype=state_dtype)
    if fuses and not is_deferred(state):
        offsets = [("QOFF", q0), ("KOFF", k0), ("VOFF", v0)]
        if w_if is None:
            offsets += [("IOFF", columns[4]), ("FOFF", columns[5])]
        gates = [x, w_if] if w_if is not None else []
        return _step_launch([y], offsets, gates, w_if is not None, i_bias, f_bias, state, B, NH, dqk, dv, y.dtype,
                            gate_dtype, gate_soft_cap, eps, state_dtype)
    if w_if is None and not is_deferred(state) and y.ndim == 3 and y.shape[1] == 1:
        return _step_packed_ops(y, columns, NH, i_bias, f_bias, state, gate_soft_cap, eps, state_dtype)
    q, k, v, i_raw, f_raw = unpack_step_columns(y, columns, NH)
    return mlstm_step_gated(q, k, v, i_raw, f_raw, i_bias, f_bias, state, gate_soft_cap=gate_soft_cap, eps=eps,
                            state_dtype=state_dtype, x=x, w_if=w_if)


def _step_packed_ops(y, columns, NH, i_bias, f_bias, state, gate_soft_cap, eps, state_dtype):
    """:func:`mlstm_step_gated_packed` in MLX ops (CPUs, Metal): the math of
    :func:`~xlstm_metal.kernels.mlstm.mlstm_step` after :func:`gate_preactivation`, with as few
    graph nodes as the ops allow (MLX's CPU backend spends ~5 us of host and stream time per node
    of a step: one split of y, its pieces reshaped straight to the shapes the products and
    broadcasts take, h [B, NH, 1, DV] from one matmul without squeezes). Same result to float32
    round-off."""
    B, W = y.shape[0], y.shape[-1]
    q0, k0, v0, v1, i0, f0 = columns
    dqk, dv = (k0 - q0) // NH, (v1 - v0) // NH
    pieces = mx.split(y.reshape(B, W), [q0, k0, v0, v1, i0, f0, f0 + NH], axis=-1)
    q, k, v, i_raw, f_raw = pieces[1], pieces[2], pieces[3], pieces[5], pieces[6]
    f32 = mx.float32
    if state is None:
        C = mx.zeros((B, NH, dqk, dv), f32)
        n = mx.zeros((B, NH, 1, dqk), f32)
        m = mx.zeros((B, NH, 1, 1), f32)
    else:
        C = state[0].astype(f32)
        n = state[1].astype(f32).reshape(B, NH, 1, dqk)
        m = state[2].astype(f32).reshape(B, NH, 1, 1)
    i = i_raw.reshape(B, NH, 1, 1)
    f = f_raw.reshape(B, NH, 1, 1)
    if i_bias is not None:
        i, f = i + i_bias.reshape(1, NH, 1, 1), f + f_bias.reshape(1, NH, 1, 1)
    i = soft_cap(i, gate_soft_cap).astype(f32)
    lf = log_sigmoid(soft_cap(f, gate_soft_cap).astype(f32))
    m_new = mx.maximum(lf + m, i)
    f_act = mx.exp(lf + m - m_new)
    i_act = mx.exp(i - m_new)
    k_row = k.reshape(B, NH, 1, dqk).astype(f32)
    C = f_act * C + i_act * (k_row.swapaxes(-1, -2) * v.reshape(B, NH, 1, dv).astype(f32))
    n = f_act * n + i_act * k_row
    qs = q.reshape(B, NH, 1, dqk).astype(f32) * (dqk**-0.5)
    num = qs @ C  # [B, NH, 1, DV]
    qn = mx.sum(qs * n, axis=-1, keepdims=True)  # [B, NH, 1, 1]
    h = num / (mx.maximum(mx.abs(qn), mx.exp(-m_new)) + eps)
    out = state_dtype or f32
    return h.astype(y.dtype), (C.astype(out), n.reshape(B, NH, dqk).astype(out), m_new.reshape(B, NH, 1).astype(out))


def unpack_step_columns(y: mx.array, columns: tuple[int, ...], num_heads: int):
    """The slices of :func:`mlstm_step_gated_packed`'s y: q, k [B, NH, 1, DQK], v [B, NH, 1, DV]
    and i~, f~ [B, NH, 1] (None without the gate columns)."""
    B, NH = y.shape[0], num_heads
    q, k, v = (y[..., a:z].reshape(B, NH, 1, -1) for a, z in zip(columns[:3], columns[1:4]))
    i_raw = f_raw = None
    if len(columns) == 6:  # [B, 1, NH] -> [B, NH, 1]
        i_raw, f_raw = (y[..., c: c + NH].reshape(B, NH, 1) for c in columns[4:])
    return q, k, v, i_raw, f_raw


# --------------------------------------------------------------------------- output epilogue
_REDUCE_HEADER = """
// Sum over the thread block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float xl_block_sum(float v, float* s_warp) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  float t = lane < warps ? s_warp[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}
"""

_NORM_GATE_SOURCE = """
    // One block per (token, head): LayerNorm over the head's DV values of h (float32, biased
    // variance, no bias), rounded to T, times the norm weight (in T), times sigmoid(o~) (in T),
    // as MultiHeadLayerNorm and the output cell compute it.
    constexpr int MAXV = (DV + NTHREADS - 1) / NTHREADS;
    __shared__ float s_warp[32];
    const int S = h_shape[2];
    const int hd = blockIdx.y;
    const int b = blockIdx.x / S;
    const int t = blockIdx.x % S;
    const int64_t h_off = b * h_strides[0] + hd * h_strides[1] + t * h_strides[2];
    const int64_t o_off = b * o_strides[0] + t * o_strides[1];
    const size_t out_off = static_cast<size_t>(blockIdx.x) * NH * DV;
    float xs[MAXV];
    float sum = 0.0f;
    #pragma unroll
    for (int r = 0; r < MAXV; ++r) {
        const int j = threadIdx.x + r * NTHREADS;
        xs[r] = j < DV ? static_cast<float>(h[h_off + j * h_strides[3]]) : 0.0f;
        sum += xs[r];
    }
    const float mean = xl_block_sum(sum, s_warp) / DV;
    float sq = 0.0f;
    #pragma unroll
    for (int r = 0; r < MAXV; ++r) {
        const int j = threadIdx.x + r * NTHREADS;
        const float d = xs[r] - mean;
        sq += j < DV ? d * d : 0.0f;
    }
    const float rstd = rsqrtf(xl_block_sum(sq, s_warp) / DV + EPS);
    #pragma unroll
    for (int r = 0; r < MAXV; ++r) {
        const int j = threadIdx.x + r * NTHREADS;
        if (j < DV) {
            const int col = hd * DV + j;
            const float normed = static_cast<float>(static_cast<T>((xs[r] - mean) * rstd));
            const float scaled = static_cast<float>(static_cast<T>(normed * static_cast<float>(w[col * w_strides[0]])));
            const float og = static_cast<float>(o[o_off + col * o_strides[2]]);
            const float gate = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-og))));
            out[out_off + col] = static_cast<T>(gate * scaled);
        }
    }
"""

_norm_gate_kernels: dict[float, object] = {}


def _norm_gate_kernel(eps: float):
    kernel = _norm_gate_kernels.get(eps)
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_output_norm_gate_{len(_norm_gate_kernels)}",
            input_names=["h", "o", "w"],
            output_names=["out"],
            source=_NORM_GATE_SOURCE.replace("EPS", f"{float(eps)!r}f"),
            header=_REDUCE_HEADER,
            ensure_row_contiguous=False,
        )
        _norm_gate_kernels[eps] = kernel
    return kernel


def output_norm_gate(h: mx.array, o_preact: mx.array, norm: nn.Module) -> mx.array:
    """h [B, NH, S, DV], o~ [B, S, NH * DV] (any strides), ``norm`` the layer's
    :class:`~xlstm_metal.cells.norms.MultiHeadLayerNorm` -> ``sigmoid(o~) * norm(h)``
    [B, S, NH * DV] in h's dtype, as :class:`~xlstm_metal.cells.mlstm.mLSTMOutputCell` computes it;
    one launch on CUDA when h, o~ and the norm weight share a dtype, otherwise (and off CUDA, or
    for any other norm module) the reference ops. No gradient: for inference."""
    B, NH, S, DV = h.shape
    weight = norm.get("weight") if isinstance(norm, nn.Module) else None
    if not (_kernels_on() and type(norm) is MultiHeadLayerNorm and o_preact.dtype == h.dtype
            and weight.dtype == h.dtype and o_preact.shape == (B, S, NH * DV) and weight.shape == (NH * DV,)):
        return sigmoid(o_preact) * norm(h.transpose(0, 2, 1, 3))
    if S > 1 and norm_gate_rows_supported(h, weight):  # prompts: a warp per row (norm_rows.py)
        return norm_gate_rows(h, o_preact, weight, norm.eps)
    threads = min(1024, max(32, 32 * -(-min(DV, 256) // 32)))
    (out,) = _norm_gate_kernel(norm.eps)(
        inputs=[h, o_preact, weight],
        template=[("T", h.dtype), ("NH", NH), ("DV", DV), ("NTHREADS", threads)],
        grid=(B * S * threads, NH, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, S, NH * DV)],
        output_dtypes=[h.dtype],
    )
    return out


# ------------------------------------------------------------------------ residual + RMSNorm
_ADD_NORM_SOURCE = """
    // One block per row: s = x + y (in ST), then rms_norm(s) * w as MLX's fast.rms_norm computes
    // it (float32 sum of squares, s * rsqrt(mean + eps) rounded to ST, times w, rounded to T).
    // ST == T, or ST float32 (a float32 residual stream under T weights: RMSNorm's float32 path).
    constexpr int MAXV = (E + NTHREADS - 1) / NTHREADS;
    __shared__ float s_warp[32];
    const size_t row = blockIdx.x;
    const size_t base = row * E;
    float xs[MAXV];
    float sq = 0.0f;
    #pragma unroll
    for (int r = 0; r < MAXV; ++r) {
        const int j = threadIdx.x + r * NTHREADS;
        if (j < E) {
            const ST s = static_cast<ST>(static_cast<float>(x[base + j]) + static_cast<float>(y[base + j]));
            sum_out[base + j] = s;
            xs[r] = static_cast<float>(s);
            sq += xs[r] * xs[r];
        } else {
            xs[r] = 0.0f;
        }
    }
    const float rn = rsqrtf(xl_block_sum(sq, s_warp) / E + EPS);
    #pragma unroll
    for (int r = 0; r < MAXV; ++r) {
        const int j = threadIdx.x + r * NTHREADS;
        if (j < E) {
            const float normed = static_cast<float>(static_cast<ST>(xs[r] * rn));
            norm_out[base + j] = static_cast<T>(normed * static_cast<float>(w[j]));
        }
    }
"""

_add_norm_kernels: dict[float, object] = {}


def _add_norm_kernel(eps: float):
    kernel = _add_norm_kernels.get(eps)
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_add_rms_norm_{len(_add_norm_kernels)}",
            input_names=["x", "y", "w"],
            output_names=["sum_out", "norm_out"],
            source=_ADD_NORM_SOURCE.replace("EPS", f"{float(eps)!r}f"),
            header=_REDUCE_HEADER,
        )
        _add_norm_kernels[eps] = kernel
    return kernel


def add_rms_norm(x: mx.array, y: mx.array, norm: nn.Module) -> tuple[mx.array, mx.array]:
    """x, y [..., E], ``norm`` an :class:`~xlstm_metal.cells.norms.RMSNorm` over E -> (s = x + y,
    norm(s)): a residual add and the pre-norm that reads it, one launch on CUDA when x, y and the
    norm weight share a dtype (then ``norm`` is ``mx.fast.rms_norm(s, weight, eps)``), or when x
    is a float32 residual stream beside y and weight in bf16/float16 (then s is float32 and the
    norm, RMSNorm's float32 path, is rounded once to the weight's dtype); otherwise, and off
    CUDA, or for any other module, the two ops."""
    E = x.shape[-1]
    weight = norm.get("weight") if isinstance(norm, nn.Module) else None
    if not (_kernels_on() and type(norm) is RMSNorm and y.dtype == weight.dtype
            and x.dtype in (weight.dtype, mx.float32)
            and x.shape == y.shape and weight.shape == (E,)
            and weight.dtype in (mx.bfloat16, mx.float16, mx.float32)):
        s = x + y
        normed = norm(s)
        if x.dtype == mx.float32 and isinstance(weight, mx.array) and weight.dtype in (mx.bfloat16, mx.float16):
            normed = normed.astype(weight.dtype)  # as the kernel returns it
        return s, normed
    eps = norm.eps
    if add_rms_norm_rows_supported(x, y, weight):  # prompts: 16-byte accesses (norm_rows.py)
        return add_rms_norm_rows(x, y, weight, eps)
    threads = 1024 if E >= 4096 else max(32, 32 * -(-min(E, 1024) // 32))
    rows = x.size // E
    s, normed = _add_norm_kernel(eps)(
        inputs=[x, y, weight],
        template=[("ST", x.dtype), ("T", weight.dtype), ("E", E), ("NTHREADS", threads)],
        grid=(rows * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, weight.dtype],
    )
    return s, normed
