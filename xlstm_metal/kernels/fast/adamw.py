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
from .tensor_cores import kernel_tag

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

_SIZE = """
    size_t n = 1;
    for (int d = 0; d < p_ndim; ++d) n *= p_shape[d];
    const size_t blk = blockIdx.x;"""
_BODY = """
    const float lr = lr_in[0];
    const float s = scale[0];
    const float decay = __fsub_rn(1.0f, __fmul_rn(lr, WD));
    // 16-byte vectors where every array allows them (a gradient may be a row view at any
    // offset of its group's); else element by element, the same arithmetic.
    const bool vec = n % VEC == 0 && xl_aligned(p, 16) && xl_aligned(m, 16) && xl_aligned(v, 16)
                     && xl_aligned(g, 4 * sizeof(*g)) && xl_aligned(P_OUT, 16) && xl_aligned(M_OUT, 16)
                     && xl_aligned(V_OUT, 16);
    const size_t base = blk * (blockDim.x * VEC * GROUPS) + size_t(threadIdx.x) * VEC;
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

_SOURCE = _SIZE + _BODY

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
            name=f"xlstm_adamw_{kernel_tag(key)}",
            input_names=["g", "p", "m", "v", "lr_in", "scale"],
            output_names=["done"] if in_place else ["p_out", "m_out", "v_out"],
            source=source.replace("GROUPS", str(_GROUPS)).replace("VEC", str(_VEC)), header=header,
        )
        _kernels[key] = kernel
    return kernel


#: Most parameters one multi-tensor launch updates: 4 pointers each, so the kernel's parameters
#: stay under CUDA's classic 4 KB (96 x 4 x 8 bytes + 4 more pointers).
MULTI_MAX = 96
_CTYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float"}

# Multi-tensor (in place): the block's tensor from the table of block starts (tab[0..count-1],
# ascending) and sizes (tab[count..2 count-1]), then the one-tensor kernel's arithmetic on it.
_MULTI_SIZE = """
    int lo = 0, hi = COUNT - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (unsigned(tab[mid]) <= blockIdx.x) lo = mid; else hi = mid - 1;
    }
    const GT* g; const float* p; const float* m; const float* v;
    switch (lo) {
CASES    }
    const size_t n = size_t(unsigned(tab[COUNT + lo]));
    const size_t blk = blockIdx.x - unsigned(tab[lo]);"""


def _multi_kernel(b1: float, b2: float, eps: float, wd: float, count: int, gdtype: mx.Dtype):
    """The in-place update of ``count`` parameters (gradients of ``gdtype``) in one launch."""
    key = ("multi", b1, b2, eps, wd, count, gdtype)
    kernel = _kernels.get(key)
    if kernel is None:
        cases = "".join(f"    case {j}: g = xg{j}; p = xp{j}; m = xm{j}; v = xv{j}; break;\n" for j in range(count))
        size = _MULTI_SIZE.replace("COUNT", str(count)).replace("GT", _CTYPES[gdtype]).replace("CASES", cases)
        source = ((size + _BODY).replace("M_OUT", "const_cast<float*>(m)").replace("V_OUT", "const_cast<float*>(v)")
                  .replace("P_OUT", "const_cast<float*>(p)")
                  + "    if (blockIdx.x == 0 && threadIdx.x == 0) done[0] = 0.0f;\n")
        header = _HEADER + _UPDATE
        for name, value in (("OMB1", 1 - b1), ("OMB2", 1 - b2), ("B1", b1), ("B2", b2), ("EPS", eps), ("WD", wd)):
            source, header = source.replace(name, _f32(value)), header.replace(name, _f32(value))
        names = [f"x{kind}{j}" for kind in "gpmv" for j in range(count)]
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_adamw_{kernel_tag(key)}",
            input_names=names + ["lr_in", "scale", "tab"], output_names=["done"],
            source=source.replace("GROUPS", str(_GROUPS)).replace("VEC", str(_VEC)), header=header,
        )
        _kernels[key] = kernel
    return kernel


def _blocks(n: int) -> int:
    return max(1, -(-n // (_THREADS * _VEC * _GROUPS)))


def multi_adamw_enabled() -> bool:
    """Whether :class:`ScaledAdamW` (in place, on CUDA) updates its parameters in multi-tensor
    launches of up to :data:`MULTI_MAX` (``XLSTM_METAL_ADAMW_MULTI``, default on; 0: one launch
    per parameter) instead of one launch each."""
    return os.environ.get("XLSTM_METAL_ADAMW_MULTI", "1") != "0"


def multi_groups(sizes: list[int], limit: int = MULTI_MAX) -> list[range]:
    """Positions 0..len(sizes)-1 cut into consecutive launches of at most ``limit``, as even as
    possible (at most two distinct counts: fewer kernels to compile)."""
    total = len(sizes)
    launches = -(-total // limit) if total else 0
    bounds = [round(j * total / launches) for j in range(launches + 1)] if launches else [0]
    return [range(bounds[j], bounds[j + 1]) for j in range(launches)]


def adamw_update_many(gradients: list[mx.array], parameters: list[mx.array], ms: list[mx.array],
                      vs: list[mx.array], lr: mx.array, scale: mx.array, *, b1: float, b2: float, eps: float,
                      weight_decay: float) -> list[tuple[mx.array, mx.array, mx.array]]:
    """:func:`adamw_update` with ``in_place=True`` for many parameters, up to :data:`MULTI_MAX`
    per kernel launch (CUDA only): the same arithmetic element for element, so the same bits.
    Gradients of one launch share a dtype (grouped here, each group in the given order)."""
    out: list = [None] * len(parameters)
    lr, scale = lr.astype(mx.float32).reshape(1), scale.astype(mx.float32).reshape(1)
    by_dtype: dict = {}
    for j, g in enumerate(gradients):
        by_dtype.setdefault(g.dtype, []).append(j)
    for gdtype, members in by_dtype.items():
        for part in multi_groups([parameters[j].size for j in members]):
            idx = [members[j] for j in part]
            # The parameters through mx.contiguous (it shares a row-contiguous buffer, else copies:
            # the kernel must write into the buffers the returned arrays hold). m and v are this
            # optimizer's own state, created contiguous (zeros, a loaded checkpoint, these
            # buffers): passed as they are (a graph node fewer each in every traced step).
            p = [mx.contiguous(parameters[j]) for j in idx]
            m, v = [ms[j] for j in idx], [vs[j] for j in idx]
            starts, total = [], 0
            for j in idx:
                starts.append(total)
                total += _blocks(parameters[j].size)
            tab = mx.array(starts + [parameters[j].size for j in idx], dtype=mx.int32)
            (done,) = _multi_kernel(b1, b2, eps, weight_decay, len(idx), gdtype)(
                inputs=[gradients[j] for j in idx] + p + m + v + [lr, scale, tab],
                template=[], grid=(total * _THREADS, 1, 1), threadgroup=(_THREADS, 1, 1),
                output_shapes=[(1,)], output_dtypes=[mx.float32])
            after = mx.depends(p + m + v, [done])  # one node for the launch's outputs
            n = len(idx)
            for k, j in enumerate(idx):
                out[j] = (after[k], after[n + k], after[2 * n + k])
    return out


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


def _node(tree, path: str):
    """The entry of a nested dict / list tree at a dotted ``tree_flatten`` path."""
    for key in path.split("."):
        tree = tree[int(key)] if isinstance(tree, (list, tuple)) else tree[key]
    return tree


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
        """``optim.Optimizer.apply_gradients``; in place on CUDA with ``XLSTM_METAL_ADAMW_MULTI``
        the float32 parameters go through :func:`adamw_update_many` (a few launches, the same
        bits as one launch per parameter), the rest through :meth:`apply_single`."""
        if not (self.in_place and multi_adamw_enabled() and fused_adamw_enabled() and not self.bias_correction):
            return super().apply_gradients(gradients, parameters)
        if not self._initialized:
            self.init(gradients)
        for param, scheduler in self._schedulers.items():
            self.state[param] = scheduler(self.step)
        self.state["step"] = self.step + 1
        flat = tree_flatten(gradients)
        if not flat:
            return super().apply_gradients(gradients, parameters)
        params = dict(tree_flatten(parameters))
        states = [_node(self.state, path) for path, _ in flat]
        many = [j for j, (path, _) in enumerate(flat) if params[path].dtype == mx.float32]
        new = {}
        if many:
            scale = mx.array(1.0, mx.float32) if self.grad_scale is None else self.grad_scale
            b1, b2 = self.betas
            results = adamw_update_many([flat[j][1] for j in many], [params[flat[j][0]] for j in many],
                                        [states[j]["m"] for j in many], [states[j]["v"] for j in many],
                                        self.learning_rate, scale, b1=b1, b2=b2, eps=self.eps,
                                        weight_decay=self.weight_decay)
            for j, (p, m, v) in zip(many, results):
                states[j]["m"], states[j]["v"] = m, v
                new[flat[j][0]] = p
        for j, (path, g) in enumerate(flat):
            if path not in new:
                new[path] = self.apply_single(g, params[path], states[j])
        return tree_unflatten([(path, new[path]) for path, _ in flat])

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
