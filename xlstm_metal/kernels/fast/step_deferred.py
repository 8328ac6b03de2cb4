"""The gated mLSTM step on a deferred state (:data:`~xlstm_metal.kernels.mlstm.DeferredMLSTMState`)
as one CUDA kernel, beside its reference :func:`xlstm_metal.kernels.mlstm.mlstm_step_deferred`.

Why: at 16-64 rows the 7B decode step is bound by the float32 state's traffic. The plain step
kernel reads and writes C every step (537 MB per layer at 64 rows); but h_t needs only
q . C_t = exp(L_0) q . C_base + sum_s exp(L_s) (q . k_s) v_s, so a state that keeps its last
steps' (k, v) apart reads C once per step and writes it once every R steps (the step that would
hold R terms folds them into a new base, as the plain kernel writes C).

Layout: as the gated step kernel's layout 2 (:mod:`.decode`): a block per tile of COLS value
columns x all DQK rows of one (batch row, head), TX x TD threads, V = 4 adjacent float32
columns per thread (16-byte loads), RB rows per thread in flight, the first rows issued before
the gates. Template RIN: the pending terms coming in; RL: L's length (R). The macro XL_FLUSH:
whether this step folds the RIN + 1 terms into C (RIN + 1 == R; each form has its own outputs).
The math is the reference's, in float32, so h and the state agree with it (and with the plain step) to float32 round-off.

Each form is its own kernel function. One function for every form, reading the pending count at
run time (fixed-size term buffers, outputs for both forms), was tried on an H200 (S19R3-S19R4):
it ran at the plain kernel's time, read-only steps included, and was dropped.
"""

from __future__ import annotations

import os
import re

import mlx.core as mx

from ..mlstm import DeferredMLSTMState
from .decode import (
    ROW_SUMS_TO_SHARED,
    TILE_POSITION,
    TILE_THREADS,
    _GATE_HEADER,
    _GATES_AND_OFFSETS,
    _kernels_on,
    _v2_tile,
    fill_step_source,
)
from .tensor_cores import compact_source

