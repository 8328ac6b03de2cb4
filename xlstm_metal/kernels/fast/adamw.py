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
_PER_THREAD = 4  # elements per thread, blockDim apart (coalesced)

_SOURCE = """
    size_t n = 1;
    for (int d = 0; d < p_ndim; ++d) n *= p_shape[d];
    const float lr = lr_in[0];
    const float s = scale[0];
    const float decay = __fsub_rn(1.0f, __fmul_rn(lr, WD));
    const size_t base = size_t(blockIdx.x) * (blockDim.x * PER_THREAD) + threadIdx.x;
    #pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
        const size_t i = base + size_t(j) * blockDim.x;
        if (i < n) {
            const float gi = __fmul_rn(static_cast<float>(g[i]), s);
            const float mi = __fadd_rn(__fmul_rn(B1, m[i]), __fmul_rn(OMB1, gi));
            const float vi = __fadd_rn(__fmul_rn(B2, v[i]), __fmul_rn(OMB2, __fmul_rn(gi, gi)));
            const float pi = __fmul_rn(p[i], decay);
            m_out[i] = mi;
            v_out[i] = vi;
            p_out[i] = __fsub_rn(pi, __fdiv_rn(__fmul_rn(lr, mi), __fadd_rn(__fsqrt_rn(vi), EPS)));
        }
    }
"""

# In place: the same arithmetic written over the parameter, m and v (MLX has no buffer aliasing
# for custom kernels: they are inputs, cast to writable). ``done`` only orders the graph.
_SOURCE_IN_PLACE = (_SOURCE.replace("m_out[i]", "const_cast<float*>(m)[i]")
                    .replace("v_out[i]", "const_cast<float*>(v)[i]").replace("p_out[i]", "const_cast<float*>(p)[i]")
                    + "    if (blockIdx.x == 0 && threadIdx.x == 0) done[0] = 0.0f;\n")

_kernels: dict[tuple, object] = {}


def _f32(x: float) -> str:
    """A float32 literal of the Python float ``x`` as MLX rounds it (round to nearest)."""
    return f"{float(np.float32(x))!r}f"


def _kernel(b1: float, b2: float, eps: float, wd: float, in_place: bool = False):
    key = (b1, b2, eps, wd, in_place)
    kernel = _kernels.get(key)
    if kernel is None:
        source = _SOURCE_IN_PLACE if in_place else _SOURCE
        for name, value in (("OMB1", 1 - b1), ("OMB2", 1 - b2), ("B1", b1), ("B2", b2), ("EPS", eps), ("WD", wd)):
            source = source.replace(name, _f32(value))
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_adamw_{len(_kernels)}",
            input_names=["g", "p", "m", "v", "lr_in", "scale"],
            output_names=["done"] if in_place else ["p_out", "m_out", "v_out"],
            source=source.replace("PER_THREAD", str(_PER_THREAD)),
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
    blocks = max(1, -(-n // (_THREADS * _PER_THREAD)))
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
