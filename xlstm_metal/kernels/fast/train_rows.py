"""Training-step work around the mLSTM cell as CUDA kernels, with their own vjps (issue 19 item 3).

In the compiled 1.3b train step (8,192 tokens, H200, CUPTI trace of GPU round S5R3) MLX ran the
SwiGLU and the mLSTM output cell (multi-head LayerNorm, output gate) as a dozen launches per
block: unfused ``Sigmoid`` and ``Multiply`` kernels over strided column slices of the fused
projections' outputs (4.2 + 5.0 ms per step), float32 copies for the LayerNorm and back, its
forward and vjp kernels, the weight's column reduction, and the concatenation that the split of
the fused gate|up product costs in the backward; around them a cast per float32 master and a
concatenation per projection group, ~1,000 launches for the clip norm, and float32 passes over
the LM head's logits. Here:

- :func:`swiglu_joined`: ``silu(gate) * up`` from the fused gate|up product [..., 2F] itself
  (no split); its vjp writes the gradient of that product [..., 2F] in one pass (no
  concatenation). Every bf16 operation is the ops' (:func:`~xlstm_metal.cells.ffn.swiglu`), in
  their order, with MLX's own ``Sigmoid`` functor. :func:`swiglu_down` adds the down projection
  and recomputes the SwiGLU in the backward instead of keeping its output.
- :func:`norm_gate_train`: ``sigmoid(o~) * MultiHeadLayerNorm(h)`` by the prompt kernel
  :func:`~xlstm_metal.kernels.fast.norm_rows.norm_gate_rows`, and a backward kernel, one warp
  per (token, head) as there, that recomputes the row's statistics and writes dh (in h's
  [B, NH, S, DV] layout, which the chunkwise backward reads), do~, and per-warp partial sums of
  the weight's gradient. :func:`norm_gate_linear` adds out_proj and recomputes the cell's output
  in the backward.
- :func:`cast_joined` (a projection group's bf16 copy from its float32 masters in one kernel),
  :func:`sum_of_squares` (the clip norm's squares of all gradients in one launch per dtype),
  :func:`cross_entropy_rows` (the LM head's loss and logit gradient from the bf16 logits).

The kernels' float32 intermediates (sigmoid, row statistics, sums) round apart from MLX's own
kernels here and there, so their bf16 results differ from the ops' by round-off, not bits:
tests/test_cuda_train_rows.py checks each side's distance from the float32 computation (and
``cast_joined`` bit for bit). They run on CUDA for bf16 / fp16 operands (the ``*_supported``
functions say when); ``XLSTM_METAL_TRAIN_ROWS=0`` turns them off (comparisons).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Callable, Iterator

import mlx.core as mx

from .norm_rows import _NORM_GATE_HEADER, norm_gate_rows, norm_gate_rows_supported
from .step import cuda_available
from .tensor_cores import kernel_tag

_kernels: dict[tuple, object] = {}



def train_rows_enabled() -> bool:
    """On CUDA unless ``XLSTM_METAL_TRAIN_ROWS=0``."""
    return cuda_available() and os.environ.get("XLSTM_METAL_TRAIN_ROWS", "1") != "0"


# ---------------------------------------------------------------------------------- SwiGLU
_SWIGLU_HEADER = """
#include "mlx/backend/cuda/device/unary_ops.cuh"

// Thread -> 8 consecutive columns of one row of y [rows, 2F]: its gate and up values; false past
// the last row.
template <typename T, int F>
__device__ __forceinline__ bool xl_swiglu_load(const T* y, size_t rows, size_t& row, size_t& col, T* g, T* u) {
    const size_t gid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (gid >= rows * (F / 8)) return false;
    row = gid / (F / 8);
    col = (gid % (F / 8)) * 8;
    const T* yr = y + row * (2 * F);
    *reinterpret_cast<uint4*>(g) = *reinterpret_cast<const uint4*>(yr + col);
    *reinterpret_cast<uint4*>(u) = *reinterpret_cast<const uint4*>(yr + F + col);
    return true;
}
"""

# y [rows, 2F] row-contiguous, F % 8 == 0.
# Forward: out = (gate * sigmoid(gate)) * up, each product rounded to T (nn.silu, then * up).
_SWIGLU_FWD = """
    size_t row, col;
    __align__(16) T g[8];
    __align__(16) T u[8];
    __align__(16) T r[8];
    if (!xl_swiglu_load<T, F>(y, y_shape[0], row, col, g, u)) return;
    #pragma unroll
    for (int e = 0; e < 8; ++e) {
        const T s = Sigmoid{}(g[e]);
        const T silu = g[e] * s;
        r[e] = silu * u[e];
    }
    *reinterpret_cast<uint4*>(out + row * F + col) = *reinterpret_cast<const uint4*>(r);
"""

# Backward, the ops of cells.ffn._swiglu_vjp in their order:
#   s = sigmoid(gate); d_silu = c * up
#   d_gate = d_silu * s + (d_silu * gate) * (s * (1 - s));  d_up = c * (gate * s)
_SWIGLU_BWD = """
    size_t row, col;
    __align__(16) T g[8];
    __align__(16) T u[8];
    __align__(16) T c[8];
    __align__(16) T dg[8];
    __align__(16) T du[8];
    if (!xl_swiglu_load<T, F>(y, y_shape[0], row, col, g, u)) return;
    *reinterpret_cast<uint4*>(c) = *reinterpret_cast<const uint4*>(cot + row * F + col);
    const T one = static_cast<T>(1.0f);
    #pragma unroll
    for (int e = 0; e < 8; ++e) {
        const T s = Sigmoid{}(g[e]);
        const T d_silu = c[e] * u[e];
        const T a = d_silu * s;
        const T b = d_silu * g[e];
        const T ds = s * (one - s);
        dg[e] = a + b * ds;
        du[e] = c[e] * (g[e] * s);
    }
    T* dr = dy + row * (2 * F);
    *reinterpret_cast<uint4*>(dr + col) = *reinterpret_cast<const uint4*>(dg);
    *reinterpret_cast<uint4*>(dr + F + col) = *reinterpret_cast<const uint4*>(du);
