"""AdamW's update of one float32 parameter as one CUDA kernel, the gradient's clip scale inside.

Why: in the compiled 1.3b train step (8,192 tokens, H200) MLX's fused elementwise kernel for
AdamW took 22.8 ms per step for the 1.32B decayed parameters (CUPTI trace, GPU round S4R2):
about 1.6 TB/s of the ~37 GB it must move (read gradient, parameter, m, v; write parameter, m,
v). This kernel reads the gradient in its own dtype (bf16 in mixed-precision training, so the
float32 copies of the gradients are never made), applies the global-norm clip's scale, and
writes the three results with coalesced loads and stores. Measured in the whole step with CUDA
graphs (S4R3): 265.5 ms per step against 268.3 ms with MLX's ops.

The arithmetic is MLX's ``optim.AdamW.apply_single`` (no bias correction) op for op, each step
rounded as MLX's separate ops round it (``__fmul_rn`` and friends: no fused multiply-add):

    g = gradient * scale
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p = p (1 - lr wd) - lr m / (sqrt(v) + eps)

with b1, b2, 1 - b1, 1 - b2, eps and wd rounded to float32 as MLX rounds Python floats.
:class:`ScaledAdamW` runs it on CUDA and MLX's ops elsewhere (or with
``XLSTM_METAL_FUSED_ADAMW=0``).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from .step import cuda_available

_THREADS = 256
_VEC = 4  # consecutive elements per thread and group: one 16-byte load of p, m, v each
_GROUPS = 2  # groups per thread, blockDim * VEC elements apart (coalesced; more bytes in flight)

# Four consecutive gradient elements as floats (16-byte aligned float32, 8-byte bf16 / fp16).
_HEADER = """
__device__ __forceinline__ float4 xl_load4(const float* g) { return *reinterpret_cast<const float4*>(g); }
__device__ __forceinline__ float4 xl_load4(const __nv_bfloat16* g) {
    const uint2 u = *reinterpret_cast<const uint2*>(g);
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                       __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}
__device__ __forceinline__ float4 xl_load4(const __half* g) {
    const uint2 u = *reinterpret_cast<const uint2*>(g);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
template <typename T>
__device__ __forceinline__ bool xl_aligned(const T* x, int bytes) {
    return (reinterpret_cast<uintptr_t>(x) & (bytes - 1)) == 0;
}
"""

# One element's update (MLX's ops in their order and roundings).
_UPDATE = """
#define XL_ADAMW(gv, pv, mv, vv, po, mo, vo) { \\
    const float gi = __fmul_rn(gv, s); \\
    mo = __fadd_rn(__fmul_rn(B1, mv), __fmul_rn(OMB1, gi)); \\
    vo = __fadd_rn(__fmul_rn(B2, vv), __fmul_rn(OMB2, __fmul_rn(gi, gi))); \\
    po = __fsub_rn(__fmul_rn(pv, decay), __fdiv_rn(__fmul_rn(lr, mo), __fadd_rn(__fsqrt_rn(vo), EPS))); }
