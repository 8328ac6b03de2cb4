/* One decode step of an xLSTM-Large model (float32, 1 to XL_MAX_ROWS rows) as one call, for CPUs.

   The reference is the MLX graph of xLSTMLarge.__call__ at one token; on a CPU MLX spends
   ~5 us of host and stream time on each of a step's ~800 graph nodes (benchmarks/NOTES.md,
   session 21), so a 125m step was ~30% bookkeeping around its one-row products, and several
   rows go through OpenBLAS's GEMM, which packs each weight matrix first. Here a step is the
   products (each weight row streamed front to back once, for every row of the batch, as the
   BLAS forwarder's row kernel reads them) and the few vector operations between them, in one
   OpenMP region whose threads split each product's weight rows; the arithmetic is the
   reference's, in float32, summed in another order.

   Layouts: every weight row-major [out, in] and contiguous; for ``rows`` rows the activations
   [rows, width] and the state C [rows, NH, DQK, DV], n [rows, NH, DQK], m [rows, NH].
   A weight may instead be MLX's affine quantization (xl_quant: 2 to 8 bits, groups of a multiple
   of 16): the products then read the packed integers, a quarter to an eighth of float32's bytes,
   and never a dequantized copy.
   Python (decode_step.py) checks all of it and falls back to the MLX graph where anything
   differs. */
#include <math.h>
#include <sched.h>
#include <stddef.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define XL_MAX_ROWS 8

/* A weight in MLX's affine quantization (mx.quantize, mode "affine"): row n's value j is
   scales[n, j / group] * q + biases[n, j / group], q the ``bits``-bit integer at bit j * bits of
   the row's little-endian bit stream (w: [out, in * bits / 8] bytes). bits == 0: a float weight
   (the xl_block / xl_model pointer beside it). */
typedef struct {
  const unsigned char *w;
  const float *scales, *biases; /* [out, in / group] */
  long bits, group;
} xl_quant;

/* Where each block's weights sit in xl_block.quant. */
enum { XL_Q, XL_K, XL_V, XL_O, XL_I, XL_F, XL_OUT, XL_GATE, XL_UP, XL_DOWN, XL_WEIGHTS };

typedef struct {
  const float *norm_mlstm;            /* [E] */
  const float *w_q, *w_k, *w_v, *w_o; /* [NH*DQK, E], [NH*DQK, E], [NH*DV, E], [NH*DV, E] */
  const float *w_i, *w_f;             /* [NH, E] */
  const float *b_i, *b_f;             /* [NH] */
  const float *mh_norm;               /* [NH*DV] */
  const float *w_out;                 /* [E, NH*DV] */
  const float *norm_ffn;              /* [E] */
  const float *w_gate, *w_up;         /* [F, E] */
  const float *w_down;                /* [E, F] */
  const float *C, *n, *m;             /* the state before the step (NULL: the zero state) */
  float *C_out, *n_out, *m_out;       /* the state after it */
  float norm_mlstm_eps, mh_eps, norm_ffn_eps;
  xl_quant quant[XL_WEIGHTS];         /* bits != 0: that weight is quantized (its pointer above unused) */
} xl_block;

typedef struct {
  long E, NH, DQK, DV, F, V, num_blocks;
  int threads;
  int has_gate_cap, has_logit_cap;
  float gate_cap, logit_cap, step_eps, out_norm_eps;
  const float *embedding; /* [V, E] */
  const float *out_norm;  /* [E] or NULL */
  const float *lm_head;   /* [V, E] */
  const xl_block *blocks;
  float *work;            /* xl_work_floats(model, rows) floats */
  xl_quant q_embedding, q_head; /* bits != 0: quantized (tied: the same arrays) */
} xl_model;

int xl_max_rows(void) { return XL_MAX_ROWS; }

long xl_work_floats(const xl_model *M, long rows) {
  /* per row: x, xn, y [E]; the projections q|k|v|o|i|f; h and the gated norm [NH*DV]; act and a
     quantized up's outputs [F] */
  return rows * (3 * M->E + 2 * M->NH * M->DQK + 4 * M->NH * M->DV + 2 * M->NH + 2 * M->F);
}

/* dot_rows (one row of x: the BLAS forwarder's row kernel, xlstm_metal/_blas.py's
   ROW_KERNEL_SOURCE, which the build puts before this file, with XL_CLONES) for NB rows of x
   [NB, K]: y[b * ldy + n] = <W[n], x[b]>, each 16-float chunk of a
   weight row loaded once for all NB rows (NB vector accumulators: GCC/clang vector types keep
   them in registers, where arrays of floats went through the stack; xl_v16, xl_load and the
   tree sum xl_hsum come with the row kernel). */
typedef int xl_i16 __attribute__((vector_size(64)));
static inline void xl_store(float *p, xl_v16 v) { memcpy(p, &v, sizeof v); }
#define XL_DOT_ROWS(NB)                                                                                 \
  XL_CLONES static void dot_rows##NB(const float *restrict W, const float *restrict x, float *restrict y, \
                                     long ldy, long n0, long n1, long K) {                               \
    for (long n = n0; n < n1; n++) {                                                                    \
      const float *restrict w = W + n * K;                                                              \
      xl_v16 acc[NB];                                                                                   \
      for (int b = 0; b < NB; b++) acc[b] = (xl_v16){0};                                                \
      long k = 0;                                                                                       \
      for (; k + 16 <= K; k += 16) {                                                                    \
        if (!(k & 63)) __builtin_prefetch(w + k + XL_ROW_PREFETCH, 0, 3);                               \
        const xl_v16 wk = xl_load(w + k);                                                               \
        for (int b = 0; b < NB; b++) acc[b] += wk * xl_load(x + b * K + k);                             \
      }                                                                                                 \
      for (int b = 0; b < NB; b++) {                                                                    \
        float s = 0.0f;                                                                                 \
        for (long r = k; r < K; r++) s += w[r] * x[b * K + r];                                          \
        y[b * ldy + n] = s + xl_hsum(acc[b]);                                                           \
      }                                                                                                 \
    }                                                                                                   \
  }