"""

_THREADS = 256


def _swiglu_kernel(which: str):
    kernel = _kernels.get(("swiglu", which))
    if kernel is None:
        fwd = which == "fwd"
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_train_swiglu_{which}",
            input_names=["y"] if fwd else ["y", "cot"],
            output_names=["out"] if fwd else ["dy"],
            source=_SWIGLU_FWD if fwd else _SWIGLU_BWD,
            header=_SWIGLU_HEADER,
        )
        _kernels[("swiglu", which)] = kernel
    return kernel


def _swiglu_launch(which: str, inputs: list[mx.array], F: int, out_cols: int) -> mx.array:
    rows = inputs[0].size // (2 * F)
    groups = rows * (F // 8)
    y = inputs[0]
    (out,) = _swiglu_kernel(which)(
        inputs=[a.reshape(rows, a.shape[-1]) for a in inputs],
        template=[("T", y.dtype), ("F", F)],
        grid=(-(-groups // _THREADS) * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(rows, out_cols)],
        output_dtypes=[y.dtype],
    )
    return out.reshape(*y.shape[:-1], out_cols)


def swiglu_joined_supported(dtype: mx.Dtype, F: int) -> bool:
    """Whether :func:`swiglu_joined` runs its kernels for a gate|up product [..., 2F] of
    ``dtype``: CUDA, bf16 / fp16, F a multiple of 8 (16-byte accesses)."""
    return train_rows_enabled() and dtype in (mx.bfloat16, mx.float16) and F % 8 == 0


@mx.custom_function
def swiglu_joined(y: mx.array) -> mx.array:
    """``silu(gate) * up`` of the fused product y = [gate | up] [..., 2F] -> [..., F], one CUDA
    kernel (see the module docstring); its vjp returns the gradient of y [..., 2F] from one
    kernel. Only where :func:`swiglu_joined_supported`."""
    F = y.shape[-1] // 2
    return _swiglu_launch("fwd", [y], F, F)


@swiglu_joined.vjp
def _swiglu_joined_vjp(primals, cotangent, _output):
    y = primals[0] if isinstance(primals, (list, tuple)) else primals  # one input: MLX passes it alone
    F = y.shape[-1] // 2
    return _swiglu_launch("bwd", [y, cotangent.astype(y.dtype)], F, 2 * F)


# ------------------------------------------------------------- a projection group's columns
# The gradient of a column split (the traced step's q|k|v|o~|i~|f~ product, [..., N]) is the
# concatenation of the pieces' cotangents: MLX runs it as one strided copy per piece (144 launches,
# 2.5 ms per 1.3b step in S8R3's trace). Here one kernel writes the joined rows: each thread 8
# consecutive columns (one 16-byte load and store where they lie in one piece whose rows allow it,
# else element by element). PIECES: the generated chain that picks a column's piece.
_JOIN = """
    const size_t idx = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const size_t row = idx / GROUPS;
    const int c0 = int(idx % GROUPS) * 8;
    if (row >= ROWS) return;
    T* dst = out + row * N + c0;
    const T* src = nullptr;  // the piece's element for column c0, where all 8 columns lie in it
PIECES    if (src != nullptr && ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        return;
    }
    #pragma unroll
    for (int e = 0; e < 8; ++e) {
        const int c = c0 + e;
        if (c >= N) break;
ELEMENTS    }
"""


def join_columns_supported(dtype: mx.Dtype, widths: tuple[int, ...]) -> bool:
    """Whether :func:`split_columns` gets its kernel: CUDA (unless ``XLSTM_METAL_TRAIN_JOIN=0``),
    bf16 / fp16, at most 8 pieces."""
    return (train_rows_enabled() and os.environ.get("XLSTM_METAL_TRAIN_JOIN", "1") != "0"
            and dtype in (mx.bfloat16, mx.float16) and 1 < len(widths) <= 8)


def _join_kernel(widths: tuple[int, ...]):
    key = ("join", widths)
    kernel = _kernels.get(key)
    if kernel is None:
        starts = [sum(widths[:j]) for j in range(len(widths))]
        pieces, elements = "", ""
        for j, (a, w) in enumerate(zip(starts, widths)):
            if w % 8 == 0 and a % 8 == 0:
                pieces += (f"    {'else ' if pieces else ''}if (c0 >= {a} && c0 + 8 <= {a + w}) "
                           f"src = x{j} + row * {w} + (c0 - {a});\n")
            elements += (f"        {'else ' if j else ''}if (c < {a + w}) dst[e] = x{j}[row * {w} + c - {a}];\n")
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_train_join_{kernel_tag(key)}", input_names=[f"x{j}" for j in range(len(widths))],
            output_names=["out"], source=_JOIN.replace("PIECES", pieces).replace("ELEMENTS", elements))
        _kernels[key] = kernel
    return kernel


def _join_launch(pieces: list[mx.array], widths: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    N = sum(widths)
    rows = pieces[0].size // widths[0]
    groups = -(-N // 8)
    (out,) = _join_kernel(widths)(
        inputs=[p.astype(dtype).reshape(rows, w) for p, w in zip(pieces, widths)],
        template=[("T", dtype), ("N", N), ("GROUPS", groups), ("ROWS", rows)],
        grid=(-(-(rows * groups) // _THREADS) * _THREADS, 1, 1), threadgroup=(_THREADS, 1, 1),
        output_shapes=[(rows, N)], output_dtypes=[dtype])
    return out.reshape(*pieces[0].shape[:-1], N)


_splits: dict[tuple[int, ...], Callable] = {}


def split_columns(y: mx.array, bounds: list[int]) -> list[mx.array]:
    """``mx.split(y, bounds, axis=-1)`` whose vjp joins the pieces' cotangents in one kernel
    (the bits of MLX's concatenation). Only where :func:`join_columns_supported`."""
    N = y.shape[-1]
    edges = [0, *bounds, N]
    widths = tuple(b - a for a, b in zip(edges[:-1], edges[1:]))
    fn = _splits.get(widths)
    if fn is None:
        cuts = list(bounds)

        @mx.custom_function
        def fn(y):
            return tuple(mx.split(y, cuts, axis=-1))

        @fn.vjp
        def fn_vjp(primals, cotangents, _outputs):
            y = primals[0] if isinstance(primals, (list, tuple)) else primals
            return _join_launch(list(cotangents), widths, y.dtype)

        _splits[widths] = fn
    return list(fn(y))


def train_recompute_enabled() -> bool:
    """Whether the training step recomputes the SwiGLU's output in the backward instead of
    keeping it (:func:`swiglu_down`; default on, ``XLSTM_METAL_TRAIN_RECOMPUTE=0`` keeps it)."""
    return os.environ.get("XLSTM_METAL_TRAIN_RECOMPUTE", "1") != "0"


def train_swiglu_kept_fraction() -> float:
    """The share of FFNs (spread evenly over the step's blocks) whose SwiGLU output the training
    step keeps for the backward while :func:`train_recompute_enabled` recomputes the others'
    (``XLSTM_METAL_TRAIN_KEEP_SWIGLU``, 0 to 1, default 0): each kept one trades [B, S, F] of
    memory (90 MB at the 1.3b shape and 8,192 tokens) for one SwiGLU pass fewer."""
    raw = os.environ.get("XLSTM_METAL_TRAIN_KEEP_SWIGLU", "0")
    try:
        share = float(raw)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"XLSTM_METAL_TRAIN_KEEP_SWIGLU must be a number from 0 to 1, got {raw!r}")
    return share


_FFNS_SEEN: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("xlstm_metal_train_ffns_seen",
                                                                              default=None)


