"""The backward of the fused chunkwise mLSTM as CUDA kernels (``mx.fast.cuda_kernel``), used by
:mod:`.chunkwise_grad`'s vjp where the forward ran the fused kernels (bf16 q, k, v; DQK and DV
multiples of 64; chunks of 16-64 steps). The MLX-ops backward stays beside it as the reference
(``XLSTM_METAL_FUSED_MLSTM_BWD=0`` selects it).

Every stabiliser is held fixed (the chunk-entry m, and each step's m_comb): (C, n, m) stands for
(C e^m, n e^m), so only the eps of the denominator sees a shift of m (relative effect eps / den).
Per chunk c (rows t, s; entering state C_c, n_c, m_c; b the cumulative log forget gate inside
the chunk, i~ the input gate; sc = DQK^-1/2):

- W_ts = exp(b_t - b_s + i~_s - m_comb_t) (s <= t), inter_t = exp(b_t + m_c - m_comb_t),
  S_ts = sc q_t.k_s W_ts, dn_t = inter_t sc q_t.n_c + sum_s S_ts, den_t = max(|dn_t|, e^-m_comb_t) + eps,
  h_t = (inter_t sc q_t C_c + sum_s S_ts v_s) / den_t.
- ``y`` kernel: Y = dH C_c^T (dq's inter-chunk part) and q_t . Y_t = q_t C_c dh_t.
- ``rows`` kernel (one block per chunk): den_t, the denominator's cotangent
  ddn_t = -sign(dn_t) (num_t . dh_t) / den_t^2 (zero where e^-m_comb wins), with
  num_t . dh_t = inter_t sc q_t . Y_t + sum_s S_ts (dh_t . v_s); alpha_t = inter_t sc / den_t,
  beta_t = inter_t sc ddn_t.
- ``reverse`` kernel (the states kernel run backwards, one launch): the cotangent of the state
  leaving each chunk, dC_{c+1}; dC_c = exp(g_c + m_c - m_{c+1}) dC_{c+1} + (alpha q)^T dH,
  dn_c likewise with beta q; the last is the initial state's.
- ``dqdk`` kernel: dP_ts = sc W_ts (dh_t . v_s / den_t + ddn_t);
  dq = dP K + alpha Y + beta n_c; dk = dP^T Q + e (V dC_{c+1}^T + dn_{c+1}),
  e_s = exp(g - b_s + i~_s - m_{c+1}); and per step q.dq and k.dk.
- ``dv`` kernel: dv = (S / den)^T dH + e K dC_{c+1}.
- Gates: with the stabilisers fixed every log weight is F_t - F_s + i~_s (F the cumulative
  log forget gate over the sequence), linear in q_t and in k_s, so dF_t = q_t.dq_t - k_t.dk_t
  (plus <dC_f, C_f> + <dn_f, n_f> at the last step), d i~_t = k_t.dk_t, and the forget gates'
  gradient is the reverse cumulative sum of dF times sigmoid(-f).

Matmuls are bf16 ``mma.sync`` with float32 sums; float32 operands are split into three bf16
terms (float32's precision), as in the forward kernels, so the result equals the ops backward
to float32 round-off.
"""

from __future__ import annotations

import os

import mlx.core as mx

from .chunkwise_fused import _HEADER, _LOADS, _ROWS
from .tensor_cores import kernel_tag

_KS = 32  # columns staged in shared memory per slab
_JT = 64  # value columns per reverse-kernel block

# Shared by the per-chunk kernels: indices, the chunk's gate values and row statistics.
_PRELUDE = """
    constexpr int NW = L / 16;
    constexpr int NT = 32 * NW;
    constexpr int KS = __SLAB__;
    constexpr int PAD = 8;
    const int S = q_shape[2];
    const int NC = bcum_shape[2];
    const int bh = blockIdx.z;
    const int b = bh / NH;
    const int hd = bh % NH;
    const int c = blockIdx.y;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int tq = lane & 3;
    const int lrow = lane & 7;
    const int ltile = lane >> 3;
    const int rr = warp * 16 + g;
    const float scale = rsqrtf(static_cast<float>(DQK));
    const size_t chunk = static_cast<size_t>(bh) * NC + c;
    const int rows_left = S - c * L;
    const __nv_bfloat16* qb = q + b * q_strides[0] + hd * q_strides[1] + static_cast<int64_t>(c) * L * q_strides[2];
    const __nv_bfloat16* kb = k + b * k_strides[0] + hd * k_strides[1] + static_cast<int64_t>(c) * L * k_strides[2];
    const __nv_bfloat16* db = dh + b * dh_strides[0] + hd * dh_strides[1] + static_cast<int64_t>(c) * L * dh_strides[2];
    const bool q_vec = rows_vectorizable(qb, q_strides);
    const bool k_vec = rows_vectorizable(kb, k_strides);
    const bool d_vec = rows_vectorizable(db, dh_strides);
    __shared__ float bs[L];
    __shared__ float is[L];
    for (int t = tid; t < L; t += NT) {
        bs[t] = bcum[chunk * L + t];
        is[t] = igc[chunk * L + t];
    }
"""

# acc (L x L) += X Z^T over D columns: X rows staged in xs, Z rows in zs (both [L][KS + PAD]).
_ROWS_PRODUCT = """
    for (int d0 = 0; d0 < D_; d0 += KS) {
        stage_rows<L, KS, NT>(xs, XB, XSTR, d0, XVEC, rows_left, tid);
        stage_rows<L, KS, NT>(zs, ZB, ZSTR, d0, ZVEC, rows_left, tid);
        __syncthreads();
        EXTRA
        #pragma unroll
        for (int kk = 0; kk < KS / 16; ++kk) {
            const int e0 = kk * 16 + 2 * tq;
            uint32_t a[4];
            a_frag(a, xs, rr, e0);
            #pragma unroll
            for (int nt = 0; nt < L / 8; ++nt)
                mma_bf16(ACC[nt], a, pack_pair(&zs[nt * 8 + g][e0]), pack_pair(&zs[nt * 8 + g][e0 + 8]));
        }
        __syncthreads();
    }
"""


def _rows_product(acc: str, x: str, z: str, x_vec: str, z_vec: str, x_str: str, z_str: str, depth: str,
                  extra: str = "") -> str:
    return (_ROWS_PRODUCT.replace("ACC", acc).replace("XB", x).replace("ZB", z).replace("XVEC", x_vec)
            .replace("ZVEC", z_vec).replace("XSTR", x_str).replace("ZSTR", z_str).replace("D_", depth)
            .replace("EXTRA", extra))