_SOURCE = """
TILE_THREADS
    constexpr int NTERM = RIN + 1;  // terms after this step, the new one last
    constexpr int NRED = NW * COLS > NT ? NW * COLS : NT;
    const int tile = blockIdx.x;
TILE_POSITION
    __shared__ float s_q[DQK];
    __shared__ float s_k[XL_FLUSH ? NTERM : 1][DQK];
    __shared__ float s_red[NRED];
    __shared__ float s_qn[NW][NTERM + 1];

    // RB rows of this thread's columns of C from row d0 (row r sits r * TD * DV after row d0),
    // streamed (a step reads each byte once).
    float cv[RB][V];
    auto load_rows = [&](int d0) {
        if (!cols_ok) return;
        #pragma unroll
        for (int r = 0; r < RB; ++r) {
            if (d0 + r * TD < DQK) {
                const float4 c4 = __ldcs(reinterpret_cast<const float4*>(C + c_base + static_cast<size_t>(d0 + r * TD) * DV));
                cv[r][0] = c4.x; cv[r][1] = c4.y; cv[r][2] = c4.z; cv[r][3] = c4.w;
            }
        }
    };
    load_rows(ty);  // before anything else: the state is in flight while the block reads its scalars

GATES_AND_OFFSETS
    // Log weights after this step: the base's and each pending term's decayed by fa; the new term's is ia.
    const float log_fa = lf + m_old - m_new;
    const int64_t l_off = b * L_strides[0] + hd * L_strides[1];
    const float w0 = expf(L[l_off] + log_fa);
    float wt[NTERM];
    #pragma unroll
    for (int s = 0; s < RIN; ++s) wt[s] = expf(L[l_off + (1 + s) * L_strides[2]] + log_fa);
    wt[RIN] = ia;

    // q (scaled) to shared memory, n' = fa n + ia k, and this thread's parts of q.n' and q.k_s.
    float part[NTERM + 1];  // q.k_0 .. q.k_RIN, then q.n'
    #pragma unroll
    for (int s = 0; s <= NTERM; ++s) part[s] = 0.0f;
    for (int d = tid; d < DQK; d += NT) {
        const float kd = static_cast<float>(k[k_off + d * k_strides[3]]);
        const float qd = static_cast<float>(q[q_off + d * q_strides[3]]) * scale;
        const float nd = fa * static_cast<float>(n[n_off + d * n_strides[2]]) + ia * kd;
        part[NTERM] += qd * nd;
        s_q[d] = qd;
        if (ct == 0) n_out[qk_off + d] = static_cast<ST>(nd);
        #pragma unroll
        for (int s = 0; s < RIN; ++s) {
            const float ks = static_cast<float>(KTERM(s, d));
#if XL_FLUSH
            s_k[s][d] = ks;
#else
            part[s] += qd * ks;
            if (ct == 0) K_out[(static_cast<size_t>(bh) * NTERM + s) * DQK + d] = static_cast<KT>(ks);  // exact
#endif
        }
#if XL_FLUSH
        s_k[RIN][d] = kd;
#else
        part[RIN] += qd * kd;
        if (ct == 0) K_out[(static_cast<size_t>(bh) * NTERM + RIN) * DQK + d] = static_cast<KT>(kd);
#endif
    }
    // This thread's columns of every term's v (the new one from v), and the pending ones copied on.
    float wv[XL_FLUSH ? NTERM : 1][V];
    if (XL_FLUSH && cols_ok) {
        #pragma unroll
        for (int s = 0; s < NTERM; ++s) {
            #pragma unroll
            for (int c = 0; c < V; ++c) {
                const float vs = s < RIN ? static_cast<float>(VTERM(s, j0 + c))
                    : static_cast<float>(v[b * v_strides[0] + hd * v_strides[1] + (j0 + c) * v_strides[3]]);
                wv[s][c] = wt[s] * vs;
            }
        }
    }
#if !XL_FLUSH
    if (cols_ok && ty == 0) {
        #pragma unroll
        for (int s = 0; s < NTERM; ++s) {
            #pragma unroll
            for (int c = 0; c < V; ++c) {
                const float vs = s < RIN ? static_cast<float>(VTERM(s, j0 + c))
                    : static_cast<float>(v[b * v_strides[0] + hd * v_strides[1] + (j0 + c) * v_strides[3]]);
                V_out[(static_cast<size_t>(bh) * NTERM + s) * DV + j0 + c] = static_cast<KT>(vs);
            }
        }
    }
    if (ct == 0 && tid < RL) {
        L_out[bh * RL + tid] = tid <= RIN ? L[l_off + tid * L_strides[2]] + log_fa : (tid == RIN + 1 ? ig - m_new : 0.0f);
    }
#endif
    __syncthreads();

    // q.C over this thread's rows; a flush also forms C' = w0 C + sum_s k_s (w_s v_s) and writes it.
    float acc[V];
    #pragma unroll
    for (int c = 0; c < V; ++c) acc[c] = 0.0f;
    for (int d0 = ty; d0 < DQK; d0 += TD * RB) {
        if (d0 != ty) load_rows(d0);
        #pragma unroll
        for (int r = 0; r < RB; ++r) {
            const int d = d0 + r * TD;
            if (cols_ok && d < DQK) {
                const float qd = s_q[d];
#if XL_FLUSH
                #pragma unroll
                for (int c = 0; c < V; ++c) {
                    float cn = w0 * cv[r][c];
                    #pragma unroll
                    for (int s = 0; s < NTERM; ++s) cn += s_k[s][d] * wv[s][c];
                    cv[r][c] = cn;
                    acc[c] += qd * cn;
                }
                __stcs(reinterpret_cast<float4*>(C_out + c_base + static_cast<size_t>(d) * DV),
                       make_float4(cv[r][0], cv[r][1], cv[r][2], cv[r][3]));
#else
                #pragma unroll
                for (int c = 0; c < V; ++c) acc[c] += qd * cv[r][c];
#endif
            }
        }
    }

    // The sums over rows: within a warp by shuffles (lanes tx, tx + TX, ... hold the same
    // columns), then the warps' parts through shared memory; q.k_s and q.n' over all threads.
    #pragma unroll
    for (int c = 0; c < V; ++c) {
        #pragma unroll
        for (int o = TX; o < 32; o <<= 1) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], o);
    }
    #pragma unroll
    for (int s = 0; s <= NTERM; ++s) {
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) part[s] += __shfl_xor_sync(0xffffffffu, part[s], o);
    }
ROW_SUMS_TO_SHARED
    if (lane == 0) {
        #pragma unroll
        for (int s = 0; s <= NTERM; ++s) s_qn[warp][s] = part[s];
    }
    __syncthreads();
    float sums[NTERM + 1];
    #pragma unroll
    for (int s = 0; s <= NTERM; ++s) {
        sums[s] = 0.0f;
        #pragma unroll
        for (int w = 0; w < NW; ++w) sums[s] += s_qn[w][s];
    }
    const float den = fmaxf(fabsf(sums[NTERM]), expf(-m_new)) + EPS;
    for (int col = tid; col < COLS; col += NT) {
        const int j = ct * COLS + col;
        if (j < DV) {
            float num = 0.0f;
            #pragma unroll
            for (int w = 0; w < NSUM; ++w) num += s_red[w * COLS + col];
            if (!XL_FLUSH) {
                num *= w0;
                #pragma unroll
                for (int s = 0; s < RIN; ++s) {
                    num += wt[s] * sums[s] * static_cast<float>(VTERM(s, j));
                }
                num += ia * sums[RIN] * static_cast<float>(v[b * v_strides[0] + hd * v_strides[1] + j * v_strides[3]]);
            }
            h[v_off + j] = static_cast<HT>(num / den);
        }
    }
    if (ct == 0 && tid == 0) m_out[bh] = static_cast<ST>(m_new);
""".replace("GATES_AND_OFFSETS\n", _GATES_AND_OFFSETS).replace("ROW_SUMS_TO_SHARED\n", ROW_SUMS_TO_SHARED) \
    .replace("TILE_THREADS\n", TILE_THREADS).replace("TILE_POSITION\n", TILE_POSITION)