"""

_SOURCE = """
    size_t n = 1;
    for (int d = 0; d < p_ndim; ++d) n *= p_shape[d];
    const float lr = lr_in[0];
    const float s = scale[0];
    const float decay = __fsub_rn(1.0f, __fmul_rn(lr, WD));
    // 16-byte vectors where every array allows them (a gradient may be a row view at any
    // offset of its group's); else element by element, the same arithmetic.
    const bool vec = n % VEC == 0 && xl_aligned(p, 16) && xl_aligned(m, 16) && xl_aligned(v, 16)
                     && xl_aligned(g, 4 * sizeof(*g)) && xl_aligned(P_OUT, 16) && xl_aligned(M_OUT, 16)
                     && xl_aligned(V_OUT, 16);
    const size_t base = size_t(blockIdx.x) * (blockDim.x * VEC * GROUPS) + size_t(threadIdx.x) * VEC;
    #pragma unroll
    for (int j = 0; j < GROUPS; ++j) {
        const size_t i = base + size_t(j) * blockDim.x * VEC;
        if (vec) {
            if (i < n) {
                const float4 gv = xl_load4(g + i);
                const float4 pv = *reinterpret_cast<const float4*>(p + i);
                const float4 mv = *reinterpret_cast<const float4*>(m + i);
                const float4 vv = *reinterpret_cast<const float4*>(v + i);
                float4 po, mo, vo;
                XL_ADAMW(gv.x, pv.x, mv.x, vv.x, po.x, mo.x, vo.x)
                XL_ADAMW(gv.y, pv.y, mv.y, vv.y, po.y, mo.y, vo.y)
                XL_ADAMW(gv.z, pv.z, mv.z, vv.z, po.z, mo.z, vo.z)
                XL_ADAMW(gv.w, pv.w, mv.w, vv.w, po.w, mo.w, vo.w)
                *reinterpret_cast<float4*>(M_OUT + i) = mo;
                *reinterpret_cast<float4*>(V_OUT + i) = vo;
                *reinterpret_cast<float4*>(P_OUT + i) = po;
            }
        } else {
            #pragma unroll
            for (int e = 0; e < VEC; ++e) {
                if (i + e < n) {
                    float po, mo, vo;
                    XL_ADAMW(static_cast<float>(g[i + e]), p[i + e], m[i + e], v[i + e], po, mo, vo)
                    M_OUT[i + e] = mo;
                    V_OUT[i + e] = vo;
                    P_OUT[i + e] = po;
                }
            }
        }
    }