# acc (L x 64 columns n of M) += X M^T, X rows [L x DV] (bf16, global), M = Mg[n][j] float32
# rows d0..d0+63 (row stride DV), contraction over the DV columns j in slabs.
_ROWS_TIMES_MT = """
    for (int j0 = 0; j0 < DV; j0 += KS) {
        stage_rows<L, KS, NT>(xs, XB, XSTR, j0, XVEC, rows_left, tid);
        stage_splitn<TERMS, 64, KS, NT>(Ms, MG + j0, DV, tid);
        __syncthreads();
        #pragma unroll
        for (int kk = 0; kk < KS / 16; ++kk) {
            const int e0 = kk * 16 + 2 * tq;
            uint32_t a[4];
            a_frag(a, xs, rr, e0);
            #pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                #pragma unroll
                for (int p = 0; p < TERMS; ++p)
                    mma_bf16(ACC[nt], a, pack_pair(&Ms[p][nt * 8 + g][e0]), pack_pair(&Ms[p][nt * 8 + g][e0 + 8]));
            }
        }
        __syncthreads();
    }
"""


def _rows_times_mt(acc: str, x: str, x_vec: str, x_str: str, m: str) -> str:
    return (_ROWS_TIMES_MT.replace("ACC", acc).replace("XB", x).replace("XVEC", x_vec).replace("XSTR", x_str)
            .replace("MG", m))


# acc (L x 64 columns) += A B: A (L x L) float32 in shared memory, read as ASRC(row, col) and
# split into three bf16 terms; B rows [L][64 + PAD] bf16 in shared memory (bt), by ldmatrix.trans.
_SMEM_TIMES_TILE = """
    #pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
        const int t0 = kk * 16 + 2 * tq;
        uint32_t a0[TERMS], a1[TERMS], a2[TERMS], a3[TERMS];
        splitn_pair<TERMS>(ASRC(rr, t0), ASRC(rr, t0 + 1), a0);
        splitn_pair<TERMS>(ASRC(rr + 8, t0), ASRC(rr + 8, t0 + 1), a1);
        splitn_pair<TERMS>(ASRC(rr, t0 + 8), ASRC(rr, t0 + 9), a2);
        splitn_pair<TERMS>(ASRC(rr + 8, t0 + 8), ASRC(rr + 8, t0 + 9), a3);
        #pragma unroll
        for (int np = 0; np < 4; ++np) {
            uint32_t bf[4];
            ldsm_x4_trans(bf, &BT[kk * 16 + (ltile & 1) * 8 + lrow][np * 16 + (ltile >> 1) * 8]);
            #pragma unroll
            for (int p = 0; p < TERMS; ++p) {
                const uint32_t a[4] = {a0[p], a1[p], a2[p], a3[p]};
                mma_bf16(ACC[2 * np], a, bf[0], bf[1]);
                mma_bf16(ACC[2 * np + 1], a, bf[2], bf[3]);
            }
        }
    }
"""


def _smem_times_tile(acc: str, asrc: str, bt: str) -> str:
    return _SMEM_TIMES_TILE.replace("ACC", acc).replace("ASRC", asrc).replace("BT", bt)


# Stage rows t of X[t][c0 .. c0 + 63] (bf16, global) into dst[L][64 + PAD].
_STAGE_TILE = """
    stage_rows<L, 64, NT>(DST, XB, XSTR, C0_, XVEC, rows_left, tid);
"""


def _stage_tile(dst: str, x: str, x_vec: str, x_str: str, col0: str) -> str:
    return (_STAGE_TILE.replace("DST", dst).replace("XB", x).replace("XVEC", x_vec).replace("XSTR", x_str)
            .replace("C0_", col0))


# Row statistics (written by ``rows``): [B, NH, NC, 5, L] = 1/den, ddn, m_comb, alpha, beta.
_LOAD_STATS = """
    __shared__ float st[5][L];
    for (int idx = tid; idx < 5 * L; idx += NT) st[idx / L][idx % L] = rowst[chunk * 5 * L + idx];
    // e_s = exp(a_s - m_{c+1}): the weight of step s's write into the state leaving the chunk.
    __shared__ float es[L];
    {
        const float m_next = c + 1 < NC ? m_enter[chunk + 1] : m_final[bh];
        const float gc = bcum[chunk * L + L - 1];
        for (int t = tid; t < L; t += NT) es[t] = expf(gc - bcum[chunk * L + t] + igc[chunk * L + t] - m_next);
    }
    __syncthreads();
"""