@contextlib.contextmanager
def counting_ffns() -> Iterator[None]:
    """Inside (one trace of the training step's loss): :func:`swiglu_output_recomputed` counts
    the FFNs it is asked about, so that :func:`train_swiglu_kept_fraction` of them keep their
    output."""
    token = _FFNS_SEEN.set([0])
    try:
        yield
    finally:
        _FFNS_SEEN.reset(token)


def swiglu_output_recomputed() -> bool:
    """Whether this FFN of the training step (the next one, in the order the step runs them,
    inside :func:`counting_ffns`) recomputes its SwiGLU output in the backward: with
    :func:`train_recompute_enabled`, all but a :func:`train_swiglu_kept_fraction` share of them,
    the kept ones spread evenly (FFN i is kept where floor((i + 1) f) > floor(i f))."""
    if not train_recompute_enabled():
        return False
    share, seen = train_swiglu_kept_fraction(), _FFNS_SEEN.get()
    if share == 0.0 or seen is None:
        return share < 1.0
    i = seen[0]
    seen[0] += 1
    return math.floor((i + 1) * share) == math.floor(i * share)


@mx.custom_function
def swiglu_down(y: mx.array, w_down: mx.array) -> mx.array:
    """``swiglu_joined(y) @ w_down.T`` (the FFN after its gate|up product y [..., 2F]; w_down
    [E, F]) keeping only y and w_down for the backward, which recomputes the SwiGLU (one kernel,
    the same bits) instead of holding its output: [..., F] per block, 90 MB at the 1.3b shape
    and 8,192 tokens (2.2 GB over 24 blocks). The gradients are those of
    :func:`swiglu_joined` followed by :func:`~xlstm_metal.cells.fused.linear_rows_grad`, op
    for op. Only where :func:`swiglu_joined_supported`."""
    F = y.shape[-1] // 2
    return _swiglu_launch("fwd", [y], F, F) @ w_down.T


@swiglu_down.vjp
def _swiglu_down_vjp(primals, cotangent, _output):
    return _swiglu_down_grads(*primals, cotangent)


def _swiglu_down_grads(y: mx.array, w_down: mx.array, cotangent: mx.array) -> tuple[mx.array, mx.array]:
    """(dy, dw_down) of :func:`swiglu_down`, recomputing the SwiGLU."""
    F = y.shape[-1] // 2
    s = _swiglu_launch("fwd", [y], F, F)
    g2 = cotangent.reshape(-1, cotangent.shape[-1])
    dw = g2.T @ s.reshape(-1, F)
    ds = cotangent @ w_down
    return _swiglu_launch("bwd", [y, ds.astype(y.dtype)], F, 2 * F), dw


def train_addmm_enabled() -> bool:
    """Whether the training step adds each block's residual inside the GEMM that ends the
    branch (``mx.addmm``: cuBLASLt's epilogue reads the residual) instead of as a separate
    kernel (``XLSTM_METAL_TRAIN_ADDMM``, default on; 0: a separate add). One rounding (of
    product + residual) instead of two: not the same bits."""
    return os.environ.get("XLSTM_METAL_TRAIN_ADDMM", "1") != "0"


class _Residual:
    __slots__ = ("x", "taken")

    def __init__(self, x: mx.array):
        self.x, self.taken = x, False


_RESIDUAL: contextvars.ContextVar[_Residual | None] = contextvars.ContextVar("xlstm_metal_train_residual",
                                                                               default=None)


@contextlib.contextmanager
def residual_into_output(x: mx.array) -> Iterator[_Residual]:
    """Inside (with :func:`train_addmm_enabled`): the first :func:`swiglu_down` /
    :func:`norm_gate_linear` whose output has ``x``'s shape and dtype returns ``x + output``,
    the add in its GEMM, and sets the yielded holder's ``taken``; when it stays False the
    caller adds ``x`` itself."""
    holder = _Residual(x)
    token = _RESIDUAL.set(holder if train_addmm_enabled() else None)
    try:
        yield holder
    finally:
        _RESIDUAL.reset(token)


def _take_residual(shape: tuple, dtype: mx.Dtype) -> mx.array | None:
    holder = _RESIDUAL.get()
    if holder is None or holder.taken or tuple(holder.x.shape) != tuple(shape) or holder.x.dtype != dtype:
        return None
    holder.taken = True
    return holder.x


def _addmm_rows(r: mx.array, a: mx.array, w: mx.array) -> mx.array:
    """``r + a @ w.T`` (a [..., K], w [N, K], r [..., N]) as one GEMM reading r in its epilogue."""
    N = w.shape[0]
    return mx.addmm(r.reshape(-1, N), a.reshape(-1, a.shape[-1]), w.T).reshape(*a.shape[:-1], N)


@mx.custom_function
def _swiglu_down_add(y: mx.array, w_down: mx.array, r: mx.array) -> mx.array:
    F = y.shape[-1] // 2
    return _addmm_rows(r, _swiglu_launch("fwd", [y], F, F), w_down)


@_swiglu_down_add.vjp
def _swiglu_down_add_vjp(primals, cotangent, _output):
    y, w_down, r = primals
    dy, dw = _swiglu_down_grads(y, w_down, cotangent)
    return dy, dw, cotangent.astype(r.dtype)


def swiglu_down_residual(y: mx.array, w_down: mx.array) -> mx.array:
    """:func:`swiglu_down`, plus the residual of :func:`residual_into_output` in the GEMM where
    one is waiting for this output."""
    r = _take_residual((*y.shape[:-1], w_down.shape[0]), w_down.dtype) if y.dtype == w_down.dtype else None
    return swiglu_down(y, w_down) if r is None else _swiglu_down_add(y, w_down, r)


def train_cell_recompute_enabled() -> bool:
    """Whether the training step (with :func:`train_recompute_enabled`) recomputes the mLSTM
    output cell's output in the backward (:func:`norm_gate_linear`) instead of keeping it
    (``XLSTM_METAL_TRAIN_RECOMPUTE_CELL``, default on; 0: kept, [B, S, NH * DV] per block, 0.8 GB
    at the 1.3b shape and 8,192 tokens, one norm-gate launch per block fewer)."""
    return os.environ.get("XLSTM_METAL_TRAIN_RECOMPUTE_CELL", "1") != "0"


@mx.custom_function
def _linear_add(x: mx.array, w: mx.array, r: mx.array) -> mx.array:
    return _addmm_rows(r, x, w)


@_linear_add.vjp
def _linear_add_vjp(primals, cotangent, _output):
    x, w, r = primals
    N, K = w.shape
    # cells.fused.linear_rows_grad's gradients (row-major weight gradient), and the residual's
    return (cotangent @ w, (cotangent.reshape(-1, N).T @ x.reshape(-1, K)).astype(w.dtype),
            cotangent.astype(r.dtype))


