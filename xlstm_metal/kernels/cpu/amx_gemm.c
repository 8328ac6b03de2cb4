/* Float32 matrix products on AMX's bf16 tiles, for the C prefill (prefill.c), where the CPU has
   them (Intel Xeon, 4th generation and later) and Linux lets the process use them.

   Each float32 value is split exactly into three bf16 parts, x = hi + mid + lo (8 significant
   bits each, each part the nearest bf16 to what the parts before it left), and a product sums the
   six partial products of relative size 2^-16 or more (hi.hi, hi.mid, mid.hi, mid.mid, hi.lo,
   lo.hi) in the tiles' float32 accumulators. What is left out (mid.lo, lo.mid, lo.lo) is below
   2^-24 of each term, float32's unit round-off, so the result is a float32 product like
   OpenBLAS's: against a float64 reference an ad hoc 512 x 768 x 1,152 product was off by 2.0e-7
   (mean relative) here and 3.3e-7 through OpenBLAS's SGEMM. On the 2-core Xeon one core's tile
   unit did 3.4 TFLOP/s of bf16 back to back, ~2.8 with both operands in L2 and ~2.2 with A
   streamed as below, so six products come to ~370-470 GFLOP/s of float32 per core against
   OpenBLAS's ~210 (benchmarks/NOTES.md, session 30).

   Layouts. The activations A [M, K] are split once per product input into three planes [Mp, Kp]
   of bf16 in tile order (plane_at; Mp = M and Kp = K rounded up to 32, zeros in the padding), by
   rows or by column ranges (xl_amx_split). A weight W [N, K] (row-major, float or MLX's affine
   quantization) is split into panels of 32 of its rows while the product runs: a panel holds, for
   each 32-wide step of K, each plane and each half of 16 rows, one B tile in AMX's pair-interleaved
   layout (tile row r = the pairs k = 2r, 2r + 1 of the 16 weight rows). The product walks groups
   of panels that fit in L2 with 32 rows of A at a time: four 16 x 16 accumulators.

   Compiled after decode_step.c (xl_quant, dequantize_rows). Where the compiler lacks the AMX
   intrinsics this file defines xl_amx_available() as 0 and prefill.c runs OpenBLAS's GEMM. */

#include <stdlib.h>
#include <time.h>

typedef unsigned short xl_bf16;

#if defined(__x86_64__) && !defined(XL_NO_AMX) && \
    ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 12))
#define XL_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define XL_AMX_FN __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

/* Set to 0 (tests, comparisons) to keep OpenBLAS's GEMM where the tiles could run. */
int xl_amx = 1;

/* Whether this build and CPU run the products on the tiles: AMX-TILE, AMX-BF16 and AVX512-BF16
   in CPUID, and Linux's permission for the tiles' 8 KB of state (arch_prctl
   ARCH_REQ_XCOMP_PERM, asked once for the whole process). */
int xl_amx_available(void) {
#ifdef XL_AMX
  static int state = -1;
  if (state < 0) {
    unsigned a, b, c, d;
    int ok = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1);
    ok = ok && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1);
    ok = ok && __builtin_cpu_supports("avx512bw");
    ok = ok && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    state = ok;
  }
  return state;
#else
  return 0;
#endif
}

static inline long xl_round32(long n) { return (n + 31) / 32 * 32; }

/* The longest stretch of K one pass takes (a multiple of 32): wider inputs go through in
   stretches, the accumulators stored and loaded between them, so that a group of packed weight
   rows stays wide (fewer passes over A). */
#ifndef XL_AMX_KC
#define XL_AMX_KC 768
#endif
static long amx_stretch(long Kp) { return Kp < XL_AMX_KC ? Kp : XL_AMX_KC; }

/* Whether an input of width K goes through the products in one stretch. */
static int amx_one_stretch(long K) { return xl_round32(K) <= XL_AMX_KC; }

/* Weight rows packed per group: the group's planes (a stretch of K wide) in about 1 MB, which L2
   holds beside A's 32 rows. */