"""

# In place: the same arithmetic written over the parameter, m and v (MLX has no buffer aliasing
# for custom kernels: they are inputs, cast to writable). ``done`` only orders the graph.
_SOURCE_IN_PLACE = (_SOURCE.replace("M_OUT", "const_cast<float*>(m)").replace("V_OUT", "const_cast<float*>(v)")
                    .replace("P_OUT", "const_cast<float*>(p)")
                    + "    if (blockIdx.x == 0 && threadIdx.x == 0) done[0] = 0.0f;\n")

_kernels: dict[tuple, object] = {}


def _f32(x: float) -> str:
    """A float32 literal of the Python float ``x`` as MLX rounds it (round to nearest)."""
    return f"{float(np.float32(x))!r}f"


def _kernel(b1: float, b2: float, eps: float, wd: float, in_place: bool = False):
    key = (b1, b2, eps, wd, in_place)
    kernel = _kernels.get(key)
    if kernel is None:
        source = _SOURCE_IN_PLACE if in_place else (
            _SOURCE.replace("M_OUT", "m_out").replace("V_OUT", "v_out").replace("P_OUT", "p_out"))
        header = _HEADER + _UPDATE
        for name, value in (("OMB1", 1 - b1), ("OMB2", 1 - b2), ("B1", b1), ("B2", b2), ("EPS", eps), ("WD", wd)):
            source, header = source.replace(name, _f32(value)), header.replace(name, _f32(value))
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_adamw_{len(_kernels)}",
            input_names=["g", "p", "m", "v", "lr_in", "scale"],
            output_names=["done"] if in_place else ["p_out", "m_out", "v_out"],
            source=source.replace("GROUPS", str(_GROUPS)).replace("VEC", str(_VEC)), header=header,
        )
        _kernels[key] = kernel
    return kernel


def fused_adamw_enabled() -> bool:
    """The kernel runs on CUDA unless ``XLSTM_METAL_FUSED_ADAMW=0``."""
    return cuda_available() and os.environ.get("XLSTM_METAL_FUSED_ADAMW", "1") != "0"


def adamw_in_place_enabled() -> bool:
    """Whether the trainer's :class:`ScaledAdamW` updates in place on CUDA
    (``XLSTM_METAL_ADAMW_IN_PLACE``, default on): otherwise each step holds the old and the new
    parameters, m and v at once (MLX allocates every kernel output anew: 15.6 GB more at the
    1.3b shape)."""
    return os.environ.get("XLSTM_METAL_ADAMW_IN_PLACE", "1") != "0"


def adamw_update(gradient: mx.array, parameter: mx.array, m: mx.array, v: mx.array, lr: mx.array,
                 scale: mx.array, *, b1: float, b2: float, eps: float, weight_decay: float,
                 in_place: bool = False):
    """(parameter, m, v) after one AdamW step with ``gradient * scale`` (one kernel on CUDA).

    parameter, m, v: float32, any shape; gradient: the same shape, any float dtype; lr, scale:
    float32 scalars (0-d or [1] arrays). ``in_place`` (CUDA kernel only): the kernel writes the
    results over the buffers of (row-contiguous views of) parameter, m and v and returns arrays
    sharing them, so no new memory is taken; the arrays passed in then hold the new values too
    (an optimizer's state and the weights it replaces: nothing reads the old values after the
    update, whose gradient already depends on every use of them)."""
    if not fused_adamw_enabled():
        g = gradient * scale if gradient.dtype == mx.float32 else gradient.astype(mx.float32) * scale
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * mx.square(g)
        p = parameter * (1 - lr * weight_decay)
        return p - lr * m / (mx.sqrt(v) + eps), m, v
    n = parameter.size
    blocks = max(1, -(-n // (_THREADS * _VEC * _GROUPS)))
    if in_place:
        # mx.contiguous shares a row-contiguous buffer (else copies): the kernel writes into the
        # buffers that the returned arrays hold.
        parameter, m, v = (mx.contiguous(x) for x in (parameter, m, v))
        (done,) = _kernel(b1, b2, eps, weight_decay, in_place=True)(
            inputs=[gradient, parameter, m, v, lr.astype(mx.float32).reshape(1), scale.astype(mx.float32).reshape(1)],
            template=[], grid=(blocks * _THREADS, 1, 1), threadgroup=(_THREADS, 1, 1),
            output_shapes=[(1,)], output_dtypes=[mx.float32])
        p_new, m_new, v_new = mx.depends([parameter, m, v], [done])
        return p_new, m_new, v_new
    outs = _kernel(b1, b2, eps, weight_decay)(
        inputs=[gradient, parameter, m, v, lr.astype(mx.float32).reshape(1), scale.astype(mx.float32).reshape(1)],
        template=[],
        grid=(blocks * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[parameter.shape] * 3,
        output_dtypes=[mx.float32] * 3,
    )
    return outs[0], outs[1], outs[2]


class ScaledAdamW(optim.AdamW):
    """``optim.AdamW`` (no bias correction) whose gradients may come unscaled and in any float
    dtype: ``grad_scale`` (a float32 scalar array, e.g. the global-norm clip's factor; None = 1)
    multiplies them inside the update. On CUDA each float32 parameter's update is one kernel
    (:func:`adamw_update`); elsewhere MLX's ops compute exactly what ``optim.AdamW`` computes
    from ``gradient * grad_scale`` in float32."""

    def __init__(self, *args, in_place: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_scale: mx.array | None = None
        #: Update parameters and state in place (the CUDA kernel only; see :func:`adamw_update`):
        #: for a trainer that owns the parameters and drops the old ones every step.
        self.in_place = in_place

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        scale = mx.array(1.0, mx.float32) if self.grad_scale is None else self.grad_scale
        if self.bias_correction or parameter.dtype != mx.float32 or not fused_adamw_enabled():
            g = gradient * scale if self.grad_scale is not None else gradient
            return super().apply_single(g.astype(mx.float32) if g.dtype != mx.float32 else g, parameter, state)
        b1, b2 = self.betas
        p, state["m"], state["v"] = adamw_update(gradient, parameter, state["m"], state["v"],
                                                 self.learning_rate, scale, b1=b1, b2=b2, eps=self.eps,
                                                 weight_decay=self.weight_decay, in_place=self.in_place)
        return p