XL_DOT_ROWS(2)
XL_DOT_ROWS(3)
XL_DOT_ROWS(4)
XL_DOT_ROWS(5)
XL_DOT_ROWS(6)
XL_DOT_ROWS(7)
XL_DOT_ROWS(8)

/* y[b * ldy + n] = <W[n, :K], x[b]> for n in [n0, n1) and the ``rows`` rows of x [rows, K]. */
static void dot_rows_n(const float *W, const float *x, float *y, long ldy, long n0, long n1, long K, long rows) {
  switch (rows) {
    case 1: dot_rows(W, K, x, y, 1, n0, n1, K, 1.0f, 0.0f); break;
    case 2: dot_rows2(W, x, y, ldy, n0, n1, K); break;
    case 3: dot_rows3(W, x, y, ldy, n0, n1, K); break;
    case 4: dot_rows4(W, x, y, ldy, n0, n1, K); break;
    case 5: dot_rows5(W, x, y, ldy, n0, n1, K); break;
    case 6: dot_rows6(W, x, y, ldy, n0, n1, K); break;
    case 7: dot_rows7(W, x, y, ldy, n0, n1, K); break;
    default: dot_rows8(W, x, y, ldy, n0, n1, K); break;
  }
}

typedef unsigned char xl_u8x16 __attribute__((vector_size(16)));
/* 16 bytes from any address as a vector load (a memcpy into a vector went through two general
   registers and a byte-by-byte conversion with GCC 12) */
typedef unsigned char xl_u8x16u __attribute__((vector_size(16), aligned(1)));
typedef unsigned int xl_u32x16 __attribute__((vector_size(64)));
typedef unsigned short xl_u16x8 __attribute__((vector_size(16)));

/* 16 bytes as 16 ints, and as 16 floats. The empty asm makes v a register value: GCC 12 converted
   a vector straight from memory byte by byte, and one from a register with a single vpmovzxbd. */
static inline xl_i16 bytes_to_ints(xl_u8x16 v) {
#if defined(__x86_64__) && defined(__GNUC__)
  __asm__("" : "+x"(v));
#endif
  return (xl_i16)__builtin_convertvector(v, xl_u32x16);
}

static inline xl_v16 bytes_to_floats(xl_u8x16 v) { return __builtin_convertvector(bytes_to_ints(v), xl_v16); }

/* Shuffles: GCC's __builtin_shuffle; clang's __builtin_shufflevector takes constant indices only, so
   the variable ones go element by element there (correct, slower). */
#if defined(__GNUC__) && !defined(__clang__)
#define XL_GCC_SHUFFLE 1
#endif

/* r[j] = a[m[j]] (m[j] < 16). */
static inline xl_u8x16 pick_bytes(xl_u8x16 a, xl_u8x16 m) {
#ifdef XL_GCC_SHUFFLE
  return __builtin_shuffle(a, m);
#else
  xl_u8x16 r;
  for (int j = 0; j < 16; j++) r[j] = a[m[j] & 15];
  return r;
#endif
}

/* r[j] = table[i[j]] (i[j] < 16). */
static inline xl_v16 pick_floats(xl_v16 table, xl_i16 i) {
#ifdef XL_GCC_SHUFFLE
  return __builtin_shuffle(table, i);
#else
  xl_v16 r;
  for (int j = 0; j < 16; j++) r[j] = table[i[j] & 15];
  return r;
#endif
}

/* The first (high = 0) or last (high = 1) 8 bytes of a and b, interleaved: a0 b0 a1 b1 ... */
#ifdef XL_GCC_SHUFFLE
#define XL_INTERLEAVE_LO(a, b) __builtin_shuffle(a, b, (xl_u8x16){0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23})
#define XL_INTERLEAVE_HI(a, b) \
  __builtin_shuffle(a, b, (xl_u8x16){8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31})
#else
#define XL_INTERLEAVE_LO(a, b) __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23)
#define XL_INTERLEAVE_HI(a, b) \
  __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)
#endif

typedef unsigned char xl_u8x64 __attribute__((vector_size(64)));

/* Unpacking 16 values of ``bits`` bits (2 * bits bytes): value j starts at bit j * bits, in the
   byte lo[j] (and the next, hi[j] = lo[j] + 1, where it crosses), shifted right by shift[j].
   lanes: the same bytes for unpack16_wide, value j's bytes lo[j] .. lo[j] + 3 (at most 15) in
   bytes 4 j .. 4 j + 3. */
typedef struct {
  xl_u8x16 lo, hi;
  xl_u32x16 shift, mask;
  xl_u8x64 lanes;
} xl_unpack;