static long amx_group_rows(long Kc) {
  const long rows = (1L << 20) / (6 * Kc) / 32 * 32;
  return rows < 32 ? 32 : rows;
}

/* Bytes of scratch one thread's products take for inputs of width up to K: the packed group and
   32 dequantized rows of a quantized weight. */
long xl_amx_scratch_bytes(long K) {
  const long Kp = xl_round32(K), Kc = amx_stretch(Kp), group = amx_group_rows(Kc) * Kc * 3 * (long)sizeof(xl_bf16);
  /* at least 1 MB: a narrower input's group fits then too */
  return (group > (1L << 20) ? group : 1L << 20) + 32 * Kp * (long)sizeof(float) + 64;
}

#ifdef XL_AMX
typedef struct {
  unsigned char palette, start_row, reserved[14];
  unsigned short colsb[16];
  unsigned char rows[16];
} __attribute__((packed)) xl_tile_config;

XL_AMX_FN static void amx_begin(void) {
  xl_tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) { /* every tile 16 rows of 64 bytes */
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

XL_AMX_FN static inline __m512 bf16_floats(__m256bh v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)v), 16));
}

/* x[0:count] (count <= 16; zeros after) -> hi, mid, lo at p, p + plane, p + 2 * plane (16 each). */
XL_AMX_FN static inline void split16(const float *x, long count, xl_bf16 *p, long plane) {
  const __mmask16 keep = count >= 16 ? (__mmask16)0xFFFF : count <= 0 ? 0 : (__mmask16)((1u << count) - 1);
  const __m512 v = _mm512_maskz_loadu_ps(keep, x);
  const __m256bh hi = _mm512_cvtneps_pbh(v);
  const __m512 rest = _mm512_sub_ps(v, bf16_floats(hi));
  const __m256bh mid = _mm512_cvtneps_pbh(rest);
  const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(rest, bf16_floats(mid)));
  _mm256_storeu_si256((__m256i *)p, (__m256i)hi);
  _mm256_storeu_si256((__m256i *)(p + plane), (__m256i)mid);
  _mm256_storeu_si256((__m256i *)(p + 2 * plane), (__m256i)lo);
}

/* Where A's value (r, c) sits in a plane: the plane in A tiles, each 16 rows x 32 columns (1 KB)
   contiguous, a row's 16 tiles after each other (so a tile load reads 1 KB in a row, which the
   hardware prefetcher follows, not 16 lines Kp * 2 bytes apart). */
static inline long plane_at(long r, long c, long Kp) { return r / 16 * 16 * Kp + c / 32 * 512 + r % 16 * 32 + c % 32; }

/* Columns [c0, c1) of rows [r0, r1) of A (row stride lda, K columns) into the planes (plane_at,
   plane stride Mp * Kp); c1 == K also writes the zero columns to Kp. c0 a multiple of 16. */
XL_AMX_FN static void split_block(const float *A, long lda, long r0, long r1, long c0, long c1, long K, long Mp,
                                  xl_bf16 *planes) {
  const long Kp = xl_round32(K), end = c1 == K ? Kp : c1;
  for (long r = r0; r < r1; r++)
    for (long c = c0; c < end; c += 16) split16(A + r * lda + c, c1 - c, planes + plane_at(r, c, Kp), Mp * Kp);
}

/* Rows [r0, r1) x columns [c0, c1) (c0 a multiple of 16) of the three planes (Mp x Kp each): zeros,
   the padding that split_block's rows and columns leave. */
static void zero_planes(xl_bf16 *planes, long r0, long r1, long c0, long c1, long Mp, long Kp) {
  for (long p = 0; p < 3; p++)
    for (long r = r0; r < r1; r++)
      for (long c = c0; c < c1; c += 16) memset(planes + p * Mp * Kp + plane_at(r, c, Kp), 0, 16 * sizeof(xl_bf16));
}