_kernels: dict[tuple, object] = {}


def _term_reads(source: str, pending: bool) -> str:
    """The source with KTERM(s, d) / VTERM(s, j), a pending term's element of k / v, read through
    the term arrays' strides (views need no copy node per step); 0 without pending terms (then
    there are no K, V inputs: a zero-size array has no buffer)."""
    def read(match: re.Match) -> str:
        if not pending:
            return "0.0f"
        a = f"{match[1]}t"
        return f"{a}[b * {a}_strides[0] + hd * {a}_strides[1] + ({match[2]}) * {a}_strides[2] + ({match[3]}) * {a}_strides[3]]"
    return re.sub(r"([KV])TERM\(([^,]+), ([^)]+)\)", read, source)


def _kernel(eps: float, cap: float, has_bias: bool, pending: bool, flush: bool, packed: bool = False):
    key = (eps, cap, has_bias, pending, flush, packed)
    kernel = _kernels.get(key)
    if kernel is None:
        source = f"#define XL_FLUSH {int(flush)}\n" + fill_step_source(_SOURCE, eps, cap, has_bias, packed=packed)
        source = _term_reads(source, pending)
        terms = ["Kt", "Vt"] if pending else []
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_mlstm_step_deferred{'_flush' if flush else ''}{'_packed' if packed else ''}_{len(_kernels)}",
            input_names=(["y"] if packed else ["q", "k", "v", "i", "f"]) + (["ib", "fb"] if has_bias else [])
            + ["C", "n", "m", "L"] + terms,
            output_names=["h", "C_out", "n_out", "m_out"] if flush
            else ["h", "n_out", "m_out", "K_out", "V_out", "L_out"],
            source=compact_source(source),
            header=compact_source(_GATE_HEADER),
            ensure_row_contiguous=False,
        )
        _kernels[key] = kernel
    return kernel


def deferred_kernel_applies(state: DeferredMLSTMState) -> bool:
    """Whether the kernel takes this state: float32 C and n, DV a multiple of 4 (16-byte rows)."""
    C, n = state[0], state[1]
    return C.dtype == mx.float32 and n.dtype == mx.float32 and C.shape[-1] % 4 == 0


def mlstm_step_gated_deferred(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    i_raw: mx.array,
    f_raw: mx.array,
    i_bias: mx.array | None,
    f_bias: mx.array | None,
    state: DeferredMLSTMState,
    *,
    gate_soft_cap: float | None,
    eps: float,
    state_dtype: mx.Dtype | None,
) -> tuple[mx.array, DeferredMLSTMState]:
    """The CUDA kernel: :func:`~xlstm_metal.kernels.fast.decode.mlstm_step_gated`'s contract
    (raw gates, their bias and soft cap inside) on a deferred state (see the module docstring;
    the caller checks :func:`deferred_kernel_applies`). Returns h [B, NH, 1, DV] and the new
    deferred state."""
    B, NH, _, dqk = q.shape
    return _launch([q, k, v, i_raw, f_raw], [], i_bias, f_bias, state, B, NH, dqk, v.shape[-1], q.dtype, i_raw.dtype,
                   gate_soft_cap, eps, state_dtype)