def linear_residual(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T`` with a row-major weight gradient (:func:`~xlstm_metal.cells.fused.
    linear_rows_grad`), plus the residual of :func:`residual_into_output` in the GEMM where one
    is waiting for this output."""
    r = _take_residual((*x.shape[:-1], w.shape[0]), w.dtype) if x.dtype == w.dtype else None
    if r is None:
        from ...cells.fused import linear_rows_grad

        return linear_rows_grad(x, w)
    return _linear_add(x, w, r)


# ------------------------------------------------------------ pre-norm and residual fan-out
# The block's input x feeds its pre-norm and its residual; autodiff sums the two cotangents in a
# separate add (48 launches and ~1.2 ms per 1.3b step, H200 S10R1). residual_norm's backward
# writes dx = c + d rms_norm(x, w) / dx . g in one pass. One block per RPB rows of D columns,
# D / 8 threads, thread -> 8 consecutive columns (its weights and weight-gradient sums in
# registers); the row sums (x^2, g w x) over the block: warp shuffles, then one float2 per warp
# in shared memory (two buffers, alternating by row: one barrier per row). Float32 arithmetic,
# one rounding of dx; dw_part [blocks, D] float32: each block's sum of g * x * rstd.
_NORM_RES_BWD = """
    constexpr int WARPS = D / 256;
    __shared__ float2 part[2][WARPS];
    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int col = tid * 8;
    const int rows = x_shape[0];
    float ws[8], dw[8];
    #pragma unroll
    for (int e = 0; e < 8; ++e) { ws[e] = static_cast<float>(w[col + e]); dw[e] = 0.0f; }
    // 16-byte loads and stores where every row array allows them (a view may start anywhere)
    const bool vec = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(g)
                       | reinterpret_cast<uintptr_t>(c) | reinterpret_cast<uintptr_t>(dx)) & 15) == 0;
    auto load8 = [vec](const T* p, float* out) {
        if (vec) {
            const uint4 u = *reinterpret_cast<const uint4*>(p);
            const T* t = reinterpret_cast<const T*>(&u);
            #pragma unroll
            for (int e = 0; e < 8; ++e) out[e] = static_cast<float>(t[e]);
        } else {
            #pragma unroll
            for (int e = 0; e < 8; ++e) out[e] = static_cast<float>(p[e]);
        }
    };
    const int r0 = blockIdx.x * RPB;
    for (int i = 0; i < RPB; ++i) {
        const int r = r0 + i;
        if (r >= rows) break;
        const size_t off = static_cast<size_t>(r) * D + col;
        float xs[8], gs[8], cs[8], gw[8];
        load8(x + off, xs);
        load8(g + off, gs);
        load8(c + off, cs);
        float ss = 0.0f, dot = 0.0f;
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
            gw[e] = gs[e] * ws[e];
            ss += xs[e] * xs[e];
            dot += gw[e] * xs[e];
        }
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            ss += __shfl_xor_sync(0xffffffffu, ss, o);
            dot += __shfl_xor_sync(0xffffffffu, dot, o);
        }
        if (lane == 0) part[i & 1][warp] = make_float2(ss, dot);
        __syncthreads();
        ss = 0.0f; dot = 0.0f;
        #pragma unroll
        for (int k = 0; k < WARPS; ++k) { const float2 q = part[i & 1][k]; ss += q.x; dot += q.y; }
        const float rstd = rsqrtf(ss / D + EPS);
        const float m = dot * rstd / D;  // mean(g w n), n = x rstd
        __align__(16) T out[8];
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float n = xs[e] * rstd;
            out[e] = static_cast<T>(cs[e] + rstd * (gw[e] - n * m));
            dw[e] += gs[e] * n;
        }
        if (vec) {
            *reinterpret_cast<uint4*>(dx + off) = *reinterpret_cast<const uint4*>(out);
        } else {
            #pragma unroll
            for (int e = 0; e < 8; ++e) dx[off + e] = out[e];
        }
    }
    float* dwr = dw_part + static_cast<size_t>(blockIdx.x) * D + col;
    #pragma unroll
    for (int e = 0; e < 8; ++e) dwr[e] = dw[e];
