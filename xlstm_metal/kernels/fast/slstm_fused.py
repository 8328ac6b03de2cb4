"""The sLSTM of the 2024 xLSTM as fused CUDA kernels (``mx.fast.cuda_kernel``), beside its
reference :mod:`xlstm_metal.kernels.slstm` (pure MLX ops, which CPU and Metal keep running).

The reference runs ~15 small ops per time step (one matmul per head, the gate math), so a
2,048-token sequence is ~30k launches. Here:

- ``forward`` kernel: one launch walks the whole sequence. The recurrent weights R (block-
  diagonal per head) stay in registers: block (unit slice, head, batch-row chunk) holds the
  columns of R that feed its U units' four gates (DH x 4U floats, DH/8 per thread) and keeps
  the state of its units on chip. Each step it reads h_{t-1} of its head, computes the gate
  pre-activations (lanes split the DH-long dot products, warp shuffles reduce them), updates
  (c, n, m, h), writes h_t, then the blocks of a head meet at a barrier in global memory
  (an atomic counter; every block of the grid is resident, see ``_MAX_BLOCKS``) before
  reading h_t. The step (decode) is the same kernel with S = 1: recurrent matmul, gates and
  state update in one launch, no barrier.
- ``backward`` kernel: walks time in reverse with the rows of R of its units (U x 4DH floats
  in registers): dh_t = dh_out_t + R (d raw_{t+1}), then the gate derivatives, carrying
  (dc, dn, dm) on chip. d raw is dwx; dR = sum_t h_{t-1}^T d raw_t and the bias gradient
  are one batched matmul and one sum outside.

Training uses the kernels through :func:`slstm_recurrence` (``mx.custom_function`` with a
custom vjp). The forward returns every step's (h, c, n, m) and the gate pre-activations so
the backward needs no recomputation; ``backend="ops"`` runs the same custom function with a
pure-ops forward and backward (how the CPU tests check the wiring and the derivative).

The math is the reference's, in float32 (the stabiliser m, the ``n == 0`` test for the empty
state, the clamps of exp(.) at 1 with MLX's tie rules for max/min gradients), so results
agree to float32 round-off (tests/test_slstm_fused.py).

Shapes: wx [B, S, NH, 4, DH] (W x, gate order i, f, z, o; any float dtype), bias [NH, 4, DH],
R [NH, DH, 4 DH] (R[h, j, g DH + u]), state (c, n, m, h) each [B, NH, DH] float32.
"""

from __future__ import annotations

import mlx.core as mx

from ..slstm import SLSTMState, _log_sigmoid, _pointwise, slstm_zero_state
from .step import cuda_available

_LANES = 8  # KS: lanes that split one forward dot product (4 KS split a backward one; <= 32)
_MAX_UNITS = 16  # U: units per block (4U gate columns); threads per block = 32 U
_MAX_HEAD_DIM = 512  # R slice per thread = DH / 8 floats in registers
_MAX_BLOCKS = 128  # blocks of one launch, all resident at once (H100/H200: 132 SMs)
_SMEM_FLOATS = 11 * 1024  # static shared memory per block used for rows (44 KB of 48)
# How the blocks of a head hand each other a step's values: "barrier" (write, fence, atomic
# counter, spin, read back) or "tagged" (each value in one 8-byte word with its step number,
# polled directly, in groups of 4 words). Both are tested on an H200 (GPU rounds R1 and R2). At
# B=4, S=2048, NH=4, DH=256 "tagged" took 4.97 ms forward and 12.4 ms forward + backward, "barrier"
# 7.15 and 14.1 ms (R1, tagged words then polled one at a time).
EXCHANGE = "tagged"
_XCHG = {"barrier": 0, "tagged": 1}

