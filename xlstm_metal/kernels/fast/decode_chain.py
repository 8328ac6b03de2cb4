"""The decode step of a quantized xLSTM-Large block in five CUDA launches, beside its ops reference.

At a few rows a quantized decode step is paced by the host's work per launched kernel, not by
the weights (benchmarks/NOTES.md): :mod:`.decode`'s kernels leave 9-10 launches per block. For
quantized weights the matrix products are our own kernel (:mod:`.quantized`; at one row the
float ones too, through the same kernel: :data:`CHAIN_FLOAT`), so the small
kernels fold into their prologues and epilogues: each thread block computes its few input rows
(from L2) into shared memory, then multiplies them with its 16-feature tile(s) of the weights:

1. [residual add +] RMSNorm -> the fused q|k|v|o(|i|f) product (:func:`norm_quantized_matmul`;
   it also writes the residual sum and, for the float gate projections, the normed x);
2. the gated step kernel, reading q, k, v (and raw gates) as columns of stage 1's output
   (:func:`.decode.mlstm_step_gated_packed`: no slices or reshapes of it in the graph, each of
   which the host would walk at every step);
3. multi-head LayerNorm of h times sigmoid(o~) -> out_proj, the residual add in the epilogue
   (:func:`gate_norm_quantized_matmul`: writes the new residual stream);
4. RMSNorm -> the fused gate|up product (:func:`norm_quantized_matmul`);
5. SwiGLU -> proj_down (:func:`swiglu_quantized_matmul`): the next block's pending residual.

Each computes in float32 and rounds where the reference rounds (the prologues are the formulas
of :func:`.decode.add_rms_norm` and :func:`.decode.output_norm_gate`, the products those of
:func:`.quantized.fused_quantized_matmul`, the same tensor-core loop), so results agree with the ops path to float32
round-off and at most an ulp of bf16/fp16 where a transcendental differs.

:meth:`~xlstm_metal.blocks.xlstm_large.mLSTMBlock.step` runs them, stage by stage: a stage whose modules are
not what the kernel expects (a LoRA wrapper, a float layer, a user's norm, a projection replaced
since ``fuse_projections()``) calls the modules of the tree instead. Only on CUDA, for at most
:data:`CHAIN_MAX_ROWS` rows; ``XLSTM_METAL_DECODE_CHAIN=0`` (or :func:`set_decode_chain`) turns
it off (then :meth:`mLSTMBlock.step` runs :mod:`.decode`'s kernels, as before).

Stages 4 and 5, or 3, 4 and 5, or the whole block (at 4 bits by default) also run as one launch
(:data:`CHAIN_MERGE`, :func:`ffn_quantized_matmul`, :func:`tail_quantized_matmul`,
:func:`block_quantized_matmul`): each stage's code and rounding as
above, the stages after the first waiting in the kernel for the blocks of the one before (a
counter of the launch's own, zero between launches), their first weight chunks requested
before they wait; with :data:`CHAIN_PAIRED` the gate|up tiles hold matching gate and up rows, so
SwiGLU runs in their epilogue and proj_down has no prologue. The same values as the separate
stages (bit-equal: the CUDA tests).

At one row, bf16 and 8-bit stages take :mod:`.gemv`'s streaming product instead of the
tensor-core loop (:data:`CHAIN_ROWS`; the same prologues and stores, unmerged): it reads the
weights faster there (benchmarks/NOTES.md, session 14). Stages 4 and 5 then run as
:func:`ffn_rows_matmul` (:data:`ROWS_SWIGLU`): SwiGLU in gate|up's epilogue, a warp per gate/up
pair, and proj_down staging its input as it is; at bf16 each warp first asks L2 for its first
weights (:data:`ROWS_PREFETCH`; session 15).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn

from ...cells.norms import MultiHeadLayerNorm, RMSNorm
from . import decode as _decode
from .decode import _GATE_HEADER, _REDUCE_HEADER, _kernels_on, add_rms_norm, output_norm_gate
from . import gemv as _gemv
from . import quantized as _quantized
from .quantized import (_HEADER, INT_HEADER, INT_STAGE, decode_launch, decode_source, decode_template, int_weights_apply, kernel_takes,
                        launch_bounds, quantized_matmul)
from .tensor_cores import compact_source, tile_sums_source

#: Most rows (batch x 1 token) the chain takes; more rows run :mod:`.decode`'s kernels. Measured
#: on an H200 (S6R3, 7B, 4 bits): 484.6 tok/s at 2 rows (4.13 ms per step), where the path without
#: the chain took 5.6-6.4 ms per step at one row; 3 and 4 rows were not measured (the kernels take
#: them: a stage whose rows do not fit shared memory, at 7B SwiGLU's 10,944 values per row beyond
#: 2 rows, runs its reference).
CHAIN_MAX_ROWS = 2

#: Whether float (bf16/fp16) products take the chain too at one row, through the same kernel
#: reading its T weights as they are (``XLSTM_METAL_CHAIN_FLOAT=0`` turns it off). Its products
#: are slower than MLX's GEMV (S6R2, H200, 7B: 4.90 ms of GPU time per step against 4.25), but a
#: step launches 167 kernels instead of 296 and MLX's matmul node costs the host ~23-38 us
#: (a custom kernel ~5-8): 198.5 tok/s against 162.3 in the same process.
CHAIN_FLOAT = os.environ.get("XLSTM_METAL_CHAIN_FLOAT", "1") != "0"

#: Most rows the float products take the chain at (measured at one row only).
CHAIN_FLOAT_MAX_ROWS = 1

_enabled = os.environ.get("XLSTM_METAL_DECODE_CHAIN", "1") != "0"


def decode_chain_enabled() -> bool:
    """Whether blocks run the chain (default on; ``XLSTM_METAL_DECODE_CHAIN=0`` off)."""
    return _enabled


def set_decode_chain(enabled: bool) -> None:
    """Switch the chain on or off for steps traced from now on."""
    global _enabled
    _enabled = bool(enabled)


def _chain_active() -> bool:
    """Where blocks take the chain: on CUDA (with :mod:`.decode`'s kernels on). Tests patch this
    to run the chain's dispatch on a CPU, where every stage computes its reference ops."""
    return _kernels_on()


def chain_applies(x: mx.array) -> bool:
    """Whether a block step on residual input ``x`` [B, 1, E] may take the chain (CUDA, the switch
    on, at most :data:`CHAIN_MAX_ROWS` rows); each stage then checks its own modules."""
    return _enabled and _chain_active() and x.ndim == 3 and x.shape[1] == 1 and 0 < x.shape[0] <= CHAIN_MAX_ROWS


# ----------------------------------------------------------------------------- kernel sources
# Hooks of :func:`.quantized.decode_source` (a thread block runs its prologue once, then walks
# its 16-feature output tiles). K (the inner size) is the template KD; M comes from an
# input's shape. The prologue stages x's values, rounded to T (and ST) exactly where the reference
# rounds, in shared memory (SR >= M rows), all threads of the block at work, in one pass over the
# inputs (a norm's values stay in registers for its statistics); the product reads them there.
_STAGE_DECL = """
    __shared__ __align__(16) T xs_s[SR * KD];
    constexpr bool XPRE = BITS == 4;  // x staged in the 4-bit pair order: the product permutes nothing
    auto xpos = [](int k) { return XPRE ? xl_xpos4(k) : k; };
"""
_LOAD_X = """
        const uint4* xp = reinterpret_cast<const uint4*>(xs_s + (size_t)m * K + kc);
        #pragma unroll
        for (int i = 0; i < VALS / 8; ++i) {
          const uint4 u = xp[i];
          xv[4 * i] = u.x; xv[4 * i + 1] = u.y; xv[4 * i + 2] = u.z; xv[4 * i + 3] = u.w;
        }
"""

# 1 and 4: RMSNorm of s = xr (+ pend), as add_rms_norm: s in ST, sum of squares in float32,
# normed = ST(s * rsqrt(mean + eps)), value = T(normed * w).
_NORM_SIZES = """
    const int M = xr_shape[0];
    constexpr int K = KD;
    __shared__ float s_warp[32];
STAGE_DECL
"""
_NORM_PROLOGUE = """
    {
      constexpr int MAXV = (KD + 32 * WARPS - 1) / (32 * WARPS);
      for (int mm = 0; mm < M; ++mm) {
        float sv[MAXV], wv[MAXV];  // the norm weight loaded with s: one wait on L2, not two
        float sq = 0.0f;
        #pragma unroll
        for (int r = 0; r < MAXV; ++r) {
          const int k = threadIdx.x + r * 32 * WARPS;
          sv[r] = k < K ? RESID : 0.0f;
          wv[r] = k < K ? static_cast<float>(nw[k]) : 0.0f;
          sq += sv[r] * sv[r];
        }
        const float rn = rsqrtf(xl_block_sum(sq, s_warp) / K + EPS);
        #pragma unroll
        for (int r = 0; r < MAXV; ++r) {
          const int k = threadIdx.x + r * 32 * WARPS;
          if (k < K) {
            const int e = mm * K + k;
            const T v = static_cast<T>(static_cast<float>(static_cast<ST>(sv[r] * rn)) * wv[r]);
            xs_s[mm * K + xpos(k)] = v;
            if (blockIdx.x == 0) {  // the residual sum and the normed input, once
              WRITE_SUM
              WRITE_XN
            }
          }
        }
      }
      __syncthreads();
    }
"""

# 3: LayerNorm per head of h (float32, biased variance), rounded to T, times the weight (T),
# times sigmoid(o~) (T), as output_norm_gate; the epilogue adds the rounded product to xr in ST.
_GATE_SIZES = """
    const int M = h_shape[0];
    constexpr int K = KD;
STAGE_DECL
"""
_GATE_PROLOGUE = """
    {
      // A warp per (row, head) keeps the head's h in registers for its statistics; o~ is read
      // in the same pass and its sigmoid taken while the statistics are summed (one wait on L2).
      constexpr int MAXJ = (DV + 31) / 32;
      const int h_lo = k_lo / DV, nh = (k_hi + DV - 1) / DV - h_lo;  // the heads of this block's share of K
      for (int p = warp; p < M * nh; p += WARPS) {
        const int mm = p / nh, hd = h_lo + (p - mm * nh);
        const size_t hoff = (static_cast<size_t>(mm) * NH + hd) * DV;  // h [B, NH, 1, DV] row-contiguous
        const size_t ooff = static_cast<size_t>(mm) * o_shape[2] + OOFF + hd * DV;
        float hv[MAXJ], gv[MAXJ];
        float sum = 0.0f;
        #pragma unroll
        for (int r = 0; r < MAXJ; ++r) {
          const int j = lane + 32 * r;
          hv[r] = j < DV ? static_cast<float>(h[hoff + j]) : 0.0f;
          gv[r] = j < DV ? static_cast<float>(o[ooff + j]) : 0.0f;
        }
        #pragma unroll
        for (int r = 0; r < MAXJ; ++r) {
          sum += hv[r];
          gv[r] = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-gv[r]))));
        }
        for (int sh = 16; sh > 0; sh >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, sh);
        const float mean = sum / DV;
        float sq = 0.0f;
        #pragma unroll
        for (int r = 0; r < MAXJ; ++r) {
          const float d = hv[r] - mean;
          sq += lane + 32 * r < DV ? d * d : 0.0f;
        }
        for (int sh = 16; sh > 0; sh >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, sh);
        const float rstd = rsqrtf(sq / DV + EPS);
        #pragma unroll
        for (int r = 0; r < MAXJ; ++r) {
          const int j = lane + 32 * r;
          if (j < DV) {
            const int k = hd * DV + j;
            const float normed = static_cast<float>(static_cast<T>((hv[r] - mean) * rstd));
            const float scaled = static_cast<float>(static_cast<T>(normed * static_cast<float>(nw[k])));
            xs_s[mm * K + xpos(k)] = static_cast<T>(gv[r] * scaled);
          }
        }
      }
      __syncthreads();
    }
"""
_RESIDUAL_STORE = """{
        out[(size_t)m * N + n] = static_cast<ST>(static_cast<float>(xr[(size_t)m * N + n])
                                                 + static_cast<float>(static_cast<T>(sum)));
      }"""

# 5: silu(gate) * up, each op rounded to T (nn.silu is gate * sigmoid(gate)).
_SWIGLU_SIZES = """
    const int M = gate_up_shape[0];
    constexpr int K = KD;
STAGE_DECL
"""
_SWIGLU_PROLOGUE = """
    {
      constexpr int NT = 32 * WARPS;
      if (KD % 8 == 0 && (reinterpret_cast<uintptr_t>(gate_up) & 15) == 0) {
        // All of a thread's gate and up values requested at once, 8 per 16-byte load: one wait
        // on L2 per row instead of one per batch of values (F 10,944: 6 chunks of 8 per thread).
        // chunks of 8 per thread: a share of K is at most ceil(spans / SPLIT) spans
        constexpr int C8 = KD / 8, PER = ((((KD + SPAN - 1) / SPAN + SPLIT - 1) / SPLIT) * SPAN / 8 + NT - 1) / NT;
        const int c_lo = k_lo / 8, c_hi = k_hi / 8;  // this block's share of K (all of it unsplit)
        for (int mm = 0; mm < M; ++mm) {
          const uint4* gp = reinterpret_cast<const uint4*>(gate_up + static_cast<size_t>(mm) * 2 * K);
          const uint4* upp = gp + C8;
          uint4 gv[PER], uv[PER];
          #pragma unroll
          for (int u = 0; u < PER; ++u) {
            const int c = c_lo + threadIdx.x + u * NT;
            gv[u] = c < c_hi ? gp[c] : make_uint4(0u, 0u, 0u, 0u);
            uv[u] = c < c_hi ? upp[c] : make_uint4(0u, 0u, 0u, 0u);
          }
          #pragma unroll
          for (int u = 0; u < PER; ++u) {
            const int c = c_lo + threadIdx.x + u * NT;
            if (c < c_hi) {
              const T* g8 = reinterpret_cast<const T*>(&gv[u]);
              const T* u8 = reinterpret_cast<const T*>(&uv[u]);
              uint4 o;
              T* o8 = reinterpret_cast<T*>(&o);
              #pragma unroll
              for (int i = 0; i < 8; ++i) {
                const float gf = static_cast<float>(g8[i]);
                const float sg = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-gf))));
                const float si = static_cast<float>(static_cast<T>(gf * sg));
                o8[XPRE ? xl_xpos4(i) : i] = static_cast<T>(si * static_cast<float>(u8[i]));
              }
              *reinterpret_cast<uint4*>(xs_s + mm * K + xpos(c * 8)) = o;  // (xpos keeps pieces of 8 whole)
            }
          }
        }
      } else {
        // U values of gate and of up per thread loaded before any is used.
        constexpr int U = 8;
        for (int mm = 0; mm < M; ++mm) {
          const size_t base = static_cast<size_t>(mm) * 2 * K;
          for (int k0 = k_lo + threadIdx.x; k0 < k_hi; k0 += NT * U) {
            float gv[U], uv[U];
            #pragma unroll
            for (int u = 0; u < U; ++u) {
              const int k = k0 + u * NT;
              gv[u] = k < k_hi ? static_cast<float>(gate_up[base + k]) : 0.0f;
              uv[u] = k < k_hi ? static_cast<float>(gate_up[base + K + k]) : 0.0f;
            }
            #pragma unroll
            for (int u = 0; u < U; ++u) {
              const int k = k0 + u * NT;
              if (k < k_hi) {
                const float sg = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-gv[u]))));
                const float si = static_cast<float>(static_cast<T>(gv[u] * sg));
                xs_s[mm * K + xpos(k)] = static_cast<T>(si * uv[u]);
              }
            }
          }
        }
      }
      __syncthreads();
    }
"""

#: Bytes of shared memory the staged x may take (static shared memory is 48 KiB per block; the
#: product's reduction takes 4 KiB at one tile). A stage whose rows do not fit runs its reference.
STAGE_BYTES = 44 * 1024

#: Thread blocks a chain kernel launches by bits, each walking output tiles of 16 features after
#: one prologue (0: one block per tile): at 4 bits as many as fit the GPU at once
#: (``quantized.RESIDENT`` per SM), which compute each prologue's input rows once per block while
#: the weight ring streams on across the block's tiles. On an H200 (S7R2, 7B, 4 bits, one process)
#: 264 blocks took 2.88 ms of GPU time per step against 3.28 ms with a block per tile (gate|up
#: 27.8 us instead of 37.2, q|k|v|o 17.1 instead of 22.2); at 8 bits 4.30 vs 4.43 ms, both behind
#: session 6's schedule (4.13 ms, S6R3), which 8 and 16 bits keep (see ``quantized.DEPTH``).
WALK_BLOCKS = {4: _quantized.RESIDENT[4] * _quantized.SMS, 8: 0, 16: 0}

#: Shares of K for the stages whose products have few output tiles (out_proj and proj_down:
#: :data:`SPLIT_MAX_FEATURES` or fewer features), by bits (``XLSTM_METAL_CHAIN_SPLIT``, e.g.
#: "4:4,8:4,16:4"; 1: no split, the default). At 4,096 features a product has 256 tiles of 16
#: and each block's prologue (the head norm over all of h; SwiGLU over all 10,944 values) took
#: ~4-5 us of the 13-20 us such a stage took on an H200 (S7R2); with K in shares each block
#: stages only its share and there are SPLIT times the work items. Measured slower (S8R1, H200,
#: 7B, one process, CUPTI): 4 shares took out_proj 0.536 ms and proj_down 0.828 ms per 4-bit step
#: (unsplit, S7R3: 0.34-0.36 and 0.70-0.71), 0.666 / 1.145 ms at bf16 (unsplit 0.466 / 1.012): the
#: prologues are latency-bound (a warp per head either way) and each work item now pays its
#: reduction, a fence and the counter for a quarter of the weights.
SPLIT_K = _quantized._per_bits("XLSTM_METAL_CHAIN_SPLIT", {4: 1, 8: 1, 16: 1})
SPLIT_MAX_FEATURES = 8192

#: Schedules of single stages, over :data:`.quantized.DEPTH` and :data:`WALK_BLOCKS` (an explicit
#: :data:`CHAIN_BLOCKS` keeps precedence): stage ("norm": RMSNorm -> q|k|v|o and gate|up; "gate":
#: head norm -> out_proj; "swiglu": SwiGLU -> proj_down) -> bits -> (ring depth, thread blocks
#: walking tiles, 0 one block per tile[, integer weights: :data:`.quantized.INT_WEIGHTS`' value for
#: the stage; an entry whose integer weights cannot apply, e.g. group 32, is not used]).
#:
#: At 8 bits the norm stages take the weights as integers 1024 + q with 2 chunks in flight and
#: 396 blocks walking tiles: on an H200 (7B, one row, group 64, CUPTI) gate|up 1.239 ms and
#: q|k|v|o 0.701 ms per step against 1.309 / 0.763 with session 8's schedule (S9R2; the same
#: walking schedule dequantizing first: 1.362 / 0.752); whole steps: 3.563 ms of GPU work against
#: 3.781 (S9R3: gate|up 1.225 / 1.315, q|k|v|o 0.688 / 0.767). The other stages keep their
#: schedules: the integer path's extra pass in their prologue made out_proj and proj_down slower
#: (S9R1, products alone: 16.2 / 29.0 us against 13.5 / 27.1).
STAGE_SCHEDULE: dict[str, dict[int, tuple]] = {"norm": {8: (2, 3 * _quantized.SMS, 2)}, "gate": {}, "swiglu": {}}

#: The same for every width at once (``XLSTM_METAL_CHAIN_BLOCKS``), or None: :data:`WALK_BLOCKS`.
CHAIN_BLOCKS = int(os.environ["XLSTM_METAL_CHAIN_BLOCKS"]) if os.environ.get("XLSTM_METAL_CHAIN_BLOCKS") else None


def _span_sums(k: int, bits: int) -> int:
    """Bytes of the integer-weights path's (2^-e, sum of x) per staged row of ``k`` values: a
    float2 per span (:func:`.quantized.span`)."""
    return k // _quantized.span(bits) * 8


def _stage_rows(rows: int, k: int, dtype: mx.Dtype, int_bits: int = 0) -> int:
    """Rows staged in shared memory (a power of two >= rows, so few variants compile), or 0 when
    they do not fit; ``int_bits``: with the integer-weights path's (2^-e, sum) per span of a
    ``int_bits`` product (512 / bits values; :data:`.quantized.INT_WEIGHTS`)."""
    sr = 1 << (rows - 1).bit_length()
    per_row = k * dtype.size + (_span_sums(k, int_bits) if int_bits else 0)
    return sr if sr * per_row <= STAGE_BYTES else 0


def _int(bits: int, group_size: int, rows: int, k: int, dtype: mx.Dtype, split: int = 1, stage: str = "") -> int:
    """Whether a stage's product takes the weights as exact integers (:func:`.quantized.int_weights_apply`,
    and its rows with their group sums fit shared memory; else the stage dequantizes as before):
    0, or the kind (:data:`.quantized.INT_WEIGHTS`' value, 1 or 2, or the stage's in :data:`STAGE_SCHEDULE`)."""
    sched = STAGE_SCHEDULE.get(stage, {}).get(bits, ())
    # A shipped schedule takes the integer path only where its CUDA tests ran (bf16 rows, groups
    # of 64: S9R1, S9R3); XLSTM_METAL_DECODE_INT opts in for the rest.
    scheduled = len(sched) > 2 and dtype == mx.bfloat16 and group_size == 64
    kind = sched[2] if scheduled else _quantized.INT_WEIGHTS.get(bits, 0)
    if kind and int_weights_apply(bits, group_size, rows, split, kind) and _stage_rows(rows, k, dtype, bits) > 0:
        return 2 if kind == 2 else 1
    return 0


def _int_template(iw: int) -> list:
    """The integer-weights kernels' template argument (none for the others)."""
    return [("IW", iw)] if iw else []


def _rows_template(rows: int, k: int, dtype: mx.Dtype, bits: int, iw: int) -> list:
    """A stage's template arguments for its staged rows: the inner size ``KD``, the rows ``SR``
    staged in shared memory (with the integer-weights path's span sums where ``iw``) and ``IW``."""
    return [("KD", k), ("SR", _stage_rows(rows, k, dtype, bits if iw else 0))] + _int_template(iw)


def _eps(eps: float) -> str:
    return f"{float(eps)!r}f"


def _source(sizes: str, prologue: str, store: str = "y[(size_t)m * N + n] = static_cast<T>(sum);",
            split: bool = False, int_weights: bool = False) -> str:
    decl = _STAGE_DECL + ("    __shared__ float2 xg_s[SR * (KD / SPAN)];\n" if int_weights else "")
    return decode_source(sizes=sizes.replace("STAGE_DECL", decl), prologue=prologue + (INT_STAGE if int_weights else ""),
                         load_x=_LOAD_X, store=store, split=split, int_weights=int_weights)


def _plan(stage: str, bits: int, iw: int) -> tuple | None:
    """``stage``'s :data:`STAGE_SCHEDULE` entry at ``bits``, if it applies to a kernel whose integer
    weights are ``iw`` (0: not taken)."""
    entry = STAGE_SCHEDULE.get(stage, {}).get(bits)
    return entry if entry is not None and (len(entry) < 3 or not entry[2] or iw) else None


def _launch(n_out: int, bits: int, split: int = 1, stage: str = "", iw: int = 0) -> dict:
    blocks = CHAIN_BLOCKS if CHAIN_BLOCKS is not None else WALK_BLOCKS.get(bits, 0)
    plan = _plan(stage, bits, iw)
    if plan is not None and CHAIN_BLOCKS is None:
        blocks = plan[1]
    return decode_launch(n_out, blocks or None, split)


def _depth(stage: str, bits: int, iw: int = 0) -> int | None:
    """The ring depth of ``stage``'s kernel at ``bits`` (None: :data:`.quantized.DEPTH`'s)."""
    plan = _plan(stage, bits, iw)
    return None if plan is None else plan[0]


def _split(n_out: int, k: int, bits: int) -> int:
    """Shares of K for a split-able stage with ``n_out`` features and inner size ``k``
    (:data:`SPLIT_K`; at most one per span of K a warp covers, 512 / bits values)."""
    split = min(max(1, SPLIT_K.get(bits, 1)), -(-k // _quantized.span(bits)))
    return split if split > 1 and n_out <= SPLIT_MAX_FEATURES else 1


def _outputs(shapes: list, dtypes: list, split: int, rows: int, n_out: int) -> dict:
    """A stage's output shapes and dtypes, and with K in ``split`` shares two more: the float32
    partial sums ``part`` [split, rows, n_out] and ``count``, a uint32 arrival counter per
    16-feature tile, zeroed at each launch (``init_value``; it zero-fills the other outputs too,
    each written whole). Counters of each launch's own, not of the kernel's module: MLX's CUDA
    graphs run launches that share no array side by side, and two launches counting on the same
    counters can sum partial sums not yet written (S26: three launches evaluated together gave
    different bits)."""
    if split == 1:
        return dict(output_shapes=shapes, output_dtypes=dtypes)
    return dict(output_shapes=shapes + [(split, rows, n_out), (-(-n_out // 16),)],
                output_dtypes=dtypes + [mx.float32, mx.uint32], init_value=0)


def _norm_prologue(eps: float, has_pending: bool, write_xn: bool) -> str:
    """Stage 1's / 4's prologue: [the residual add and] the RMSNorm of x into ``xs_s``."""
    resid = ("static_cast<float>(static_cast<ST>(static_cast<float>(xr[(size_t)mm * K + k]) "
             "+ static_cast<float>(pend[(size_t)mm * K + k])))") if has_pending else "static_cast<float>(xr[(size_t)mm * K + k])"
    prologue = _NORM_PROLOGUE.replace("RESID", resid).replace("EPS", _eps(eps))
    prologue = prologue.replace("WRITE_SUM", "sum_out[e] = static_cast<ST>(sv[r]);" if has_pending else "")
    prologue = prologue.replace("WRITE_XN", "xn_out[e] = v;" if write_xn else "")
    if not (has_pending or write_xn):
        prologue = prologue.replace("if (blockIdx.x == 0) {", "if (false) {")
    return prologue


def _norm_source(eps: float, has_pending: bool, write_xn: bool, int_weights: bool = False,
                 store: str = "y[(size_t)m * N + n] = static_cast<T>(sum);", wait: str = "") -> str:
    return _source(_NORM_SIZES, wait + _norm_prologue(eps, has_pending, write_xn), store, int_weights=int_weights)


_kernels: dict[tuple, object] = {}


def _kernel(key: tuple, bits: int, inputs: list[str], outputs: list[str], source, split: bool = False,
            int_weights: int = 0, header: str = ""):
    """The chain's kernel for ``key`` at ``bits``, its source from ``source()``, built once per
    register bound (``quantized.RESIDENT``); ``split``: a split-K kernel (its outputs end with
    ``part``; see :func:`.quantized.decode_source`); ``int_weights``: the integer-weights kernel
    (its header has :data:`.quantized.INT_HEADER`); ``header``: more header text (before the
    launch bounds, which end it)."""
    key = (*key, split, _quantized.RESIDENT.get(bits, 0))
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_decode_chain_{key[0]}_{len(_kernels)}",
            input_names=inputs,
            output_names=outputs + (["part", "count"] if split else []),
            source=compact_source(source()),
            header=compact_source(_HEADER + (INT_HEADER if int_weights else "") + _REDUCE_HEADER
                                  + header
                                  + launch_bounds(key[-1])),
        )
        _kernels[key] = kernel
    return kernel


# ------------------------------------------------- bf16 and 8-bit stages through .gemv's GEMV
#: Widths whose stages at one row run :mod:`.gemv`'s streaming product (a warp per output
#: feature, 512-byte loads of a row, float32 FMAs; the same prologues and stores) instead of the
#: tensor-core decode kernel (``XLSTM_METAL_CHAIN_ROWS``: bits, comma-separated, 16 for float
#: weights and/or 8 for 8-bit affine ones; 0 none; those widths' stages run unmerged). On an
#: H200 (S14, 7B, one row, one process per setting, CUPTI): bf16 243-245 tok/s, 4.06-4.08 ms of
#: GPU work per step, against 225.5 and 4.34 ms (the tensor-core stages, 4 and 5 merged); 8 bits
#: 324-338 tok/s, 2.92 ms, against 276-277 and 3.59 ms. The products alone (decode_product.py):
#: bf16 gate|up 4.16 TB/s, proj_down 3.63, q|k|v|o 3.97 (the tensor-core kernel 3.68, 3.29, 3.45);
#: 8 bits 3.16-3.36, 2.13-2.28, 2.78-2.88 (2.44, 2.03, 2.30).
CHAIN_ROWS: frozenset[int] = frozenset(int(b) for b in os.environ.get("XLSTM_METAL_CHAIN_ROWS", "8,16").split(",")
                                       if b.strip() and b.strip() != "0")

#: Thread blocks per SM that walk the features of a stage on the streaming path
#: (``XLSTM_METAL_CHAIN_ROWS_BLOCKS``): each block runs its prologue once. S14 (H200, 7B, one
#: row): 4 blocks 244.8 / 244.3 tok/s bf16 and 329.9 / 323.6 at 8 bits; 3 blocks 243.0 / 243.6 and
#: 337.7 / 256.3 (a slow second round, 2.92 ms of GPU work in both); 2 blocks with the first
#: weights requested early 244.1 / 243.8 and 278.9 / 230.4.
ROWS_BLOCKS = int(os.environ.get("XLSTM_METAL_CHAIN_ROWS_BLOCKS", "4") or 4)

#: Whether those blocks request their first weights before the prologue
#: (``XLSTM_METAL_CHAIN_ROWS_EARLY=1``; the registers they take stay held through it, which at
#: 4 blocks per SM spills: off).
ROWS_EARLY = os.environ.get("XLSTM_METAL_CHAIN_ROWS_EARLY", "0") == "1"

#: Bytes of each warp's first output features that those blocks ask of L2 before the prologue,
#: by bits (``XLSTM_METAL_CHAIN_ROWS_PREFETCH``, "bits:bytes,...", multiples of 16; 0 none): no
#: registers are held, and HBM streams while the prologue reads the stage's inputs and reduces
#: them. Why: on an H200
#: (S14R1, 7B, bf16) the stages ran 8-18% below their products alone (gate|up 3.81 against 4.16
#: TB/s, proj_down 2.97 against 3.63), out_proj at 2.5: the prologues (RMSNorm, the head norm,
#: SwiGLU; 2-5 us each) leave HBM idle at every stage's start. Measured (H200, 7B, one row, one
#: process per setting, CUPTI GPU time per step, with :data:`ROWS_SWIGLU`): bf16 4 KB 3.881 /
#: 3.847 / 3.842 ms (S15R1-R2; 252-257 tok/s), none 3.931 / 3.892 / 3.895, 2 KB 3.866, 8 KB
#: 4.039 / 4.035, 16 KB 4.116; 8 bits 4 KB 2.879 and 8 KB 2.928 against none 2.763: 4 KB at
#: bf16, none at 8 bits.
ROWS_PREFETCH = _quantized._per_bits("XLSTM_METAL_CHAIN_ROWS_PREFETCH", {8: 0, 16: 4096})

#: Whether the FFN's gate|up stage on the streaming product computes SwiGLU in its epilogue (a
#: warp per pair of gate and up features, both sums at hand) and proj_down stages the result as
#: it is (``XLSTM_METAL_CHAIN_ROWS_SWIGLU=1``): the proj_down stage's prologue, SwiGLU over all
#: 10,944 values redone by each of its blocks, was where the stage lost most to its product
#: alone (H200, S14R1: 2.97 against 3.63 TB/s). Same values: the epilogue rounds gate and up to
#: T as the stored gate|up output was, then runs the prologue's arithmetic. On an H200 (S15R1,
#: 7B, one row, CUPTI GPU time per step): bf16 3.931 ms against 4.050-4.062 (proj_down 0.82
#: against 0.97 ms), 8 bits 2.763 against 2.924-2.926 (0.57 against 0.78): on by default
#: (``=0``: the two stages as before).
ROWS_SWIGLU = os.environ.get("XLSTM_METAL_CHAIN_ROWS_SWIGLU", "1") == "1"

# The streaming product's staged rows: in order, or at 4 bits each row's pieces of 8 rotated in
# their 32-value chunk (:func:`.gemv.rows_source`); the prologues place value k at ``xpos(k)``.
_ROWS_STAGE_DECL = """
    __shared__ __align__(16) T xs_s[SR * KD];
    constexpr bool XPRE = false;
    auto xpos = [](int k) { return BITS == 4 ? xl_xswz4(k) : k; };
"""

_ROWS_HEADER = _REDUCE_HEADER + """
__device__ __forceinline__ int xl_xpos4(int k) { return (k & ~7) | ((k & 3) << 1) | ((k >> 2) & 1); }
""" + _gemv.HEADER


def rows_apply(bits: int, rows: int, group_size: int = 64) -> bool:
    """Whether a stage of ``bits`` products (groups of ``group_size`` at 8 or 4 bits) at ``rows``
    rows runs the streaming product (:data:`CHAIN_ROWS`)."""
    return bits in CHAIN_ROWS and bits in (4, 8, 16) and rows <= 1 and (bits == 16 or group_size in (32, 64, 128))


def _rows_kernel(key: tuple, bits: int, inputs: list[str], outputs: list[str], sizes: str, prologue: str,
                 store: str, pair_store: str = ";"):
    """The streaming kernel of a stage (``key``) at ``bits``: :func:`.gemv.rows_source` with the
    stage's hooks (inputs ``scales`` and ``biases`` added at 8 bits), registers bounded for
    :data:`ROWS_BLOCKS` blocks per SM."""
    key = ("rows", *key, bits, ROWS_BLOCKS, ROWS_EARLY)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_decode_chain_rows_{key[1]}_{len(_kernels)}",
            input_names=inputs + (["scales", "biases"] if bits != 16 else []),
            output_names=outputs,
            source=compact_source(_gemv.rows_source(sizes.replace("STAGE_DECL", _ROWS_STAGE_DECL), prologue, store, bits,
                                                    pair_store)),
            header=compact_source(_ROWS_HEADER + _gemv.launch_bounds(ROWS_BLOCKS)),
        )
        _kernels[key] = kernel
    return kernel


def _rows_call(kernel, inputs: list, arrays: tuple, dtype: mx.Dtype, k: int, rows: int, shapes: list, dtypes: list,
               extra: list, pair: int = 0) -> list:
    """Launch a stage's streaming kernel on ``inputs`` and the product's ``arrays`` (w, scales,
    biases, group size, bits) for inner size ``k``; ``pair``: features n and n + pair per warp
    (4 loads of each in flight: the 8 of one feature otherwise)."""
    w, scales, biases, group_size, bits = arrays
    shape = dict(unroll=_gemv.UNROLL // 2, rows_per_warp=2, pair=pair) if pair else {}
    return kernel(
        inputs=inputs + [w] + ([scales, biases] if bits != 16 else []),
        template=_gemv.rows_template(dtype, k, _stage_rows(rows, k, dtype), early=ROWS_EARLY, bits=bits,
                                     group_size=group_size if bits != 16 else 32,
                                     prefetch=ROWS_PREFETCH.get(bits, 0),
                                     **shape) + extra,
        output_shapes=shapes, output_dtypes=dtypes, **_gemv.rows_launch(pair or w.shape[0], blocks=ROWS_BLOCKS),
    )


# ------------------------------------------------------------------------------ entry points
def quantized_arrays(layer: nn.Module, rows: int) -> tuple[mx.array, mx.array, mx.array, int, int] | None:
    """(weight, scales, biases, group size, bits) of a plain affine quantized layer without a
    bias (``nn.QuantizedLinear`` or a subclass computing as it does), or, with
    :data:`CHAIN_FLOAT`, at most :data:`CHAIN_FLOAT_MAX_ROWS` ``rows``, of a plain float
    ``nn.Linear`` without a bias (its weight, and the weight again in place of scales and biases,
    which the kernel does not read at bits 16); None for anything else (then the layer is called
    as it stands)."""
    from ...cells.fused import fusion_kind  # noqa: PLC0415  (cells import this package)

    kind = fusion_kind(layer)
    if kind is None or "bias" in layer:
        return None
    return group_arrays(kind, {name: layer[name] for name in ("weight", "scales", "biases") if name in layer}, rows)


def group_arrays(kind: tuple, group: dict, rows: int) -> tuple[mx.array, mx.array, mx.array, int, int] | None:
    """The same tuple for a fused group of layers (:mod:`xlstm_metal.cells.fused`: its kind and
    arrays) multiplying ``rows`` rows."""
    if kind[0] == "linear":
        w = group["weight"]
        if not CHAIN_FLOAT or rows > CHAIN_FLOAT_MAX_ROWS or w.ndim != 2 or w.dtype not in (mx.bfloat16, mx.float16) or w.shape[1] % 8:
            return None
        return w, w, w, 32, 16
    if kind[0] != "quantized" or kind[3] != "affine" or not kind[4]:
        return None
    return group["weight"], group["scales"], group["biases"], kind[1], kind[2]


def _fast(dtype: mx.Dtype, arrays, k: int) -> bool:
    """Whether the decode kernel takes inputs of ``dtype`` and inner size ``k``."""
    w, scales, biases, group_size, bits = arrays
    if bits == 16:
        return w.dtype == dtype and w.shape[1] == k
    return kernel_takes(_Probe(dtype, k), w, scales, biases, group_size, bits)


def _product(x: mx.array, arrays) -> mx.array:
    """The reference product x @ W.T for :func:`quantized_arrays`'s tuple."""
    w, scales, biases, group_size, bits = arrays
    if bits == 16:
        return x @ w.T
    return quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)


class _Probe:
    """Stands in for x in :func:`.quantized.kernel_takes` (which reads its dtype and last
    dimension only)."""

    def __init__(self, dtype: mx.Dtype, k: int):
        self.dtype, self.shape = dtype, (1, k)


def norm_quantized_matmul(x: mx.array, pending: mx.array | None, norm: RMSNorm, w: mx.array, scales: mx.array,
                          biases: mx.array, *, group_size: int, bits: int, write_xn: bool = False):
    """x [B, 1, E] (the residual stream, float32 or the norm weight's dtype T), pending [B, 1, E]
    in T or None -> (s = x + pending (x itself when None), xn = norm(s) in T (None unless
    ``write_xn``), y = xn @ dequantize(w).T [B, 1, N] in T): one launch on CUDA for the cases
    :func:`norm_chain_supported` accepts (the caller checks), else the ops."""
    if not _kernels_on():  # the reference: the add + norm of the step, then the product
        if pending is None:
            s, xn = x, norm(x)
        else:
            s, xn = add_rms_norm(x, pending, norm)
        xn = xn.astype(norm.weight.dtype)
        y = _product(xn, (w, scales, biases, group_size, bits))
        return s, xn if write_xn else None, y
    B, _, E = x.shape
    T = norm.weight.dtype
    has_pending = pending is not None
    N = w.shape[0]
    shapes, dtypes = [(B, 1, N)], [T]
    if has_pending:
        shapes.append((B, 1, E)); dtypes.append(x.dtype)
    if write_xn:
        shapes.append((B, 1, E)); dtypes.append(T)
    if rows_apply(bits, B, group_size):
        kernel = _rows_kernel(("norm", norm.eps, has_pending, write_xn), bits,
                              ["xr"] + (["pend"] if has_pending else []) + ["nw", "w"],
                              ["y"] + (["sum_out"] if has_pending else []) + (["xn_out"] if write_xn else []),
                              _NORM_SIZES, _norm_prologue(norm.eps, has_pending, write_xn), _gemv.STORE)
        outs = _rows_call(kernel, [x] + ([pending] if has_pending else []) + [norm.weight],
                          (w, scales, biases, group_size, bits), T, E, B, shapes, dtypes, [("ST", x.dtype)])
        return (outs[1] if has_pending else x), (outs[-1] if write_xn else None), outs[0]
    iw = _int(bits, group_size, B, E, T, stage="norm")
    key = ("norm", norm.eps, has_pending, write_xn, iw)
    kernel = _kernel(key, bits, ["xr"] + (["pend"] if has_pending else []) + ["nw", "w", "scales", "biases"],
                     ["y"] + (["sum_out"] if has_pending else []) + (["xn_out"] if write_xn else []),
                     lambda: _norm_source(norm.eps, has_pending, write_xn, iw), int_weights=iw)
    # [B, 1, E] in and out as they are (row-contiguous; the kernel reads rows as flat): no views
    # to build per call, which the host pays for like kernels at one row.
    inputs = [x] + ([pending] if has_pending else []) + [norm.weight, w, scales, biases]
    outs = kernel(
        inputs=inputs,
        template=decode_template(T, bits, group_size, B, _depth("norm", bits, iw))
        + [("ST", x.dtype)] + _rows_template(B, E, T, bits, iw),
        output_shapes=shapes, output_dtypes=dtypes, **_launch(N, bits, stage="norm", iw=iw),
    )
    return (outs[1] if has_pending else x), (outs[-1] if write_xn else None), outs[0]


def norm_chain_supported(x: mx.array, pending: mx.array | None, norm: nn.Module, arrays) -> bool:
    """Whether :func:`norm_quantized_matmul` runs as one kernel for these inputs and modules
    (``arrays``: :func:`quantized_arrays` of the product, or None)."""
    if arrays is None or type(norm) is not RMSNorm:
        return False
    weight = norm.get("weight")
    if not isinstance(weight, mx.array) or weight.dtype not in (mx.bfloat16, mx.float16):
        return False
    T = weight.dtype
    return (x.ndim == 3 and x.shape[1] == 1 and weight.shape == (x.shape[-1],) and x.dtype in (T, mx.float32)
            and (pending is None or (pending.dtype == T and pending.shape == x.shape))
            and _stage_rows(x.shape[0], x.shape[-1], T) > 0 and _fast(T, arrays, x.shape[-1]))


def gate_norm_quantized_matmul(h: mx.array, o_src: mx.array, o_offset: int, norm: MultiHeadLayerNorm, x: mx.array,
                               w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int, bits: int):
    """h [B, NH, 1, DV], o~ = ``o_src[..., o_offset : o_offset + NH * DV]`` (o_src [B, 1, *]: the
    fused projection's output, passed whole so no slice is built), ``norm`` the multi-head
    LayerNorm, x [B, 1, E] the residual stream -> x + out_proj(sigmoid(o~) * norm(h)) in x's
    dtype (the product rounded to T first, as the separate layer returns it): one launch."""
    B, NH, _, DV = h.shape
    if not _kernels_on():  # the reference: norm + gate, the product, the residual add
        o_preact = o_src[..., o_offset: o_offset + NH * DV]
        return x + _product(output_norm_gate(h, o_preact, norm), (w, scales, biases, group_size, bits))
    E = x.shape[-1]
    T = h.dtype
    if rows_apply(bits, B, group_size):
        kernel = _rows_kernel(("gate", norm.eps), bits, ["h", "o", "nw", "xr", "w"], ["out"], _GATE_SIZES,
                              _GATE_PROLOGUE.replace("EPS", _eps(norm.eps)), _RESIDUAL_STORE)
        return _rows_call(kernel, [h, o_src, norm.weight, x], (w, scales, biases, group_size, bits), T, NH * DV, B,
                          [(B, 1, E)], [x.dtype], [("ST", x.dtype), ("NH", NH), ("DV", DV), ("OOFF", o_offset)])[0]
    split = _split(w.shape[0], NH * DV, bits)
    iw = _int(bits, group_size, B, NH * DV, T, split, "gate")
    kernel = _kernel(("gate", norm.eps, iw), bits, ["h", "o", "nw", "xr", "w", "scales", "biases"], ["out"],
                     lambda: _source(_GATE_SIZES, _GATE_PROLOGUE.replace("EPS", _eps(norm.eps)), _RESIDUAL_STORE,
                                     split > 1, iw), split > 1, iw)
    outs = kernel(
        inputs=[h, o_src, norm.weight, x, w, scales, biases],
        template=decode_template(T, bits, group_size, B, _depth("gate", bits, iw), split=split)
        + [("ST", x.dtype), ("NH", NH), ("DV", DV), ("OOFF", o_offset)] + _rows_template(B, NH * DV, T, bits, iw),
        **_outputs([(B, 1, E)], [x.dtype], split, B, E), **_launch(w.shape[0], bits, split, "gate", iw),
    )
    return outs[0]


def gate_chain_supported(h: mx.array, o_src: mx.array, o_offset: int, norm: nn.Module, x: mx.array, arrays) -> bool:
    """Whether :func:`gate_norm_quantized_matmul` runs as one kernel for these inputs and modules."""
    if arrays is None or type(norm) is not MultiHeadLayerNorm:
        return False
    B, NH, S, DV = h.shape
    weight = norm.get("weight")
    w = arrays[0]
    return (S == 1 and h.dtype in (mx.bfloat16, mx.float16) and o_src.dtype == h.dtype
            and o_src.ndim == 3 and o_src.shape[:2] == (B, 1) and 0 <= o_offset
            and o_offset + NH * DV <= o_src.shape[2] and weight.dtype == h.dtype and weight.shape == (NH * DV,)
            and x.dtype in (h.dtype, mx.float32) and x.shape == (B, 1, w.shape[0])
            and _stage_rows(B, NH * DV, h.dtype) > 0 and _fast(h.dtype, arrays, NH * DV))


def swiglu_quantized_matmul(gate_up: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *,
                            group_size: int, bits: int) -> mx.array:
    """gate_up [B, 1, 2F] in T (the fused gate|up product's output: gate, then up) ->
    (silu(gate) * up) @ dequantize(w).T [B, 1, N] in T: one launch."""
    F = gate_up.shape[-1] // 2
    if not _kernels_on():  # the reference: the FFN's SwiGLU, then the product
        from ...cells.ffn import swiglu  # noqa: PLC0415  (cells import this package)

        return _product(swiglu(gate_up[..., :F], gate_up[..., F:]), (w, scales, biases, group_size, bits))
    B = gate_up.shape[0]
    T = gate_up.dtype
    N = w.shape[0]
    if rows_apply(bits, B, group_size):
        kernel = _rows_kernel(("swiglu",), bits, ["gate_up", "w"], ["y"], _SWIGLU_SIZES, _SWIGLU_PROLOGUE, _gemv.STORE)
        return _rows_call(kernel, [gate_up], (w, scales, biases, group_size, bits), T, F, B, [(B, 1, N)], [T], [])[0]
    split = _split(N, F, bits)
    iw = _int(bits, group_size, B, F, T, split, "swiglu")
    kernel = _kernel(("swiglu", iw), bits, ["gate_up", "w", "scales", "biases"], ["y"],
                     lambda: _source(_SWIGLU_SIZES, _SWIGLU_PROLOGUE, split=split > 1, int_weights=iw), split > 1, iw)
    outs = kernel(
        inputs=[gate_up, w, scales, biases],
        template=decode_template(T, bits, group_size, B, _depth("swiglu", bits, iw), split=split)
        + _rows_template(B, F, T, bits, iw),
        **_outputs([(B, 1, N)], [T], split, B, N), **_launch(N, bits, split, "swiglu", iw),
    )
    return outs[0]


def swiglu_chain_supported(gate_up: mx.array, arrays) -> bool:
    """Whether :func:`swiglu_quantized_matmul` runs as one kernel for these inputs and modules."""
    if arrays is None or gate_up.ndim != 3 or gate_up.shape[1] != 1 or gate_up.shape[-1] % 2:
        return False
    F = gate_up.shape[-1] // 2
    return _stage_rows(gate_up.shape[0], F, gate_up.dtype) > 0 and _fast(gate_up.dtype, arrays, F)


# x [B, 1, K] staged as it is (:func:`ffn_rows_matmul`'s proj_down).
_PLAIN_SIZES = """
    const int M = x_shape[0];
    constexpr int K = KD;
STAGE_DECL
"""
_SWIGLU_PAIR_STORE = """{
        const float gf = static_cast<float>(static_cast<T>(sum0));
        const float sg = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-gf))));
        const float si = static_cast<float>(static_cast<T>(gf * sg));
        y[(size_t)m * PAIR + n] = static_cast<T>(si * static_cast<float>(static_cast<T>(sum1)));
      }"""


def ffn_rows_supported(x: mx.array, norm: nn.Module, arrays, down) -> bool:
    """Whether :func:`ffn_rows_matmul` runs its two streaming launches for residual stream x
    [B, 1, E], the FFN's norm, its gate|up group's ``arrays`` and proj_down's ``down``
    (:func:`quantized_arrays` tuples): :data:`ROWS_SWIGLU` on, one row, both products on the
    streaming path at the same bits."""
    if not ROWS_SWIGLU or arrays is None or down is None or arrays[4] != down[4]:
        return False
    w, scales, biases, group_size, bits = arrays
    if not (rows_apply(bits, x.shape[0], group_size) and rows_apply(bits, x.shape[0], down[3])
            and w.shape[0] % 2 == 0 and norm_chain_supported(x, None, norm, arrays)):
        return False
    dw, ds, db, dg, dbits = down
    act = _Probe(norm.weight.dtype, w.shape[0] // 2)  # SwiGLU's output, one row: only its dtype and shape are read
    return _gemv.rows_supported(act, dw, None if dbits == 16 else ds, None if dbits == 16 else db, dg, dbits)


def ffn_rows_matmul(x: mx.array, norm: RMSNorm, arrays, down) -> mx.array:
    """The FFN of a block step on the streaming product (:func:`ffn_rows_supported`): RMSNorm of
    x [B, 1, E] -> gate|up with SwiGLU in the epilogue (a warp per gate/up pair) -> silu(gate) *
    up [B, 1, F] in T, then proj_down on it staged as it is -> [B, 1, N] in T. Two launches; the
    same values as :func:`norm_quantized_matmul` then :func:`swiglu_quantized_matmul`."""
    w, scales, biases, group_size, bits = arrays
    F = w.shape[0] // 2
    if not _kernels_on():
        from ...cells.ffn import swiglu  # noqa: PLC0415  (cells import this package)

        gate_up = _product(norm(x).astype(norm.weight.dtype), arrays)
        return _product(swiglu(gate_up[..., :F], gate_up[..., F:]), down)
    B, _, E = x.shape
    T = norm.weight.dtype
    kernel = _rows_kernel(("norm_swiglu", norm.eps), bits, ["xr", "nw", "w"], ["y"], _NORM_SIZES,
                          _norm_prologue(norm.eps, False, False), ";", _SWIGLU_PAIR_STORE)
    act = _rows_call(kernel, [x, norm.weight], arrays, T, E, B, [(B, 1, F)], [T], [("ST", x.dtype)], pair=F)[0]
    # [B, 1, F] in and [B, 1, N] out as they are (no reshape nodes: the host pays for each)
    kernel = _rows_kernel(("plain",), bits, ["x", "w"], ["y"], _PLAIN_SIZES, _gemv.STAGE_X, _gemv.STORE)
    return _rows_call(kernel, [act], down, T, F, B, [(B, 1, down[0].shape[0])], [T], [])[0]


# --------------------------------------------------------------- stages 4 and 5 in one launch
#: Which stages run as one launch, by bits of the products (``XLSTM_METAL_CHAIN_MERGE``: one value
#: for every width, or "bits:value,...", e.g. "4:4,8:0,16:4"): 0 none (five launches per block);
#: 1 stages 4 and 5 (:func:`ffn_quantized_matmul`), each stage in blocks of its own; 2 the same,
#: the proj_down blocks asking L2 for their first tile's weights while they wait for gate|up; 3
#: stages 4 and 5, every block running both, as many blocks as the GPU holds at once walking
#: each stage's tiles, a grid-wide barrier between them; 4 stages 3, 4 and 5 so, in one grid
#: (:func:`tail_quantized_matmul`); 5 the whole block, stages 1-5 with the step between, so
#: (:func:`block_quantized_matmul`). A value may be one int (every width) too.
#:
#: Shipped: 5 at 4 bits, 4 (with :data:`CHAIN_PAIRED`) for bf16 products (which at one row take
#: the streaming product unmerged since session 14: :data:`CHAIN_ROWS`), one row
#: (:data:`MERGE_MAX_ROWS`), bf16 rows; 8 bits unmerged. On an H200 (S10R2, 7B, one row, one process,
#: CUPTI GPU time per step): 4 bits 2.613 ms against 2.700 unmerged (stages 3-5 1.769 ms against
#: 1.857 for the three kernels), bf16 4.344 against 4.411 (3.069 against 3.169); at 8 bits every
#: merged form was slower (stages 3-5 2.723 ms against 2.547; stages 4-5 2.252-2.306 against 2.112).
#: The whole block in one launch (5) cuts a 4-bit step from 106 launches to 39, and a 4-bit step's
#: host work is level with its GPU work: on an H100 (S33, 7B, one row, one process, the settings in
#: turns over three rounds) 340.1 / 306.8 / 298.9 tok/s against 4's 319.0 / 274.2 / 280.0; on an H200
#: (S33, five rounds) level, 325.3 / 362.1 / 377.7 / 319.2 / 351.1 against 342.6 / 374.4 / 356.8 /
#: 280.8 / 370.9; the same greedy tokens on both. At bf16 (S13R1, H200) 5 took more GPU time than 4
#: (4.42 against 4.34 ms per step), so bf16 products keep 4.
_MERGE_RAW = os.environ.get("XLSTM_METAL_CHAIN_MERGE", "")
CHAIN_MERGE: dict[int, int] | int = (_quantized._per_bits("XLSTM_METAL_CHAIN_MERGE", {4: 5, 8: 0, 16: 4})
                                     if not _MERGE_RAW.strip().lstrip("-").isdigit() else int(_MERGE_RAW))

#: Most rows the merged launches take (measured at one row; their kernels take 2, the CUDA tests
#: run them there), and the row dtypes (their CUDA tests ran bf16; fp16 runs the separate stages).
MERGE_MAX_ROWS = 1
MERGE_DTYPES = (mx.bfloat16,)


def merge_mode(bits: int, rows: int) -> int:
    """:data:`CHAIN_MERGE`'s value for products of ``bits`` at ``rows`` rows (0 beyond
    :data:`MERGE_MAX_ROWS`)."""
    if rows > MERGE_MAX_ROWS or rows_apply(bits, rows):
        return 0
    return CHAIN_MERGE if isinstance(CHAIN_MERGE, int) else CHAIN_MERGE.get(bits, 0)

# The merged kernel's blocks [0, NB1) run stage 4 (RMSNorm -> gate|up, writing gate|up to the
# output ``gate_up``), the others stage 5 (SwiGLU -> proj_down), each with its own schedule (the
# unmerged stages' ring depth, blocks, integer weights) and the same code as the unmerged kernel,
# so the outputs are bit-equal. A stage-5 block requests its first weight chunks (and with PF2
# its first tile towards L2), then waits until every stage-4 block has counted itself done in
# its launch's ``done`` counter; the last stage-5 block past the wait puts both counters back to
# zero and frees them. Only stage-5 blocks wait, and the host launches the kernel only where fewer
# of them than the GPU holds at once exist (:func:`_merge_plan`), so a stage-4 block always finds
# room; a stage-4 block waits only for block 0's slot claim below, which the GPU, starting blocks
# in index order, has started first (the kernels with grid-wide barriers hold all their blocks at
# once and rely on no order).
#
# The counters are per launch: MLX's CUDA graph runs launches that share no array side by side
# (steps queued with known tokens: one step's later layers beside the next step's first), and
# counters of the kernel module mixed two launches' counts (wrong logits, NaN). Each launch takes
# a free slot of a table in the module, under the address of its first output (distinct for
# launches in flight together: both outputs are alive): block 0 claims the key's hashed slot at
# its start (or, taken, the next free one), the other blocks read the hashed slot at their start
# and use what they read where they first count or wait (looking again only where it was not yet
# theirs), the block that zeroes the counters frees the slot. Neither waits for its answer at the
# start: on an H100 (7B, 4 bits, whole block per launch) the step ran as fast as with the module's
# counters (session 35). (A zeroed output per launch, as the split-K counters have, would zero-fill
# every output of the launch, the state included: ~3% of a 4-bit 7B step.)
_MERGE_HEADER = """
#define XL_SLOTS 64
__device__ unsigned long long xl_slot_key[XL_SLOTS];  // the owning launch's first output, 0: free
__device__ unsigned int xl_slot_cnt[2 * XL_SLOTS];     // per slot: blocks done, blocks past the last wait
__device__ __forceinline__ unsigned int xl_slot_hash(unsigned long long key) {
  return static_cast<unsigned int>((key >> 8) ^ (key >> 20)) % XL_SLOTS;
}
__device__ __forceinline__ unsigned long long xl_key_at(unsigned int s) {
  unsigned long long k;
  asm volatile("ld.relaxed.gpu.u64 %0, [%1];" : "=l"(k) : "l"(xl_slot_key + s) : "memory");
  return k;
}
// Where the hashed slot was not the launch's: block 0 claims the next free one (all taken: until
// one is freed), another block waits for block 0's claim and finds it. Out of line: rare.
__device__ __noinline__ unsigned int* xl_slot_elsewhere(unsigned long long key, bool lead) {
  for (unsigned int s = (xl_slot_hash(key) + lead) % XL_SLOTS;; s = (s + 1) % XL_SLOTS) {
    if (lead ? atomicCAS(xl_slot_key + s, 0ull, key) == 0ull : xl_key_at(s) == key) return xl_slot_cnt + 2 * s;
    if (s + 1 == XL_SLOTS) __nanosleep(64);
  }
}
// Thread 0's counters at their first use, from what its start saw in the hashed slot (``seen``:
// block 0's atomicCAS there, another block's read of it; neither waited for at the start).
__device__ __forceinline__ unsigned int* xl_slot_of(unsigned long long key, unsigned long long seen, bool lead) {
  const unsigned int h = xl_slot_hash(key);
  if (lead ? seen == 0ull : (seen == key || xl_key_at(h) == key)) return xl_slot_cnt + 2 * h;
  return xl_slot_elsewhere(key, lead);
}
// The launch's last block past its last wait: counters back to zero, then the slot free.
__device__ __forceinline__ void xl_release(unsigned int* cnt) {
  cnt[0] = 0u;
  cnt[1] = 0u;
  __threadfence();
  atomicExch(xl_slot_key + (cnt - xl_slot_cnt) / 2, 0ull);
}
#define XL_CNT (xl_cnt ? xl_cnt : (xl_cnt = xl_slot_of(xl_key, xl_seen, xl_lead)))
"""


def _claim(first_output: str) -> str:
    """A merged kernel's first lines: the launch's key (the address of ``first_output``); thread 0
    of block 0 requesting the hashed slot, of another block reading it (:data:`_MERGE_HEADER`)."""
    return f"""
    const unsigned long long xl_key = reinterpret_cast<unsigned long long>({first_output});
    const bool xl_lead = blockIdx.x == 0;
    unsigned long long xl_seen = 0ull;
    if (threadIdx.x == 0)
      xl_seen = xl_lead ? atomicCAS(xl_slot_key + xl_slot_hash(xl_key), 0ull, xl_key) : xl_key_at(xl_slot_hash(xl_key));
    unsigned int* xl_cnt = nullptr;  // thread 0's, at first use: XL_CNT
"""


def _wait(target: str, last: bool = True) -> str:
    """A block's wait (thread 0 polling, the others at the barrier) until its launch's ``done``
    counter reaches ``target``; after the launch's last wait, the last block past it zeroes and
    frees the counters."""
    reset = ("      if (atomicAdd(XL_CNT + 1, 1u) == static_cast<unsigned int>(xl_nblk - 1)) "
             "xl_release(xl_cnt);\n") if last else ""
    return ("""
    if (threadIdx.x == 0) {
      unsigned int* xl_done = XL_CNT;
      for (;;) {
        unsigned int v;
        asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(xl_done) : "memory");
        if (v >= static_cast<unsigned int>(TARGET)) break;
        __nanosleep(64);
      }
      __threadfence();
""".replace("TARGET", target) + reset + """    }
    __syncthreads();
""")


_MERGE_WAIT = _wait("NB1")
_DONE = """
      __syncthreads();  // this block's outputs stored
      if (threadIdx.x == 0) { __threadfence(); atomicAdd(XL_CNT, 1u); }
"""
# 3: every block runs stage 4's tiles, counts itself done, requests its first proj_down chunks,
# waits for all blocks (a grid-wide barrier: the grid is at most what the GPU holds at once),
# then runs stage 5's tiles.
_MERGE_BODY_PERSISTENT = """
    __shared__ __align__(16) T xl_pool[POOL];
    __shared__ float xl_red[WARPS * MT * 4 * 32];
@CLAIM@    {
      const int xl_bid = blockIdx.x, xl_nblk = gridDim.x;
@P1@
      __syncthreads();
      if (threadIdx.x == 0) { __threadfence(); atomicAdd(XL_CNT, 1u); }
    }
    {
      const int xl_bid = blockIdx.x, xl_nblk = gridDim.x;
@P2@
    }
"""
_MERGE_BODY = """
    __shared__ __align__(16) T xl_pool[POOL];  // the staged rows of either stage
    __shared__ float xl_red[WARPS * MT * 4 * 32];
@CLAIM@    if (static_cast<int>(blockIdx.x) < NB1) {
      const int xl_bid = blockIdx.x, xl_nblk = NB1;
@P1@
      __syncthreads();  // this block's gate|up values stored
      if (threadIdx.x == 0) { __threadfence(); atomicAdd(XL_CNT, 1u); }
    } else {
      const int xl_bid = static_cast<int>(blockIdx.x) - NB1, xl_nblk = static_cast<int>(gridDim.x) - NB1;
@P2@
    }
"""


def _merge_phase(text: str, rename: dict[str, str]) -> str:
    """A stage's kernel body as one phase of the merged kernel: its staged rows and reduction in
    the shared pools, its block index and count the phase's, identifiers renamed."""
    text = text.replace("__shared__ __align__(16) T xs_s[SR * KD];", "T* xs_s = xl_pool;")  # (none: no rows staged)
    for old, new in (("__shared__ float red[WARPS * MT * 4 * 32];", "float* red = xl_red;"),
                     ("blockIdx.x", "xl_bid"), ("gridDim.x", "xl_nblk")):
        assert old in text, old
        text = text.replace(old, new)
    for old, new in rename.items():
        text = re.sub(rf"(?<![\w.]){old}\b", new, text)  # not members (u.w)
    return "{\n" + text + "}\n"


#: Whether the merged kernels' gate|up phase pairs its tiles (``XLSTM_METAL_CHAIN_PAIRED``; on, 0
#: off; S10R2, H200, 7B, one row: stages 4-5 in one launch 1.433 ms per 4-bit step paired, 1.464
#: not; bf16 2.727 / 2.858):
#: each 16-row tile holds 8 gate rows and the same 8 up rows (the fused weight read as it is
#: stored, rows j..j+7 and F+j..F+j+7), so its epilogue computes SwiGLU itself (the same float32
#: sums, rounded where stage 5's prologue rounds) and writes silu(gate) * up [B, F]; the
#: proj_down phase then reads its x from there like the plain product (no prologue, nothing
#: staged). Not where proj_down takes integer weights (their x is staged with its group sums).
CHAIN_PAIRED = int(os.environ.get("XLSTM_METAL_CHAIN_PAIRED", "1") or 0)

_PAIRED = (
    ("const int ntiles = (N + 15) / 16;", "const int ntiles = (N / 2 + 7) / 8;"),
    ("const int row0 = (tl / SPLIT) * 16 + g, row1 = row0 + 8;", "const int row0 = (tl / SPLIT) * 8 + g, row1 = row0 + N / 2;"),
    ("const bool ok0 = tl < nwork && row0 < N, ok1 = tl < nwork && row1 < N;",
     "const bool ok0 = tl < nwork && row0 < N / 2, ok1 = ok0;"),
    ("const int row0 = (tile / SPLIT) * 16 + g, row1 = row0 + 8;", "const int row0 = (tile / SPLIT) * 8 + g, row1 = row0 + N / 2;"),
    ("if (kc < K && row0 < N) l2_prefetch", "if (kc < K && row0 < N / 2) l2_prefetch"),
    ("if (kc < K && row1 < N) l2_prefetch", "if (kc < K && row0 < N / 2) l2_prefetch"),
)
# The epilogue of a paired tile: thread e sums gate (acc c) and up (acc c + 2) of the same
# feature and row over the warps, in the unpaired order, and rounds as stage 5's prologue does.
_PAIRED_STORE = """
      for (int e = threadIdx.x; e < MT * 2 * 32; e += WARPS * 32) {
        const int l = e & 31, c = (e >> 5) & 1, t = e >> 6;
        const int eg = (t * 4 + c) * 32 + l;
        float sg = 0.0f, su = 0.0f;
        #pragma unroll
        for (int v = 0; v < WARPS; ++v) { sg += red[v * MT * 4 * 32 + eg]; su += red[v * MT * 4 * 32 + eg + 64]; }
        const int j = cur * 8 + (l >> 2), m = t * 8 + 2 * (l & 3) + c;
        if (j < N / 2 && m < M) {
          const float gf = static_cast<float>(static_cast<T>(sg));
          const float sgm = static_cast<float>(static_cast<T>(1.0f / (1.0f + expf(-gf))));
          const float si = static_cast<float>(static_cast<T>(gf * sgm));
          hs[(size_t)m * (N / 2) + j] = static_cast<T>(si * static_cast<float>(static_cast<T>(su)));
        }
      }
"""
_UNPAIRED_STORE = "\n" + tile_sums_source("gate_up[(size_t)m * N + n] = static_cast<T>(sum);")


def _paired(text: str) -> str:
    """A gate|up phase (its store ``gate_up[...]``) with paired tiles writing silu(gate) * up to ``hs``."""
    for old, new in _PAIRED + ((_UNPAIRED_STORE, _PAIRED_STORE),):
        assert old in text, old
        text = text.replace(old, new)
    return text


# The proj_down phase after a paired gate|up phase: x is silu(gate) * up in ``hs``, read as the
# plain product reads its x (past L1: other blocks wrote it in this launch).
_HS_SIZES = """
    const int M = ROWS;
    constexpr int K = KD;
    constexpr bool XPRE = false;
"""
_HS_LOAD_X = """
        const uint4* xp = reinterpret_cast<const uint4*>(hs + (size_t)m * K + kc);
        #pragma unroll
        for (int i = 0; i < VALS / 8; ++i) {
          const uint4 u = __ldcg(xp + i);
          xv[4 * i] = u.x; xv[4 * i + 1] = u.y; xv[4 * i + 2] = u.z; xv[4 * i + 3] = u.w;
        }
"""


def _down_phase(iw2: int, wait: str, rows: str, paired: bool) -> str:
    """Stage 5 as a merged kernel's last phase: after a paired gate|up phase the plain product on
    ``hs`` (``wait`` its prologue), else :func:`_swiglu_phase`."""
    if not paired:
        return _swiglu_phase(iw2, wait, rows)
    p2 = decode_source(sizes=_HS_SIZES.replace("ROWS", rows), prologue=wait, load_x=_HS_LOAD_X)
    return _merge_phase(p2, {"KD": "KD2", "DEPTH": "DEPTH2", "PF": "PF2", "w": "w2", "scales": "scales2",
                             "biases": "biases2", "w_shape": "w2_shape"})


def _swiglu_phase(iw2: int, wait: str, rows: str) -> str:
    """Stage 5 as the merged kernels' last phase: ``wait`` first, gate|up read past L1, M from ``rows``."""
    prologue = _SWIGLU_PROLOGUE
    for old, new in (("gp[c]", "__ldcg(gp + c)"), ("upp[c]", "__ldcg(upp + c)"),
                     ("gate_up[base + k]", "__ldcg(gate_up + base + k)"),
                     ("gate_up[base + K + k]", "__ldcg(gate_up + base + K + k)")):
        assert old in prologue, old  # gate|up read past L1: other SMs wrote it in this launch
        prologue = prologue.replace(old, new)
    sizes = _SWIGLU_SIZES.replace("gate_up_shape[0]", rows)
    p2 = _source(sizes, wait + prologue, int_weights=bool(iw2))
    return _merge_phase(p2, {"KD": "KD2", "SR": "SR2", "DEPTH": "DEPTH2", "IW": "IW2", "PF": "PF2", "w": "w2",
                             "scales": "scales2", "biases": "biases2", "w_shape": "w2_shape"})


def _merged_source(eps: float, iw1: int, iw2: int, persistent: bool = False, paired: bool = False) -> str:
    p1 = _norm_source(eps, False, False, bool(iw1), store="gate_up[(size_t)m * N + n] = static_cast<T>(sum);")
    p1 = _paired(p1) if paired else p1
    p2 = _down_phase(iw2, _MERGE_WAIT, "xr_shape[0]", paired)
    body = _MERGE_BODY_PERSISTENT if persistent else _MERGE_BODY
    return body.replace("@CLAIM@", _claim("y")).replace("@P1@\n", _merge_phase(p1, {})).replace("@P2@\n", p2)


@functools.lru_cache(maxsize=None)
def _device_sms() -> int:
    """Streaming multiprocessors of the CUDA devices this process sees, from the driver: the
    fewest of any (MLX's Device does not say which one it runs on), or 0 where the driver cannot
    be asked (then the merged kernels are not launched)."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count, dev, sms = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cu.cuInit(0) or cu.cuDeviceGetCount(ctypes.byref(count)) or count.value < 1:
        return 0
    fewest = 0
    for ordinal in range(count.value):
        if cu.cuDeviceGet(ctypes.byref(dev), ordinal) or cu.cuDeviceGetAttribute(ctypes.byref(sms), 16, dev):
            return 0  # 16: CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        fewest = sms.value if not fewest else min(fewest, sms.value)
    return fewest


def _merge_plan(B: int, E: int, F: int, n_out: int, dtype: mx.Dtype, group_size: int, bits: int) -> dict | None:
    """The merged kernel's schedule (each phase the unmerged stage's) and template values, or None
    where it could deadlock or not fit: its static shared memory within 48 KiB, and fewer stage-5
    blocks than the GPU holds at once (:data:`.quantized.RESIDENT` blocks per SM, bounded by the
    kernel's registers, or 1, times the device's SMs, their shared memory allowing it)."""
    iw1 = _int(bits, group_size, B, E, dtype, stage="norm")
    iw2 = _int(bits, group_size, B, F, dtype, 1, "swiglu")
    nb1 = _launch(2 * F, bits, stage="norm", iw=iw1)["grid"][0] // 256
    nb2 = _launch(n_out, bits, 1, "swiglu", iw2)["grid"][0] // 256
    sr1 = _stage_rows(B, E, dtype, bits if iw1 else 0)
    sr2 = _stage_rows(B, F, dtype, bits if iw2 else 0)
    paired = bool(CHAIN_PAIRED) and not iw2
    pool = max(sr1 * E, 0 if paired else sr2 * F)
    smem = (pool * dtype.size + 8 * -(-B // 8) * 4 * 32 * 4 + 32 * 4 + 64
            + (sr1 * _span_sums(E, bits) if iw1 else 0) + (sr2 * _span_sums(F, bits) if iw2 else 0))
    resident = max(1, _quantized.RESIDENT.get(bits, 0))
    held = resident * _device_sms()  # blocks the GPU holds at once
    if not (sr1 and sr2) or smem > 48 * 1024 or resident * (smem + 1024) > 228 * 1024 or nb2 >= held:
        return None
    if merge_mode(bits, B) == 3:  # every block both stages: all of them held at once, waiting for each other
        nb1, nb2 = min(held, max(-(-2 * F // 16), -(-n_out // 16))), 0
    return dict(iw1=iw1, iw2=iw2, nb1=nb1, nb2=nb2, sr1=sr1, sr2=sr2, pool=pool, paired=paired)


def ffn_merge_supported(x: mx.array, norm: nn.Module, arrays, down) -> bool:
    """Whether :func:`ffn_quantized_matmul` runs (:data:`CHAIN_MERGE` on) for residual stream x,
    the FFN's norm, its fused gate|up group's arrays and proj_down's (:func:`quantized_arrays`):
    both stages supported as they are unmerged, at the same bits and group size, proj_down's K
    unsplit; on CUDA, :func:`_merge_plan` finding a schedule."""
    if (arrays is None or down is None or merge_mode(arrays[4], x.shape[0]) not in (1, 2, 3) or arrays[3:] != down[3:]
            or arrays[0].shape[0] % 2):
        return False
    F = arrays[0].shape[0] // 2
    T = norm.weight.dtype if isinstance(norm.get("weight"), mx.array) else None
    gate_up = SimpleNamespace(ndim=3, shape=(x.shape[0], 1, 2 * F), dtype=T)
    if T not in MERGE_DTYPES or not (norm_chain_supported(x, None, norm, arrays) and swiglu_chain_supported(gate_up, down)):
        return False
    group_size, bits = arrays[3:]
    if _split(down[0].shape[0], F, bits) > 1 or (bits == 16 and down[0].dtype != T):
        return False
    return not _kernels_on() or _merge_plan(x.shape[0], x.shape[-1], F, down[0].shape[0], T, group_size, bits) is not None


def ffn_quantized_matmul(x: mx.array, norm: RMSNorm, arrays, down) -> mx.array:
    """Stages 4 and 5 in one launch: x [B, 1, E] (the residual stream) -> (silu(gate) * up) @
    proj_down.T [B, 1, N] in T, gate|up = norm(x) @ W.T (``arrays``, ``down``: see
    :func:`ffn_merge_supported`, which the caller checks); on CUDA the same values as
    :func:`norm_quantized_matmul` then :func:`swiglu_quantized_matmul`, else their reference ops."""
    w, scales, biases, group_size, bits = arrays
    F = w.shape[0] // 2
    if not _kernels_on():  # the two stages' reference ops
        from ...cells.ffn import swiglu  # noqa: PLC0415  (cells import this package)

        gate_up = _product(norm(x).astype(norm.weight.dtype), arrays)
        return _product(swiglu(gate_up[..., :F], gate_up[..., F:]), down)
    B, _, E = x.shape
    T = norm.weight.dtype
    N = down[0].shape[0]
    plan = _merge_plan(B, E, F, N, T, group_size, bits)
    iw1, iw2 = plan["iw1"], plan["iw2"]
    mode = merge_mode(bits, B)
    pf2 = int(mode == 2 or _quantized.PREFETCH)
    persistent, paired = mode == 3, plan["paired"]
    kernel = _kernel(("ffn", norm.eps, iw1, iw2, persistent, paired), bits,
                     ["xr", "nw", "w", "scales", "biases", "w2", "scales2", "biases2"], ["y", "hs" if paired else "gate_up"],
                     lambda: _merged_source(norm.eps, iw1, iw2, persistent, paired), int_weights=iw1 or iw2,
                     header=_MERGE_HEADER)
    y, _ = kernel(
        inputs=[x, norm.weight, w, scales, biases, *down[:3]],
        template=decode_template(T, bits, group_size, B, _depth("norm", bits, iw1))
        + [("ST", x.dtype)] + _rows_template(B, E, T, bits, iw1)
        + [("KD2", F), ("SR2", plan["sr2"])] + ([("IW2", iw2)] if iw2 else [])
        + [("DEPTH2", _depth("swiglu", bits, iw2) or _quantized.DEPTH[bits]), ("PF2", pf2), ("NB1", plan["nb1"]),
           ("POOL", plan["pool"])],
        output_shapes=[(B, 1, N), (B, 1, F if paired else 2 * F)], output_dtypes=[T, T],
        grid=((plan["nb1"] + plan["nb2"]) * 256, 1, 1), threadgroup=(256, 1, 1),
    )
    return y


# ----------------------------------------------------------- stages 3, 4 and 5 in one launch
# Every block runs stage 3 (head norm * sigmoid(o~) -> out_proj, the residual add: the new
# residual stream ``out``), counts itself done, then stage 4 (requesting its first gate|up chunks,
# waiting for every block, RMSNorm of ``out`` -> gate|up), counts itself done again, then stage 5
# (waiting for twice the blocks): a grid of at most what the GPU holds at once, two grid-wide
# barriers on one counter, each stage's tiles walked by all blocks.
_TAIL_BODY = """
    __shared__ __align__(16) T xl_pool[POOL];
    __shared__ float xl_red[WARPS * MT * 4 * 32];
@CLAIM@    const int xl_bid = blockIdx.x, xl_nblk = gridDim.x;
@PA@
@DONE@
@PB@
@DONE@
@PC@
"""


def _tail_source(mh_eps: float, eps: float, iw3: int, iw1: int, iw2: int, paired: bool = False) -> str:
    pa = _source(_GATE_SIZES, _GATE_PROLOGUE.replace("EPS", _eps(mh_eps)), _RESIDUAL_STORE, int_weights=bool(iw3))
    pa = _merge_phase(pa, {"KD": "KD3", "SR": "SR3", "DEPTH": "DEPTH3", "IW": "IW3", "w": "w3", "scales": "scales3",
                           "biases": "biases3", "w_shape": "w3_shape", "nw": "nw3"})
    pb = _norm_source(eps, False, False, bool(iw1), store="gate_up[(size_t)m * N + n] = static_cast<T>(sum);",
                      wait=_wait("xl_nblk", last=False))
    for old, new in (("xr[(size_t)mm * K + k]", "__ldcg(out + (size_t)mm * K + k)"), ("xr_shape[0]", "h_shape[0]")):
        assert old in pb, old  # the residual stream stage 3 wrote in this launch, read past L1
        pb = pb.replace(old, new)
    pb = _paired(pb) if paired else pb
    pc = _down_phase(iw2, _wait("2 * xl_nblk"), "h_shape[0]", paired)
    return (_TAIL_BODY.replace("@CLAIM@", _claim("out")).replace("@PA@\n", pa).replace("@PB@\n", _merge_phase(pb, {}))
            .replace("@PC@\n", pc).replace("@DONE@\n", _DONE))


def _tail_plan(B: int, E: int, KO: int, F: int, dtype: mx.Dtype, group_size: int, bits: int) -> dict | None:
    """:func:`tail_quantized_matmul`'s schedule, or None where it could deadlock or not fit: its
    grid at most what the GPU holds at once (every block waits at the barriers), its static shared
    memory within 48 KiB."""
    iw3 = _int(bits, group_size, B, KO, dtype, 1, "gate")
    iw1 = _int(bits, group_size, B, E, dtype, stage="norm")
    iw2 = _int(bits, group_size, B, F, dtype, 1, "swiglu")
    srs = [_stage_rows(B, k, dtype, bits if iw else 0) for k, iw in ((KO, iw3), (E, iw1), (F, iw2))]
    paired = bool(CHAIN_PAIRED) and not iw2
    pool = max(sr * k for sr, k in zip(srs[:2] if paired else srs, (KO, E, F)))
    smem = (pool * dtype.size + 8 * -(-B // 8) * 4 * 32 * 4 + 32 * 4 + 64
            + sum(sr * _span_sums(k, bits) for sr, k, iw in zip(srs, (KO, E, F), (iw3, iw1, iw2)) if iw))
    resident = max(1, _quantized.RESIDENT.get(bits, 0))
    held = resident * _device_sms()
    if not all(srs) or smem > 48 * 1024 or resident * (smem + 1024) > 228 * 1024 or not held:
        return None
    blocks = min(held, max(-(-E // 16), -(-2 * F // 16)))
    return dict(iw3=iw3, iw1=iw1, iw2=iw2, sr3=srs[0], sr1=srs[1], sr2=srs[2], pool=pool, blocks=blocks, paired=paired)


def tail_merge_supported(h: mx.array, o_src: mx.array, o_offset: int, mh_norm: nn.Module, x: mx.array, out_arrays,
                         norm: nn.Module, arrays, down) -> bool:
    """Whether :func:`tail_quantized_matmul` runs (:data:`CHAIN_MERGE` 4): stage 3 as
    :func:`gate_chain_supported` takes it and stages 4 and 5 as :func:`ffn_merge_supported` does,
    all three products at the same bits and group size, K unsplit; on CUDA, :func:`_tail_plan`
    finding a schedule."""
    if arrays is None or merge_mode(arrays[4], x.shape[0]) not in (4, 5):  # 5: where the whole block cannot
        return False
    return _tail_stages_supported(h, o_src, o_offset, mh_norm, x, out_arrays, norm, arrays, down)


def _tail_stages_supported(h, o_src, o_offset: int, mh_norm: nn.Module, x, out_arrays, norm: nn.Module, arrays,
                           down) -> bool:
    """Stages 3-5's checks of :func:`tail_merge_supported` (for stages 3, 4 and 5 in one launch, alone or
    in :func:`block_quantized_matmul`'s)."""
    if out_arrays is None or arrays is None or down is None:
        return False
    if not (out_arrays[3:] == arrays[3:] == down[3:]) or arrays[0].shape[0] % 2:
        return False
    F = arrays[0].shape[0] // 2
    T = norm.weight.dtype if isinstance(norm.get("weight"), mx.array) else None
    gate_up = SimpleNamespace(ndim=3, shape=(x.shape[0], 1, 2 * F), dtype=T)
    if T not in MERGE_DTYPES or not (gate_chain_supported(h, o_src, o_offset, mh_norm, x, out_arrays) and h.dtype == T
            and norm_chain_supported(x, None, norm, arrays) and swiglu_chain_supported(gate_up, down)):
        return False
    group_size, bits = arrays[3:]
    KO = h.shape[1] * h.shape[3]
    if _split(out_arrays[0].shape[0], KO, bits) > 1 or _split(down[0].shape[0], F, bits) > 1:
        return False
    if bits == 16 and not (out_arrays[0].dtype == down[0].dtype == T):
        return False
    return not _kernels_on() or _tail_plan(x.shape[0], x.shape[-1], KO, F, T, group_size, bits) is not None


def tail_quantized_matmul(h: mx.array, o_src: mx.array, o_offset: int, mh_norm: MultiHeadLayerNorm, x: mx.array,
                          out_arrays, norm: RMSNorm, arrays, down) -> tuple[mx.array, mx.array]:
    """Stages 3, 4 and 5 in one launch -> (x' = x + out_proj(sigmoid(o~) * mh_norm(h)), the FFN's
    output on x'): on CUDA the values of :func:`gate_norm_quantized_matmul` then
    :func:`ffn_quantized_matmul` (the caller checks :func:`tail_merge_supported`), else their
    reference ops."""
    w, scales, biases, group_size, bits = arrays
    F = w.shape[0] // 2
    B, NH, _, DV = h.shape
    if not _kernels_on():  # the stages' reference ops
        from ...cells.ffn import swiglu  # noqa: PLC0415  (cells import this package)

        o_preact = o_src[..., o_offset: o_offset + NH * DV]
        x = x + _product(output_norm_gate(h, o_preact, mh_norm), out_arrays)
        gate_up = _product(norm(x).astype(norm.weight.dtype), arrays)
        return x, _product(swiglu(gate_up[..., :F], gate_up[..., F:]), down)
    E = x.shape[-1]
    T = norm.weight.dtype
    N = down[0].shape[0]
    plan = _tail_plan(B, E, NH * DV, F, T, group_size, bits)
    iw3, iw1, iw2, paired = plan["iw3"], plan["iw1"], plan["iw2"], plan["paired"]
    kernel = _kernel(("tail", mh_norm.eps, norm.eps, iw3, iw1, iw2, paired), bits,
                     ["h", "o", "nw3", "xr", "w3", "scales3", "biases3", "nw", "w", "scales", "biases", "w2", "scales2",
                      "biases2"], ["out", "y", "hs" if paired else "gate_up"],
                     lambda: _tail_source(mh_norm.eps, norm.eps, iw3, iw1, iw2, paired), int_weights=iw3 or iw1 or iw2,
                     header=_MERGE_HEADER)
    x_new, y, _ = kernel(
        inputs=[h, o_src, mh_norm.weight, x, *out_arrays[:3], norm.weight, w, scales, biases, *down[:3]],
        template=decode_template(T, bits, group_size, B, _depth("norm", bits, iw1))
        + [("ST", x.dtype)] + _rows_template(B, E, T, bits, iw1)
        + [("NH", NH), ("DV", DV), ("OOFF", o_offset), ("KD3", NH * DV), ("SR3", plan["sr3"])]
        + ([("IW3", iw3)] if iw3 else []) + [("DEPTH3", _depth("gate", bits, iw3) or _quantized.DEPTH[bits])]
        + [("KD2", F), ("SR2", plan["sr2"])] + ([("IW2", iw2)] if iw2 else [])
        + [("DEPTH2", _depth("swiglu", bits, iw2) or _quantized.DEPTH[bits]), ("PF2", int(_quantized.PREFETCH)),
           ("POOL", plan["pool"])],
        output_shapes=[(B, 1, E), (B, 1, N), (B, 1, F if paired else 2 * F)], output_dtypes=[x.dtype, T, T],
        grid=(plan["blocks"] * 256, 1, 1), threadgroup=(256, 1, 1),
    )
    return x_new, y


# --------------------------------------------------------- the whole block in one launch (1-5)
# CHAIN_MERGE 5: stage 1 (RMSNorm [of x + pending] -> q|k|v|o(|i|f), writing the product ``qkv``
# and the residual sum), the gated step (layout 2 of :mod:`.decode`, its tiles walked by the
# grid's blocks: 256 threads as its TX x TD), then stages 3, 4 and 5 as
# :func:`tail_quantized_matmul` runs them, in one grid of at most what the GPU holds at once: four
# grid-wide barriers on one counter, each phase's code and rounding the separate kernel's (so the
# values are bit-equal: the CUDA tests). Each phase after the first requests its first weight
# chunks (the step: its first rows of the state) before it waits.
_BLOCK_HEAD = """
    __shared__ __align__(16) T xl_pool[POOL];
    __shared__ float xl_red[WARPS * MT * 4 * 32];
    constexpr int XL_SNT = STX * STD, XL_SNW = XL_SNT / 32, XL_SCOLS = STX * SV;
    __shared__ float xl_sq[DQK], xl_sk[DQK], xl_sqn[XL_SNW], xl_swarp[32];
    __shared__ float xl_sred[XL_SNW * XL_SCOLS > XL_SNT ? XL_SNW * XL_SCOLS : XL_SNT];
    const int xl_bid = blockIdx.x, xl_nblk = gridDim.x;
"""
# The phases' own shared arrays, one set for the launch (a barrier ends each phase; static shared
# memory in separate scopes would otherwise add up block after block).
_BLOCK_SHARED = (("__shared__ float s_warp[32];", "float* s_warp = xl_swarp;"),
                 ("__shared__ float s_q[DQK];", "float* s_q = xl_sq;"), ("__shared__ float s_k[DQK];", "float* s_k = xl_sk;"),
                 ("__shared__ float s_red[NRED];", "float* s_red = xl_sred;"), ("__shared__ float s_qn[NW];", "float* s_qn = xl_sqn;"))

# The step's names in the block kernel: its template arguments beside the products' (ST there is
# the residual stream's dtype), its packed input the stage-1 product ``qkv`` (an output of this
# launch: read past L1), the gate product's x the normed x stage 1 writes.
_STEP_RENAME = {"ST": "SST", "TX": "STX", "TD": "STD", "V": "SV", "RB": "SRB", "LOAD4": "SLOAD4", "STREAM": "SSTREAM",
                "E": "SE", "y": "qkv", "x": "xn_out", "w": "wif", "w_strides": "wif_strides",
                # the state's arrays named apart from the products' locals (n, m)
                "C": "st_C", "n": "st_n", "m": "st_m", "n_strides": "st_n_strides", "m_strides": "st_m_strides",
                "C_out": "st_C_out", "n_out": "st_n_out", "m_out": "st_m_out"}


def _step_phase(eps: float, cap: float, has_bias: bool, inproj: bool, wait: str) -> str:
    """Layout 2 of the gated step (packed) as a phase of the block kernel: ``wait`` after its first
    state rows are requested; q, k, v, the raw gates (and the normed x) read past L1."""
    src = _decode.step_source(eps, cap, has_bias, inproj, 2, packed=True)
    subs = [("y_shape[0]", "MROWS"), ("y_strides[0]", "YW"),
            ("const int tx = threadIdx.x;", "const int tx = static_cast<int>(threadIdx.x) % STX;"),
            ("const int ty = threadIdx.y;", "const int ty = static_cast<int>(threadIdx.x) / STX;"),
            ("load_rows(blockIdx.x, ty);  // before anything else\n",
             "load_rows(blockIdx.x, ty);  // before anything else\n" + wait),
            ("blockIdx.x", "xl_bid"), ("gridDim.x", "xl_nblk"),
            # loop counters named apart from the gate weights (w, renamed below)
            ("for (int w = 0; w < NSUM; ++w) num += s_red[w * COLS + col];",
             "for (int wr = 0; wr < NSUM; ++wr) num += s_red[wr * COLS + col];"),
            ("for (int w = 0; w < NW; ++w) qn_all += s_qn[w];", "for (int wr = 0; wr < NW; ++wr) qn_all += s_qn[wr];")]
    if inproj:
        subs += [("x_strides[0]", "SE"), ("x_strides[2]", "1")]
    for old, new in subs:
        assert old in src, old
        src = src.replace(old, new)
    assert "threadIdx.y" not in src and "_shape" not in src
    src = re.sub(r"(?<![\w.])(q|k|v|y|x|xv)\[([^\[\]]*)\]", r"__ldcg(\1 + (\2))", src)
    assert not re.search(r"(?<![\w.])(q|k|v|y|x|xv)\[", src)
    for old, new in _STEP_RENAME.items():
        src = re.sub(rf"(?<![\w.]){old}\b", new, src)
    return "{\n" + src + "}\n"


#: The block kernel's arrays, each named with its layer's suffix in a launch of several blocks.
_BLOCK_ARRAYS = ("xr", "pend", "nw0", "w0", "scales0", "biases0", "wif", "ib", "fb", "st_C", "st_n", "st_m", "nw3", "w3",
                 "scales3", "biases3", "nw", "w", "scales", "biases", "w2", "scales2", "biases2", "qkv", "sum_out",
                 "xn_out", "h", "st_C_out", "st_n_out", "st_m_out", "out", "y", "hs", "gate_up")


def _layer_source(eps0: float, has_pending: bool, inproj: bool, step_eps: float, cap: float, has_bias: bool,
                  mh_eps: float, eps: float, iw0: int, iw3: int, iw1: int, iw2: int, paired: bool, layer: int | None,
                  last: bool) -> str:
    """Block ``layer`` of a launch (its arrays suffixed ``_l<layer>``): its five phases, the
    counter's targets continuing from the blocks before (5 per block); a block after the first
    reads its residual stream and pending FFN output from the block before's outputs (past L1),
    after a wait; the launch's last wait zeroes the counters. ``layer`` None: the body of the
    loop over blocks 1, 2, ... (``xl_l``; arrays by their plain names, the block before's from
    the pointer table, the last block's tests at run time)."""
    loop = layer is None
    target = (lambda k: f"(5 * xl_l + {k}) * xl_nblk") if loop else (lambda k: f"{5 * layer + k} * xl_nblk")  # noqa: E731
    p1 = _norm_source(eps0, has_pending, inproj, bool(iw0), store="qkv[(size_t)m * N + n] = static_cast<T>(sum);",
                      wait=_wait(target(0), last=False) if layer != 0 else "")
    if layer != 0:  # x and pending: the outputs of the block before, written in this launch
        for old, new in (("xr[(size_t)mm * K + k]", "__ldcg(XL_PREV_OUT + (size_t)mm * K + k)"),
                         ("pend[(size_t)mm * K + k]", "__ldcg(XL_PREV_Y + (size_t)mm * K + k)")):
            assert old in p1, old
            p1 = p1.replace(old, new)
    p1 = _merge_phase(p1, {"KD": "KD0", "SR": "SR0", "DEPTH": "DEPTH0", "IW": "IW0", "w": "w0", "scales": "scales0",
                           "biases": "biases0", "w_shape": "w0_shape", "nw": "nw0"})
    p2 = _step_phase(step_eps, cap, has_bias, inproj, _wait(target(1), last=False))
    gate = _GATE_PROLOGUE.replace("EPS", _eps(mh_eps))
    for old, new in (("h[hoff + j]", "__ldcg(h + hoff + j)"), ("o[ooff + j]", "__ldcg(qkv + ooff + j)"),
                     ("o_shape[2]", "YW")):
        assert old in gate, old  # h and o~ written in this launch: read past L1
        gate = gate.replace(old, new)
    store = _RESIDUAL_STORE
    if has_pending:  # the residual stream is stage 1's sum
        assert "xr[(size_t)m * N + n]" in store
        store = store.replace("xr[(size_t)m * N + n]", "__ldcg(sum_out + (size_t)m * N + n)")
    pa = _source(_GATE_SIZES, _wait(target(2), last=False) + gate, store, int_weights=bool(iw3))
    pa = _merge_phase(pa, {"KD": "KD3", "SR": "SR3", "DEPTH": "DEPTH3", "IW": "IW3", "w": "w3", "scales": "scales3",
                           "biases": "biases3", "w_shape": "w3_shape", "nw": "nw3"})
    pb = _norm_source(eps, False, False, bool(iw1), store="gate_up[(size_t)m * N + n] = static_cast<T>(sum);",
                      wait=_wait(target(3), last=False))
    old = "xr[(size_t)mm * K + k]"
    assert old in pb, old
    pb = pb.replace(old, "__ldcg(out + (size_t)mm * K + k)")  # the residual stream stage 3 wrote
    pb = _paired(pb) if paired else pb
    last_wait = _wait(target(4), last=last or loop)
    if loop:
        old = "if (atomicAdd(XL_CNT + 1, 1u)"
        assert old in last_wait
        last_wait = last_wait.replace(old, "if (xl_l == XL_NL - 1 && atomicAdd(XL_CNT + 1, 1u)")
    pc = _down_phase(iw2, last_wait, "MROWS", paired)
    text = "".join((p1, _DONE, p2, _DONE, pa, _DONE, _merge_phase(pb, {}), _DONE, pc))
    text = text.replace("xr_shape[0]", "MROWS").replace("h_shape[0]", "MROWS")
    assert "_shape[0]" not in text.replace("w0_shape[0]", "").replace("w3_shape[0]", "").replace(
        "w_shape[0]", "").replace("w2_shape[0]", "")
    if loop:
        text = text.replace("XL_PREV_OUT", "XL_PTR(out, xl_l - 1)").replace("XL_PREV_Y", "XL_PTR(y, xl_l - 1)")
        return text + "      if (xl_l < XL_NL - 1) {" + _DONE + "      }\n"
    rename = {}
    for name in _BLOCK_ARRAYS:
        for tail in ("", "_shape", "_strides"):
            rename[name + tail] = f"{name}_l{layer}{tail}"
    for old, new in rename.items():
        text = re.sub(rf"(?<![\w.]){old}\b", new, text)
    text = text.replace("XL_PREV_OUT", f"out_l{layer - 1}").replace("XL_PREV_Y", f"y_l{layer - 1}")
    return text + (_DONE if not last else "")


#: Most blocks per launch whose code is written out block after block; more run block 0's code,
#: then one loop over the others (their arrays from a pointer table in shared memory): the
#: unrolled source grows with the blocks (NVRTC: ~4 s per block of 7B at 4 bits on a CPU core,
#: and spills), the loop's does not.
STACK_UNROLL = 4


def _loop_source(blocks: int, names: list[str], inputs: set[str], first: set[str], text: str) -> tuple[str, str]:
    """Blocks 1 .. ``blocks``-1 as a loop over the generic block ``text``: each block's arrays
    (``names``, the same for every block after the first) from ``xl_ptrs``, filled at the start
    of the launch by the first threads; shapes and strides (the same for every block) from block
    1's inputs; ``first``: the names block 0 has."""
    na = len(names)
    slots = [(layer * na + i, f"{name}_l{layer}") for layer in range(blocks) for i, name in enumerate(names)
             if layer or name in first]
    fill, per = [], 8
    for c in range(0, len(slots), per):
        fill.append(f"      case {c // per}: " + " ".join(f"xl_ptrs[{i}] = (void*)({expr});" for i, expr in slots[c: c + per])
                    + " break;")
    head = (f"    __shared__ void* xl_ptrs[{blocks * na}];\n    switch (threadIdx.x) {{\n" + "\n".join(fill)
            + "\n      default: break;\n    }\n    __syncthreads();\n")
    # each use reads the table (a barrier ends each phase: no pointer stays live across the block)
    index = {name: i for i, name in enumerate(names)}
    text = re.sub(r"XL_PTR\((\w+), xl_l - 1\)",
                  lambda mt: f"((decltype(&{mt.group(1)}_l1[0]))xl_ptrs[(xl_l - 1) * {na} + {index[mt.group(1)]}])", text)
    for name, i in index.items():
        for tail in ("_shape", "_strides"):
            text = re.sub(rf"(?<![\w.]){name}{tail}\b", f"{name}_l1{tail}", text) if name in inputs else text
        text = re.sub(rf"(?<![\w.]){name}\b(?!_l1)", f"((decltype(&{name}_l1[0]))xl_ptrs[xl_l * {na} + {i}])", text)
    return head, ("    #pragma unroll 1\n    for (int xl_l = 1; xl_l < XL_NL; ++xl_l) {\n"
                  + text + "    }\n").replace("XL_NL", str(blocks))


def _block_source(blocks: int, eps0: float, has_pending: bool, inproj: bool, step_eps: float, cap: float,
                  has_bias: bool, mh_eps: float, eps: float, iw0: int, iw3: int, iw1: int, iw2: int, paired: bool) -> str:
    """``blocks`` blocks in one launch (the first with pending FFN output where ``has_pending``):
    written out block after block up to :data:`STACK_UNROLL`, else block 0 and a loop."""
    args = (inproj, step_eps, cap, has_bias, mh_eps, eps, iw0, iw3, iw1, iw2, paired)
    head = ""
    if blocks <= STACK_UNROLL:
        text = "".join(_layer_source(eps0, has_pending or layer > 0, *args, layer, layer == blocks - 1)
                       for layer in range(blocks))
    else:
        names, inputs = _stack_names(True, inproj, has_bias, paired)
        first = set(_stack_names(has_pending, inproj, has_bias, paired)[0])
        body = _layer_source(eps0, True, *args, None, False)
        assert not re.search(r"(?<![\w.])(xr|pend)\b", body)
        head, body = _loop_source(blocks, names, inputs, first, body)
        text = _layer_source(eps0, has_pending, *args, 0, False) + body
    for old, new in _BLOCK_SHARED:
        assert old in text, old
        text = text.replace(old, new)
    return _BLOCK_HEAD + _claim("qkv_l0") + head + text


def _stack_names(pending: bool, inproj: bool, has_bias: bool, paired: bool) -> tuple[list[str], set[str]]:
    """A block's array names in the block kernel (after the first block: ``pending``), and which are inputs."""
    inputs = (["nw0", "w0", "scales0", "biases0"] + (["wif"] if inproj else []) + (["ib", "fb"] if has_bias else [])
              + ["st_C", "st_n", "st_m", "nw3", "w3", "scales3", "biases3", "nw", "w", "scales", "biases", "w2",
                 "scales2", "biases2"])
    outputs = (["qkv"] + (["sum_out"] if pending else []) + (["xn_out"] if inproj else [])
               + ["h", "st_C_out", "st_n_out", "st_m_out", "out", "y", "hs" if paired else "gate_up"])
    return inputs + outputs, set(inputs)


def _block_step_tile(B: int, NH: int, dqk: int, dv: int) -> tuple[int, int, int, int] | None:
    """Layout 2's (TX, TD, V, RB) for the step phase, or None where its block is not the block
    kernel's 256 threads or its state is not read 16 bytes at a time (then the blocks run unmerged)."""
    tx, td, vec, rb = _decode._v2_tile(B * NH, dqk, dv)
    return (tx, td, vec, rb) if tx * td == 256 and vec == 4 else None


def _block_plan(B: int, E: int, N1: int, NH: int, dqk: int, dv: int, F: int, dtype: mx.Dtype, group_size: int,
                bits: int, blocks: int = 1) -> dict | None:
    """:func:`block_quantized_matmul`'s schedule, or None where it could deadlock or not fit (as
    :func:`_tail_plan`, with stage 1's staged rows, the step's shared memory and, for ``blocks``
    beyond :data:`STACK_UNROLL`, the pointer table added)."""
    tail = _tail_plan(B, E, NH * dv, F, dtype, group_size, bits)
    tile = _block_step_tile(B, NH, dqk, dv)
    if tail is None or tile is None:
        return None
    iw0 = _int(bits, group_size, B, E, dtype, stage="norm")
    sr0 = _stage_rows(B, E, dtype, bits if iw0 else 0)
    tx, td, vec, rb = tile
    nred = max(8 * tx * vec, 256)
    pool = max(tail["pool"], sr0 * E)
    table = 8 * 36 * blocks if blocks > STACK_UNROLL else 0  # (at most 36 arrays a block)
    smem = (pool * dtype.size + 8 * -(-B // 8) * 4 * 32 * 4 + 2 * 32 * 4 + 64 + 4 * (2 * dqk + nred + 8) + table
            + sum(sr * _span_sums(k, bits) for sr, k, iw in
                  ((sr0, E, iw0), (tail["sr3"], NH * dv, tail["iw3"]), (tail["sr1"], E, tail["iw1"]),
                   (tail["sr2"], F, tail["iw2"])) if iw))
    resident = max(1, _quantized.RESIDENT.get(bits, 0))
    held = resident * _device_sms()
    if not sr0 or smem > 48 * 1024 or resident * (smem + 1024) > 228 * 1024 or not held:
        return None
    step_tiles = B * NH * -(-dv // (tx * vec))
    blocks = min(held, max(-(-N1 // 16), step_tiles, -(-E // 16), -(-2 * F // 16)))
    return dict(tail, iw0=iw0, sr0=sr0, pool=pool, blocks=blocks, tile=tile)


def _default_step_cell(cell) -> bool:
    """Whether ``cell`` steps as :class:`~xlstm_metal.cells.mlstm.mLSTMRecurrentKernelCell` does
    (its :meth:`step_packed` runs :func:`.decode.mlstm_step_gated_packed`)."""
    from ...cells.mlstm import mLSTMRecurrentKernelCell  # noqa: PLC0415  (cells import this package)

    return (isinstance(cell, mLSTMRecurrentKernelCell) and type(cell).step_packed is mLSTMRecurrentKernelCell.step_packed
            and type(cell).step_raw_gates is mLSTMRecurrentKernelCell.step_raw_gates)


def block_merge_supported(x: mx.array, pending: mx.array | None, norm0: nn.Module, arrays0, columns: tuple,
                          i_bias, f_bias, w_if, cell, num_heads: int, cap, state, mh_norm: nn.Module, out_arrays,
                          norm: nn.Module, arrays, down) -> bool:
    """Whether :func:`block_quantized_matmul` runs (:data:`CHAIN_MERGE` 5, one row): stage 1 as
    :func:`norm_chain_supported` takes it (its product ``arrays0``, the step's q, k, v (and raw
    gates) at ``columns`` of its output, or the float gate weights ``w_if``), the step's layout-2
    kernel (:func:`.decode.step_kernel_version` 2, a float32 state), stages 3-5 as
    :func:`tail_merge_supported` takes them, all four products at the same bits and group size; on
    CUDA, :func:`_block_plan` finding a schedule."""
    if arrays is None or arrays0 is None or merge_mode(arrays[4], x.shape[0]) != 5 or arrays0[3:] != arrays[3:]:
        return False
    if not (norm_chain_supported(x, pending, norm0, arrays0) and _default_step_cell(cell)
            and _decode.step_kernel_version() == 2 and cell.state_dtype == mx.float32):
        return False
    B, E, T = x.shape[0], x.shape[-1], norm0.weight.dtype
    NH, N1 = num_heads, arrays0[0].shape[0]
    q0, k0, v0, v1 = columns[:4]
    dqk, dv = (k0 - q0) // NH, (v1 - v0) // NH
    if (len(columns) == 6) == (w_if is not None) or min(dqk, dv) <= 0 or v1 > N1:
        return False
    if (k0 - q0, v0 - k0, v1 - v0) != (dqk * NH, dqk * NH, dv * NH) or (i_bias is None) != (f_bias is None):
        return False
    if w_if is not None and (w_if.dtype != T or w_if.shape != (2 * NH, E)):
        return False
    if i_bias is not None and not (i_bias.dtype == f_bias.dtype == T and i_bias.shape == f_bias.shape == (NH,)):
        return False
    if state is not None:
        shapes = ((B, NH, dqk, dv), (B, NH, dqk), (B, NH, 1))
        if any(a.dtype != mx.float32 or a.shape != shp for a, shp in zip(state, shapes)):
            return False
    if _block_step_tile(B, NH, dqk, dv) is None:
        return False
    h = SimpleNamespace(ndim=4, shape=(B, NH, 1, dv), dtype=T)
    o_src = SimpleNamespace(ndim=3, shape=(B, 1, N1), dtype=T)
    o_offset = v1  # o~ follows v in the fused product (stage 3 reads it there)
    if not _tail_stages_supported(h, o_src, o_offset, mh_norm, x, out_arrays, norm, arrays, down):
        return False
    F = arrays[0].shape[0] // 2
    return not _kernels_on() or _block_plan(B, E, N1, NH, dqk, dv, F, T, *arrays[3:]) is not None


def block_quantized_matmul(x: mx.array, pending: mx.array | None, norm0: RMSNorm, arrays0, columns: tuple, i_bias,
                           f_bias, w_if, cell, num_heads: int, cap, state, mh_norm: MultiHeadLayerNorm, out_arrays,
                           norm: RMSNorm, arrays, down):
    """A block's decode step in one launch (stages 1-5; the caller checks :func:`block_merge_supported`)
    -> (x' the block's residual stream after the mLSTM layer, the FFN's output on it, the new
    state (C, n, m)): on CUDA the values of :func:`norm_quantized_matmul`, the packed step
    (:func:`.decode.mlstm_step_gated_packed`) and :func:`tail_quantized_matmul`, else their reference ops."""
    return stack_quantized_matmul([(x, pending, norm0, arrays0, columns, i_bias, f_bias, w_if, cell, num_heads, cap,
                                    state, mh_norm, out_arrays, norm, arrays, down)])[0]


#: Most blocks one launch steps (``XLSTM_METAL_CHAIN_STACK``; with :data:`CHAIN_MERGE` 5): 1, each
#: block its own launch; more, consecutive blocks of the same shapes in one launch
#: (:func:`stack_quantized_matmul`, 5 grid-wide barriers per block). Measured slower, so 1 stays
#: (S13R1, H200, 7B bf16, one row, tok/s in two rounds): the default 225.4 / 214.1, the whole block
#: per launch (CHAIN_MERGE 5) 221.8 / 204.6, 8 blocks 171.3 / 173.2, 32 blocks at 2 blocks per SM
#: 72.6 / 87.7: the step was not launch-bound (GPU busy 97.5% of it) and the stacked kernels spill.
#: At 4 bits (S33, H100, in turns) 2, 4 and 8 blocks per launch ran 269-276, 199-271 and 165-188
#: tok/s against 299-340 for one block per launch.
CHAIN_STACK = int(os.environ.get("XLSTM_METAL_CHAIN_STACK", "1") or 1)


def stack_compatible(first: tuple, other: tuple) -> bool:
    """Whether the block of arguments ``other`` (:func:`block_merge_supported`'s, already accepted)
    runs in the same launch as ``first``'s: the same shapes, dtypes, flags and constants."""
    def sig(args):
        (x, pending, norm0, arrays0, columns, i_bias, f_bias, w_if, cell, num_heads, cap, state, mh_norm, out_arrays,
         norm, arrays, down) = args
        shapes = tuple((a[0].shape, a[0].dtype, a[3], a[4]) for a in (arrays0, out_arrays, arrays, down))
        return (x.shape, x.dtype, norm0.weight.dtype, norm0.eps, columns, i_bias is None, w_if is None, cell.eps, num_heads,
                cap, mh_norm.eps, norm.eps, shapes)
    return sig(first) == sig(other)


def stack_quantized_matmul(blocks: list) -> list:
    """Consecutive blocks' decode steps in one launch: ``blocks`` a list of
    :func:`block_quantized_matmul`'s arguments (each accepted by :func:`block_merge_supported`
    and :func:`stack_compatible` with the first; a block after the first takes its x and pending
    from the block before, whatever its own say) -> [(x', FFN output, state)] per block, the
    values of one :func:`block_quantized_matmul` after another."""
    if not _kernels_on():  # the stages' reference ops, block after block
        results, carried = [], None
        for (x, pending, norm0, arrays0, columns, i_bias, f_bias, w_if, cell, num_heads, cap, state, mh_norm, out_arrays,
             norm, arrays, down) in blocks:
            if carried is not None:
                x, pending = carried
            s, xn, y0 = norm_quantized_matmul(x, pending, norm0, *arrays0[:3], group_size=arrays0[3], bits=arrays0[4],
                                              write_xn=w_if is not None)
            h, state = _decode.mlstm_step_gated_packed(y0, columns, num_heads, i_bias, f_bias, state, gate_soft_cap=cap,
                                                       eps=cell.eps, state_dtype=cell.state_dtype, x=xn, w_if=w_if)
            x_new, y = tail_quantized_matmul(h, y0, columns[3], mh_norm, s, out_arrays, norm, arrays, down)
            results.append((x_new, y, state))
            carried = (x_new, y)
        return results
    (x, pending, norm0, arrays0, columns, i_bias, f_bias, w_if, cell, num_heads, cap, _, mh_norm, out_arrays, norm,
     arrays, down) = blocks[0]
    L = len(blocks)
    inproj = w_if is not None
    o_offset = columns[3]
    B, _, E = x.shape
    T = norm0.weight.dtype
    NH, N1 = num_heads, arrays0[0].shape[0]
    q0, k0, v0, v1 = columns[:4]
    dqk, dv = (k0 - q0) // NH, (v1 - v0) // NH
    group_size, bits = arrays[3:]
    F = arrays[0].shape[0] // 2
    N = down[0].shape[0]
    plan = _block_plan(B, E, N1, NH, dqk, dv, F, T, group_size, bits, L)
    if plan is None:  # the pointer table does not fit beside the rest: in halves
        half = L // 2
        first = stack_quantized_matmul(blocks[:half])
        rest = [(first[-1][0], first[-1][1], *args[2:]) for args in blocks[half:]]
        return first + stack_quantized_matmul(rest)
    iw0, iw3, iw1, iw2, paired = plan["iw0"], plan["iw3"], plan["iw1"], plan["iw2"], plan["paired"]
    has_pending, has_bias = pending is not None, i_bias is not None
    capf = float(cap) if cap is not None else 0.0
    inputs, outputs, in_arrays, shapes, dtypes = [], [], [], [], []
    for layer, args in enumerate(blocks):
        (_, _, l_norm0, l_arrays0, _, l_ib, l_fb, l_wif, _, _, _, l_state, l_mh, l_out, l_norm, l_arrays, l_down) = args
        first = layer == 0
        pend_here = has_pending if first else True
        names = ((["xr"] if first else []) + (["pend"] if first and has_pending else [])
                 + ["nw0", "w0", "scales0", "biases0"] + (["wif"] if inproj else []) + (["ib", "fb"] if has_bias else [])
                 + ["st_C", "st_n", "st_m", "nw3", "w3", "scales3", "biases3", "nw", "w", "scales", "biases", "w2",
                    "scales2", "biases2"])
        if l_state is None:
            l_state = _decode.zero_state(B, NH, dqk, dv, mx.float32)
        in_arrays += (([x] if first else []) + ([pending] if first and has_pending else [])
                      + [l_norm0.weight, *l_arrays0[:3]] + ([l_wif] if inproj else []) + ([l_ib, l_fb] if has_bias else [])
                      + [*l_state, l_mh.weight, *l_out[:3], l_norm.weight, *l_arrays[:3], *l_down[:3]])
        inputs += [f"{name}_l{layer}" for name in names]
        names = (["qkv"] + (["sum_out"] if pend_here else []) + (["xn_out"] if inproj else [])
                 + ["h", "st_C_out", "st_n_out", "st_m_out", "out", "y", "hs" if paired else "gate_up"])
        outputs += [f"{name}_l{layer}" for name in names]
        shapes += ([(B, 1, N1)] + ([(B, 1, E)] if pend_here else []) + ([(B, 1, E)] if inproj else [])
                   + [(B, NH, 1, dv), (B, NH, dqk, dv), (B, NH, dqk), (B, NH, 1), (B, 1, E), (B, 1, N),
                      (B, 1, F if paired else 2 * F)])
        dtypes += ([T] + ([x.dtype] if pend_here else []) + ([T] if inproj else [])
                   + [T, mx.float32, mx.float32, mx.float32, x.dtype, T, T])
    key = ("block", L, norm0.eps, has_pending, inproj, cell.eps, capf, has_bias, mh_norm.eps, norm.eps, iw0, iw3, iw1,
           iw2, paired)
    kernel = _kernel(key, bits, inputs, outputs,
                     lambda: _block_source(L, norm0.eps, has_pending, inproj, cell.eps, capf, has_bias, mh_norm.eps,
                                           norm.eps, iw0, iw3, iw1, iw2, paired),
                     int_weights=iw0 or iw3 or iw1 or iw2, header=_GATE_HEADER + _MERGE_HEADER)
    tx, td, vec, rb = plan["tile"]
    template = (decode_template(T, bits, group_size, B, _depth("norm", bits, iw1))
                + [("ST", x.dtype), ("MROWS", B)] + _rows_template(B, E, T, bits, iw1)
                + [("NH", NH), ("DV", dv), ("OOFF", o_offset), ("KD3", NH * dv), ("SR3", plan["sr3"])]
                + ([("IW3", iw3)] if iw3 else []) + [("DEPTH3", _depth("gate", bits, iw3) or _quantized.DEPTH[bits])]
                + [("KD2", F), ("SR2", plan["sr2"])] + ([("IW2", iw2)] if iw2 else [])
                + [("DEPTH2", _depth("swiglu", bits, iw2) or _quantized.DEPTH[bits]), ("PF2", int(_quantized.PREFETCH)),
                   ("POOL", plan["pool"])]
                + [("KD0", E), ("SR0", plan["sr0"])] + ([("IW0", iw0)] if iw0 else [])
                + [("DEPTH0", _depth("norm", bits, iw0) or _quantized.DEPTH[bits])]
                + [("HT", T), ("SST", mx.float32), ("GT", T), ("DQK", dqk), ("STX", tx), ("STD", td), ("SV", vec),
                   ("SE", E), ("SLOAD4", True), ("SRB", rb), ("SSTREAM", _decode._STREAM_HINTS), ("YW", N1),
                   ("QOFF", q0), ("KOFF", k0), ("VOFF", v0)]
                + ([("IOFF", columns[4]), ("FOFF", columns[5])] if len(columns) == 6 else []))
    outs = kernel(inputs=in_arrays, template=template, output_shapes=shapes, output_dtypes=dtypes,
                  grid=(plan["blocks"] * 256, 1, 1), threadgroup=(256, 1, 1))
    results, i = [], 0
    for layer in range(L):
        i += 1 + (has_pending if layer == 0 else True) + inproj  # qkv, sum_out, xn_out
        h_, C_, n_, m_, out_, y_, _ = outs[i: i + 7]
        results.append((out_, y_, (C_, n_, m_)))
        i += 7
    return results