_ROWS_SOURCE = (_PRELUDE + """
    const __nv_bfloat16* vb = v + b * v_strides[0] + hd * v_strides[1] + static_cast<int64_t>(c) * L * v_strides[2];
    const bool v_vec = rows_vectorizable(vb, v_strides);
    __shared__ __align__(16) __nv_bfloat16 xs[L][KS + PAD];
    __shared__ __align__(16) __nv_bfloat16 zs[L][KS + PAD];
    __shared__ float ns[DQK];
    __shared__ float qn_s[L];
    const float m0 = m_enter[chunk];
    for (int d = tid; d < DQK; d += NT) ns[d] = n_enter[chunk * DQK + d];
    __syncthreads();

    // S = q k^T and q . n (two threads per row).
    float sacc[L / 8][4];
    float dsacc[L / 8][4];
    #pragma unroll
    for (int nt = 0; nt < L / 8; ++nt) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) sacc[nt][e] = dsacc[nt][e] = 0.0f;
    }
    float qn_part = 0.0f;
    const int qn_row = tid >> 1;
    const int qn_half = tid & 1;
""" + _rows_product("sacc", "qb", "kb", "q_vec", "k_vec", "q_strides", "k_strides", "DQK", """
        #pragma unroll
        for (int e = 0; e < KS / 2; ++e)
            qn_part += __bfloat162float(xs[qn_row][qn_half * (KS / 2) + e]) * ns[d0 + qn_half * (KS / 2) + e];
""") + """
    qn_part += __shfl_xor_sync(0xffffffffu, qn_part, 1);
    if (qn_half == 0) qn_s[qn_row] = qn_part * scale;
    // dS = dh v^T.
""" + _rows_product("dsacc", "db", "vb", "d_vec", "v_vec", "dh_strides", "v_strides", "DV") + """
    // q . Y = q C dh (the ``y`` kernel's shares over DQK).
    float qy[2] = {0.0f, 0.0f};
    if (tq == 0) {
        const int tiles = qyp_shape[3];
        for (int u = 0; u < tiles; ++u) {
            qy[0] += qyp[(chunk * tiles + u) * L + rr];
            qy[1] += qyp[(chunk * tiles + u) * L + rr + 8];
        }
    }

    // Per row: the stabiliser, denominator, and the cotangents alpha, beta, ddn.
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = rr + 8 * h;
        float inter;
        const float m_comb = row_stabiliser<L>(bs, is, r, tq, m0, &inter);
        float sum = 0.0f, sdot = 0.0f;
        #pragma unroll
        for (int nt = 0; nt < L / 8; ++nt) {
            #pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float sc = sacc[nt][2 * h + e] * scale * decay_weight(bs, is, r, nt * 8 + 2 * tq + e, m_comb);
                sum += sc;
                sdot += sc * dsacc[nt][2 * h + e];
            }
        }
        float qyr = qy[h];
        #pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            sum += __shfl_xor_sync(0xffffffffu, sum, o);
            sdot += __shfl_xor_sync(0xffffffffu, sdot, o);
            qyr += __shfl_xor_sync(0xffffffffu, qyr, o);
        }
        const float dn = inter * qn_s[r] + sum;
        float floor_;
        const float den = row_denominator(dn, m_comb, EPS, &floor_);
        const float numdh = inter * scale * qyr + sdot;
        const float dden = -numdh / (den * den);
        const float ddn = fabsf(dn) > floor_ ? (dn > 0.0f ? dden : (dn < 0.0f ? -dden : 0.0f)) : 0.0f;
        if (tq == 0) {
            float* out = rowst + chunk * 5 * L + r;
            out[0] = 1.0f / den;
            out[L] = ddn;
            out[2 * L] = m_comb;
            out[3 * L] = inter * scale / den;
            out[4 * L] = inter * scale * ddn;
        }
        // The chunk's L x L matrices: dP = sc W (dS / den + ddn) for ``dqdk``, S / den for ``dv``.
        const float rden = 1.0f / den;
        float* dPr = dPg + (chunk * L + r) * L;
        float* Str = Stg + (chunk * L + r) * L;
        #pragma unroll
        for (int nt = 0; nt < L / 8; ++nt) {
            const int s = nt * 8 + 2 * tq;
            const float w0 = decay_weight(bs, is, r, s, m_comb);
            const float w1 = decay_weight(bs, is, r, s + 1, m_comb);
            *reinterpret_cast<float2*>(dPr + s) = make_float2(scale * w0 * (dsacc[nt][2 * h] * rden + ddn),
                                                              scale * w1 * (dsacc[nt][2 * h + 1] * rden + ddn));
            *reinterpret_cast<float2*>(Str + s) = make_float2(sacc[nt][2 * h] * scale * w0 * rden,
                                                              sacc[nt][2 * h + 1] * scale * w1 * rden);
        }
    }
""").replace("__SLAB__", str(_KS))

# Y = dH C_c^T [L x DQK] per chunk (dq's inter-chunk part) and its shares of q . Y: one block
# per (64 columns of DQK, chunk, batch * head) (or per chunk, looping over the columns).
_Y_SOURCE = (_PRELUDE + """
    __shared__ __align__(16) __nv_bfloat16 xs[L][KS + PAD];
    __shared__ __align__(16) __nv_bfloat16 Ms[TERMS][64][KS + PAD];
    __syncthreads();
    const auto* Ce = C_enter + chunk * DQK * DV;  // float32, or bf16 with one term
    float* Yc = Y + chunk * L * DQK;
    float qy[2] = {0.0f, 0.0f};
    for (int d0 = blockIdx.x * 64; d0 < DQK; d0 += gridDim.x * 64) {
        float yacc[8][4];
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) yacc[nt][0] = yacc[nt][1] = yacc[nt][2] = yacc[nt][3] = 0.0f;
""" + _rows_times_mt("yacc", "db", "d_vec", "dh_strides", "(Ce + static_cast<size_t>(d0) * DV)") + """
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = rr + 8 * h;
            const bool in = r < rows_left;
            #pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                const int col = d0 + nt * 8 + 2 * tq;
                const float y0 = yacc[nt][2 * h], y1 = yacc[nt][2 * h + 1];
                *reinterpret_cast<float2*>(Yc + static_cast<size_t>(r) * DQK + col) = make_float2(y0, y1);
                if (in) {
                    const __nv_bfloat16* qr = qb + r * q_strides[2];
                    qy[h] += static_cast<float>(qr[col * q_strides[3]]) * y0
                           + static_cast<float>(qr[(col + 1) * q_strides[3]]) * y1;
                }
            }
        }
    }
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        float a = qy[h];
        a += __shfl_xor_sync(0xffffffffu, a, 1);
        a += __shfl_xor_sync(0xffffffffu, a, 2);
        if (tq == 0) qyp[(chunk * gridDim.x + blockIdx.x) * L + rr + 8 * h] = a;
    }
""").replace("__SLAB__", str(_KS))