_HEADER = """
// Blocks of one (head, row chunk) wait here until all NBLK of them finished step `round`.
// Every block of the grid is resident (the grid is smaller than the GPU), so spinning is
// safe. Should a block ever wait ~1 s, it stops waiting for the rest of the launch: wrong
// numbers (which the tests catch) instead of a hung GPU.
__device__ __forceinline__ void slstm_barrier(int* counter, int target, bool& gave_up) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counter, 1);
        volatile int* p = counter;
        int spins = 0;
        while (!gave_up && *p < target) {
            if (++spins > (1 << 22)) gave_up = true;
        }
        __threadfence();
    }
    __syncthreads();
}

// Tagged exchange (XCHG = 1): a value travels with the step that wrote it in one 8-byte word,
// so a reader polls the word itself; no fence, counter or second read per step.
__device__ __forceinline__ void slstm_put(unsigned long long* p, float v, int tag) {
    const unsigned long long w = (static_cast<unsigned long long>(static_cast<unsigned>(tag)) << 32)
                                 | static_cast<unsigned long long>(__float_as_uint(v));
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" :: "l"(p), "l"(w) : "memory");
}

__device__ __forceinline__ unsigned long long slstm_load(const unsigned long long* p) {
    unsigned long long w;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(w) : "l"(p) : "memory");
    return w;
}

// Copies `count` tagged words (row r of `width` words at src + r * row_stride) into dst[r *
// width + k], each once its tag equals `tag`. The loads of a group of 4 are issued together,
// so a thread waits about one L2 round trip per group instead of one per word.
__device__ __forceinline__ void slstm_gather(float* dst, const unsigned long long* src, size_t row_stride,
                                             int width, int count, int tag, int tid, int nt, bool& gave_up) {
    for (int e0 = tid; e0 < count; e0 += 4 * nt) {
        unsigned long long w[4];
        #pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int e = e0 + q * nt;
            if (e < count) w[q] = slstm_load(src + static_cast<size_t>(e / width) * row_stride + e % width);
        }
        #pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int e = e0 + q * nt;
            if (e < count) {
                const unsigned long long* p = src + static_cast<size_t>(e / width) * row_stride + e % width;
                int spins = 0;
                while (static_cast<int>(w[q] >> 32) != tag && !gave_up) {
                    if (++spins > (1 << 22)) gave_up = true;
                    w[q] = slstm_load(p);
                }
                dst[e] = __uint_as_float(static_cast<unsigned>(w[q] & 0xffffffffull));
            }
        }
    }
}

__device__ __forceinline__ float slstm_logsig(float x) {
    return fminf(x, 0.0f) - log1pf(expf(-fabsf(x)));
}

__device__ __forceinline__ float slstm_sigmoid(float x) {
    return 1.0f / (1.0f + expf(-x));
}
"""

