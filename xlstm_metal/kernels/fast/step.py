"""mLSTM step as one fused CUDA kernel (``mx.fast.cuda_kernel``), beside its reference
:func:`xlstm_metal.kernels.mlstm.mlstm_step`.

The reference step is about fifteen separate MLX ops (gates, outer product k v^T, state decay,
q C, q n, the denominator); on a GPU, decoding one token through 32 layers is bound by those
launches, not by memory. Here one launch per layer reads (C, n, m) once, writes the new state
and h. Math and rounding follow the reference (float32 throughout, state cast to
``state_dtype`` on write), so results agree to float32 round-off.

Layout: one thread block per (batch*head, tile of TJ value columns); its TJ x TD threads walk
the DQK rows of C for their columns (coalesced along DV). Every block recomputes the scalar
q.n' of its head (DQK multiply-adds) rather than exchanging it between blocks; the first tile
writes n' and m'.

With the second or fourth layout of the gated step kernel selected (``XLSTM_METAL_STEP_KERNEL=2``
or ``4``, :func:`xlstm_metal.kernels.fast.decode.set_step_kernel_version`) this function runs that
kernel (no gate bias, no soft cap): the state streamed with more bytes in flight.

On other devices (CPU, Metal) this function runs the reference, so a config naming it works
everywhere.
"""

from __future__ import annotations

import mlx.core as mx

from ..mlstm import MLSTMState, mlstm_step, zero_state

_TILE_COLUMNS = 64  # TJ: value columns per block (threads along x)
_TILE_ROWS = 4  # TD: row groups per block (threads along y); TJ * TD must be a power of 2

#: The stabilised gates of one step from ig, fg (pre-activations, float) and the state's m:
#: log f = logsigmoid(f~), m' = max(log f + m, i~), fa = exp(log f + m - m'), ia = exp(i~ - m')
#: (both <= 1), and the 1/sqrt(DQK) query scale. Shared with the gated step kernel (decode.py).
GATE_STABILISER = """    const float m_old = static_cast<float>(m[b * m_strides[0] + hd * m_strides[1]]);
    const float lf = fminf(fg, 0.0f) - log1pf(expf(-fabsf(fg)));
    const float m_new = fmaxf(lf + m_old, ig);
    const float fa = expf(lf + m_old - m_new);
    const float ia = expf(ig - m_new);
    const float scale = 1.0f / sqrtf(static_cast<float>(DQK));"""

_SOURCE = """
    const int bh = blockIdx.z;
    const int b = bh / NH;
    const int hd = bh % NH;
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int tid = ty * TJ + tx;
    constexpr int NT = TJ * TD;
    const int j = blockIdx.x * TJ + tx;
    __shared__ float s_red[NT];

    // Gates, as in the reference: logsigmoid(f~), stabiliser m, then exp(...) <= 1.
    // Inputs are read through their strides: q, k, v, i, f arrive as transposed views of the
    // projection output, and copying them to row-contiguous arrays cost five extra launches.
    const float ig = static_cast<float>(i[b * i_strides[0] + hd * i_strides[1]]);
    const float fg = static_cast<float>(f[b * f_strides[0] + hd * f_strides[1]]);
GATE_STABILISER

    const int64_t q_off = b * q_strides[0] + hd * q_strides[1];
    const int64_t k_off = b * k_strides[0] + hd * k_strides[1];
    const int64_t n_off = b * n_strides[0] + hd * n_strides[1];
    const int64_t c_base = b * C_strides[0] + hd * C_strides[1];
    // Outputs are new row-contiguous arrays.
    const size_t qk_off = static_cast<size_t>(bh) * DQK;
    const size_t v_off = static_cast<size_t>(bh) * DV;

    // n' = fa n + ia k and the head's scalar q.n' (every block of the head computes it).
    float part = 0.0f;
    for (int d = tid; d < DQK; d += NT) {
        const float kd = static_cast<float>(k[k_off + d * k_strides[3]]);
        const float nd = fa * static_cast<float>(n[n_off + d * n_strides[2]]) + ia * kd;
        part += (static_cast<float>(q[q_off + d * q_strides[3]]) * scale) * nd;
        if (blockIdx.x == 0) {
            n_out[qk_off + d] = static_cast<ST>(nd);
        }
    }
    s_red[tid] = part;
    __syncthreads();
    for (int s = NT / 2; s > 0; s >>= 1) {
        if (tid < s) s_red[tid] += s_red[tid + s];
        __syncthreads();
    }
    const float qn = s_red[0];
    __syncthreads();

    // C' = fa C + ia k v^T for this block's columns, and q.C' summed over the rows.
    float acc = 0.0f;
    if (j < DV) {
        const float vj = ia * static_cast<float>(v[b * v_strides[0] + hd * v_strides[1] + j * v_strides[3]]);
        const size_t c_off = static_cast<size_t>(bh) * DQK * DV + j;
        const int64_t c_in = c_base + j * C_strides[3];
        #pragma unroll 4
        for (int d = ty; d < DQK; d += TD) {
            const float kd = static_cast<float>(k[k_off + d * k_strides[3]]);
            const float c = fa * static_cast<float>(C[c_in + d * C_strides[2]]) + kd * vj;
            C_out[c_off + static_cast<size_t>(d) * DV] = static_cast<ST>(c);
            acc += (static_cast<float>(q[q_off + d * q_strides[3]]) * scale) * c;
        }
    }
    s_red[tid] = acc;
    __syncthreads();
    if (ty == 0 && j < DV) {
        float num = 0.0f;
        for (int t = 0; t < TD; ++t) num += s_red[t * TJ + tx];
        const float den = fmaxf(fabsf(qn), expf(-m_new)) + EPS;
        h[v_off + j] = static_cast<HT>(num / den);
    }
    if (blockIdx.x == 0 && tid == 0) {
        m_out[bh] = static_cast<ST>(m_new);
    }
""".replace("GATE_STABILISER", GATE_STABILISER)