static xl_unpack unpack_for(long bits) {
  xl_unpack u;
  for (int j = 0; j < 16; j++) {
    const int at = j * (int)bits, lo = at >> 3;
    u.lo[j] = (unsigned char)lo;
    u.hi[j] = (unsigned char)(lo + 1 < 2 * bits ? lo + 1 : lo); /* past the 16 values' bytes: unused */
    u.shift[j] = (unsigned)(at & 7);
    u.mask[j] = (1u << bits) - 1u;
    for (int b = 0; b < 4; b++) u.lanes[4 * j + b] = (unsigned char)(lo + b < 16 ? lo + b : 15);
  }
  return u;
}

/* The 2 * bits bytes of 16 values from ``p`` in a vector (``room``: bytes readable from p, at
   least that many; past the matrix's last bytes the rest is 0). */
static inline xl_u8x16 packed16(const unsigned char *p, long room, long bits) {
  xl_u8x16 raw = {0};
  if (room >= 16)
    raw = *(const xl_u8x16u *)p;
  else
    memcpy(&raw, p, (size_t)(2 * bits));
  return raw;
}

/* Whether a group takes the 4-bit lookup (unpack32_4) rather than 16 values at a time. */
static inline int nibble_table(long bits, long group) { return bits == 4 && group % 32 == 0; }

/* 16 integers of a row from ``p`` (packed16's arguments) as floats. */
static inline xl_v16 unpack16(const unsigned char *p, long room, const xl_unpack *u, long bits) {
  const xl_u8x16 raw = packed16(p, room, bits);
  const xl_u32x16 lo = __builtin_convertvector(pick_bytes(raw, u->lo), xl_u32x16),
                  hi = __builtin_convertvector(pick_bytes(raw, u->hi), xl_u32x16);
  const xl_u32x16 q = ((lo | (hi << 8)) >> u->shift) & u->mask;
  return __builtin_convertvector((xl_i16)q, xl_v16);
}

/* The general unpacking with AVX-512BW: the 16 bytes broadcast to the four 128-bit lanes, one
   in-lane byte shuffle (each lane can pick any of them) puts value j's bytes in its 32-bit lane,
   then one shift and one mask: 4 instructions per 16 values for unpack16's 8; 1.6x faster per
   6-bit weight in a one-row product (2-core Xeon). Written with intrinsics, in functions built for
   x86-64-v4 and called only where the CPU has it (xl_wide_unpack_available): with vector
   extensions GCC 12 folds the broadcast into the shuffle and makes it a cross-lane permute. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(XLSTM_NO_CLONES)
#define XL_WIDE_UNPACK 1
#include <immintrin.h>
#define XL_V4 __attribute__((target("arch=x86-64-v4")))
XL_V4 static inline xl_v16 unpack16_wide(const unsigned char *p, long room, const xl_unpack *u, long bits) {
  const xl_u8x16 raw = packed16(p, room, bits);
  const __m512i picked = _mm512_shuffle_epi8(_mm512_broadcast_i32x4((__m128i)raw), (__m512i)u->lanes);
  const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(picked, (__m512i)u->shift), (__m512i)u->mask);
  return (xl_v16)_mm512_cvtepi32_ps(q);
}
#endif
/* Set to 0 (tests) to keep the portable unpacking where the wide one could run. */
int xl_wide_unpack = 1;
/* Whether this build and CPU take unpack16_wide. */
int xl_wide_unpack_available(void) {
#ifdef XL_WIDE_UNPACK
  return __builtin_cpu_supports("x86-64-v4") ? 1 : 0;
#else
  return 0;
#endif
}

/* 32 4-bit integers (16 bytes; value 2i in byte i's low half, 2i + 1 in its high half) in order,
   dequantized by looking each up in ``table`` (s q + c for q = 0..15, the group's values: one
   permute per 16 instead of a conversion and a multiply-add). Reads exactly its 16 bytes. */
static inline void unpack32_4(const unsigned char *p, xl_v16 table, xl_v16 *first, xl_v16 *second) {
  const xl_u8x16 raw = *(const xl_u8x16u *)p;
  /* x86 has no byte shifts: shift 16-bit lanes, then mask */
  const xl_u8x16 lo = raw & 15, hi = (xl_u8x16)((xl_u16x8)raw >> 4) & 15;
  *first = pick_floats(table, bytes_to_ints(XL_INTERLEAVE_LO(lo, hi)));
  *second = pick_floats(table, bytes_to_ints(XL_INTERLEAVE_HI(lo, hi)));
}

/* The 16 values s q + c of a 4-bit group (q = 0..15). */
static inline xl_v16 group_table(float s, float c) {
  return (xl_v16){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} * s + c;
}

/* 16 8-bit integers as floats (reads exactly their 16 bytes). */
static inline xl_v16 unpack16_8(const unsigned char *p) {
  return bytes_to_floats(*(const xl_u8x16u *)p);
}

/* The quantized dot_rows_n: y[b * ldy + n] = <dequantized Q row n, x[b]> for n in [n0, n1), the
   ``rows`` rows of x [rows, K] (``end``: the end of Q's packed bytes, which 16-byte loads must
   not pass). Each 16 values are dequantized in registers (s q + c, as MLX's quantized matmul
   computes them) and multiplied into all the rows. (Summing s sum q x + c sum x per group instead
   saves a multiply but cancels: up to 7e-5 relative off the graph's logits at 5 bits.) */