_FORWARD = """
    constexpr int G4U = 4 * U;
    constexpr int NT = G4U * KS;
    constexpr int PR = (DH + KS - 1) / KS;
    const int B = wx_shape[0];
    const int S = wx_shape[1];
    const int us = blockIdx.x, hd = blockIdx.y, bc = blockIdx.z;
    const int tid = threadIdx.x;
    const int u0 = us * U;
    const int b0 = bc * BC;
    __shared__ float s_h[BC][DH];
    __shared__ float s_raw[BC][G4U];

    // Matvec role: gate column kcol = g DH + u0 + ul, lanes ks split the DH inputs.
    const int o = tid / KS, ks = tid % KS;
    const int kcol = (o / U) * DH + u0 + (o % U);
    float Rr[PR];
    #pragma unroll
    for (int r = 0; r < PR; ++r) {
        const int j = ks + KS * r;
        Rr[r] = (j < DH) ? R[(static_cast<size_t>(hd) * DH + j) * (4 * DH) + kcol] : 0.0f;
    }

    // Pointwise role: thread (pb, pu) owns unit u0 + pu of row b0 + pb.
    const int pb = tid / U, pu = tid % U;
    const int brow = b0 + pb;
    const bool pact = tid < BC * U && brow < B;
    const int unit = u0 + pu;
    const size_t sidx = (static_cast<size_t>(brow) * NH + hd) * DH + unit;
    float c = 0.0f, n = 0.0f, m = 0.0f;
    float bi = 0.0f, bf = 0.0f, bz = 0.0f, bo = 0.0f;
    float xi = 0.0f, xf = 0.0f, xz = 0.0f, xo = 0.0f;
    size_t xidx = 0;
    if (pact) {
        c = c0[sidx];
        n = n0[sidx];
        m = m0[sidx];
        bi = bias[(hd * 4 + 0) * DH + unit];
        bf = bias[(hd * 4 + 1) * DH + unit];
        bz = bias[(hd * 4 + 2) * DH + unit];
        bo = bias[(hd * 4 + 3) * DH + unit];
        xidx = ((static_cast<size_t>(brow) * S) * NH + hd) * 4 * DH + unit;
        xi = static_cast<float>(wx[xidx]);
        xf = static_cast<float>(wx[xidx + DH]);
        xz = static_cast<float>(wx[xidx + 2 * DH]);
        xo = static_cast<float>(wx[xidx + 3 * DH]);
    }
    for (int e = tid; e < BC * DH; e += NT) {
        const int bb = e / DH, j = e % DH;
        s_h[bb][j] = (b0 + bb < B) ? h0[(static_cast<size_t>(b0 + bb) * NH + hd) * DH + j] : 0.0f;
    }
    const int rows = min(BC, B - b0);
    bool gave_up = false;
    __syncthreads();

    for (int t = 0; t < S; ++t) {
        for (int bb = 0; bb < rows; ++bb) {
            float acc = 0.0f;
            #pragma unroll
            for (int r = 0; r < PR; ++r) {
                const int j = ks + KS * r;
                if (PR * KS == DH || j < DH) acc = fmaf(Rr[r], s_h[bb][j], acc);
            }
            #pragma unroll
            for (int off = KS / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
            if (ks == 0) s_raw[bb][o] = acc;
        }
        __syncthreads();
        if (pact) {
            const float ai = xi + bi + s_raw[pb][pu];
            const float af = xf + bf + s_raw[pb][U + pu];
            const float az = xz + bz + s_raw[pb][2 * U + pu];
            const float ao = xo + bo + s_raw[pb][3 * U + pu];
            if (t + 1 < S) {  // next step's inputs, in flight during this step
                xidx += static_cast<size_t>(NH) * 4 * DH;
                xi = static_cast<float>(wx[xidx]);
                xf = static_cast<float>(wx[xidx + DH]);
                xz = static_cast<float>(wx[xidx + 2 * DH]);
                xo = static_cast<float>(wx[xidx + 3 * DH]);
            }
            const float lf = m + slstm_logsig(af);
            const float m_new = (n == 0.0f) ? ai : fmaxf(ai, lf);
            const float ia = fminf(expf(ai - m_new), 1.0f);
            const float fa = fminf(expf(lf - m_new), 1.0f);
            c = fa * c + ia * tanhf(az);
            n = fa * n + ia;
            m = m_new;
            const float h = slstm_sigmoid(ao) * c / n;
            const size_t oidx = ((static_cast<size_t>(brow) * S + t) * NH + hd) * DH + unit;
            hs[oidx] = h;
            cs[oidx] = c;
            ns[oidx] = n;
            ms[oidx] = m;
            if (XCHG == 1 && t + 1 < S) {
                slstm_put(reinterpret_cast<unsigned long long*>(xbuf)
                          + ((static_cast<size_t>(t & 1) * B + brow) * NH + hd) * DH + unit, h, t + 1);
            }
            const size_t ridx = ((static_cast<size_t>(brow) * S + t) * NH + hd) * 4 * DH + unit;
            raw[ridx] = ai;
            raw[ridx + DH] = af;
            raw[ridx + 2 * DH] = az;
            raw[ridx + 3 * DH] = ao;
        }
        if (t + 1 < S) {
            if (XCHG == 1) {
                // s_h is free: the matvec that read it ended at the __syncthreads above.
                const unsigned long long* xb = reinterpret_cast<const unsigned long long*>(xbuf)
                                               + ((static_cast<size_t>(t & 1) * B + b0) * NH + hd) * DH;
                slstm_gather(&s_h[0][0], xb, static_cast<size_t>(NH) * DH, DH, rows * DH, t + 1, tid, NT, gave_up);
            } else {
                slstm_barrier(&bar[bc * NH + hd], (t + 1) * NBLK, gave_up);
                for (int e = tid; e < rows * DH; e += NT) {
                    const int bb = e / DH, j = e % DH;
                    s_h[bb][j] = __ldcg(&hs[((static_cast<size_t>(b0 + bb) * S + t) * NH + hd) * DH + j]);
                }
            }
            __syncthreads();
        }
    }
"""

