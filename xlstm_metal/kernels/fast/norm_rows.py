"""The norms of a prompt's rows (prefill) as CUDA kernels with vector (8- and 16-byte) accesses, each
bit-identical to its decode kernel in :mod:`.decode` (which dispatches here for prompts):

- :func:`norm_gate_rows`: the multi-head LayerNorm and output gate, one warp per (token, head).
  The decode kernel (one thread block per (token, head), two block-wide sums) moved ~0.9 TB/s
  over the 16,384 rows of a 2,048-token 7B prefill (1.8 ms per prefill, 14 ms at 16,384
  tokens; H200, CUPTI, round S5R2); here a warp holds a head's DV values (8 consecutive per lane
  and 256 columns), so the row needs no barrier.
- :func:`add_rms_norm_rows`: a residual add and the RMSNorm that reads it, 256 threads per row
  (the decode kernel: 1,024 threads, one value each per 1,024 columns), 4 consecutive values per
  thread and 1,024 columns.

The math and rounding points are the decode kernels', and the float32 sums are added in the same
order (each thread's share, then the same butterfly over the same index bits), so the results
are the same bits (tests/test_cuda_kernels.py).
"""

from __future__ import annotations

import os

import mlx.core as mx

from .tensor_cores import launch_bounds

_NORM_GATE_SOURCE = """
    // Row = (b * S + t) * NH + hd: warp w of the block takes one.
    constexpr int GROUPS = DV / 256;  // 8-value groups per lane
    const int S = h_shape[2];
    const int rows = h_shape[0] * S * NH;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int hd = row % NH;
    const int bt = row / NH;
    const int b = bt / S;
    const int t = bt % S;
    const T* hr = h + b * h_strides[0] + hd * h_strides[1] + t * h_strides[2];
    const T* orow = o + b * o_strides[0] + t * o_strides[1] + static_cast<int64_t>(hd) * DV * o_strides[2];
    const T* wr = w + static_cast<int64_t>(hd) * DV * w_strides[0];
    const bool h_vec = h_strides[3] == 1 && (reinterpret_cast<uintptr_t>(hr) & 15) == 0;
    const bool o_vec = o_strides[2] == 1 && (reinterpret_cast<uintptr_t>(orow) & 15) == 0;
    const bool w_vec = w_strides[0] == 1 && (reinterpret_cast<uintptr_t>(wr) & 15) == 0;

    // Every load of the row first (h, then the gate's o~ and the weight), so the o~ and weight
    // loads are in flight during the statistics' shuffles instead of starting after them.
    if constexpr (PACKED) {
        // The row's values kept as loaded (8 per 16 bytes; converted where used, exactly): a
        // third of the registers, so more warps per SM have their loads in flight.
        uint4 xr[GROUPS], orw[GROUPS], wrw[GROUPS];
        #pragma unroll
        for (int u = 0; u < GROUPS; ++u) xr[u] = xl_raw8(hr + (u * 256 + lane * 8) * h_strides[3], h_strides[3], h_vec);
        #pragma unroll
        for (int u = 0; u < GROUPS; ++u) {
            const int j = u * 256 + lane * 8;
            orw[u] = xl_raw8(orow + j * o_strides[2], o_strides[2], o_vec);
            wrw[u] = xl_raw8(wr + j * w_strides[0], w_strides[0], w_vec);
        }
        const float2 stats = xl_row_stats_raw<T, GROUPS>(xr, DV, EPS);
        const float mean = stats.x, rstd = stats.y;
        T* out_row = out + static_cast<size_t>(row) * DV;
        #pragma unroll
        for (int u = 0; u < GROUPS; ++u) {
            const int j = u * 256 + lane * 8;
            float xs[1][8], ov[8], wv[8];
            xl_unpack8<T>(xr[u], xs[0]);
            xl_unpack8<T>(orw[u], ov);
            xl_unpack8<T>(wrw[u], wv);
            __align__(16) T res[8];
            #pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float normed = static_cast<float>(static_cast<T>((xs[0][e] - mean) * rstd));
                const float scaled = static_cast<float>(static_cast<T>(normed * wv[e]));
                const float gate = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-ov[e]))));
                res[e] = static_cast<T>(gate * scaled);
            }
            *reinterpret_cast<uint4*>(out_row + j) = *reinterpret_cast<const uint4*>(res);
        }
        return;
    }
    float xs[GROUPS][8], os[GROUPS][8], ws[GROUPS][8];
    #pragma unroll
    for (int u = 0; u < GROUPS; ++u)
        xl_load8(hr + (u * 256 + lane * 8) * h_strides[3], h_strides[3], h_vec, xs[u]);
    #pragma unroll
    for (int u = 0; u < GROUPS; ++u) {
        const int j = u * 256 + lane * 8;
        xl_load8(orow + j * o_strides[2], o_strides[2], o_vec, os[u]);
        xl_load8(wr + j * w_strides[0], w_strides[0], w_vec, ws[u]);
    }
    const float2 stats = xl_row_stats<GROUPS>(xs, DV, EPS);
    const float mean = stats.x, rstd = stats.y;
    T* out_row = out + static_cast<size_t>(row) * DV;
    #pragma unroll
    for (int u = 0; u < GROUPS; ++u) {
        const int j = u * 256 + lane * 8;
        __align__(16) T res[8];
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float normed = static_cast<float>(static_cast<T>((xs[u][e] - mean) * rstd));
            const float scaled = static_cast<float>(static_cast<T>(normed * ws[u][e]));
            const float gate = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-os[u][e]))));
            res[e] = static_cast<T>(gate * scaled);
        }
        *reinterpret_cast<uint4*>(out_row + j) = *reinterpret_cast<const uint4*>(res);
    }
"""

