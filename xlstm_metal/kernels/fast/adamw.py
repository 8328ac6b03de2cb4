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
from mlx.utils import tree_flatten, tree_unflatten

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

# Many parameters in one launch, in place: block (x, y) strides over parameter y (SELECT picks its
# four arrays), each element's arithmetic that of _SOURCE.
_SOURCE_MULTI = """
    const int a = blockIdx.y;
    const G* g = nullptr;
    float* p = nullptr;
    float* m = nullptr;
    float* v = nullptr;
    switch (a) {
SELECT
    }
    const size_t n = static_cast<size_t>(sizes[a]);
    const float lr = lr_in[0];
    const float s = scale[0];
    const float decay = __fsub_rn(1.0f, __fmul_rn(lr, WD));
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const float gi = __fmul_rn(static_cast<float>(g[i]), s);
        const float mi = __fadd_rn(__fmul_rn(B1, m[i]), __fmul_rn(OMB1, gi));
        const float vi = __fadd_rn(__fmul_rn(B2, v[i]), __fmul_rn(OMB2, __fmul_rn(gi, gi)));
        const float pi = __fmul_rn(p[i], decay);
        m[i] = mi;
        v[i] = vi;
        p[i] = __fsub_rn(pi, __fdiv_rn(__fmul_rn(lr, mi), __fadd_rn(__fsqrt_rn(vi), EPS)));
    }
    if (a == 0 && blockIdx.x == 0 && threadIdx.x == 0) done[0] = 0.0f;
"""
#: Parameters per multi-tensor launch (four pointers each in the kernel's parameter space).
MULTI_MAX = 96
_MULTI_BLOCKS = 160  # blocks per parameter (grid-stride; ~1 wave of the H200's 132 SMs for the big ones)

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


def _multi_kernel(count: int, b1: float, b2: float, eps: float, wd: float):
    key = ("multi", count, b1, b2, eps, wd)
    kernel = _kernels.get(key)
    if kernel is None:
        select = "\n".join(
            f"        case {j}: g = g{j}; p = const_cast<float*>(p{j}); m = const_cast<float*>(m{j}); "
            f"v = const_cast<float*>(v{j}); break;" for j in range(count))
        source = _SOURCE_MULTI.replace("SELECT", select)
        for name, value in (("OMB1", 1 - b1), ("OMB2", 1 - b2), ("B1", b1), ("B2", b2), ("EPS", eps), ("WD", wd)):
            source = source.replace(name, _f32(value))
        names = [f"{x}{j}" for x in "gpmv" for j in range(count)]
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_adamw_multi_{len(_kernels)}",
            input_names=names + ["lr_in", "scale", "sizes"],
            output_names=["done"],
            source=source,
        )
        _kernels[key] = kernel
    return kernel


def adamw_update_many(gradients: list[mx.array], parameters: list[mx.array], ms: list[mx.array],
                      vs: list[mx.array], lr: mx.array, scale: mx.array, *, b1: float, b2: float, eps: float,
                      weight_decay: float) -> tuple[list[mx.array], list[mx.array], list[mx.array]]:
    """:func:`adamw_update` with ``in_place=True`` for many parameters at once: one CUDA launch
    per :data:`MULTI_MAX` parameters of one gradient dtype instead of one per parameter (the
    1.3b step has 363: each a few microseconds of host work while the GPU runs the small ones
    faster than the host launches them). The same arithmetic per element, written over the
    (row-contiguous) buffers of the parameters, m and v; returns the new (parameters, ms, vs)."""
    parameters, ms, vs = ([mx.contiguous(x) for x in xs] for xs in (parameters, ms, vs))
    lr = lr.astype(mx.float32).reshape(1)
    scale = scale.astype(mx.float32).reshape(1)
    order: dict[mx.Dtype, list[int]] = {}
    for j, g in enumerate(gradients):
        order.setdefault(g.dtype, []).append(j)
    dones = []
    for dtype, members in order.items():
        for first in range(0, len(members), MULTI_MAX):
            chunk = members[first : first + MULTI_MAX]
            sizes = mx.array([parameters[j].size for j in chunk], dtype=mx.int64)
            (done,) = _multi_kernel(len(chunk), b1, b2, eps, weight_decay)(
                inputs=[gradients[j] for j in chunk] + [parameters[j] for j in chunk] + [ms[j] for j in chunk]
                + [vs[j] for j in chunk] + [lr, scale, sizes],
                template=[("G", dtype)],
                grid=(_MULTI_BLOCKS * _THREADS, len(chunk), 1),
                threadgroup=(_THREADS, 1, 1),
                output_shapes=[(1,)],
                output_dtypes=[mx.float32],
            )
            dones.append(done)
    new = mx.depends(parameters + ms + vs, dones)
    n = len(parameters)
    return new[:n], new[n : 2 * n], new[2 * n :]


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

    def apply_gradients(self, gradients: dict, parameters: dict):
        """``optim.Optimizer.apply_gradients``; in place on CUDA the float32 parameters' updates
        run as :func:`adamw_update_many` (a few launches for all of them), the same numbers."""
        if not (self.in_place and fused_adamw_enabled() and not self.bias_correction):
            return super().apply_gradients(gradients, parameters)
        if not self._initialized:
            self.init(gradients)
        for param, scheduler in self._schedulers.items():
            self.state[param] = scheduler(self.step)
        self.state["step"] = self.step + 1
        flat_p = dict(tree_flatten(parameters))
        many, updated = [], []
        for path, g in tree_flatten(gradients):
            p, state = flat_p[path], _node(self.state, path)
            if p.dtype == mx.float32:
                many.append((path, g, p, state))
            else:
                updated.append((path, self.apply_single(g, p, state)))
        if many:
            scale = mx.array(1.0, mx.float32) if self.grad_scale is None else self.grad_scale
            b1, b2 = self.betas
            ps, ms, vs = adamw_update_many([x[1] for x in many], [x[2] for x in many],
                                           [x[3]["m"] for x in many], [x[3]["v"] for x in many],
                                           self.learning_rate, scale, b1=b1, b2=b2, eps=self.eps,
                                           weight_decay=self.weight_decay)
            for (path, _, _, state), p, m, v in zip(many, ps, ms, vs):
                state["m"], state["v"] = m, v
                updated.append((path, p))
        return tree_unflatten(updated)

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


def _node(tree, path: str):
    """The subtree of a nested dict / list ``tree`` at a ``tree_flatten`` path ("a.0.b")."""
    for key in path.split("."):
        tree = tree[int(key)] if isinstance(tree, (list, tuple)) else tree[key]
    return tree