_BACKWARD = """
    constexpr int KSB = 4 * KS;
    constexpr int NT = U * KSB;
    constexpr int PRB = (4 * DH + KSB - 1) / KSB;
    const int B = raw_shape[0];
    const int S = raw_shape[1];
    const int us = blockIdx.x, hd = blockIdx.y, bc = blockIdx.z;
    const int tid = threadIdx.x;
    const int u0 = us * U;
    const int b0 = bc * BC;
    __shared__ float s_d[BC][4 * DH];
    __shared__ float s_dh[BC][U];

    // Matvec role: unit u0 + ul of h_{t-1}, lanes ks split the 4 DH gate columns.
    const int ul = tid / KSB, ks = tid % KSB;
    float Rb[PRB];
    #pragma unroll
    for (int r = 0; r < PRB; ++r) {
        const int k = ks + KSB * r;
        Rb[r] = (k < 4 * DH) ? R[(static_cast<size_t>(hd) * DH + u0 + ul) * (4 * DH) + k] : 0.0f;
    }

    const int pb = tid / U, pu = tid % U;
    const int brow = b0 + pb;
    const bool pact = tid < BC * U && brow < B;
    const int unit = u0 + pu;
    const size_t sidx = (static_cast<size_t>(brow) * NH + hd) * DH + unit;
    const int rows = min(BC, B - b0);
    float dC = 0.0f, dN = 0.0f, dM = 0.0f;  // d loss / d (c_t, n_t, m_t) through step t + 1
    bool gave_up = false;
    // One step's inputs of this thread's unit: raw gates, the previous state, the output
    // cotangents (h, c, n, m) and the raw-gate cotangents; loaded a step ahead.
    float v[15];
    auto load_step = [&](int tt) {
        const size_t oidx = ((static_cast<size_t>(brow) * S + tt) * NH + hd) * DH + unit;
        const size_t ridx = ((static_cast<size_t>(brow) * S + tt) * NH + hd) * 4 * DH + unit;
        #pragma unroll
        for (int g = 0; g < 4; ++g) {
            v[g] = raw[ridx + g * DH];
            v[11 + g] = draws_in[ridx + g * DH];
        }
        if (tt > 0) {
            const size_t pidx = oidx - static_cast<size_t>(NH) * DH;
            v[4] = cs[pidx];
            v[5] = ns[pidx];
            v[6] = ms[pidx];
        } else {
            v[4] = c0[sidx];
            v[5] = n0[sidx];
            v[6] = m0[sidx];
        }
        v[7] = dhs[oidx];
        v[8] = dcs[oidx];
        v[9] = dns[oidx];
        v[10] = dms[oidx];
    };
    if (pact) load_step(S - 1);
    // s_dh = R d raw of the step in s_d (the part of d h_{t-1} that comes through the gates).
    auto recurrent_dh = [&]() {
        for (int bb = 0; bb < rows; ++bb) {
            float acc = 0.0f;
            #pragma unroll
            for (int r = 0; r < PRB; ++r) {
                const int k = ks + KSB * r;
                if (PRB * KSB == 4 * DH || k < 4 * DH) acc = fmaf(Rb[r], s_d[bb][k], acc);
            }
            #pragma unroll
            for (int off = KSB / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
            if (ks == 0) s_dh[bb][ul] = acc;
        }
        __syncthreads();
    };

    for (int t = S - 1; t >= 0; --t) {
        if (t < S - 1) recurrent_dh();
        if (pact) {
            const size_t ridx = ((static_cast<size_t>(brow) * S + t) * NH + hd) * 4 * DH + unit;
            const float ai = v[0], af = v[1], az = v[2], ao = v[3];
            const float cp = v[4], np_ = v[5], mp = v[6];
            float dh = v[7] + (t < S - 1 ? s_dh[pb][pu] : 0.0f);
            float dc = dC + v[8];
            float dn = dN + v[9];
            const float dm = dM + v[10];
            const float din[4] = {v[11], v[12], v[13], v[14]};
            if (t > 0) load_step(t - 1);  // in flight during the exchange
            // Forward again (the reference's order of operations).
            const float ls = slstm_logsig(af);
            const float lf = mp + ls;
            const bool fresh = np_ == 0.0f;
            const float mt = fresh ? ai : fmaxf(ai, lf);
            const float eia = expf(ai - mt), efa = expf(lf - mt);
            const float ia = fminf(eia, 1.0f), fa = fminf(efa, 1.0f);
            const float tz = tanhf(az);
            const float so = slstm_sigmoid(ao);
            const float c = fa * cp + ia * tz;
            const float n = fa * np_ + ia;
            // h = so c / n
            const float dsc = dh / n;
            const float dso = dsc * c;
            dc += dsc * so;
            dn -= dh * (so * c) / (n * n);
            const float d_o = dso * so * (1.0f - so);
            const float dfa = dc * cp + dn * np_;
            const float dia = dc * tz + dn;
            const float d_z = dc * ia * (1.0f - tz * tz);
            // min(e, 1) passes the gradient only where e < 1 (ties go to the constant).
            const float dfarg = efa < 1.0f ? dfa * efa : 0.0f;
            const float diarg = eia < 1.0f ? dia * eia : 0.0f;
            float dlf = dfarg;
            float d_i = diarg;
            const float dmt = dm - dfarg - diarg;
            // max(i, lf) gives ties to lf, as mx.maximum's gradient does.
            if (fresh || ai > lf) d_i += dmt; else dlf += dmt;
            const float d_f = dlf * slstm_sigmoid(-af);
            dC = dc * fa;
            dN = dn * fa;
            dM = dlf;
            const float dg[4] = {d_i + din[0], d_f + din[1], d_z + din[2], d_o + din[3]};
            #pragma unroll
            for (int g = 0; g < 4; ++g) {
                draw[ridx + g * DH] = dg[g];
                if (XCHG == 1) {
                    slstm_put(reinterpret_cast<unsigned long long*>(xbuf)
                              + ((static_cast<size_t>(t & 1) * B + brow) * NH + hd) * 4 * DH + g * DH + unit,
                              dg[g], S - t);
                }
            }
        }
        if (XCHG == 1) {
            // s_d is free: the matvec that read it ended at its __syncthreads.
            const unsigned long long* xb = reinterpret_cast<const unsigned long long*>(xbuf)
                                           + ((static_cast<size_t>(t & 1) * B + b0) * NH + hd) * 4 * DH;
            slstm_gather(&s_d[0][0], xb, static_cast<size_t>(NH) * 4 * DH, 4 * DH, rows * 4 * DH, S - t, tid, NT,
                         gave_up);
        } else {
            slstm_barrier(&bar[bc * NH + hd], (S - t) * NBLK, gave_up);
            for (int e = tid; e < rows * 4 * DH; e += NT) {
                const int bb = e / (4 * DH), k = e % (4 * DH);
                s_d[bb][k] = __ldcg(&draw[((static_cast<size_t>(b0 + bb) * S + t) * NH + hd) * 4 * DH + k]);
            }
        }
        __syncthreads();
    }
    recurrent_dh();  // d h_{-1} = R d raw_0
    if (pact) {
        dh0[sidx] = s_dh[pb][pu];
        dc0[sidx] = dC;
        dn0[sidx] = dN;
        dm0[sidx] = dM;
    }
"""