# The states kernel run backwards (same tiling: x = DV/JT blocks of 128 threads, y = DQK/64, z =
# B*NH). Warp w owns rows 16w..16w+15 of the block's 64 rows of dC; the update's A operand is
# (alpha q)^T split in three bf16 terms, B is dh (exact in bf16).
_REVERSE_SOURCE = """
    constexpr int NT = 128;
    constexpr int PAD = 8;
    constexpr int KV = (L * 8 + NT - 1) / NT;
    constexpr int VV = (L * JT / 8 + NT - 1) / NT;
    const int S = q_shape[2];
    const int NC = bcum_shape[2];
    const int bh = blockIdx.z;
    const int b = bh / NH;
    const int hd = bh % NH;
    const int d0 = blockIdx.y * 64;
    const int j0 = blockIdx.x * JT;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int tq = lane & 3;
    const int lrow = lane & 7;
    const int ltile = lane >> 3;

    __shared__ __align__(16) __nv_bfloat16 ks[2][L][64 + PAD];  // q[t][d0 + dd]
    __shared__ __align__(16) __nv_bfloat16 vs[2][L][JT + PAD];  // dh[t][j0 + jj]
    __shared__ __align__(16) float as_[2][L];                   // alpha_t
    __shared__ __align__(16) float bt_[2][L];                   // beta_t

    const __nv_bfloat16* kb = q + b * q_strides[0] + hd * q_strides[1] + d0 * q_strides[3];
    const __nv_bfloat16* vb = dh + b * dh_strides[0] + hd * dh_strides[1] + j0 * dh_strides[3];
    const bool k_vec = rows_vectorizable(kb, q_strides);
    const bool v_vec = rows_vectorizable(vb, dh_strides);
    const size_t state_off = static_cast<size_t>(bh) * DQK * DV;
    const size_t chunk_off = static_cast<size_t>(bh) * NC;

    float acc[JT / 8][4];
    const int rr = warp * 16 + g;
    const int r0 = d0 + rr;
    #pragma unroll
    for (int nt = 0; nt < JT / 8; ++nt) {
        const int col = j0 + nt * 8 + 2 * tq;
        // FINAL false: the final state's cotangent is zero (nothing read it) and dC_f, dn_f are
        // placeholders, not read.
        acc[nt][0] = FINAL ? dC_f[state_off + static_cast<size_t>(r0) * DV + col] : 0.0f;
        acc[nt][1] = FINAL ? dC_f[state_off + static_cast<size_t>(r0) * DV + col + 1] : 0.0f;
        acc[nt][2] = FINAL ? dC_f[state_off + static_cast<size_t>(r0 + 8) * DV + col] : 0.0f;
        acc[nt][3] = FINAL ? dC_f[state_off + static_cast<size_t>(r0 + 8) * DV + col + 1] : 0.0f;
    }
    float n_reg0 = FINAL ? dn_f[static_cast<size_t>(bh) * DQK + r0] : 0.0f;
    float n_reg1 = FINAL ? dn_f[static_cast<size_t>(bh) * DQK + r0 + 8] : 0.0f;
    const bool writes_n = blockIdx.x == 0 && tq == 0;

    uint4 kpre[KV], vpre[VV];
    float apre = 0.0f, bpre = 0.0f, dpre = 0.0f;
    auto prefetch = [&](int c) {
        prefetch_rows<L, 64, NT, KV>(kpre, kb, q_strides, k_vec, c, S, tid);
        prefetch_rows<L, JT, NT, VV>(vpre, vb, dh_strides, v_vec, c, S, tid);
        // The chunk's decay exp(g + m_c - m_{c+1}) (every thread computes it).
        const float m_next = c + 1 < NC ? m_enter[chunk_off + c + 1] : m_final[bh];
        dpre = expf(bcum[(chunk_off + c) * L + L - 1] + m_enter[chunk_off + c] - m_next);
        if (tid < L) {
            apre = rowst[(chunk_off + c) * 5 * L + 3 * L + tid];
            bpre = rowst[(chunk_off + c) * 5 * L + 4 * L + tid];
        }
    };
    prefetch(NC - 1);

    for (int c = NC - 1; c >= 0; --c) {
        const int buf = c & 1;
        // The cotangent of the state leaving chunk c.
        auto* Co = dC_out + (chunk_off + c) * DQK * DV;  // float32, or bf16 with one term (its readers' operand)
        #pragma unroll
        for (int nt = 0; nt < JT / 8; ++nt) {
            const int col = j0 + nt * 8 + 2 * tq;
            store_pair(Co + static_cast<size_t>(r0) * DV + col, acc[nt][0], acc[nt][1]);
            store_pair(Co + static_cast<size_t>(r0 + 8) * DV + col, acc[nt][2], acc[nt][3]);
        }
        if (writes_n) {
            dn_out[(chunk_off + c) * DQK + r0] = n_reg0;
            dn_out[(chunk_off + c) * DQK + r0 + 8] = n_reg1;
        }
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
        const float decay = dpre;
        if (tid < L) {
            as_[buf][tid] = apre;
            bt_[buf][tid] = bpre;
        }
        if (c > 0) prefetch(c - 1);
        __syncthreads();

        #pragma unroll
        for (int nt = 0; nt < JT / 8; ++nt) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][e] *= decay;
        }
        // dC += (alpha q)^T dh; dn += (beta q)^T 1.
        float nsum0 = 0.0f, nsum1 = 0.0f;
        state_chunk_mma<L, JT, TERMS>(acc, ks[buf], vs[buf], as_[buf], bt_[buf], warp, tq, lrow, ltile, nsum0, nsum1);
        n_reg0 = decay * n_reg0 + nsum0;
        n_reg1 = decay * n_reg1 + nsum1;
    }

    #pragma unroll
    for (int nt = 0; nt < JT / 8; ++nt) {
        const int col = j0 + nt * 8 + 2 * tq;
        *reinterpret_cast<float2*>(dC0 + state_off + static_cast<size_t>(r0) * DV + col) = make_float2(acc[nt][0], acc[nt][1]);
        *reinterpret_cast<float2*>(dC0 + state_off + static_cast<size_t>(r0 + 8) * DV + col) = make_float2(acc[nt][2], acc[nt][3]);
    }
    if (writes_n) {
        dn0[static_cast<size_t>(bh) * DQK + r0] = n_reg0;
        dn0[static_cast<size_t>(bh) * DQK + r0 + 8] = n_reg1;
    }
"""