_NORM_GATE_HEADER = """
// The sum of a row of 256-column groups held as 8 consecutive columns per lane (column
// j = 8 lane + e of each group, the groups already summed per lane), added in the order of the
// decode kernel's block sum (256 threads, thread j holding column j: a butterfly over j's bits
// 4, 3, 2, 1, 0 within each warp, then over the warps, bits 7, 6, 5), so the two kernels' sums,
// and hence their results, agree to the bit.
__device__ __forceinline__ float xl_row_sum(float* p) {
    #pragma unroll
    for (int o = 2; o > 0; o >>= 1) {  // bits 4, 3 of j: bits 1, 0 of the lane
        #pragma unroll
        for (int e = 0; e < 8; ++e) p[e] += __shfl_xor_sync(0xffffffffu, p[e], o);
    }
    #pragma unroll
    for (int w = 4; w > 0; w >>= 1) {  // bits 2, 1, 0 of j: within the lane
        #pragma unroll
        for (int e = 0; e < w; ++e) p[e] += p[e + w];
    }
    float v = p[0];
    #pragma unroll
    for (int o = 16; o > 2; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);  // bits 7, 6, 5
    return v;
}

// LayerNorm statistics (mean, 1 / sqrt(var + eps)) of a row of D values held as G groups of 8
// per lane (xl_row_sum's layout): the sums of the values and of the rounded squares of their
// deviations, in the decode kernel's order.
template <int G>
__device__ __forceinline__ float2 xl_row_stats(const float (&xs)[G][8], float D, float eps) {
    float p[8];
    #pragma unroll
    for (int e = 0; e < 8; ++e) {
        p[e] = 0.0f;
        #pragma unroll
        for (int u = 0; u < G; ++u) p[e] += xs[u][e];
    }
    const float mean = xl_row_sum(p) / D;
    #pragma unroll
    for (int e = 0; e < 8; ++e) {
        p[e] = 0.0f;
        #pragma unroll
        for (int u = 0; u < G; ++u) {
            const float d = xs[u][e] - mean;
            p[e] += __fmul_rn(d, d);  // rounded product, then the sum: as the decode kernel
        }
    }
    return make_float2(mean, rsqrtf(xl_row_sum(p) / D + eps));
}

// Eight values x[0], x[stride], ... as loaded (T's 16 bytes): one 16-byte load when contiguous
// and aligned.
template <typename T, typename I>
__device__ __forceinline__ uint4 xl_raw8(const T* x, I stride, bool vec) {
    if (vec) return *reinterpret_cast<const uint4*>(x);
    __align__(16) T v[8];
    #pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = x[e * stride];
    return *reinterpret_cast<const uint4*>(v);
}

template <typename T>
__device__ __forceinline__ void xl_unpack8(uint4 r, float* out) {
    __align__(16) T v[8];
    *reinterpret_cast<uint4*>(v) = r;
    #pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = static_cast<float>(v[e]);
}

// xl_row_stats of the row kept as loaded (G groups of 8 16-bit values per lane): the same sums in
// the same order.
template <typename T, int G>
__device__ __forceinline__ float2 xl_row_stats_raw(const uint4 (&xr)[G], float D, float eps) {
    float p[8];
    #pragma unroll
    for (int e = 0; e < 8; ++e) p[e] = 0.0f;
    #pragma unroll
    for (int u = 0; u < G; ++u) {
        float x[8];
        xl_unpack8<T>(xr[u], x);
        #pragma unroll
        for (int e = 0; e < 8; ++e) p[e] += x[e];
    }
    const float mean = xl_row_sum(p) / D;
    #pragma unroll
    for (int e = 0; e < 8; ++e) p[e] = 0.0f;
    #pragma unroll
    for (int u = 0; u < G; ++u) {
        float x[8];
        xl_unpack8<T>(xr[u], x);
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float d = x[e] - mean;
            p[e] += __fmul_rn(d, d);
        }
    }
    return make_float2(mean, rsqrtf(xl_row_sum(p) / D + eps));
}

// Eight values x[0], x[stride], ... as float: one 16-byte load when contiguous and aligned.
template <typename T, typename I>
__device__ __forceinline__ void xl_load8(const T* x, I stride, bool vec, float* out) {
    if (vec) {
        __align__(16) T v[8];
        *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(x);
        #pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = static_cast<float>(v[e]);
    } else {
        #pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = static_cast<float>(x[e * stride]);
    }
}
"""