_kernels: dict[str, object] = {}


def _kernel(which: str):
    kernel = _kernels.get(which)
    if kernel is None:
        if which == "forward":
            kernel = mx.fast.cuda_kernel(
                name="xlstm_slstm_forward",
                input_names=["wx", "bias", "R", "c0", "n0", "m0", "h0"],
                output_names=["hs", "cs", "ns", "ms", "raw", "bar", "xbuf"],
                source=_FORWARD, header=_HEADER,
            )
        else:
            kernel = mx.fast.cuda_kernel(
                name="xlstm_slstm_backward",
                input_names=["raw", "cs", "ns", "ms", "c0", "n0", "m0", "R", "dhs", "dcs", "dns", "dms", "draws_in"],
                output_names=["draw", "dh0", "dc0", "dn0", "dm0", "bar", "xbuf"],
                source=_BACKWARD, header=_HEADER,
            )
        _kernels[which] = kernel
    return kernel


# ------------------------------------------------------------------------------- launch plan
def _units(DH: int) -> int:
    """U: the largest divisor of DH up to ``_MAX_UNITS`` (units per block); 8 above DH = 256,
    where the backward needs ~160 registers per thread (its R slice is DH / 8 floats) and a
    block of 32 U threads must stay within the SM's 64K registers."""
    limit = _MAX_UNITS if DH <= 256 else _MAX_UNITS // 2
    return max(u for u in range(1, min(DH, limit) + 1) if DH % u == 0)