_DQDK_SOURCE = (_PRELUDE + """
    const __nv_bfloat16* vb = v + b * v_strides[0] + hd * v_strides[1] + static_cast<int64_t>(c) * L * v_strides[2];
    const bool v_vec = rows_vectorizable(vb, v_strides);
    // The V dC^T product's slabs and the chunk's q, k tiles share one buffer.
    constexpr int SLAB_BYTES = L * (KS + PAD) * 2 + TERMS * 64 * (KS + PAD) * 2;
    constexpr int TILE_BYTES = 2 * L * (64 + PAD) * 2;
    __shared__ __align__(16) unsigned char raw[SLAB_BYTES > TILE_BYTES ? SLAB_BYTES : TILE_BYTES];
    auto xs = reinterpret_cast<__nv_bfloat16 (*)[KS + PAD]>(raw);
    auto Ms = reinterpret_cast<__nv_bfloat16 (*)[64][KS + PAD]>(raw + L * (KS + PAD) * 2);
    auto qt = reinterpret_cast<__nv_bfloat16 (*)[64 + PAD]>(raw);
    auto kt = reinterpret_cast<__nv_bfloat16 (*)[64 + PAD]>(raw + L * (64 + PAD) * 2);
    __shared__ float dPs[L][L + 1];
""" + _LOAD_STATS + """
    // dP (from ``rows``) in shared memory: dq reads its rows, dk its columns.
    for (int idx = tid; idx < L * L; idx += NT) dPs[idx / L][idx % L] = dPg[chunk * L * L + idx];
    __syncthreads();

    const auto* dCo = dC_out + chunk * DQK * DV;
    const float* dno = dn_out + chunk * DQK;
    const float* ne = n_enter + chunk * DQK;
    const float* Yc = Y + chunk * L * DQK;
    float rq[2] = {0.0f, 0.0f}, rk[2] = {0.0f, 0.0f};
    for (int d0 = blockIdx.x * 64; d0 < DQK; d0 += gridDim.x * 64) {
        float dq_acc[8][4], dk_acc[8][4];
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) dk_acc[nt][e] = 0.0f;
        }
        // dk's inter-chunk part: e_t (v_t dC^T + dn); dq's: alpha_t Y_t + beta_t n.
""" + _rows_times_mt("dk_acc", "vb", "v_vec", "v_strides", "(dCo + static_cast<size_t>(d0) * DV)") + """
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = rr + 8 * h;
            #pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                const int col = d0 + nt * 8 + 2 * tq;
                const float2 y = *reinterpret_cast<const float2*>(Yc + static_cast<size_t>(r) * DQK + col);
                dk_acc[nt][2 * h] = es[r] * (dk_acc[nt][2 * h] + dno[col]);
                dk_acc[nt][2 * h + 1] = es[r] * (dk_acc[nt][2 * h + 1] + dno[col + 1]);
                dq_acc[nt][2 * h] = st[3][r] * y.x + st[4][r] * ne[col];
                dq_acc[nt][2 * h + 1] = st[3][r] * y.y + st[4][r] * ne[col + 1];
            }
        }
        // Intra-chunk parts: dq += dP K, dk += dP^T Q.
""" + _stage_tile("qt", "qb", "q_vec", "q_strides", "d0") + _stage_tile("kt", "kb", "k_vec", "k_strides", "d0") + """
        __syncthreads();
""" + _smem_times_tile("dq_acc", "DPR", "kt") + _smem_times_tile("dk_acc", "DPC", "qt") + """
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = rr + 8 * h;
            if (r < rows_left) {
                // [B, S, NH, DQK]: the layout of the projections q, k are views of
                const size_t row = ((static_cast<size_t>(b) * S + c * L + r) * NH + hd) * DQK + d0;
                #pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    const int col = nt * 8 + 2 * tq;
                    const float2 qv = make_float2(__bfloat162float(qt[r][col]), __bfloat162float(qt[r][col + 1]));
                    const float2 kv = make_float2(__bfloat162float(kt[r][col]), __bfloat162float(kt[r][col + 1]));
                    rq[h] += qv.x * dq_acc[nt][2 * h] + qv.y * dq_acc[nt][2 * h + 1];
                    rk[h] += kv.x * dk_acc[nt][2 * h] + kv.y * dk_acc[nt][2 * h + 1];
                    dq[row + col] = static_cast<GT>(dq_acc[nt][2 * h]);
                    dq[row + col + 1] = static_cast<GT>(dq_acc[nt][2 * h + 1]);
                    dk[row + col] = static_cast<GT>(dk_acc[nt][2 * h]);
                    dk[row + col + 1] = static_cast<GT>(dk_acc[nt][2 * h + 1]);
                }
            }
        }
        __syncthreads();
    }
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
        float a = rq[h], k_ = rk[h];
        a += __shfl_xor_sync(0xffffffffu, a, 1);
        a += __shfl_xor_sync(0xffffffffu, a, 2);
        k_ += __shfl_xor_sync(0xffffffffu, k_, 1);
        k_ += __shfl_xor_sync(0xffffffffu, k_, 2);
        if (tq == 0) {  // this block's share of the sums over DQK
            float* out = gates + (chunk * gridDim.x + blockIdx.x) * 2 * L;
            out[rr + 8 * h] = a;
            out[L + rr + 8 * h] = k_;
        }
    }
""").replace("__SLAB__", str(_KS))

_DV_SOURCE = (_PRELUDE + """
    constexpr int INTER_BYTES = L * (KS + PAD) * 2 + TERMS * KS * (64 + PAD) * 2;
    constexpr int TILE_BYTES = L * (64 + PAD) * 2;
    __shared__ __align__(16) unsigned char raw[INTER_BYTES > TILE_BYTES ? INTER_BYTES : TILE_BYTES];
    auto xs = reinterpret_cast<__nv_bfloat16 (*)[KS + PAD]>(raw);
    auto Cs = reinterpret_cast<__nv_bfloat16 (*)[KS][64 + PAD]>(raw + L * (KS + PAD) * 2);
    auto dt = reinterpret_cast<__nv_bfloat16 (*)[64 + PAD]>(raw);
    __shared__ float Sts[L][L + 1];
""" + _LOAD_STATS + """
    // S / den (from ``rows``) in shared memory: dv reads its columns.
    for (int idx = tid; idx < L * L; idx += NT) Sts[idx / L][idx % L] = Stg[chunk * L * L + idx];
    __syncthreads();

    const auto* dCo = dC_out + chunk * DQK * DV;
    for (int j0 = blockIdx.x * 64; j0 < DV; j0 += gridDim.x * 64) {
        float acc[8][4];
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
        // Inter-chunk part e_s k_s dC (contraction over DQK, dC in three bf16 terms).
        for (int d0 = 0; d0 < DQK; d0 += KS) {
            stage_rows<L, KS, NT>(xs, kb, k_strides, d0, k_vec, rows_left, tid);
            stage_splitn<TERMS, KS, 64, NT>(Cs, dCo + static_cast<size_t>(d0) * DV + j0, DV, tid);
            __syncthreads();
            #pragma unroll
            for (int kk = 0; kk < KS / 16; ++kk) {
                const int e0 = kk * 16 + 2 * tq;
                uint32_t a[4];
                a_frag(a, xs, rr, e0);
                #pragma unroll
                for (int p = 0; p < TERMS; ++p) {
                    #pragma unroll
                    for (int np = 0; np < 4; ++np) {
                        uint32_t cf[4];
                        ldsm_x4_trans(cf, &Cs[p][kk * 16 + (ltile & 1) * 8 + lrow][np * 16 + (ltile >> 1) * 8]);
                        mma_bf16(acc[2 * np], a, cf[0], cf[1]);
                        mma_bf16(acc[2 * np + 1], a, cf[2], cf[3]);
                    }
                }
            }
            __syncthreads();
        }
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            acc[nt][0] *= es[rr];
            acc[nt][1] *= es[rr];
            acc[nt][2] *= es[rr + 8];
            acc[nt][3] *= es[rr + 8];
        }
        // Intra-chunk part (S / den)^T dH.
""" + _stage_tile("dt", "db", "d_vec", "dh_strides", "j0") + """
        __syncthreads();
""" + _smem_times_tile("acc", "STC", "dt") + """
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = rr + 8 * h;
            if (r < rows_left) {
                GT* out = dv + ((static_cast<size_t>(b) * S + c * L + r) * NH + hd) * DV + j0;  // [B, S, NH, DV]
                #pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    const int col = nt * 8 + 2 * tq;
                    out[col] = static_cast<GT>(acc[nt][2 * h]);
                    out[col + 1] = static_cast<GT>(acc[nt][2 * h + 1]);
                }
            }
        }
        __syncthreads();
    }
""").replace("__SLAB__", str(_KS))