"""
#: Rows per block of the residual norm's backward kernel.
_NORM_RES_RPB = 32


def residual_norm_enabled() -> bool:
    """Whether the training step runs each block's pre-norm as :func:`residual_norm` (the
    residual's cotangent added in the norm's backward kernel; ``XLSTM_METAL_TRAIN_NORM_RESIDUAL``,
    default off; 1: on). Off because it measured slower: H200, 1.3b, 4 x 2,048 (S13R2), 183.3 ms
    per step against 176.3, peak 50.5 GB against 39.1."""
    return os.environ.get("XLSTM_METAL_TRAIN_NORM_RESIDUAL", "0") == "1"


def residual_norm_supported(x: mx.array, weight: mx.array) -> bool:
    """Whether :func:`residual_norm` runs its kernel: CUDA (:func:`train_rows_enabled`), the
    switch on, x [..., D] and weight [D] of one dtype (bf16 / fp16), D a multiple of 256 up to
    8,192."""
    D = x.shape[-1]
    return (train_rows_enabled() and residual_norm_enabled() and x.dtype == weight.dtype
            and x.dtype in (mx.bfloat16, mx.float16) and weight.ndim == 1 and weight.shape[0] == D
            and D % 256 == 0 and D <= 8192 and x.size // D > 1)


_res_norms: dict[float, Callable] = {}


def residual_norm(x: mx.array, weight: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """(x, rms_norm(x, weight)) for a block whose input x feeds both its pre-norm and its
    residual: the first output is x itself (its buffer, no copy), the second
    ``mx.fast.rms_norm``'s (the same bits). The vjp receives both outputs' cotangents and
    returns dx = c_x + (d rms_norm / dx) g in one kernel on CUDA (float32 arithmetic, one
    rounding; autodiff would round the norm's gradient, then add c_x in a second launch), and
    dweight = sum over rows of g * x * rstd (float32 partial sums per block)."""
    eps = float(eps)
    fn = _res_norms.get(eps)
    if fn is None:
        @mx.custom_function
        def fn(x, w):
            return x, mx.fast.rms_norm(x, w, eps)

        @fn.vjp
        def fn_vjp(primals, cotangents, _outputs):
            x, w = primals
            c, g = cotangents
            return _residual_norm_backward(x, w, g, c, eps)

        _res_norms[eps] = fn
    return fn(x, weight)


def _residual_norm_backward(x: mx.array, w: mx.array, g: mx.array, c: mx.array, eps: float):
    """(dx, dweight) of :func:`residual_norm`: its kernel on CUDA, float32 ops elsewhere."""
    D = x.shape[-1]
    if not (train_rows_enabled() and x.dtype in (mx.bfloat16, mx.float16) and D % 256 == 0 and D <= 8192):
        xf, gf, wf = x.astype(mx.float32), g.astype(mx.float32), w.astype(mx.float32)
        rstd = mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
        n = xf * rstd
        gw = gf * wf
        dx = c.astype(mx.float32) + rstd * (gw - n * mx.mean(gw * n, axis=-1, keepdims=True))
        dw = (gf * n).reshape(-1, D).sum(axis=0)
        return dx.astype(x.dtype), dw.astype(w.dtype)
    key = ("norm_res_bwd", eps)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_train_norm_res_bwd_{kernel_tag(key)}",
            input_names=["x", "w", "g", "c"],
            output_names=["dx", "dw_part"],
            source=_NORM_RES_BWD.replace("EPS", f"{eps!r}f"),
        )
        _kernels[key] = kernel
    rows = x.size // D
    blocks = -(-rows // _NORM_RES_RPB)
    dx, dw_part = kernel(
        inputs=[x.reshape(rows, D), w, g.astype(x.dtype).reshape(rows, D), c.astype(x.dtype).reshape(rows, D)],
        template=[("T", x.dtype), ("D", D), ("RPB", _NORM_RES_RPB)],
        grid=(blocks * (D // 8), 1, 1),
        threadgroup=(D // 8, 1, 1),
        output_shapes=[(rows, D), (blocks, D)],
        output_dtypes=[x.dtype, mx.float32],
    )
    return dx.reshape(x.shape), dw_part.sum(axis=0).astype(w.dtype)


# ------------------------------------------------------------- output gate + multi-head norm
# One warp per (token, head) row of DV values (8 consecutive per lane, DV / 256 groups), TPW
# tokens per warp, all of one head (blockIdx.y): the warp sums its rows' shares of the weight's
# gradient and writes them as one row of dw_part [warps, NH * DV] (float32).
_NORM_GATE_BWD = """
    constexpr int GROUPS = DV / 256;
    const int lane = threadIdx.x & 31;
    const int hd = blockIdx.y;
    const int B = h_shape[0];
    const int S = h_shape[2];
    const int tokens = B * S;
    const int warp = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const T* wr = w + static_cast<int64_t>(hd) * DV * w_strides[0];
    const bool w_vec = w_strides[0] == 1 && (reinterpret_cast<uintptr_t>(wr) & 15) == 0;
    float ws[GROUPS][8];
    float dw[GROUPS][8];
    #pragma unroll
    for (int u = 0; u < GROUPS; ++u) {
        xl_load8(wr + (u * 256 + lane * 8) * w_strides[0], w_strides[0], w_vec, ws[u]);
        #pragma unroll
        for (int e = 0; e < 8; ++e) dw[u][e] = 0.0f;
    }
    const T one = static_cast<T>(1.0f);
    for (int i = 0; i < TPW; ++i) {
        const int bt = warp * TPW + i;
        if (bt >= tokens) break;
        const int b = bt / S;
        const int t = bt % S;
        const T* hr = h + b * h_strides[0] + hd * h_strides[1] + t * h_strides[2];
        const T* orow = o + b * o_strides[0] + t * o_strides[1] + static_cast<int64_t>(hd) * DV * o_strides[2];
        const T* crow = cot + b * cot_strides[0] + t * cot_strides[1] + static_cast<int64_t>(hd) * DV * cot_strides[2];
        const bool h_vec = h_strides[3] == 1 && (reinterpret_cast<uintptr_t>(hr) & 15) == 0;
        const bool o_vec = o_strides[2] == 1 && (reinterpret_cast<uintptr_t>(orow) & 15) == 0;
        const bool c_vec = cot_strides[2] == 1 && (reinterpret_cast<uintptr_t>(crow) & 15) == 0;
        float xs[GROUPS][8];
        // The row's statistics as the forward kernel (norm_gate_rows) computes them.
        #pragma unroll
        for (int u = 0; u < GROUPS; ++u)
            xl_load8(hr + (u * 256 + lane * 8) * h_strides[3], h_strides[3], h_vec, xs[u]);
        const float2 stats = xl_row_stats<GROUPS>(xs, DV, EPS);
        const float mean = stats.x, rstd = stats.y;
        // Elementwise part, the ops' roundings: n = T(xhat); hn = n * w; s = T(sigmoid(o~));
        // ds = c * hn; dhn = c * s; do~ = ds * (s * (1 - s)); dn = dhn * w; dw += dhn * n.
        float g[GROUPS][8];
        float q[8];  // this lane's sum of g, then of g * xhat
        float r[8];
        #pragma unroll
        for (int e = 0; e < 8; ++e) { q[e] = 0.0f; r[e] = 0.0f; }
        T* do_row = do_out + (static_cast<size_t>(bt) * NH + hd) * DV;
        #pragma unroll
        for (int u = 0; u < GROUPS; ++u) {
            const int j = u * 256 + lane * 8;
            float os[8], cs[8];
            xl_load8(orow + j * o_strides[2], o_strides[2], o_vec, os);
            xl_load8(crow + j * cot_strides[2], cot_strides[2], c_vec, cs);
            __align__(16) T dov[8];
            #pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float xhat = (xs[u][e] - mean) * rstd;
                const T n = static_cast<T>(xhat);
                const T hn = n * static_cast<T>(ws[u][e]);
                const T s = static_cast<T>(1.0f / (1.0f + expf(-os[e])));
                const T c = static_cast<T>(cs[e]);
                const T ds = c * hn;
                const T dhn = c * s;
                dov[e] = ds * (s * (one - s));
                const T dn = dhn * static_cast<T>(ws[u][e]);
                dw[u][e] += static_cast<float>(dhn * n);
                g[u][e] = static_cast<float>(dn);
                q[e] += g[u][e];
                r[e] += g[u][e] * xhat;
                xs[u][e] = xhat;
            }
            *reinterpret_cast<uint4*>(do_row + j) = *reinterpret_cast<const uint4*>(dov);
        }
        const float mg = xl_row_sum(q) / DV;
        const float mgx = xl_row_sum(r) / DV;
        T* dh_row = dh + ((static_cast<size_t>(b) * NH + hd) * S + t) * DV;
        #pragma unroll
        for (int u = 0; u < GROUPS; ++u) {
            __align__(16) T dx[8];
            #pragma unroll
            for (int e = 0; e < 8; ++e) dx[e] = static_cast<T>(rstd * (g[u][e] - mg - xs[u][e] * mgx));
            *reinterpret_cast<uint4*>(dh_row + u * 256 + lane * 8) = *reinterpret_cast<const uint4*>(dx);
        }
    }
    float* dw_row = dw_part + static_cast<size_t>(warp) * (NH * DV) + hd * DV;
    #pragma unroll
    for (int u = 0; u < GROUPS; ++u) {
        #pragma unroll
        for (int e = 0; e < 8; ++e) dw_row[u * 256 + lane * 8 + e] = dw[u][e];
    }