#define XL_QDOT_ROWS_AS(NB, NAME, ATTR, UNPACK)                                                               \
  ATTR static void NAME##NB(const xl_quant *Q, const unsigned char *end, const float *restrict x,              \
                            float *restrict y, long ldy, long n0, long n1, long K) {                         \
    const long bits = Q->bits, G = Q->group, groups = K / G, row_bytes = K * bits / 8;                      \
    const xl_unpack u = unpack_for(bits);                                                                   \
    for (long n = n0; n < n1; n++) {                                                                        \
      const unsigned char *w = Q->w + n * row_bytes;                                                        \
      xl_v16 acc[NB];                                                                                       \
      for (int b = 0; b < NB; b++) acc[b] = (xl_v16){0};                                                    \
      for (long g = 0; g < groups; g++) {                                                                   \
        /* rows of packed bytes are short (384 B at 4 bits and K = 768): ask for the bytes ahead */         \
        __builtin_prefetch(w + (g + 1) * G * bits / 8 + XL_ROW_PREFETCH, 0, 3);                            \
        const float s = Q->scales[n * groups + g], c = Q->biases[n * groups + g];                           \
        if (nibble_table(bits, G)) { /* the common case without the general unpacking */                   \
          const xl_v16 table = group_table(s, c);                                                           \
          for (long k = g * G; k < (g + 1) * G; k += 32) {                                                  \
            xl_v16 first, second;                                                                           \
            unpack32_4(w + k / 2, table, &first, &second);                                                  \
            for (int b = 0; b < NB; b++)                                                                    \
              acc[b] += first * xl_load(x + b * K + k) + second * xl_load(x + b * K + k + 16);              \
          }                                                                                                 \
        } else {                                                                                            \
          for (long k = g * G; k < (g + 1) * G; k += 16) {                                                  \
            const unsigned char *p = w + k * bits / 8;                                                      \
            const xl_v16 wv = (bits == 8 ? unpack16_8(p) : UNPACK(p, end - p, &u, bits)) * s + c;           \
            for (int b = 0; b < NB; b++) acc[b] += wv * xl_load(x + b * K + k);                             \
          }                                                                                                 \
        }                                                                                                   \
      }                                                                                                     \
      for (int b = 0; b < NB; b++) y[b * ldy + n] = xl_hsum(acc[b]);                                        \
    }                                                                                                       \
  }
#ifdef XL_WIDE_UNPACK
/* qdot_rows_wide##NB: the same for the widths that take the general unpacking, with unpack16_wide */
#define XL_QDOT_ROWS(NB) \
  XL_QDOT_ROWS_AS(NB, qdot_rows, XL_CLONES, unpack16) XL_QDOT_ROWS_AS(NB, qdot_rows_wide, XL_V4, unpack16_wide)
#else
#define XL_QDOT_ROWS(NB) XL_QDOT_ROWS_AS(NB, qdot_rows, XL_CLONES, unpack16)
#endif
XL_QDOT_ROWS(1)
XL_QDOT_ROWS(2)
XL_QDOT_ROWS(3)
XL_QDOT_ROWS(4)
XL_QDOT_ROWS(5)
XL_QDOT_ROWS(6)
XL_QDOT_ROWS(7)
XL_QDOT_ROWS(8)

/* y[b * ldy + n] = <W[n, :K], x[b]> for n in [n0, n1) of an [N, K] weight: the float one (W) or,
   where Q->bits != 0, the quantized one. */
static void mat_rows_n(const float *W, const xl_quant *Q, long N, const float *x, float *y, long ldy, long n0,
                       long n1, long K, long rows) {
  if (!Q->bits) {
    dot_rows_n(W, x, y, ldy, n0, n1, K, rows);
    return;
  }
  const unsigned char *end = Q->w + N * (K * Q->bits / 8);
#ifdef XL_WIDE_UNPACK
  if (Q->bits != 8 && !nibble_table(Q->bits, Q->group) && xl_wide_unpack && xl_wide_unpack_available()) {
    switch (rows) {
      case 1: qdot_rows_wide1(Q, end, x, y, ldy, n0, n1, K); break;
      case 2: qdot_rows_wide2(Q, end, x, y, ldy, n0, n1, K); break;
      case 3: qdot_rows_wide3(Q, end, x, y, ldy, n0, n1, K); break;
      case 4: qdot_rows_wide4(Q, end, x, y, ldy, n0, n1, K); break;
      case 5: qdot_rows_wide5(Q, end, x, y, ldy, n0, n1, K); break;
      case 6: qdot_rows_wide6(Q, end, x, y, ldy, n0, n1, K); break;
      case 7: qdot_rows_wide7(Q, end, x, y, ldy, n0, n1, K); break;
      default: qdot_rows_wide8(Q, end, x, y, ldy, n0, n1, K); break;
    }
    return;
  }
#endif
  switch (rows) {
    case 1: qdot_rows1(Q, end, x, y, ldy, n0, n1, K); break;
    case 2: qdot_rows2(Q, end, x, y, ldy, n0, n1, K); break;
    case 3: qdot_rows3(Q, end, x, y, ldy, n0, n1, K); break;
    case 4: qdot_rows4(Q, end, x, y, ldy, n0, n1, K); break;
    case 5: qdot_rows5(Q, end, x, y, ldy, n0, n1, K); break;
    case 6: qdot_rows6(Q, end, x, y, ldy, n0, n1, K); break;
    case 7: qdot_rows7(Q, end, x, y, ldy, n0, n1, K); break;
    default: qdot_rows8(Q, end, x, y, ldy, n0, n1, K); break;
  }
}