/* 16 rows of 16 dwords transposed in place (out[r] dword n = in[n] dword r). */
XL_AMX_FN static inline void transpose16(__m512i v[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) { /* lane j of u[i + q]: dword 4j + q of rows i .. i + 3 */
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int q = 0; q < 4; q++) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0x88), x1 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0xDD),
                  y0 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0x88),
                  y1 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0xDD);
    v[q] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    v[4 + q] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    v[8 + q] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    v[12 + q] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

/* Panel of up to 32 weight rows (float rows W with stride ldw, ``count`` of them, ``valid``
   columns of them; zeros after) -> out: for each of ``steps`` 32-wide steps s of K, plane p and
   half h, the B tile at out + ((s * 3 + p) * 2 + h) * 512, whose row r holds the pairs
   (k = 32 s + 2r, 32 s + 2r + 1) of weight rows 16 h .. 16 h + 15: each row's 32 values split into
   its planes' 16 pairs, then each plane's 16 x 16 pairs transposed. */
XL_AMX_FN static void pack_panel(const float *W, long ldw, long count, long valid, long steps, xl_bf16 *out) {
  xl_bf16 parts[3 * 16 * 32] __attribute__((aligned(64))); /* [plane][row][32] */
  for (long h = 0; h < 2; h++)
    for (long s = 0; s < steps; s++) {
      const long k = 32 * s;
      for (long n = 0; n < 16; n++) {
        const long row = 16 * h + n, left = row < count ? valid - k : 0;
        split16(W + row * ldw + k, left, parts + n * 32, 16 * 32);
        split16(W + row * ldw + k + 16, left - 16, parts + n * 32 + 16, 16 * 32);
      }
      for (long p = 0; p < 3; p++) {
        __m512i v[16];
        for (int n = 0; n < 16; n++) v[n] = _mm512_load_si512((const void *)(parts + (p * 16 + n) * 32));
        transpose16(v);
        xl_bf16 *tile = out + ((s * 3 + p) * 2 + h) * 512;
        for (int r = 0; r < 16; r++) _mm512_store_si512((void *)(tile + r * 32), v[r]);
      }
    }
}

/* C[0:32, 0:32] (row stride ldc) = (accumulate ? C : 0) + 32 rows of A's planes (plane_at from
   A, plane stride PS; ``steps`` 32-wide steps of K) times a packed panel: accumulators 0-3 (rows
   0-15 / 16-31 x columns 0-15 / 16-31), A in tiles 4-5, B in 6-7. Per 32-wide step: A's hi with
   B's lo, mid, hi; A's lo, then mid, with B's hi (still loaded); A's mid with B's mid: 8 B loads
   and 6 A loads for 24 tile products. */