def kernel_supported(NH: int, DH: int) -> bool:
    """Whether the CUDA kernels take heads of this size (else the ops path runs)."""
    return cuda_available() and DH <= _MAX_HEAD_DIM and NH * (DH // _units(DH)) <= _MAX_BLOCKS


def _plan(B: int, NH: int, DH: int, row_floats: int) -> tuple[int, int, int]:
    """(U, rows per block BC, row chunks per launch): as many row chunks as stay resident."""
    U = _units(DH)
    per_chunk = NH * (DH // U)
    chunks = max(1, min(B, _MAX_BLOCKS // per_chunk))
    bc = -(-B // chunks)
    bc = max(1, min(bc, 4 * _LANES, _SMEM_FLOATS // row_floats))
    return U, bc, chunks


def _row_groups(B: int, bc: int, chunks: int) -> list[tuple[int, int]]:
    step = bc * chunks
    return [(b, min(B, b + step)) for b in range(0, B, step)]


def _launch(which: str, inputs: list, whole: set[int], S: int, NH: int, DH: int, row_floats: int,
            row_shapes: list[tuple], init_value: float | None) -> tuple:
    """Runs kernel ``which`` over the batch in as few launches as keep every block resident.
    ``inputs[i]`` for i in ``whole`` goes to every launch, the others are split along rows;
    ``row_shapes`` are the five float32 outputs' shapes without their leading row axis."""
    B = inputs[0].shape[0]
    tagged = EXCHANGE == "tagged"
    U, bc, chunks = _plan(B, NH, DH, row_floats)
    nblk = DH // U
    width = DH if which == "forward" else 4 * DH  # floats a block hands on per row and step
    outs = []
    for lo, hi in _row_groups(B, bc, chunks):
        rows, nch = hi - lo, -(-(hi - lo) // bc)
        part = [x if i in whole or (lo, hi) == (0, B) else x[lo:hi] for i, x in enumerate(inputs)]
        outs.append(_kernel(which)(
            inputs=part,
            template=[("NH", NH), ("DH", DH), ("U", U), ("KS", _LANES), ("BC", bc), ("NBLK", nblk),
                      ("XCHG", _XCHG[EXCHANGE])],
            grid=(nblk * 4 * U * _LANES, NH, nch),
            threadgroup=(4 * U * _LANES, 1, 1),
            output_shapes=[(rows, *shape) for shape in row_shapes]
            + [(nch * NH,), (2, rows, NH, width) if tagged else (1,)],
            output_dtypes=[mx.float32] * 5 + [mx.int32, mx.uint64],
            init_value=init_value,
        )[:5])
    if len(outs) == 1:
        return tuple(outs[0])
    return tuple(mx.concatenate([o[i] for o in outs], axis=0) for i in range(5))


def _forward_cuda(wx, bias, R, c0, n0, m0, h0):
    _, S, NH, _, DH = wx.shape
    # The exchange words and barrier counters must start at 0 (S = 1 exchanges nothing).
    return _launch("forward", [wx, bias, R, c0, n0, m0, h0], {1, 2}, S, NH, DH, DH + 4 * _units(DH),
                   [(S, NH, DH)] * 4 + [(S, NH, 4, DH)], 0 if S > 1 else None)


def _backward_cuda(raw, cs, ns, ms, c0, n0, m0, R, dhs, dcs, dns, dms, draws_in):
    _, S, NH, _, DH = raw.shape
    return _launch("backward", [raw, cs, ns, ms, c0, n0, m0, R, dhs, dcs, dns, dms, draws_in], {7}, S, NH, DH,
                   4 * DH + _units(DH), [(S, NH, 4, DH)] + [(NH, DH)] * 4, 0)


# ---------------------------------------------------------------------------- ops versions
def _forward_ops(wx, bias, R, c0, n0, m0, h0):
    """The reference recurrence, keeping every step (the CPU twin of the forward kernel)."""
    B, S, NH, G, DH = wx.shape
    wxf = wx.astype(mx.float32) + bias
    c, n, m, h = c0, n0, m0, h0
    hs, cs, ns, ms, raws = [], [], [], [], []
    for t in range(S):
        raw = wxf[:, t] + (h[:, :, None, :] @ R).reshape(B, NH, G, DH)
        c, n, m, h = _pointwise(raw, c, n, m)
        for lst, x in ((hs, h), (cs, c), (ns, n), (ms, m), (raws, raw)):
            lst.append(x)
    return tuple(mx.stack(x, axis=1) for x in (hs, cs, ns, ms, raws))


def _pointwise_backward(raw, cp, np_, mp, dh, dc, dn, dm):
    """One step's gate derivatives (the backward kernel's math, vectorised).

    raw [B, NH, 4, DH]; previous state cp, np_, mp and the step's total gradients dh, dc, dn,
    dm [B, NH, DH]. Returns d raw [B, NH, 4, DH] and d (c, n, m) of the previous state.
    """
    ai, af, az, ao = raw[:, :, 0], raw[:, :, 1], raw[:, :, 2], raw[:, :, 3]
    lf = mp + _log_sigmoid(af)
    fresh = np_ == 0.0
    mt = mx.where(fresh, ai, mx.maximum(ai, lf))
    eia, efa = mx.exp(ai - mt), mx.exp(lf - mt)
    ia, fa = mx.minimum(eia, 1.0), mx.minimum(efa, 1.0)
    tz, so = mx.tanh(az), mx.sigmoid(ao)
    c = fa * cp + ia * tz
    n = fa * np_ + ia
    dsc = dh / n
    d_o = dsc * c * so * (1.0 - so)
    dc = dc + dsc * so
    dn = dn - dh * (so * c) / (n * n)
    dfarg = mx.where(efa < 1.0, (dc * cp + dn * np_) * efa, 0.0)
    diarg = mx.where(eia < 1.0, (dc * tz + dn) * eia, 0.0)
    d_z = dc * ia * (1.0 - tz * tz)
    dmt = dm - dfarg - diarg
    to_i = mx.logical_or(fresh, ai > lf)
    d_i = diarg + mx.where(to_i, dmt, 0.0)
    dlf = dfarg + mx.where(to_i, 0.0, dmt)
    d_f = dlf * mx.sigmoid(-af)
    return mx.stack([d_i, d_f, d_z, d_o], axis=2), (dc * fa, dn * fa, dlf)


def _backward_ops(raw, cs, ns, ms, c0, n0, m0, R, dhs, dcs, dns, dms, draws_in):
    B, S, NH, G, DH = raw.shape
    RT = mx.swapaxes(R, 1, 2)  # [NH, 4 DH, DH]
    dC = dN = dM = mx.zeros((B, NH, DH), dtype=mx.float32)
    drec = None
    draws = [None] * S
    for t in range(S - 1, -1, -1):
        cp, np_, mp = (c0, n0, m0) if t == 0 else (cs[:, t - 1], ns[:, t - 1], ms[:, t - 1])
        dh = dhs[:, t] if drec is None else dhs[:, t] + drec
        d, (dC, dN, dM) = _pointwise_backward(
            raw[:, t], cp, np_, mp, dh, dC + dcs[:, t], dN + dns[:, t], dM + dms[:, t]
        )
        d = d + draws_in[:, t]
        draws[t] = d
        drec = (d.reshape(B, NH, 1, G * DH) @ RT).reshape(B, NH, DH)
    return mx.stack(draws, axis=1), drec, dC, dN, dM


# ----------------------------------------------------------------------- custom function
def _make_recurrence(forward, backward):
    @mx.custom_function
    def recurrence(wx, bias, R, c0, n0, m0, h0):
        return forward(wx, bias, R, c0, n0, m0, h0)

    @recurrence.vjp
    def recurrence_vjp(primals, cotangents, outputs):
        wx, bias, R, c0, n0, m0, h0 = primals
        hs, cs, ns, ms, raw = outputs
        dhs, dcs, dns, dms, draws_in = (
            mx.zeros_like(o) if ct is None else ct.astype(mx.float32)
            for ct, o in zip(cotangents, outputs)
        )
        draw, dh0, dc0, dn0, dm0 = backward(raw, cs, ns, ms, c0, n0, m0, R, dhs, dcs, dns, dms, draws_in)
        B, S, NH, G, DH = raw.shape
        # dR[h] = sum over rows and steps of h_{t-1}^T d raw_t: one batched matmul.
        hprev = mx.concatenate([h0[:, None], hs[:, :-1]], axis=1)  # [B, S, NH, DH]
        hp = hprev.transpose(2, 3, 0, 1).reshape(NH, DH, B * S)
        dr = draw.transpose(2, 0, 1, 3, 4).reshape(NH, B * S, G * DH)
        dR = hp @ dr
        dbias = draw.sum(axis=(0, 1))
        return draw.astype(wx.dtype), dbias, dR, dc0, dn0, dm0, dh0

    return recurrence


_RECURRENCES: dict[str, object] = {}


def _recurrence(backend: str):
    fn = _RECURRENCES.get(backend)
    if fn is None:
        fn = _RECURRENCES[backend] = (
            _make_recurrence(_forward_cuda, _backward_cuda) if backend == "cuda"
            else _make_recurrence(_forward_ops, _backward_ops)
        )
    return fn


def slstm_recurrence(
    wx: mx.array,
    R: mx.array,
    state: SLSTMState | None = None,
    *,
    bias: mx.array | None = None,
    backend: str = "auto",
) -> tuple[mx.array, SLSTMState]:
    """The sLSTM over a sequence (S >= 1) with a custom backward; same contract as
    :func:`xlstm_metal.kernels.slstm.slstm_sequence` plus the gate bias.

    wx [B, S, NH, 4, DH] (W x, without bias), R [NH, DH, 4 DH], bias [NH, 4, DH] or None,
    state (c, n, m, h) [B, NH, DH] or None -> (h [B, S, NH, DH] in wx's dtype, final state
    float32). ``backend``: "cuda" (the fused kernels), "ops" (the same custom function with
    pure-ops forward and backward) or "auto" (cuda where :func:`kernel_supported`, else ops).
    """
    B, S, NH, G, DH = wx.shape
    if G != 4:
        raise ValueError(f"sLSTM gate inputs need 4 gates on axis 3, got shape {tuple(wx.shape)}")
    if tuple(R.shape) != (NH, DH, 4 * DH):
        raise ValueError(f"recurrent kernel must have shape {(NH, DH, 4 * DH)}, got {tuple(R.shape)}")
    if backend == "auto":
        backend = "cuda" if kernel_supported(NH, DH) else "ops"
    elif backend == "cuda" and not kernel_supported(NH, DH):
        raise ValueError(f"the fused sLSTM kernels need MLX's CUDA backend and DH <= {_MAX_HEAD_DIM} "
                         f"(got NH={NH}, DH={DH}, device {mx.default_device()})")
    elif backend not in ("cuda", "ops"):
        raise ValueError(f"unknown sLSTM backend {backend!r}; choose from 'auto', 'cuda', 'ops'")
    if state is None:
        state = slstm_zero_state(B, NH, DH)
    c0, n0, m0, h0 = (s.astype(mx.float32) for s in state)
    b = mx.zeros((NH, 4, DH), dtype=mx.float32) if bias is None else bias.astype(mx.float32).reshape(NH, 4, DH)
    hs, cs, ns, ms, _ = _recurrence(backend)(wx, b, R.astype(mx.float32), c0, n0, m0, h0)
    return hs.astype(wx.dtype), (cs[:, -1], ns[:, -1], ms[:, -1], hs[:, -1])


__all__ = ["kernel_supported", "slstm_recurrence"]