/* Rows [r0, r1) of a quantized [N, K] weight dequantized into out [r1 - r0, K] (prefill.c: its
   GEMM then runs on them). */
XL_CLONES static void dequantize_rows(const xl_quant *Q, long N, long r0, long r1, long K, float *out) {
  const long bits = Q->bits, G = Q->group, groups = K / G, row_bytes = K * bits / 8;
  const unsigned char *end = Q->w + N * row_bytes;
  const xl_unpack u = unpack_for(bits);
  for (long r = r0; r < r1; r++) {
    const unsigned char *w = Q->w + r * row_bytes;
    float *o = out + (r - r0) * K;
    for (long g = 0; g < groups; g++) {
      const float s = Q->scales[r * groups + g], c = Q->biases[r * groups + g];
      if (nibble_table(bits, G)) {
        const xl_v16 table = group_table(s, c);
        for (long k = g * G; k < (g + 1) * G; k += 32) {
          xl_v16 first, second;
          unpack32_4(w + k / 2, table, &first, &second);
          xl_store(o + k, first);
          xl_store(o + k + 16, second);
        }
      } else {
        for (long k = g * G; k < (g + 1) * G; k += 16) {
          const unsigned char *p = w + k * bits / 8;
          xl_store(o + k, (bits == 8 ? unpack16_8(p) : unpack16(p, end - p, &u, bits)) * s + c);
        }
      }
    }
  }
}

/* Row r of an [N, K] weight, float (W) or quantized (Q), dequantized into out [K]. */
static void weight_row(const float *W, const xl_quant *Q, long N, long r, long K, float *out) {
  if (Q->bits)
    dequantize_rows(Q, N, r, r + 1, K, out);
  else
    memcpy(out, W + r * K, (size_t)K * sizeof(float));
}

/* A barrier of the step's team, spinning (then yielding) rather than libgomp's: libgomp cuts its
   spin to 100 rounds once it manages more threads than there are CPUs, which a second team (the
   BLAS forwarder's, started from MLX's thread) makes it do for good, and each of a step's ~100
   barriers then sleeps and wakes through the kernel: the 125m step went from 17 to 20 ms. */
typedef struct {
  int arrived, sense;
  long spins; /* pauses before yielding: none where the team has more threads than CPUs */
} xl_barrier;

static xl_barrier xl_barrier_for(int threads) {
  int cpus = 1;
#ifdef _OPENMP
  cpus = omp_get_num_procs();
#endif
  /* ~0.1-0.5 ms of pause before yielding the core */
  return (xl_barrier){0, 0, threads > cpus ? 0 : 4096};
}

static inline void xl_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* All T threads wait here; ``sense``: the thread's own flag, 0 at the team's start. */
static void xl_barrier_wait(xl_barrier *b, int T, int *sense) {
  if (T <= 1) return;
  const int mine = *sense = !*sense;
  if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == T) {
    __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED); /* no one arrives again before the release */
    __atomic_store_n(&b->sense, mine, __ATOMIC_RELEASE);
    return;
  }
  for (long spin = 0; __atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != mine; spin++)
    if (spin < b->spins)
      xl_pause();
    else /* another process has the core: let it run */
      sched_yield();
}

/* This thread's share [r0, r1) of R items. */
static void share(long R, int t, int T, long *r0, long *r1) {
  *r0 = R * t / T;
  *r1 = R * (t + 1) / T;
}

/* Sums of a row in 8-wide double partial sums: vectorised (a chain of dependent float adds, ~4
   cycles each, cost a 512-token 125m prefill ~7 ms in the per-head norms alone) and no less exact
   than the sequential float sum they replace (near-constant heads make the norms ill-conditioned). */
typedef double xl_d8 __attribute__((vector_size(64)));
typedef float xl_v8 __attribute__((vector_size(32)));

static inline xl_d8 xl_load_d8(const float *p) {
  xl_v8 v;
  memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, xl_d8);
}