XL_AMX_FN static void block32(const xl_bf16 *A, long Kp, long PS, long steps, const xl_bf16 *B, float *C, long ldc,
                               int accumulate) {
  const long sa = 64, rows16 = 16 * Kp, sc = ldc * (long)sizeof(float);
  if (accumulate) {
    _tile_loadd(0, C, sc);
    _tile_loadd(1, C + 16, sc);
    _tile_loadd(2, C + 16 * ldc, sc);
    _tile_loadd(3, C + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (long s = 0; s < steps; s++) {
    const xl_bf16 *a = A + 512 * s, *b = B + s * 3 * 2 * 512;
#define XL_FOUR()          \
  _tile_dpbf16ps(0, 4, 6); \
  _tile_dpbf16ps(1, 4, 7); \
  _tile_dpbf16ps(2, 5, 6); \
  _tile_dpbf16ps(3, 5, 7)
    _tile_loadd(4, a, sa);
    _tile_loadd(5, a + rows16, sa);
    _tile_loadd(6, b + 4 * 512, 64); /* lo */
    _tile_loadd(7, b + 5 * 512, 64);
    XL_FOUR();
    _tile_loadd(6, b + 2 * 512, 64); /* mid */
    _tile_loadd(7, b + 3 * 512, 64);
    XL_FOUR();
    _tile_loadd(6, b, 64); /* hi */
    _tile_loadd(7, b + 512, 64);
    XL_FOUR();
    _tile_loadd(4, a + 2 * PS, sa); /* A's lo with B's hi */
    _tile_loadd(5, a + 2 * PS + rows16, sa);
    XL_FOUR();
    _tile_loadd(4, a + PS, sa); /* A's mid with B's hi, then mid */
    _tile_loadd(5, a + PS + rows16, sa);
    XL_FOUR();
    _tile_loadd(6, b + 2 * 512, 64);
    _tile_loadd(7, b + 3 * 512, 64);
    XL_FOUR();
#undef XL_FOUR
  }
  _tile_stored(0, C, sc);
  _tile_stored(1, C + 16, sc);
  _tile_stored(2, C + 16 * ldc, sc);
  _tile_stored(3, C + 16 * ldc + 16, sc);
}

/* Weight rows [p0, p0 + count) of W (float or quantized, N rows of K) packed as a panel: the
   ``steps`` 32-wide steps of K from k0, ``valid`` columns of them. ``rows``: 32 x K floats for a
   quantized W (dequantized whole). */
XL_AMX_FN static void pack_rows(const float *W, const xl_quant *Q, long N, long p0, long count, long K, long k0,
                                long valid, long steps, float *rows, xl_bf16 *out) {
  if (Q->bits) {
    dequantize_rows(Q, N, p0, p0 + count, K, rows);
    pack_panel(rows + k0, K, count, valid, steps, out);
  } else {
    pack_panel(W + p0 * K + k0, K, count, valid, steps, out);
  }
}

/* C[0:M, n0:n1] (row stride ldc) = A @ W[n0:n1]^T, A as planes (split_block; Mp = M rounded up
   to 32), W [N, K] float or (Q->bits) quantized. scratch: xl_amx_scratch_bytes(K) bytes. Stretches
   of K one after another; in each, groups of weight rows packed, then every 32 rows of A times
   each 32-row panel of the group (A's 32 rows stay in L1 and L2 across the group's panels). A
   quantized weight's rows are dequantized again for each stretch (one stretch up to K = 768). */
XL_AMX_FN static void amx_product(long M, long n0, long n1, long K, const xl_bf16 *planes, const float *W,
                                  const xl_quant *Q, long N, float *C, long ldc, void *scratch) {
  if (n1 <= n0 || M <= 0) return;
  const long Kp = xl_round32(K), Mp = xl_round32(M), PS = Mp * Kp, Kc = amx_stretch(Kp), group = amx_group_rows(Kc);
  xl_bf16 *packed = (xl_bf16 *)(((unsigned long)scratch + 63) & ~63UL);
  float *rows = (float *)(packed + group * Kc * 3), edge[32 * 32];
  amx_begin();
  for (long k0 = 0; k0 < Kp; k0 += Kc) {
    const long k1 = Kp - k0 < Kc ? Kp : k0 + Kc, steps = (k1 - k0) / 32, valid = (K < k1 ? K : k1) - k0;
    const long panel = 32 * (k1 - k0) * 3;
    const int more = k0 > 0; /* the accumulators start from C's partial sums */
    for (long g0 = n0; g0 < n1; g0 += group) {
      const long g1 = n1 - g0 < group ? n1 : g0 + group;
      for (long p0 = g0; p0 < g1; p0 += 32) {
        const long count = g1 - p0 < 32 ? g1 - p0 : 32;
        pack_rows(W, Q, N, p0, count, K, k0, valid, steps, rows, packed + (p0 - g0) / 32 * panel);
      }
      for (long i0 = 0; i0 < M; i0 += 32)
        for (long p0 = g0; p0 < g1; p0 += 32) {
          const long count = g1 - p0 < 32 ? g1 - p0 : 32, height = M - i0 < 32 ? M - i0 : 32;
          const xl_bf16 *A = planes + plane_at(i0, k0, Kp), *B = packed + (p0 - g0) / 32 * panel;
          float *at = C + i0 * ldc + p0;
          if (count == 32 && height == 32) {
            block32(A, Kp, PS, steps, B, at, ldc, more);
          } else { /* the edges through a full block of scratch */
            if (more)
              for (long r = 0; r < height; r++) memcpy(edge + r * 32, at + r * ldc, (size_t)count * sizeof(float));
            block32(A, Kp, PS, steps, B, edge, 32, more);
            for (long r = 0; r < height; r++) memcpy(at + r * ldc, edge + r * 32, (size_t)count * sizeof(float));
          }
        }
    }
  }
  _tile_release();
}
#endif

/* Rows [r0, r1) x columns [c0, c1) of A [M, K] (row stride lda; c0 a multiple of 16) split into
   the planes; c1 == K also writes the padding columns to Kp, and r1 == M (the share that ends at
   M, or every row) the padding rows' places to Mp in those columns: zeros. */
static void xl_amx_split(const float *A, long lda, long r0, long r1, long c0, long c1, long M, long K,
                         xl_bf16 *planes) {
#ifdef XL_AMX
  if (c1 <= c0) return;
  const long Kp = xl_round32(K), Mp = xl_round32(M), end = c1 == K ? Kp : c1;
  split_block(A, lda, r0, r1, c0, c1, K, Mp, planes);
  if (r1 == M) zero_planes(planes, M, Mp, c0, end, Mp, Kp);
#else
  (void)A, (void)lda, (void)r0, (void)r1, (void)c0, (void)c1, (void)M, (void)K, (void)planes;
#endif
}

/* Measurements for benchmarks/cpu_limits.py (not on any model's path). */
#ifdef XL_AMX
XL_AMX_FN static double amx_peak_one(long reps) {
  static const xl_bf16 ones[16 * 32] __attribute__((aligned(64))) = {0};
  amx_begin();
  _tile_zero(0); /* tile numbers are literals in the instructions */
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long r = 0; r < reps; r++) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  _tile_release();
  const double seconds = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
  return 4.0 * (double)reps * 16 * 16 * 32 * 2 / seconds / 1e9;
}
#endif

/* The tiles' bf16 GFLOP/s on ``threads`` threads at once: back-to-back tile products on four
   accumulators from tiles already loaded (the float32 products' ceiling is a sixth of it); 0 where
   the tiles do not run. */
double xl_amx_peak_gflops(int threads, long reps) {
  double total = 0.0;
#ifdef XL_AMX
  if (!xl_amx_available()) return 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  total += amx_peak_one(reps);
#else
  (void)threads, (void)reps;
#endif
  return total;
}

/* C [M, N] = A [M, K] @ W [N, K]^T in float32 on the tiles, the columns split over ``threads``
   threads as the prefill splits them: the products' own rate, beside OpenBLAS's GEMM. Returns 0,
   1 where the tiles do not run, 2 where memory runs out. */
int xl_amx_sgemm(long M, long N, long K, const float *A, const float *W, float *C, int threads) {
#ifdef XL_AMX
  if (!xl_amx_available() || M < 1 || N < 1 || K < 1) return 1;
  const size_t plane_bytes = (size_t)(3 * xl_round32(M) * xl_round32(K)) * sizeof(xl_bf16) + 64;
  const size_t scratch_bytes = (size_t)xl_amx_scratch_bytes(K);
  char *memory = malloc(plane_bytes + (size_t)threads * scratch_bytes);
  if (!memory) return 2;
  xl_bf16 *planes = (xl_bf16 *)(((unsigned long)memory + 63) & ~63UL);
  const xl_quant none = {0};
#pragma omp parallel num_threads(threads)
  {
    int t = 0, T = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    T = omp_get_num_threads();
#endif
    const long r0 = M * t / T, r1 = M * (t + 1) / T;
    xl_amx_split(A, K, r0, r1, 0, K, M, K, planes);
#pragma omp barrier
    const long n0 = N * t / T / 16 * 16, n1 = t == T - 1 ? N : N * (t + 1) / T / 16 * 16;
    amx_product(M, n0, n1, K, planes, W, &none, N, C, N, memory + plane_bytes + (size_t)t * scratch_bytes);
  }
  free(memory);
  return 0;
#else
  (void)M, (void)N, (void)K, (void)A, (void)W, (void)C, (void)threads;
  return 1;
#endif
}