_kernels: dict[float, object] = {}


def _kernel(eps: float):
    """One compiled kernel per eps (a literal in the source, so it is part of the name)."""
    kernel = _kernels.get(eps)
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_mlstm_step_{len(_kernels)}",
            input_names=["q", "k", "v", "i", "f", "C", "n", "m"],
            output_names=["h", "C_out", "n_out", "m_out"],
            source=_SOURCE.replace("EPS", f"{float(eps)!r}f"),
            ensure_row_contiguous=False,
        )
        _kernels[eps] = kernel
    return kernel


def cuda_available() -> bool:
    """True when MLX runs on an NVIDIA GPU (the only place the fused kernels run)."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def mlstm_step_fused(
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
    """Same contract as :func:`xlstm_metal.kernels.mlstm.mlstm_step`.

    q, k [B, NH, 1, DQK]; v [B, NH, 1, DV]; i, f [B, NH, 1]; state (C [B, NH, DQK, DV],
    n [B, NH, DQK], m [B, NH, 1]) or None. Returns h [B, NH, 1, DV] (q's dtype) and the new
    state in ``state_dtype`` (None: float32, as the reference computes it).
    """
    if not cuda_available():
        return mlstm_step(q, k, v, i, f, state, eps=eps, chunk_size=chunk_size, state_dtype=state_dtype)
    B, NH, S, dqk = q.shape
    if S != 1:
        raise ValueError(f"mlstm_step_fused takes one time step, got S={S}")
    from .decode import mlstm_step_gated, step_kernel_version  # noqa: PLC0415 (decode imports this module)

    if step_kernel_version() in (2, 4):  # the gated kernel's layout 2 or 4, without bias or soft cap
        return mlstm_step_gated(q, k, v, i, f, None, None, state, gate_soft_cap=None, eps=eps,
                                state_dtype=state_dtype)
    dv = v.shape[-1]
    out_dtype = state_dtype or mx.float32
    if state is None:
        state = zero_state(B, NH, dqk, dv, out_dtype)
    C, n, m = state
    tj = min(_TILE_COLUMNS, 1 << max(dv - 1, 0).bit_length())  # power of 2 covering small DV
    h, C_new, n_new, m_new = _kernel(eps)(
        inputs=[q, k, v, i, f, C, n, m],
        template=[("HT", q.dtype), ("ST", out_dtype), ("NH", NH), ("DQK", dqk), ("DV", dv),
                  ("TJ", tj), ("TD", _TILE_ROWS)],
        grid=(-(-dv // tj) * tj, _TILE_ROWS, B * NH),
        threadgroup=(tj, _TILE_ROWS, 1),
        output_shapes=[(B, NH, 1, dv), (B, NH, dqk, dv), (B, NH, dqk), (B, NH, 1)],
        output_dtypes=[q.dtype, out_dtype, out_dtype, out_dtype],
    )
    return h, (C_new, n_new, m_new)