static inline double xl_hsum_d8(xl_d8 a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

static inline float xl_dot(const float *a, const float *b, long n) {
  xl_d8 s0 = {0};
  long j = 0;
  for (; j + 8 <= n; j += 8) s0 += xl_load_d8(a + j) * xl_load_d8(b + j);
  double s = xl_hsum_d8(s0);
  for (; j < n; j++) s += (double)a[j] * b[j];
  return (float)s;
}

static inline float xl_sum(const float *a, long n) {
  xl_d8 s0 = {0};
  long j = 0;
  for (; j + 8 <= n; j += 8) s0 += xl_load_d8(a + j);
  double s = xl_hsum_d8(s0);
  for (; j < n; j++) s += a[j];
  return (float)s;
}

/* sum of (a[j] - c)^2 */
static inline float xl_centered_squares(const float *a, float c, long n) {
  xl_d8 s0 = {0};
  long j = 0;
  for (; j + 8 <= n; j += 8) {
    const xl_d8 d = xl_load_d8(a + j) - (double)c;
    s0 += d * d;
  }
  double s = xl_hsum_d8(s0);
  for (; j < n; j++) s += ((double)a[j] - c) * ((double)a[j] - c);
  return (float)s;
}

XL_CLONES static void rms_norm(const float *x, const float *w, float eps, float *out, long E) {
  const float s = xl_dot(x, x, E);
  const float r = 1.0f / sqrtf(s / (float)E + eps);
  for (long j = 0; j < E; j++) out[j] = x[j] * r * w[j];
}

static float soft_cap(float v, int has, float cap) { return has ? cap * tanhf(v / cap) : v; }

static float log_sigmoid(float v) { return fminf(v, 0.0f) - log1pf(expf(-fabsf(v))); }

/* One head of one row (s = row * NH + head): the gates, C and n updated,
   h = C^T q / max(|n.q|, exp(-m)) + eps. */
static void head_step(const xl_model *M, const xl_block *B, long s, long head, const float *q, const float *k,
                      const float *v, float i_raw, float f_raw, float *out) {
  const long DQK = M->DQK, DV = M->DV;
  const float i_pre = soft_cap(i_raw + B->b_i[head], M->has_gate_cap, M->gate_cap);
  const float lf = log_sigmoid(soft_cap(f_raw + B->b_f[head], M->has_gate_cap, M->gate_cap));
  const float m_old = B->m ? B->m[s] : 0.0f;
  const float m_new = fmaxf(lf + m_old, i_pre);
  const float fa = expf(lf + m_old - m_new), ia = expf(i_pre - m_new);
  const float scale = 1.0f / sqrtf((float)DQK);
  const float *C = B->C ? B->C + s * DQK * DV : NULL;
  const float *n_old = B->n ? B->n + s * DQK : NULL;
  float *Cn = B->C_out + s * DQK * DV, *nn = B->n_out + s * DQK;
  for (long b = 0; b < DV; b++) out[b] = 0.0f;
  float qn = 0.0f;
  for (long a = 0; a < DQK; a++) {
    const float qa = q[a] * scale, ka = ia * k[a];
    float *row = Cn + a * DV;
    if (C) {
      const float *old = C + a * DV;
      for (long b = 0; b < DV; b++) row[b] = fa * old[b] + ka * v[b];
    } else {
      for (long b = 0; b < DV; b++) row[b] = ka * v[b];
    }
    for (long b = 0; b < DV; b++) out[b] += qa * row[b];
    nn[a] = (n_old ? fa * n_old[a] : 0.0f) + ka;
    qn += qa * nn[a];
  }
  const float den = fmaxf(fabsf(qn), expf(-m_new)) + M->step_eps;
  for (long b = 0; b < DV; b++) out[b] /= den;
  B->m_out[s] = m_new;
}

/* exp of 16 floats: Cephes' expf (round x / ln2 by the 1.5 * 2^23 trick, Cody-Waite ln2, degree-6
   polynomial, 2^n through the exponent bits; relative error ~2e-7 over the float32 range, no
   libm call, so loops of it vectorise); 0 below -87.3 (where 2^n leaves the normal range). */
static inline xl_v16 xl_exp16(xl_v16 x) {
  const xl_v16 hi = (xl_v16){0} + 88.3762626647949f, lo = (xl_v16){0} + -87.3365447505531f;
  const xl_i16 under = x < lo;
  xl_i16 over = x > hi;
  x = (xl_v16)(((xl_i16)x & ~over) | ((xl_i16)hi & over));
  x = (xl_v16)(((xl_i16)x & ~under) | ((xl_i16)lo & under));
  const xl_v16 magic = (xl_v16){0} + 12582912.0f;
  const xl_v16 n = (x * 1.44269504088896341f + magic) - magic;
  const xl_v16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  xl_v16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9)
  const xl_i16 bits = (__builtin_convertvector(n, xl_i16) + 127) << 23;
#else /* compilers without the builtin: element by element */
  xl_i16 bits;
  for (int j = 0; j < 16; j++) bits[j] = ((int)n[j] + 127) << 23;
#endif
  return (xl_v16)((xl_i16)(p * (xl_v16)bits) & ~under);
}

/* y[j] = exp(x[j]) for j < count. */
XL_CLONES static void exp_row(const float *x, float *y, long count) {
  long j = 0;
  for (; j + 16 <= count; j += 16) xl_store(y + j, xl_exp16(xl_load(x + j)));
  if (j < count) {
    float tail[16] = {0};
    memcpy(tail, x + j, (size_t)(count - j) * sizeof(float));
    const xl_v16 e = xl_exp16(xl_load(tail));
    memcpy(y + j, &e, (size_t)(count - j) * sizeof(float));
  }
}

/* x[j] <- cap * tanh(x[j] / cap) for j < count (the logits' soft cap), 16 at a time: glibc's tanhf
   took ~10 ns a value, 0.25 ms of a 125m step per row (50,304 logits over two threads). tanh|z| is
   a Taylor polynomial below 1/8 and (1 - e) / (1 + e), e = exp(-2|z|), above (where 1 - e >= 0.22
   keeps the subtraction exact to a few ulp). */
XL_CLONES static void soft_cap_row(float *x, long count, float cap) {
  long j = 0;
  for (; j + 16 <= count; j += 16) {
    const xl_v16 z = xl_load(x + j) / cap;
    const xl_i16 sign = (xl_i16)z & (int)0x80000000;
    const xl_v16 a = (xl_v16)((xl_i16)z & 0x7fffffff), a2 = a * a;
    const xl_v16 e = xl_exp16(-2.0f * a);
    const xl_v16 big = (1.0f - e) / (1.0f + e);
    const xl_v16 small = a + a * a2 * (-1.0f / 3.0f + a2 * (2.0f / 15.0f + a2 * (-17.0f / 315.0f)));
    const xl_i16 use_small = a < 0.125f;
    const xl_i16 t = ((xl_i16)small & use_small) | ((xl_i16)big & ~use_small);
    xl_store(x + j, cap * (xl_v16)(t | sign));
  }
  for (; j < count; j++) x[j] = cap * tanhf(x[j] / cap);
}