_ROWS_PER_BLOCK = 8
_kernels: dict[tuple, object] = {}


def _packed_rows() -> int:
    """``XLSTM_METAL_NORM_GATE_PACKED=N``: the norm + gate kernel keeps its rows' values as
    loaded (packed 16-bit, converted where used: the same arithmetic) and is bounded to N blocks
    of 256 threads per SM (N = 5: 48 registers, more loads in flight per SM); 0, the default: the
    float form, 64 registers, unbounded. One 7B layer at 16,384 tokens (H200, round S9R1, CUPTI):
    0.161 ms (float form), 0.148 (packed, unbounded), 0.145 (packed, 5 blocks). Opt-in: its
    CUDA test (test_norm_gate_rows_matches_reference_and_decode_kernel, packed cases) has not
    run on a GPU yet (cut by S9R3's time limit)."""
    value = os.environ.get("XLSTM_METAL_NORM_GATE_PACKED", "")
    return int(value) if value.isdigit() else 0


def norm_gate_rows_supported(h: mx.array, weight: mx.array) -> bool:
    """Whether :func:`norm_gate_rows` takes these inputs: h [B, NH, S, DV] in bf16 / fp16 with DV
    a multiple of 256 (whole 16-byte groups per lane); o~ and the weight as the caller checked.
    ``XLSTM_METAL_NORM_ROWS=0`` leaves prompts to the decode kernels (comparisons)."""
    if os.environ.get("XLSTM_METAL_NORM_ROWS") == "0":
        return False
    return h.dtype in (mx.bfloat16, mx.float16) and h.shape[-1] % 256 == 0 and weight.dtype == h.dtype


