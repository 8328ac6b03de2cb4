"""Fused CUDA kernels for one decode step of an xLSTM-Large block, each beside its ops reference.

On an NVIDIA GPU a decode step is bound by the number of kernels MLX launches, not by bytes
(benchmarks/NOTES.md): every primitive of the compiled step is one kernel node. Per block the
reference launches 15 (`benchmarks/decode_primitives.py --pretend-cuda`): two RMSNorms and their
residual adds, four matmuls, two soft-capped gate chains, the step kernel, a cast, the
multi-head LayerNorm, the output gate and the SwiGLU product. These kernels fold the small ones:

- :func:`mlstm_step_gated`: the fused step kernel (:mod:`.step`) with the i/f gate bias and soft
  cap computed inside it from the raw projection outputs (2 launches fewer);
- :func:`output_norm_gate`: ``sigmoid(o~) * MultiHeadLayerNorm(h)`` in one launch (from 3);
- :func:`add_rms_norm`: a residual add and the RMSNorm that follows it in one launch (from 2).

Each computes in float32 and rounds where the reference rounds (every intermediate the reference
holds in bf16/fp16 is rounded to it here too), so results agree with the ops to float32
round-off and at most an ulp of the narrow dtype where a transcendental differs in its last bit.
Elsewhere (CPU, Metal) every function here runs its reference ops.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...cells.activations import sigmoid
from ...cells.norms import MultiHeadLayerNorm, RMSNorm, soft_cap
from ..mlstm import MLSTMState, mlstm_step, zero_state
from .step import _SOURCE as _STEP_SOURCE
from .step import _TILE_COLUMNS, _TILE_ROWS, cuda_available

_STEP_GATE_LINES = (
    "    const float ig = static_cast<float>(i[b * i_strides[0] + hd * i_strides[1]]);\n"
    "    const float fg = static_cast<float>(f[b * f_strides[0] + hd * f_strides[1]]);\n"
)
assert _STEP_GATE_LINES in _STEP_SOURCE  # the fused step kernel's gate reads, replaced below

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

_GATE_LINES = """
    const float ig = xl_gate<GT>(static_cast<float>(i[b * i_strides[0] + hd * i_strides[1]]), IBIAS, HAS_BIAS, CAP);
    const float fg = xl_gate<GT>(static_cast<float>(f[b * f_strides[0] + hd * f_strides[1]]), FBIAS, HAS_BIAS, CAP);