/* sigmoid(o~) * LayerNorm per head (h) * weight for one token: the mLSTM layer's output before
   out_proj (decode_step.c and prefill.c). */
XL_CLONES static void norm_gate_row(const xl_model *M, const xl_block *B, const float *h, const float *o, float *out) {
  const long NH = M->NH, DV = M->DV, HV = NH * DV;
  exp_row(o, out, HV);  /* out = exp(o) for now; sigmoid(o) = 1 - 1 / (1 + exp(o)) */
  for (long head = 0; head < NH; head++) {
    const float *x = h + head * DV;
    const float mean = xl_sum(x, DV) / (float)DV, var = xl_centered_squares(x, mean, DV);
    const float r = 1.0f / sqrtf(var / (float)DV + B->mh_eps);
    for (long b = 0; b < DV; b++) {
      const long j = head * DV + b;
      /* exp(o) overflowing to inf gives sigmoid 1, as the reference */
      out[j] = (x[b] - mean) * r * B->mh_norm[j] * (1.0f - 1.0f / (1.0f + out[j]));
    }
  }
}

/* tokens [rows] -> logits [rows, V] (soft-capped); every block's state written to its *_out
   arrays. Returns 1 for a token outside the vocabulary or a row count outside [1, XL_MAX_ROWS]. */
int xl_decode_step(const xl_model *M, const long *tokens, long rows, float *logits) {
  if (rows < 1 || rows > XL_MAX_ROWS) return 1;
  for (long r = 0; r < rows; r++)
    if (tokens[r] < 0 || tokens[r] >= M->V) return 1;
  const long E = M->E, NH = M->NH, DQK = M->DQK, DV = M->DV, F = M->F, R = rows;
  const long QK = NH * DQK, HV = NH * DV;
  float *x = M->work, *xn = x + R * E, *y = xn + R * E;
  float *q = y + R * E, *k = q + R * QK, *v = k + R * QK, *o = v + R * HV, *gi = o + R * HV, *gf = gi + R * NH;
  float *h = gf + R * NH, *g = h + R * HV, *act = g + R * HV, *up_q = act + R * F;
  for (long r = 0; r < R; r++) weight_row(M->embedding, &M->q_embedding, M->V, tokens[r], E, x + r * E);
  int threads = M->threads > 0 ? M->threads : 1;
  xl_barrier team = xl_barrier_for(threads);
#pragma omp parallel num_threads(threads)
  {
    int t = 0, T = 1, sense = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
    T = omp_get_num_threads();
#endif
    long r0, r1;
    for (long index = 0; index < M->num_blocks; index++) {
      const xl_block *B = M->blocks + index;
      if (t == 0)
        for (long r = 0; r < R; r++) rms_norm(x + r * E, B->norm_mlstm, B->norm_mlstm_eps, xn + r * E, E);
      xl_barrier_wait(&team, T, &sense);
      {
        const float *W[6] = {B->w_q, B->w_k, B->w_v, B->w_o, B->w_i, B->w_f};
        const long count[6] = {QK, QK, HV, HV, NH, NH};
        float *const out[6] = {q, k, v, o, gi, gf};
        /* each output [R, width]: row b of output s at out[s] + b * width; widths differ, so
           the segments of one width go together */
        share(2 * QK + 2 * HV + 2 * NH, t, T, &r0, &r1);
        long start = 0;
        for (int s = 0; s < 6; s++) {
          long a = r0 > start ? r0 - start : 0, b = r1 - start < count[s] ? r1 - start : count[s];
          if (a < b) mat_rows_n(W[s], &B->quant[XL_Q + s], count[s], xn, out[s], count[s], a, b, E, R);
          start += count[s];
        }
      }
      xl_barrier_wait(&team, T, &sense);
      for (long s = t; s < R * NH; s += T) {
        const long r = s / NH, head = s % NH;
        head_step(M, B, s, head, q + r * QK + head * DQK, k + r * QK + head * DQK, v + r * HV + head * DV,
                  gi[r * NH + head], gf[r * NH + head], h + r * HV + head * DV);
      }
      xl_barrier_wait(&team, T, &sense);
      if (t == 0)
        for (long r = 0; r < R; r++) norm_gate_row(M, B, h + r * HV, o + r * HV, g + r * HV);
      xl_barrier_wait(&team, T, &sense);
      share(E, t, T, &r0, &r1);
      mat_rows_n(B->w_out, &B->quant[XL_OUT], E, g, y, E, r0, r1, HV, R);
      xl_barrier_wait(&team, T, &sense);
      if (t == 0)
        for (long r = 0; r < R; r++) {
          for (long j = 0; j < E; j++) x[r * E + j] += y[r * E + j];
          rms_norm(x + r * E, B->norm_ffn, B->norm_ffn_eps, xn + r * E, E);
        }
      xl_barrier_wait(&team, T, &sense);
      share(F, t, T, &r0, &r1);
      if (B->quant[XL_GATE].bits || B->quant[XL_UP].bits) {
        /* quantized: each product over the thread's rows, then SwiGLU */
        mat_rows_n(B->w_gate, &B->quant[XL_GATE], F, xn, act, F, r0, r1, E, R);
        mat_rows_n(B->w_up, &B->quant[XL_UP], F, xn, up_q, F, r0, r1, E, R);
        for (long r = 0; r < R; r++)
          for (long j = r0; j < r1; j++) {
            const float gate = act[r * F + j];
            act[r * F + j] = gate / (1.0f + expf(-gate)) * up_q[r * F + j];
          }
      } else {
        for (long j = r0; j < r1; j++) {  /* silu(gate) * up, each pair of weight rows by one thread */
          float gate[XL_MAX_ROWS], up[XL_MAX_ROWS];
          dot_rows_n(B->w_gate + j * E, xn, gate, 1, 0, 1, E, R);
          dot_rows_n(B->w_up + j * E, xn, up, 1, 0, 1, E, R);
          for (long r = 0; r < R; r++) act[r * F + j] = gate[r] / (1.0f + expf(-gate[r])) * up[r];
        }
      }
      xl_barrier_wait(&team, T, &sense);
      share(E, t, T, &r0, &r1);
      mat_rows_n(B->w_down, &B->quant[XL_DOWN], E, act, y, E, r0, r1, F, R);
      xl_barrier_wait(&team, T, &sense);
      if (t == 0)
        for (long j = 0; j < R * E; j++) x[j] += y[j];
      xl_barrier_wait(&team, T, &sense);
    }
    if (t == 0)
      for (long r = 0; r < R; r++) {
        if (M->out_norm) rms_norm(x + r * E, M->out_norm, M->out_norm_eps, xn + r * E, E);
        else memcpy(xn + r * E, x + r * E, (size_t)E * sizeof(float));
      }
    xl_barrier_wait(&team, T, &sense);
    share(M->V, t, T, &r0, &r1);
    mat_rows_n(M->lm_head, &M->q_head, M->V, xn, logits, M->V, r0, r1, E, R);
    if (M->has_logit_cap)
      for (long r = 0; r < R; r++) soft_cap_row(logits + r * M->V + r0, r1 - r0, M->logit_cap);
  }
  return 0;
}