"""

_WARPS = 8  # per block
_TPW = 16  # tokens per warp


def norm_gate_train_supported(h: mx.array, o_preact: mx.array, weight: mx.array) -> bool:
    """Whether :func:`norm_gate_train` runs its kernels: CUDA, h [B, NH, S, DV] with S > 1 and
    DV a multiple of 256, o~ and the weight in h's dtype (bf16 / fp16)."""
    return (train_rows_enabled() and h.ndim == 4 and h.shape[2] > 1 and norm_gate_rows_supported(h, weight)
            and o_preact.dtype == h.dtype)


_norm_gates: dict[tuple[float, bool], Callable] = {}


def norm_gate_train(h: mx.array, o_preact: mx.array, weight: mx.array, eps: float) -> mx.array:
    """``sigmoid(o~) * MultiHeadLayerNorm(h)`` (the output cell before out_proj) with a vjp:
    h [B, NH, S, DV], o~ [B, S, NH * DV], weight [NH * DV] (one dtype, any strides) ->
    [B, S, NH * DV]. Only where :func:`norm_gate_train_supported`."""
    return _norm_gate_fn(float(eps), False)(h, o_preact, weight)


def norm_gate_linear(h: mx.array, o_preact: mx.array, weight: mx.array, w_out: mx.array, eps: float) -> mx.array:
    """``norm_gate_train(h, o~, weight) @ w_out.T`` (the output cell and out_proj, w_out [E,
    NH * DV]) keeping only its inputs for the backward, which recomputes the cell's output (one
    kernel, the same bits) instead of holding it: 33.5 MB per block at the 1.3b shape and 8,192
    tokens. Gradients op for op those of :func:`norm_gate_train` followed by
    :func:`~xlstm_metal.cells.fused.linear_rows_grad`."""
    B, _, S, _ = h.shape
    r = _take_residual((B, S, w_out.shape[0]), w_out.dtype) if h.dtype == w_out.dtype else None
    if r is not None:  # the residual of residual_into_output, added in out_proj's GEMM
        return _norm_gate_fn(float(eps), "residual")(h, o_preact, weight, w_out, r)
    return _norm_gate_fn(float(eps), True)(h, o_preact, weight, w_out)


def _norm_gate_fn(eps: float, with_out: bool | str) -> Callable:
    fn = _norm_gates.get((eps, with_out))
    if fn is not None:
        return fn

    if with_out == "residual":
        @mx.custom_function
        def fn(h, o, w, w_out, r):
            return _addmm_rows(r, norm_gate_rows(h, o, w, eps), w_out)

        @fn.vjp
        def fn_vjp(primals, cotangent, _output):
            h, o, w, w_out, r = primals
            return (*_norm_gate_linear_grads(h, o, w, w_out, cotangent, eps), cotangent.astype(r.dtype))
    elif with_out:
        @mx.custom_function
        def fn(h, o, w, w_out):
            return norm_gate_rows(h, o, w, eps) @ w_out.T

        @fn.vjp
        def fn_vjp(primals, cotangent, _output):
            return _norm_gate_linear_grads(*primals, cotangent, eps)
    else:
        @mx.custom_function
        def fn(h, o, w):
            return norm_gate_rows(h, o, w, eps)

        @fn.vjp
        def fn_vjp(primals, cotangent, _output):
            return _norm_gate_backward(*primals, cotangent, eps)

    _norm_gates[(eps, with_out)] = fn
    return fn


def _norm_gate_linear_grads(h, o, w, w_out, cotangent, eps: float) -> tuple:
    """(dh, do~, dweight, dw_out) of :func:`norm_gate_linear`, recomputing the cell's output."""
    z = norm_gate_rows(h, o, w, eps)
    g2 = cotangent.reshape(-1, cotangent.shape[-1])
    dw_out = g2.T @ z.reshape(-1, z.shape[-1])
    return (*_norm_gate_backward(h, o, w, cotangent @ w_out, eps), dw_out)