# A operands read from shared memory: dP by rows (dq), dP^T (dk), (S / den)^T (dv); and the
# staging of a float32 tile as three bf16 terms.
_ACCESS = """
// The A fragment (rows r, r + 8; columns e0, e0 + 1, e0 + 8, e0 + 9) of a row-major bf16 tile.
template <typename Tile>
__device__ __forceinline__ void a_frag(uint32_t* a, Tile x, int r, int e0) {
    a[0] = pack_pair(&x[r][e0]);
    a[1] = pack_pair(&x[r + 8][e0]);
    a[2] = pack_pair(&x[r][e0 + 8]);
    a[3] = pack_pair(&x[r + 8][e0 + 8]);
}

// dst[t][e] = x[t][col0 + e] for the chunk's rows t < R (zeros past the sequence), e < C.
template <int R, int C, int NT, typename Tile, typename In, typename Str>
__device__ __forceinline__ void stage_rows(Tile dst, const In* x, const Str& st, int col0, bool vec, int rows_left,
                                           int tid) {
    for (int idx = tid; idx < R * (C / 8); idx += NT) {
        const int t = idx / (C / 8);
        const int e = (idx % (C / 8)) * 8;
        *reinterpret_cast<uint4*>(&dst[t][e]) = load8(x + t * st[2] + (col0 + e) * st[3], st[3], vec, t < rows_left);
    }
}

// dst[p][r][c] = term p < NS of src[r * ld + c] (R x C tile, C a multiple of 4, 16-byte aligned
// rows); NS = 1: src rounded to bf16.
template <int NS, int R, int C, int NT, int W>
__device__ __forceinline__ void stage_splitn(__nv_bfloat16 (*dst)[R][W], const float* src, size_t ld, int tid) {
    for (int idx = tid; idx < R * (C / 4); idx += NT) {
        const int r = idx / (C / 4);
        const int e = (idx % (C / 4)) * 4;
        const float4 cv = *reinterpret_cast<const float4*>(src + static_cast<size_t>(r) * ld + e);
        uint32_t lo[NS], hi[NS];
        splitn_pair<NS>(cv.x, cv.y, lo);
        splitn_pair<NS>(cv.z, cv.w, hi);
        #pragma unroll
        for (int p = 0; p < NS; ++p) *reinterpret_cast<uint2*>(&dst[p][r][e]) = make_uint2(lo[p], hi[p]);
    }
}

// The same from a bf16 source (stored rounded: one term, copied as is).
template <int NS, int R, int C, int NT, int W>
__device__ __forceinline__ void stage_splitn(__nv_bfloat16 (*dst)[R][W], const __nv_bfloat16* src, size_t ld, int tid) {
    static_assert(NS == 1, "a bf16 operand is one term");
    for (int idx = tid; idx < R * (C / 4); idx += NT) {
        const int r = idx / (C / 4);
        const int e = (idx % (C / 4)) * 4;
        *reinterpret_cast<uint2*>(&dst[0][r][e]) = *reinterpret_cast<const uint2*>(src + static_cast<size_t>(r) * ld + e);
    }
}

#define DPR(r, t) dPs[r][t]
#define DPC(r, t) dPs[t][r]
#define STC(r, t) Sts[t][r]
"""

_kernels: dict[tuple[str, float], object] = {}


def _kernel(which: str, eps: float = 0.0):
    key = (which, eps)
    kernel = _kernels.get(key)
    if kernel is None:
        header = _HEADER + _LOADS + _ACCESS
        if which == "y":
            kernel = mx.fast.cuda_kernel(
                name="xlstm_mlstm_bwd_y",
                input_names=["q", "k", "dh", "bcum", "igc", "C_enter"],
                output_names=["Y", "qyp"],
                source=_Y_SOURCE, header=header, ensure_row_contiguous=False)
        elif which == "rows":
            kernel = mx.fast.cuda_kernel(
                name=f"xlstm_mlstm_bwd_rows_{kernel_tag(key)}",
                input_names=["q", "k", "v", "dh", "bcum", "igc", "qyp", "n_enter", "m_enter"],
                output_names=["rowst", "dPg", "Stg"],
                source=_ROWS_SOURCE.replace("EPS", f"{float(eps)!r}f"), header=header + _ROWS,
                ensure_row_contiguous=False)
        elif which == "reverse":
            kernel = mx.fast.cuda_kernel(
                name="xlstm_mlstm_bwd_reverse",
                input_names=["q", "dh", "bcum", "rowst", "m_enter", "m_final", "dC_f", "dn_f"],
                output_names=["dC_out", "dn_out", "dC0", "dn0"],
                source=_REVERSE_SOURCE, header=header, ensure_row_contiguous=False)
        elif which == "dqdk":
            kernel = mx.fast.cuda_kernel(
                name="xlstm_mlstm_bwd_dqdk",
                input_names=["q", "k", "v", "dh", "bcum", "igc", "rowst", "dPg", "Y", "n_enter", "m_enter",
                             "m_final", "dC_out", "dn_out"],
                output_names=["dq", "dk", "gates"],
                source=_DQDK_SOURCE, header=header, ensure_row_contiguous=False)
        else:
            kernel = mx.fast.cuda_kernel(
                name="xlstm_mlstm_bwd_dv",
                input_names=["q", "k", "dh", "bcum", "igc", "rowst", "Stg", "m_enter", "m_final", "dC_out"],
                output_names=["dv"],
                source=_DV_SOURCE, header=header, ensure_row_contiguous=False)
        _kernels[key] = kernel
    return kernel