"""

_step_kernels: dict[tuple, object] = {}


def _step_kernel(eps: float, cap: float, has_bias: bool):
    key = (eps, cap, has_bias)
    kernel = _step_kernels.get(key)
    if kernel is None:
        source = _STEP_SOURCE.replace("EPS", f"{float(eps)!r}f").replace(_STEP_GATE_LINES, _GATE_LINES)
        source = source.replace("HAS_BIAS", "true" if has_bias else "false").replace("CAP", f"{float(cap)!r}f")
        for name, bias in (("IBIAS", "ib"), ("FBIAS", "fb")):
            read = f"static_cast<float>({bias}[hd * {bias}_strides[0]])" if has_bias else "0.0f"
            source = source.replace(name, read)
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_mlstm_step_gated_{len(_step_kernels)}",
            input_names=["q", "k", "v", "i", "f"] + (["ib", "fb"] if has_bias else []) + ["C", "n", "m"],
            output_names=["h", "C_out", "n_out", "m_out"],
            source=source,
            header=_GATE_HEADER,
            ensure_row_contiguous=False,
        )
        _step_kernels[key] = kernel
    return kernel


def gate_preactivation(raw: mx.array, bias: mx.array | None, cap: float | None) -> mx.array:
    """The reference gate math, as the projection cell: ``cap * tanh((raw + bias) / cap)`` for
    raw [B, NH, S] and bias [NH] (or None)."""
    return soft_cap(raw if bias is None else raw + bias[:, None], cap)


def mlstm_step_gated(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    i_raw: mx.array,
    f_raw: mx.array,
    i_bias: mx.array | None,
    f_bias: mx.array | None,
    state: MLSTMState | None = None,
    *,
    gate_soft_cap: float | None = 15.0,
    eps: float = 1e-6,
    state_dtype: mx.Dtype | None = mx.float32,
) -> tuple[mx.array, MLSTMState]:
    """One mLSTM step from raw gate projections: :func:`xlstm_metal.kernels.mlstm.mlstm_step` of
    ``gate_preactivation(i_raw, i_bias, cap)`` and the same for f.

    q, k [B, NH, 1, DQK]; v [B, NH, 1, DV]; i_raw, f_raw [B, NH, 1] (any strides); i_bias, f_bias
    [NH] or None (both or neither, same dtype as the raw gates); state (C, n, m) or None.
    Returns h [B, NH, 1, DV] (q's dtype) and the new state in ``state_dtype``.
    """
    if (i_bias is None) != (f_bias is None):
        raise ValueError("mlstm_step_gated: give both gate biases or neither")
    has_bias = i_bias is not None
    fused = (
        cuda_available()
        and q.shape[2] == 1
        and i_raw.dtype == f_raw.dtype
        and (not has_bias or (i_bias.dtype == i_raw.dtype and f_bias.dtype == i_raw.dtype))
    )
    if not fused:
        i = gate_preactivation(i_raw, i_bias, gate_soft_cap)
        f = gate_preactivation(f_raw, f_bias, gate_soft_cap)
        return mlstm_step(q, k, v, i, f, state, eps=eps, state_dtype=state_dtype)
    B, NH, _, dqk = q.shape
    dv = v.shape[-1]
    out_dtype = state_dtype or mx.float32
    if state is None:
        state = zero_state(B, NH, dqk, dv, out_dtype)
    C, n, m = state
    tj = min(_TILE_COLUMNS, 1 << max(dv - 1, 0).bit_length())
    cap = float(gate_soft_cap) if gate_soft_cap is not None else 0.0
    inputs = [q, k, v, i_raw, f_raw] + ([i_bias, f_bias] if has_bias else []) + [C, n, m]
    h, C_new, n_new, m_new = _step_kernel(eps, cap, has_bias)(
        inputs=inputs,
        template=[("HT", q.dtype), ("ST", out_dtype), ("GT", i_raw.dtype), ("NH", NH), ("DQK", dqk),
                  ("DV", dv), ("TJ", tj), ("TD", _TILE_ROWS)],
        grid=(-(-dv // tj) * tj, _TILE_ROWS, B * NH),
        threadgroup=(tj, _TILE_ROWS, 1),
        output_shapes=[(B, NH, 1, dv), (B, NH, dqk, dv), (B, NH, dqk), (B, NH, 1)],
        output_dtypes=[q.dtype, out_dtype, out_dtype, out_dtype],
    )
    return h, (C_new, n_new, m_new)


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
    // One block per (batch row, head): LayerNorm over the head's DV values of h (float32,
    // biased variance, no bias), rounded to T, times the norm weight (in T), times sigmoid(o~)
    // (in T), as MultiHeadLayerNorm and the output cell compute it.
    constexpr int MAXV = (DV + NTHREADS - 1) / NTHREADS;
    __shared__ float s_warp[32];
    const int b = blockIdx.y;
    const int hd = blockIdx.x;
    float xs[MAXV];
    float sum = 0.0f;
    #pragma unroll
    for (int r = 0; r < MAXV; ++r) {
        const int j = threadIdx.x + r * NTHREADS;
        xs[r] = j < DV ? static_cast<float>(h[b * h_strides[0] + hd * h_strides[1] + j * h_strides[3]]) : 0.0f;
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
            const float og = static_cast<float>(o[b * o_strides[0] + col * o_strides[2]]);
            const float gate = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-og))));
            out[static_cast<size_t>(b) * NH * DV + col] = static_cast<T>(gate * scaled);
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


def output_norm_gate(h: mx.array, o_preact: mx.array, norm) -> mx.array:
    """h [B, NH, 1, DV], o~ [B, 1, NH * DV] (any strides), ``norm`` the layer's
    :class:`~xlstm_metal.cells.norms.MultiHeadLayerNorm` -> ``sigmoid(o~) * norm(h)``
    [B, 1, NH * DV] in h's dtype, as :class:`~xlstm_metal.cells.mlstm.mLSTMOutputCell` computes it;
    one launch on CUDA when h, o~ and the norm weight share a dtype, otherwise (and off CUDA) the
    reference ops."""
    B, NH, S, DV = h.shape
    weight = norm.get("weight") if isinstance(norm, nn.Module) else None
    if not (cuda_available() and type(norm) is MultiHeadLayerNorm and S == 1 and o_preact.dtype == h.dtype and weight.dtype == h.dtype
            and o_preact.shape == (B, 1, NH * DV) and weight.shape == (NH * DV,)):
        return sigmoid(o_preact) * norm(h.transpose(0, 2, 1, 3))
    threads = min(1024, max(32, 32 * -(-min(DV, 256) // 32)))
    (out,) = _norm_gate_kernel(norm.eps)(
        inputs=[h, o_preact, weight],
        template=[("T", h.dtype), ("NH", NH), ("DV", DV), ("NTHREADS", threads)],
        grid=(NH * threads, B, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, 1, NH * DV)],
        output_dtypes=[h.dtype],
    )
    return out


# ------------------------------------------------------------------------ residual + RMSNorm
_ADD_NORM_SOURCE = """
    // One block per row: s = x + y (in T), then rms_norm(s) * w as MLX's fast.rms_norm computes
    // it (float32 sum of squares, s * rsqrt(mean + eps) rounded to T, times w in T).
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
            const T s = static_cast<T>(static_cast<float>(x[base + j]) + static_cast<float>(y[base + j]));
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
            const float normed = static_cast<float>(static_cast<T>(xs[r] * rn));
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
    norm weight share a dtype (then ``norm`` is ``mx.fast.rms_norm(s, weight, eps)``); otherwise,
    and off CUDA, or for any other module, the two ops."""
    E = x.shape[-1]
    weight = norm.get("weight") if isinstance(norm, nn.Module) else None
    if not (cuda_available() and type(norm) is RMSNorm and x.dtype == y.dtype == weight.dtype
            and x.shape == y.shape and weight.shape == (E,)
            and x.dtype in (mx.bfloat16, mx.float16, mx.float32)):
        s = x + y
        return s, norm(s)
    eps = norm.eps
    threads = 1024 if E >= 4096 else max(32, 32 * -(-min(E, 1024) // 32))
    rows = x.size // E
    s, normed = _add_norm_kernel(eps)(
        inputs=[x, y, weight],
        template=[("T", x.dtype), ("E", E), ("NTHREADS", threads)],
        grid=(rows * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, x.dtype],
    )
    return s, normed