def _norm_gate_backward(h: mx.array, o: mx.array, w: mx.array, cotangent: mx.array, eps: float):
    """(dh [B, NH, S, DV], do~ [B, S, NH * DV], dweight [NH * DV]) of the output cell."""
    B, NH, S, DV = h.shape
    kernel = _kernels.get(("norm_gate_bwd", eps))
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_train_norm_gate_bwd_{kernel_tag(('norm_gate_bwd', eps))}",
            input_names=["h", "o", "w", "cot"],
            output_names=["dh", "do_out", "dw_part"],
            source=_NORM_GATE_BWD.replace("EPS", f"{eps!r}f"),
            header=_NORM_GATE_HEADER,
            ensure_row_contiguous=False,
        )
        _kernels[("norm_gate_bwd", eps)] = kernel
    warps = -(-(B * S) // _TPW)
    blocks = -(-warps // _WARPS)
    dh, do, dw_part = kernel(
        inputs=[h, o, w, cotangent.astype(h.dtype)],
        template=[("T", h.dtype), ("NH", NH), ("DV", DV), ("TPW", _TPW)],
        grid=(blocks * 32 * _WARPS, NH, 1),
        threadgroup=(32 * _WARPS, 1, 1),
        output_shapes=[(B, NH, S, DV), (B, S, NH * DV), (blocks * _WARPS, NH * DV)],
        output_dtypes=[h.dtype, h.dtype, mx.float32],
    )  # every warp of the grid writes its row of dw_part (zeros past the last token)
    return dh, do, dw_part.sum(axis=0).astype(w.dtype)


# ------------------------------------------------------------------ joined compute copies
# Members w0.. [R_j, E] float32 -> out [sum R_j, E] in T: thread -> 4 consecutive columns of one
# row. SELECT (generated) picks the member and its row from the output row.
_CAST_JOINED = """
    constexpr size_t PER_ROW = E / 4;
    const size_t gid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (gid >= static_cast<size_t>(ROWS) * PER_ROW) return;
    const size_t row = gid / PER_ROW;
    const size_t col = (gid % PER_ROW) * 4;
    const float* src;
    size_t r;
SELECT
    const float* p = src + r * E + col;
    __align__(8) T v[4];
    #pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = static_cast<T>(p[e]);
    *reinterpret_cast<uint2*>(out + row * E + col) = *reinterpret_cast<const uint2*>(v);
"""


def cast_joined(members: list[mx.array], dtype: mx.Dtype) -> mx.array:
    """``mx.concatenate([w.astype(dtype) for w in members], axis=0)``: the compute copy of a
    group of projections that the traced training step runs as one matmul
    (:func:`~xlstm_metal.cells.fused.joined_weights`), members [R_j, E] float32. One kernel on
    CUDA (bf16 / fp16, E a multiple of 4) instead of a cast per member and the concatenation's
    copy per member; the same values."""
    E = members[0].shape[-1]
    if not (train_rows_enabled() and dtype in (mx.bfloat16, mx.float16) and E % 4 == 0
            and all(w.ndim == 2 and w.shape[1] == E and w.dtype == mx.float32 for w in members)):
        return mx.concatenate([w.astype(dtype) for w in members], axis=0)
    rows = [w.shape[0] for w in members]
    select, start = [], 0
    for j, r in enumerate(rows):
        test = "" if j == len(rows) - 1 else f"if (row < {start + r}) "
        select.append(f"    {'else ' if j else ''}{test}{{ src = w{j}; r = row - {start}; }}")
        start += r
    key = ("cast_joined", tuple(rows))
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_train_cast_joined_{kernel_tag(key)}",
            input_names=[f"w{j}" for j in range(len(rows))],
            output_names=["out"],
            source=_CAST_JOINED.replace("SELECT", "\n".join(select)),
        )
        _kernels[key] = kernel
    total = sum(rows)
    groups = total * (E // 4)
    (out,) = kernel(
        inputs=list(members),
        template=[("T", dtype), ("E", E), ("ROWS", total)],
        grid=(-(-groups // _THREADS) * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(total, E)],
        output_dtypes=[dtype],
    )
    return out


# --------------------------------------------------------------- many compute copies at once
# Float32 arrays x0.. -> their casts o0.. in T, one launch for up to CAST_MANY_MAX of them: the
# block's array from a table of block starts (tab[0..count-1]) and sizes (tab[count..]), 4
# consecutive elements per thread (a 16-byte load where aligned). CASES: the generated switch.
_CAST_MANY = """
    int lo = 0, hi = COUNT - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (unsigned(tab[mid]) <= blockIdx.x) lo = mid; else hi = mid - 1;
    }
    const float* src; T* dst;
    switch (lo) {
CASES    }
    const size_t n = size_t(unsigned(tab[COUNT + lo]));
    const size_t i = size_t(blockIdx.x - unsigned(tab[lo])) * blockDim.x * 4 + size_t(threadIdx.x) * 4;
    if (i + 4 <= n && ((reinterpret_cast<uintptr_t>(src + i) & 15) | (reinterpret_cast<uintptr_t>(dst + i) & 7)) == 0) {
        const float4 v = *reinterpret_cast<const float4*>(src + i);
        __align__(8) T o[4] = {static_cast<T>(v.x), static_cast<T>(v.y), static_cast<T>(v.z), static_cast<T>(v.w)};
        *reinterpret_cast<uint2*>(dst + i) = *reinterpret_cast<const uint2*>(o);
    } else {
        for (size_t e = i; e < i + 4 && e < n; ++e) dst[e] = static_cast<T>(src[e]);
    }
"""
#: Most arrays one :func:`cast_many` launch casts (2 pointers each).
CAST_MANY_MAX = 96


def cast_many_enabled() -> bool:
    """Whether the training step casts its float32 masters that no joined group holds with
    :func:`cast_many` (default on; ``XLSTM_METAL_TRAIN_CAST_MANY=0``: one cast each)."""
    return train_rows_enabled() and os.environ.get("XLSTM_METAL_TRAIN_CAST_MANY", "1") != "0"


def cast_many(arrays: list[mx.array], dtype: mx.Dtype) -> list[mx.array]:
    """``[a.astype(dtype) for a in arrays]`` for float32 arrays: on CUDA (bf16 / fp16) one kernel
    per up to :data:`CAST_MANY_MAX` arrays instead of a launch each; the same values."""
    if not (train_rows_enabled() and dtype in (mx.bfloat16, mx.float16) and arrays
            and all(a.dtype == mx.float32 for a in arrays)):
        return [a.astype(dtype) for a in arrays]
    from .adamw import multi_groups

    out: list[mx.array] = []
    for part in multi_groups([a.size for a in arrays], CAST_MANY_MAX):
        group = [arrays[j] for j in part]
        count = len(group)
        key = ("cast_many", count)
        kernel = _kernels.get(key)
        if kernel is None:
            cases = "".join(f"    case {j}: src = x{j}; dst = o{j}; break;\n" for j in range(count))
            kernel = mx.fast.cuda_kernel(
                name=f"xlstm_train_cast_many_{kernel_tag(key)}",
                input_names=[f"x{j}" for j in range(count)] + ["tab"], output_names=[f"o{j}" for j in range(count)],
                source=_CAST_MANY.replace("COUNT", str(count)).replace("CASES", cases))
            _kernels[key] = kernel
        starts, total = [], 0
        for a in group:
            starts.append(total)
            total += max(1, -(-a.size // (_THREADS * 4)))
        tab = mx.array(starts + [a.size for a in group], dtype=mx.int32)
        out += kernel(inputs=group + [tab], template=[("T", dtype)], grid=(total * _THREADS, 1, 1),
                      threadgroup=(_THREADS, 1, 1), output_shapes=[a.shape for a in group],
                      output_dtypes=[dtype] * count)
    return out


# ---------------------------------------------------------------------- gradient norm
# Sum of squares of many arrays in one launch: block (x, y) strides over array y (SELECT picks
# its pointer), 16-byte loads where the array is 16-byte aligned; one float32 partial per block,
# written to part[y, x] (summed afterwards in a fixed order: deterministic).
_SUM_SQUARES = """
    const int a = blockIdx.y;
    const T* src = nullptr;
    switch (a) {
SELECT
    }
    const int64_t n = sizes[a];
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    float acc = 0.0f;
    int64_t head = 0;
    constexpr int VW = 16 / sizeof(T);  // values per 16-byte load (8 bf16, 4 float32)
    if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
        const int64_t groups = n / VW;
        for (int64_t i = start; i < groups; i += stride) {
            __align__(16) T v[VW];
            *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(src + i * VW);
            #pragma unroll
            for (int e = 0; e < VW; ++e) {
                const float x = static_cast<float>(v[e]);
                acc += x * x;
            }
        }
        head = groups * VW;
    }
    for (int64_t i = head + start; i < n; i += stride) {
        const float x = static_cast<float>(src[i]);
        acc += x * x;
    }
    __shared__ float red[32];
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.0f;
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        if (threadIdx.x == 0) part[static_cast<size_t>(a) * gridDim.x + blockIdx.x] = t;
    }
"""
_SQ_BLOCKS = 64  # blocks per array
_SQ_MAX_ARRAYS = 256  # per launch (kernel parameter space: one pointer each)


def sum_of_squares_supported(arrays: list[mx.array]) -> bool:
    """Whether :func:`sum_of_squares` runs its kernel: CUDA, two or more float arrays."""
    return train_rows_enabled() and len(arrays) > 1 and all(
        a.dtype in (mx.bfloat16, mx.float16, mx.float32) for a in arrays)


def sum_of_squares(arrays: list[mx.array]) -> mx.array:
    """sum over all ``arrays`` of ``sum(square(a.astype(float32)))`` (a float32 scalar) in one
    CUDA launch per dtype (and per 256 arrays) and one sum of the per-block partials: the global
    gradient norm's squares without MLX's square + reductions + add per gradient (~1,000 launches
    per 1.3b step). The same squares, summed in another order (float32 round-off)."""
    by_dtype: dict[mx.Dtype, list[mx.array]] = {}
    for a in arrays:
        by_dtype.setdefault(a.dtype, []).append(a)
    parts = []
    for dtype, group in by_dtype.items():
        for first in range(0, len(group), _SQ_MAX_ARRAYS):
            chunk = group[first : first + _SQ_MAX_ARRAYS]
            key = ("sum_squares", len(chunk))
            kernel = _kernels.get(key)
            if kernel is None:
                select = "\n".join(f"        case {j}: src = g{j}; break;" for j in range(len(chunk)))
                kernel = mx.fast.cuda_kernel(
                    name=f"xlstm_train_sum_squares_{len(chunk)}",
                    input_names=[f"g{j}" for j in range(len(chunk))] + ["sizes"],
                    output_names=["part"],
                    source=_SUM_SQUARES.replace("SELECT", select),
                )
                _kernels[key] = kernel
            sizes = mx.array([a.size for a in chunk], dtype=mx.int64)
            (part,) = kernel(
                inputs=[a.reshape(-1) for a in chunk] + [sizes],
                template=[("T", dtype)],
                grid=(_SQ_BLOCKS * _THREADS, len(chunk), 1),
                threadgroup=(_THREADS, 1, 1),
                output_shapes=[(len(chunk), _SQ_BLOCKS)],
                output_dtypes=[mx.float32],
            )
            parts.append(part.reshape(-1))
    return mx.sum(parts[0] if len(parts) == 1 else mx.concatenate(parts))


# ------------------------------------------------------------------ LM head: loss + gradient
# One block per row of logits [R, V] (T, row-contiguous; V % 8 == 0): pass 1 the soft-capped
# logits' max and sum of exponentials (online, float32), pass 2 the gradient of the row's loss
# (softmax - one-hot, times the soft cap's derivative) rounded to T; the row's loss lse - z[target].
_CE_ROWS = """
    constexpr int NT = 1024;
    const int row = blockIdx.x;
    const int V = z_shape[1];
    const T* zr = z + static_cast<size_t>(row) * V;
    const int target = targets[row];
    __shared__ float red_m[NT / 32];
    __shared__ float red_s[NT / 32];
    __shared__ float zt_shared;
    const float neg_inf = -__int_as_float(0x7f800000);  // -infinity (no `inf` macro in MLX's kernel header)
    float m = neg_inf, s = 0.0f;
    for (int j = threadIdx.x * 8; j < V; j += NT * 8) {
        __align__(16) T v[8];
        *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(zr + j);
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
            float zc = static_cast<float>(v[e]);
            if (CAPPED) zc = CAP * tanhf(zc / CAP);
            if (j + e == target) zt_shared = zc;
            if (zc > m) { s = s * expf(m - zc) + 1.0f; m = zc; } else { s += expf(zc - m); }
        }
    }
    // block: max, then the sum rescaled to it
    float mw = m;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) mw = fmaxf(mw, __shfl_xor_sync(0xffffffffu, mw, o));
    float sw = (m == neg_inf) ? 0.0f : s * expf(m - mw);
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) sw += __shfl_xor_sync(0xffffffffu, sw, o);
    if ((threadIdx.x & 31) == 0) { red_m[threadIdx.x >> 5] = mw; red_s[threadIdx.x >> 5] = sw; }
    __syncthreads();
    float M = red_m[0];
    for (int w = 1; w < NT / 32; ++w) M = fmaxf(M, red_m[w]);
    float Ssum = 0.0f;
    for (int w = 0; w < NT / 32; ++w) Ssum += red_s[w] * expf(red_m[w] - M);
    const float lse = M + logf(Ssum);
    if (threadIdx.x == 0) row_loss[row] = lse - zt_shared;
    T* gr = g + static_cast<size_t>(row) * V;
    for (int j = threadIdx.x * 8; j < V; j += NT * 8) {
        __align__(16) T v[8];
        *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(zr + j);
        __align__(16) T out[8];
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
            float zc = static_cast<float>(v[e]);
            float d = 1.0f;
            if (CAPPED) {
                const float t = tanhf(zc / CAP);
                zc = CAP * t;
                d = 1.0f - t * t;
            }
            float ge = expf(zc - lse) - (j + e == target ? 1.0f : 0.0f);
            if (CAPPED) ge = ge * d;
            out[e] = static_cast<T>(ge);
        }
        *reinterpret_cast<uint4*>(gr + j) = *reinterpret_cast<const uint4*>(out);
    }
"""


def cross_entropy_rows_supported(logits_dtype: mx.Dtype, vocab: int) -> bool:
    """Whether :func:`cross_entropy_rows` runs: CUDA, bf16 / fp16 logits, V a multiple of 8."""
    return train_rows_enabled() and logits_dtype in (mx.bfloat16, mx.float16) and vocab % 8 == 0


def cross_entropy_rows(logits: mx.array, targets: mx.array, soft_cap: float | None) -> tuple[mx.array, mx.array]:
    """For logits [R, V] (bf16 / fp16, the LM head's product) and targets [R]: the gradient of
    each row's cross-entropy w.r.t. the logits, ``(softmax(z) - onehot) * dz/dlogits`` with
    ``z = cap * tanh(logits / cap)`` (or the logits), in the logits' dtype [R, V], and each row's
    loss ``logsumexp(z) - z[target]`` (float32 [R]). One CUDA kernel (two passes over each row)
    instead of the float32 ops of :func:`~xlstm_metal.training.trainer.linear_cross_entropy`
    (soft cap, logsumexp, exp, the one-hot: ~5 passes over [R, V] float32); float32 round-off
    apart from them."""
    capped = soft_cap is not None
    key = ("ce_rows", float(soft_cap) if capped else None)
    kernel = _kernels.get(key)
    if kernel is None:
        source = _CE_ROWS.replace("CAPPED", "true" if capped else "false").replace(
            "CAP", f"{float(soft_cap)!r}f" if capped else "1.0f")
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_train_ce_rows_{kernel_tag(key)}",
            input_names=["z", "targets"],
            output_names=["g", "row_loss"],
            source=source,
        )
        _kernels[key] = kernel
    R, V = logits.shape
    g, row_loss = kernel(
        inputs=[logits, targets.astype(mx.int32)],
        template=[("T", logits.dtype)],
        grid=(R * 1024, 1, 1),
        threadgroup=(1024, 1, 1),
        output_shapes=[(R, V), (R,)],
        output_dtypes=[logits.dtype, mx.float32],
    )
    return g, row_loss