def _split(split: bool | None) -> bool:
    """Whether ``dqdk`` and ``dv`` run one block per 64 output columns (more blocks, each
    recomputing the chunk's L x L scores) or one per chunk; XLSTM_METAL_MLSTM_BWD_SPLIT=0/1."""
    return split if split is not None else os.environ.get("XLSTM_METAL_MLSTM_BWD_SPLIT", "1") != "0"


def _terms(terms: int | None = None) -> int:
    """bf16 terms per float32 operand of the backward's matmuls (the states C and dC, the L x L
    score matrices, alpha q): 3 (float32's 24 bits, the default), 2 (16 bits: still finer than
    TF32's 11) or 1 (the operand rounded to bf16, as NX-AI's Triton backward casts its state and
    scores to the inputs' dtype for its dot products). ``XLSTM_METAL_MLSTM_BWD_TERMS`` (a
    measurement override) before ``terms`` (the caller's setting, :func:`.chunkwise_grad.product_terms`)."""
    raw = os.environ.get("XLSTM_METAL_MLSTM_BWD_TERMS")
    if raw is None:
        return 3 if terms is None else terms
    if raw not in ("1", "2", "3"):
        raise ValueError(f"XLSTM_METAL_MLSTM_BWD_TERMS must be 1, 2 or 3, got {raw!r}")
    return int(raw)


def _state_dtype(terms: int) -> mx.Dtype:
    """Storage of the per-chunk states C (the recompute's) and their cotangents dC (``reverse``'s):
    bf16 where their readers take them as one bf16 term (half the traffic; the same numbers, the
    rounding moves from the reader's staging to the writer), else float32.
    ``XLSTM_METAL_MLSTM_BF16_STATES=0`` keeps float32 (a measurement switch)."""
    if terms == 1 and os.environ.get("XLSTM_METAL_MLSTM_BF16_STATES", "1") != "0":
        return mx.bfloat16
    return mx.float32


def fused_backward_enabled() -> bool:
    """The kernels' backward unless ``XLSTM_METAL_FUSED_MLSTM_BWD=0`` (then the MLX-ops one)."""
    return os.environ.get("XLSTM_METAL_FUSED_MLSTM_BWD", "1") != "0"


def _dot(a: mx.array, b: mx.array, axes: int) -> mx.array:
    lead = a.shape[: a.ndim - axes]
    return (a.reshape(*lead, 1, -1) @ b.reshape(*lead, -1, 1))[..., 0, 0]


def y(q, k, dh, bcum, igc, C_enter, split: bool | None = None, terms: int | None = None):
    """Y = dH C_c^T per chunk [B, NH, NC * L, DQK] and its shares of q . Y [B, NH, NC, tiles, L]
    (float32). ``split``: one block per 64 columns of DQK (else one per chunk). ``terms``: bf16
    terms per float32 operand (:func:`_terms`; the same for the other kernels)."""
    B, NH, _, dqk = q.shape
    NC, L = bcum.shape[2:]
    tiles = dqk // 64 if _split(split) else 1
    return _kernel("y")(
        inputs=[q, k, dh, bcum, igc, C_enter],
        template=[("NH", NH), ("L", L), ("DQK", dqk), ("DV", dh.shape[-1]), ("TERMS", _terms(terms))],
        grid=(2 * L * tiles, NC, B * NH), threadgroup=(2 * L, 1, 1),
        output_shapes=[(B, NH, NC * L, dqk), (B, NH, NC, tiles, L)], output_dtypes=[mx.float32] * 2)


def rows(q, k, v, dh, bcum, igc, qyp, n_enter, m_enter, eps: float):
    """Row statistics [B, NH, NC, 5, L] (1/den, ddn, m_comb, alpha, beta) and the chunks' dP and
    S / den [B, NH, NC, L, L], float32."""
    B, NH, _, dqk = q.shape
    NC, L = bcum.shape[2:]
    return _kernel("rows", eps)(
        inputs=[q, k, v, dh, bcum, igc, qyp, n_enter, m_enter],
        template=[("NH", NH), ("L", L), ("DQK", dqk), ("DV", v.shape[-1])],
        grid=(2 * L, NC, B * NH), threadgroup=(2 * L, 1, 1),
        output_shapes=[(B, NH, NC, 5, L), (B, NH, NC, L, L), (B, NH, NC, L, L)], output_dtypes=[mx.float32] * 3)