/* xl_decode_step with the state's memory as one buffer each way, laid out [C of every block
   (blocks, rows, NH, DQK, DV) | n (blocks, rows, NH, DQK) | m (blocks, rows, NH)]: the step writes
   the new state to ``state_out`` (the caller's output array: no copy afterwards) and reads the
   state before it from ``state_in`` (NULL: from each block's C, n and m as they are set). The
   blocks are the caller's own array (M->blocks): their pointers are set here. */
int xl_decode_step_buffers(const xl_model *M, const long *tokens, long rows, float *logits, const float *state_in,
                           float *state_out) {
  const long nb = M->num_blocks, c = rows * M->NH * M->DQK * M->DV, n = rows * M->NH * M->DQK, m = rows * M->NH;
  xl_block *blocks = (xl_block *)M->blocks;
  for (long i = 0; i < nb; i++) {
    if (state_in) {
      blocks[i].C = state_in + i * c;
      blocks[i].n = state_in + nb * c + i * n;
      blocks[i].m = state_in + nb * (c + n) + i * m;
    }
    blocks[i].C_out = state_out + i * c;
    blocks[i].n_out = state_out + nb * c + i * n;
    blocks[i].m_out = state_out + nb * (c + n) + i * m;
  }
  return xl_decode_step(M, tokens, rows, logits);
}

/* A 4-bit float format's weight (mxfp4: E8M0 scales, groups of 32; nvfp4: E4M3 scales, groups of
   16) rewritten as the affine 8-bit weight the products read (decode_step.py's _FP4AsAffine, whose
   MLX ops are the reference): each e2m1 code (byte j / 2 of a row, low nibble first) becomes the
   byte 2 v + 12 of its value v, exact on e2m1's half-step grid from -6 to 6, and each group's scale
   s the scale s / 2 and bias -6 s. One pass over the codes: MLX's ops took ~110 s for a 7B model
   on a 2-core EPYC (session 44). ``e8m0``: the scales are powers of two 2^(b - 127), else E4M3. */
static float xl_e4m3(unsigned char b) {
  const int e = (b >> 3) & 15, m = b & 7;
  const float v = e == 15 && m == 7 ? NAN : e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf((float)m, -9);
  return b & 128 ? -v : v;
}

void xl_fp4_as_affine8(const unsigned char *codes, const unsigned char *scales, long rows, long cols, long group,
                       int e8m0, int threads, unsigned char *levels, float *out_scales, float *out_biases) {
  static const unsigned char level[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};
  const long groups = cols / group;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < rows; r++) {
    const unsigned char *in = codes + r * (cols / 2);
    unsigned char *out = levels + r * cols;
    for (long j = 0; j < cols / 2; j++) {
      out[2 * j] = level[in[j] & 15];
      out[2 * j + 1] = level[in[j] >> 4];
    }
    for (long g = r * groups; g < (r + 1) * groups; g++) {
      const float s = e8m0 ? ldexpf(1.0f, (int)scales[g] - 127) : xl_e4m3(scales[g]);
      out_scales[g] = s * 0.5f;
      out_biases[g] = s * -6.0f;
    }
  }
}