def norm_gate_rows(h: mx.array, o_preact: mx.array, weight: mx.array, eps: float) -> mx.array:
    """h [B, NH, S, DV], o~ [B, S, NH * DV], weight [NH * DV] (one dtype, any strides) ->
    ``sigmoid(o~) * MultiHeadLayerNorm(h)`` [B, S, NH * DV], the same as the decode kernel of
    :func:`~xlstm_metal.kernels.fast.decode.output_norm_gate` (which dispatches here for
    prompts). CUDA only; no gradient."""
    B, NH, S, DV = h.shape
    packed = _packed_rows()
    kernel = _kernels.get(("gate", eps, packed))
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_output_norm_gate_rows_{len(_kernels)}",
            input_names=["h", "o", "w"],
            output_names=["out"],
            source=_NORM_GATE_SOURCE.replace("EPS", f"{float(eps)!r}f"),
            header=(launch_bounds(32 * _ROWS_PER_BLOCK, packed) if packed else "") + _NORM_GATE_HEADER,
            ensure_row_contiguous=False,
        )
        _kernels[("gate", eps, packed)] = kernel
    blocks = -(-(B * S * NH) // _ROWS_PER_BLOCK)
    (out,) = kernel(
        inputs=[h, o_preact, weight],
        template=[("T", h.dtype), ("NH", NH), ("DV", DV), ("PACKED", packed > 0)],
        grid=(blocks * 32 * _ROWS_PER_BLOCK, 1, 1),
        threadgroup=(32 * _ROWS_PER_BLOCK, 1, 1),
        output_shapes=[(B, S, NH * DV)],
        output_dtypes=[h.dtype],
    )
    return out


_ADD_NORM_SOURCE = """
    // Row blockIdx.x of E = 1024 GROUPS columns; thread l takes columns 1024 u + 4 l + e (e < 4) of
    // each group u: the decode kernel's thread j = 4 l + e held column j of each group.
    constexpr int GROUPS = E / 1024;
    __shared__ float red[32];
    const size_t base = static_cast<size_t>(blockIdx.x) * E;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const bool vec = xl_aligned(x) && xl_aligned(y) && xl_aligned(w) && xl_aligned(sum_out) && xl_aligned(norm_out);
    float xs[GROUPS][4];
    float p[4];
    #pragma unroll
    for (int u = 0; u < GROUPS; ++u) {
        const size_t j = base + u * 1024 + 4 * tid;
        float a[4], c[4];
        xl_load4(x + j, a, vec);
        xl_load4(y + j, c, vec);
        __align__(16) ST sv[4];
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            sv[e] = static_cast<ST>(a[e] + c[e]);
            xs[u][e] = static_cast<float>(sv[e]);
            p[e] = u == 0 ? __fmaf_rn(xs[u][e], xs[u][e], 0.0f) : __fmaf_rn(xs[u][e], xs[u][e], p[e]);
        }
        xl_store4(sum_out + j, sv, vec);
    }
    // The decode kernel's order: within its warps (column bits 4, 3, 2: bits 2, 1, 0 of the lane;
    // 1, 0: within the thread), then across its 32 warps (bits 9..5).
    #pragma unroll
    for (int o = 4; o > 0; o >>= 1) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) p[e] += __shfl_xor_sync(0xffffffffu, p[e], o);
    }
    p[0] += p[2];
    p[1] += p[3];
    p[0] += p[1];
    if ((lane & 7) == 0) red[tid >> 3] = p[0];  // the decode kernel's warp (tid >> 3) sum
    __syncthreads();
    float t = red[lane];
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    const float rn = rsqrtf(t / E + EPS);
    #pragma unroll
    for (int u = 0; u < GROUPS; ++u) {
        const size_t j = base + u * 1024 + 4 * tid;
        float wv[4];
        xl_load4(w + u * 1024 + 4 * tid, wv, vec);
        __align__(16) T ov[4];
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float normed = static_cast<float>(static_cast<ST>(xs[u][e] * rn));
            ov[e] = static_cast<T>(normed * wv[e]);
        }
        xl_store4(norm_out + j, ov, vec);
    }
"""

_ADD_NORM_HEADER = """
// Four consecutive values as float / from an aligned array: one 8- or 16-byte access.
// (Element-wise where an array does not start on a 16-byte boundary: a view's offset.)
template <typename V>
__device__ __forceinline__ void xl_load4(const V* p, float* out, bool vec) {
    __align__(16) V v[4];
    if (!vec) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = p[e];
    } else if constexpr (sizeof(V) == 4) {
        *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(p);
    } else {
        *reinterpret_cast<uint2*>(v) = *reinterpret_cast<const uint2*>(p);
    }
    #pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = static_cast<float>(v[e]);
}

template <typename V>
__device__ __forceinline__ void xl_store4(V* p, const V* v, bool vec) {
    if (!vec) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) p[e] = v[e];
    } else if constexpr (sizeof(V) == 4) {
        *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
    } else {
        *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(v);
    }
}

template <typename V>
__device__ __forceinline__ bool xl_aligned(const V* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}
"""


def add_rms_norm_rows_supported(x: mx.array, y: mx.array, weight: mx.array) -> bool:
    """Whether :func:`add_rms_norm_rows` takes these: rows of E columns, E a multiple of 1,024
    (the decode kernel's 1,024 threads then hold whole groups), more than one token (decode keeps
    its kernel). The caller checked the dtypes; the kernel gets row-contiguous inputs. ``XLSTM_METAL_NORM_ROWS=0`` turns it off."""
    if os.environ.get("XLSTM_METAL_NORM_ROWS") == "0":
        return False
    return x.ndim >= 2 and x.shape[-2] > 1 and x.shape[-1] % 1024 == 0


def add_rms_norm_rows(x: mx.array, y: mx.array, weight: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """x [..., E] (the residual stream: the weight's dtype or float32), y [..., E] and weight [E]
    (bf16 / fp16) -> (s = x + y in x's dtype, rms_norm(s) * weight in the weight's dtype), as the
    decode kernel of :func:`~xlstm_metal.kernels.fast.decode.add_rms_norm`, which dispatches here
    for prompts. CUDA only; no gradient."""
    E = x.shape[-1]
    kernel = _kernels.get(("add", eps))
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_add_rms_norm_rows_{len(_kernels)}",
            input_names=["x", "y", "w"],
            output_names=["sum_out", "norm_out"],
            source=_ADD_NORM_SOURCE.replace("EPS", f"{float(eps)!r}f"),
            header=_ADD_NORM_HEADER,
        )
        _kernels[("add", eps)] = kernel
    rows = x.size // E
    s, normed = kernel(
        inputs=[x, y, weight],
        template=[("ST", x.dtype), ("T", weight.dtype), ("E", E)],
        grid=(rows * 256, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, weight.dtype],
    )
    return s, normed