def reverse(q, dh, bcum, rowst, m_enter, m_final, dC_f, dn_f, terms: int | None = None):
    """The cotangents of the states leaving every chunk ([B, NH, NC, DQK, DV] in
    :func:`_state_dtype`, [B, NH, NC, DQK]) and of the initial state ([B, NH, DQK, DV],
    [B, NH, DQK]), float32. ``dC_f`` / ``dn_f`` None: the final state's cotangents are zero
    (not read: no copies of a broadcast zero)."""
    B, NH, _, dqk = q.shape
    dv_ = dh.shape[-1]
    NC, L = bcum.shape[2:]
    final = dC_f is not None
    if final:
        dC_f, dn_f = mx.contiguous(dC_f.astype(mx.float32)), mx.contiguous(dn_f.astype(mx.float32))
    else:
        dC_f = dn_f = m_final  # placeholders (the kernel's fixed inputs)
    return _kernel("reverse")(
        inputs=[q, dh, bcum, rowst, m_enter, m_final, dC_f, dn_f],
        template=[("NH", NH), ("L", L), ("JT", _JT), ("DQK", dqk), ("DV", dv_), ("TERMS", _terms(terms)),
                  ("FINAL", final)],
        grid=(dv_ // _JT * 128, dqk // 64, B * NH), threadgroup=(128, 1, 1),
        output_shapes=[(B, NH, NC, dqk, dv_), (B, NH, NC, dqk), (B, NH, dqk, dv_), (B, NH, dqk)],
        output_dtypes=[_state_dtype(_terms(terms))] + [mx.float32] * 3)


def dqdk(q, k, v, dh, bcum, igc, rowst, dP, Y, n_enter, m_enter, m_final, dC_out, dn_out,
         split: bool | None = None, terms: int | None = None):
    """dq, dk [B, NH, S, DQK] (q's dtype) and per step (q.dq, k.dk) [B, NH, NC, 2, L] float32.
    ``split``: one block per 64 columns of DQK (else one per chunk, looping over them).
    dq and dk are written [B, S, NH, DQK] (returned as transposed views): the layout of the
    projections' output that q and k are views of, so autodiff's way back to it (transpose,
    reshape) copies nothing."""
    B, NH, S, dqk = q.shape
    NC, L = bcum.shape[2:]
    tiles = dqk // 64 if _split(split) else 1
    dq, dk, gates = _kernel("dqdk")(
        inputs=[q, k, v, dh, bcum, igc, rowst, dP, Y, n_enter, m_enter, m_final, dC_out, dn_out],
        template=[("NH", NH), ("L", L), ("DQK", dqk), ("DV", v.shape[-1]), ("GT", q.dtype), ("TERMS", _terms(terms))],
        grid=(2 * L * tiles, NC, B * NH), threadgroup=(2 * L, 1, 1),
        output_shapes=[(B, S, NH, dqk), (B, S, NH, dqk), (B, NH, NC, tiles, 2, L)],
        output_dtypes=[q.dtype, q.dtype, mx.float32])
    return (dq.transpose(0, 2, 1, 3), dk.transpose(0, 2, 1, 3),
            gates.sum(axis=3) if tiles > 1 else gates[:, :, :, 0])


def dv(q, k, dh, bcum, igc, rowst, St, m_enter, m_final, dC_out, split: bool | None = None,
       terms: int | None = None):
    """dv [B, NH, S, DV] (q's dtype; written [B, S, NH, DV], returned as a transposed view, as
    :func:`dqdk`). ``split``: one block per 64 columns of DV."""
    B, NH, S, dqk = q.shape
    dv_ = dh.shape[-1]
    NC, L = bcum.shape[2:]
    tiles = dv_ // 64 if _split(split) else 1
    (out,) = _kernel("dv")(
        inputs=[q, k, dh, bcum, igc, rowst, St, m_enter, m_final, dC_out],
        template=[("NH", NH), ("L", L), ("DQK", dqk), ("DV", dv_), ("GT", q.dtype), ("TERMS", _terms(terms))],
        grid=(2 * L * tiles, NC, B * NH), threadgroup=(2 * L, 1, 1),
        output_shapes=[(B, S, NH, dv_)], output_dtypes=[q.dtype])
    return out.transpose(0, 2, 1, 3)


def fused_backward(primals, cotangents, outputs, eps: float, L: int, has_state: bool, final_grad: bool = True,
                   terms: int | None = None, kept=None):
    """Gradients of (h, C, n, m) = chunkwise(q, k, v, i, f, C0, n0, m0) by the kernels above.

    q, k [B, NH, S, DQK] and v [B, NH, S, DV] bf16 (the forward's kernels ran); i, f [B, NH, S];
    C0, n0, m0 float32. Returns the cotangents of the eight primals in their dtypes.
    ``final_grad=False``: the final state's cotangents are zero (nothing differentiated reads
    it), so their terms are left out. ``terms``: bf16 terms per float32 operand of every
    kernel's products, the states recompute's included (None: 3; :func:`_terms`). ``kept``:
    the forward's entering states (C in :func:`_state_dtype`, n, m; ``chunkwise_grad.
    entering_states_kept``), read instead of recomputed.
    """
    from .chunkwise_fused import chunk_gates, chunk_states

    q, k, v, i, f, C0, n0, m0 = primals
    dh, dC_f, dn_f, _dm_f = cotangents
    _h, C_f, n_f, _m_f = outputs
    B, NH, S, _ = q.shape
    f32 = mx.float32
    k, v, dh = k.astype(q.dtype), v.astype(q.dtype), dh.astype(q.dtype)
    bcum, igc = chunk_gates(i, f, L)
    NC = bcum.shape[2]
    T = _terms(terms)
    if kept is not None and kept[0].dtype == _state_dtype(T):
        (C_enter, n_enter, m_enter), m_fin = kept, outputs[3]
    else:
        C_enter, n_enter, m_enter, (_, _, m_fin) = chunk_states(k, v, bcum, igc, (C0, n0, m0), terms=T,
                                                                c_dtype=_state_dtype(T))
    Y, qyp = y(q, k, dh, bcum, igc, C_enter, terms=T)
    rowst, dP, St = rows(q, k, v, dh, bcum, igc, qyp, n_enter, m_enter, eps)
    dC_out, dn_out, dC0, dn0 = reverse(q, dh, bcum, rowst, m_enter, m_fin,
                                       *((dC_f, dn_f) if final_grad else (None, None)), terms=T)
    dq, dk, gates = dqdk(q, k, v, dh, bcum, igc, rowst, dP, Y, n_enter, m_enter, m_fin, dC_out, dn_out, terms=T)
    dv_ = dv(q, k, dh, bcum, igc, rowst, St, m_enter, m_fin, dC_out, terms=T)

    # Gates: dF = q.dq - k.dk (+ the final state's <dC_f, C_f> + <dn_f, n_f> at the last step),
    # d i~ = k.dk; the forget gates' log-sigmoid gets the reverse cumulative sum of dF.
    rq = gates[:, :, :, 0].reshape(B, NH, NC * L)[:, :, :S]
    rk = gates[:, :, :, 1].reshape(B, NH, NC * L)[:, :, :S]
    if final_grad:
        E_f = _dot(dC_f.astype(f32), C_f, 2) + _dot(dn_f.astype(f32), n_f, 1)  # [B, NH]
        last = (mx.arange(S) == S - 1).astype(f32)
        dlog = mx.cumsum(rq - rk + E_f[..., None] * last, axis=-1, reverse=True)
    else:
        dlog = mx.cumsum(rq - rk, axis=-1, reverse=True)
    df = dlog * mx.sigmoid(-f.astype(f32))
    if has_state:
        dm0 = (_dot(dC0, C0, 2) + _dot(dn0, n0, 1))[..., None]
    else:  # the zero state made by the caller: its gradient is never read
        dC0, dn0, dm0 = mx.zeros_like(C0), mx.zeros_like(n0), mx.zeros_like(m0)
    return (dq, dk.astype(primals[1].dtype), dv_.astype(primals[2].dtype), rk.astype(i.dtype), df.astype(f.dtype),
            dC0.astype(C0.dtype), dn0.astype(n0.dtype), dm0.astype(m0.dtype))