def mlstm_step_gated_deferred_packed(
    y: mx.array,
    columns: tuple[int, ...],
    num_heads: int,
    i_bias: mx.array | None,
    f_bias: mx.array | None,
    state: DeferredMLSTMState,
    *,
    gate_soft_cap: float | None,
    eps: float,
    state_dtype: mx.Dtype | None,
) -> tuple[mx.array, DeferredMLSTMState]:
    """:func:`mlstm_step_gated_deferred` on q, k, v and the raw gates as columns of the fused
    projections' output y [B, 1, W] (``columns``: q, k, v start, v end, i start, f start; see
    :func:`~xlstm_metal.kernels.fast.decode.mlstm_step_gated_packed`), read there: no slices or
    reshapes of y in the graph."""
    q0, k0, v0, v1, i0, f0 = columns
    offsets = [("QOFF", q0), ("KOFF", k0), ("VOFF", v0), ("IOFF", i0), ("FOFF", f0)]
    return _launch([y], offsets, i_bias, f_bias, state, y.shape[0], num_heads, (k0 - q0) // num_heads,
                   (v1 - v0) // num_heads, y.dtype, y.dtype, gate_soft_cap, eps, state_dtype)


def _launch(heads: list, offsets: list, i_bias, f_bias, state: DeferredMLSTMState, B: int, NH: int, dqk: int, dv: int,
            h_dtype, gate_dtype, gate_soft_cap, eps: float, state_dtype) -> tuple[mx.array, DeferredMLSTMState]:
    """Launch the kernel on ``heads`` [q, k, v, i~, f~], or [y] with ``offsets`` its columns'
    template offsets (the packed form)."""
    C, n, m, K, V, L = state
    r, R = K.shape[2], L.shape[-1]
    flush = r + 1 >= R
    out_dtype = state_dtype or mx.float32
    has_bias = i_bias is not None
    cap = float(gate_soft_cap) if gate_soft_cap is not None else 0.0
    # The kernel indexes C as row-contiguous (a no-op for its own output); L, K, V by their strides.
    C = mx.contiguous(C)
    inputs = heads + ([i_bias, f_bias] if has_bias else []) + [C, n, m, L] + ([K, V] if r else [])
    tx, td, vec, rb = _v2_tile(B * NH, dqk, dv)
    tiles = B * NH * -(-dv // (tx * vec))
    template = [("HT", h_dtype), ("ST", out_dtype), ("GT", gate_dtype), ("KT", K.dtype), ("NH", NH), ("DQK", dqk),
                ("DV", dv), ("TX", tx), ("TD", td), ("V", vec), ("RB", rb), ("RIN", r), ("RL", R)] + offsets
    kernel = _kernel(eps, cap, has_bias, r > 0, flush, bool(offsets))
    if flush:
        h, C_new, n_new, m_new = kernel(
            inputs=inputs, template=template, grid=(tiles * tx, td, 1), threadgroup=(tx, td, 1),
            output_shapes=[(B, NH, 1, dv), (B, NH, dqk, dv), (B, NH, dqk), (B, NH, 1)],
            output_dtypes=[h_dtype, mx.float32, out_dtype, out_dtype],
        )
        return h, (C_new, n_new, m_new, K[:, :, :0], V[:, :, :0], mx.zeros_like(L))
    h, n_new, m_new, K_new, V_new, L_new = kernel(
        inputs=inputs, template=template, grid=(tiles * tx, td, 1), threadgroup=(tx, td, 1),
        output_shapes=[(B, NH, 1, dv), (B, NH, dqk), (B, NH, 1), (B, NH, r + 1, dqk), (B, NH, r + 1, dv), (B, NH, R)],
        output_dtypes=[h_dtype, out_dtype, out_dtype, K.dtype, K.dtype, mx.float32],
    )
    return h, (C, n_new, m_new, K_new, V_new, L_new)


#: Terms a deferred decode state holds before its C is written (R; ``XLSTM_METAL_DEFER_STATE``,
#: 0 or 1: off) and the fewest rows it is used at by default. On an H200 (7B shape, bf16, R = 8)
#: 64 rows gained (S19R5: 7,486-8,069 tok/s against 6,942-6,965). At 16 rows it was level while
#: the host's time per step matched the GPU's (S19R5: 2,490-2,792 against 2,691-2,749); with the
#: step's graph cut from ~34 to ~9 nodes per block (session 20: packed projections, products
#: without vjp nodes) it gained: S20R2 2,861 / 2,867 and 2,727 / 2,869 against 2,720 / 2,739, GPU
#: busy 5.20 against 5.73 ms. Fewer rows (2-15) were not measured and keep the plain state.
DEFER_TERMS = int(os.environ.get("XLSTM_METAL_DEFER_STATE", "8") or 0)
DEFER_MIN_ROWS = int(os.environ.get("XLSTM_METAL_DEFER_MIN_ROWS", "16") or 16)


def default_deferral(batch: int) -> int:
    """The terms (R) a decode of ``batch`` rows defers its states by on this device, 0 for none:
    :data:`DEFER_TERMS` on CUDA with the fused decode kernels on, at :data:`DEFER_MIN_ROWS` rows or more."""
    return DEFER_TERMS if DEFER_TERMS > 1 and batch >= DEFER_MIN_ROWS and _kernels_on() else 0
