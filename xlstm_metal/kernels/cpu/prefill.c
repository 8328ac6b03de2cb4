/* A prompt through an xLSTM-Large model (float32) as one call, for CPUs: the blocks, the state
   after the prompt and the logits of each row's last position.

   The reference is xLSTMLarge.prefill's MLX graph with the chunkwise kernel. On a CPU, MLX runs
   every operation between the matrix products on one thread, while OpenBLAS's second thread
   spins: ~27% of a 512-token 125m prefill's wall time (benchmarks/NOTES.md, sessions 24 and 27).
   Here one OpenMP region does it all: each thread runs OpenBLAS's GEMM (one thread each, set by
   the caller) on its share of every product's output columns, and its share of the rows,
   heads and columns of the work between them. The kernel is the reference chunkwise form (the
   parallel form inside chunks of L steps from the state entering each chunk; the state carried
   from chunk to chunk with the same stabiliser m), its small products through the same GEMM.
   Exponentials of whole rows use decode_step.c's vectorised polynomial (xl_exp16, exp_row).

   Where the CPU has AMX (amx_gemm.c), the block's products run on its bf16 tiles instead, each
   float32 value split into three bf16 parts (a float32 product still; ~1.5x OpenBLAS's speed on
   the 2-core Xeon): each product input is split into planes as the threads write it (xn after each
   norm, the gated norm, SwiGLU's output), in two buffers taken in turn so that no thread writes
   planes another still reads. The FFN's gate and up products, SwiGLU and the split of its output
   run as one pass over 32 x 32 blocks (amx_swiglu: +4-5% on a 512-token 125m prefill).

   Compiled after decode_step.c (its xl_model / xl_block / xl_quant, rms_norm, soft_cap, log_sigmoid,
   dot_rows_n, mat_rows_n, dequantize_rows, weight_row, exp_row, norm_gate_row) and amx_gemm.c.
   Layouts: tokens [B, S] row-major; the state as in decode_step.c; logits [B, V].
   Python (prefill.py) checks the model and falls back to the MLX graph where anything differs. */

typedef void (*xl_sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                            float *, int);
enum { XL_ROW_MAJOR = 101, XL_NO_TRANS = 111, XL_TRANS = 112 };

/* gate[j] <- silu(gate[j]) * up[j] for j < count (the FFN's SwiGLU), inlined where it is called
   (swiglu_row's clones, amx_swiglu's blocks) so both compile the same arithmetic. */
static inline __attribute__((always_inline)) void swiglu_span(float *gate, const float *up, long count) {
  long j = 0;
  for (; j + 16 <= count; j += 16) {
    const xl_v16 g = xl_load(gate + j);
    xl_store(gate + j, g / (1.0f + xl_exp16(-g)) * xl_load(up + j));
  }
  for (; j < count; j++) gate[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
}

XL_CLONES static void swiglu_row(float *gate, const float *up, long count) { swiglu_span(gate, up, count); }

#ifdef XL_AMX
/* The FFN's gate and up products and SwiGLU in one pass, for columns [n0, n1) of its F outputs:
   silu(A Wg^T) * (A Wu^T) split straight into the down product's planes ``out`` (plane_at over
   round32(M) x round32(F); zeros in the padding), where apart the two products' outputs went to
   memory and were read back twice, by SwiGLU and by the split (4-5% of a 512-token 125m prefill).
   Each 32 x 32 block of both products is taken from the tiles while in L1; the arithmetic is
   amx_product's, swiglu_row's and xl_amx_split's (amx_gemm.c's tiles, packing and splits), so the
   planes are the same bits. A within one stretch (amx_one_stretch(K)); scratch:
   xl_amx_scratch_bytes(K), the two weights' panels taking half of the group each. */
XL_AMX_FN static void amx_swiglu(long M, long n0, long n1, long K, const xl_bf16 *planes, const float *Wg,
                                 const xl_quant *Qg, const float *Wu, const xl_quant *Qu, long F, xl_bf16 *out,
                                 void *scratch) {
  if (n1 <= n0 || M <= 0) return;
  const long Kp = xl_round32(K), Mp = xl_round32(M), PS = Mp * Kp, steps = Kp / 32, Fp = xl_round32(F),
             OS = Mp * Fp, panel = 32 * Kp * 3;
  long half = amx_group_rows(Kp) / 2 / 32 * 32;
  if (half < 32) half = 32;
  xl_bf16 *gates = (xl_bf16 *)(((unsigned long)scratch + 63) & ~63UL), *ups = gates + half * Kp * 3;
  float *rows = (float *)(ups + half * Kp * 3);
  float eg[32 * 32] __attribute__((aligned(64))), eu[32 * 32] __attribute__((aligned(64)));
  amx_begin();
  for (long g0 = n0; g0 < n1; g0 += half) {
    const long g1 = n1 - g0 < half ? n1 : g0 + half;
    for (long p0 = g0; p0 < g1; p0 += 32) {
      const long count = g1 - p0 < 32 ? g1 - p0 : 32;
      pack_rows(Wg, Qg, F, p0, count, K, 0, K, steps, rows, gates + (p0 - g0) / 32 * panel);
      pack_rows(Wu, Qu, F, p0, count, K, 0, K, steps, rows, ups + (p0 - g0) / 32 * panel);
    }
    for (long i0 = 0; i0 < M; i0 += 32)
      for (long p0 = g0; p0 < g1; p0 += 32) {
        const xl_bf16 *A = planes + plane_at(i0, 0, Kp);
        block32(A, Kp, PS, steps, gates + (p0 - g0) / 32 * panel, eg, 32, 0);
        block32(A, Kp, PS, steps, ups + (p0 - g0) / 32 * panel, eu, 32, 0);
        const long height = M - i0 < 32 ? M - i0 : 32, count = g1 - p0 < 32 ? g1 - p0 : 32;
        for (long r = 0; r < height; r++) {
          float *g = eg + r * 32;
          const float *u = eu + r * 32;
          /* a block narrower than 32 ends the share, so its 16-wide steps are those over [n0, n1) */
          swiglu_span(g, u, count);
          for (long c = 0; c < count; c += 16) split16(g + c, count - c, out + plane_at(i0 + r, p0 + c, Fp), OS);
        }
      }
  }
  _tile_release();
  /* the padding, as xl_amx_split writes it: rows M..Mp of these columns, and columns F..Fp */
  zero_planes(out, M, Mp, n0, n1 == F ? Fp : n1, Mp, Fp);
  if (n1 == F) zero_planes(out, 0, M, (F + 15) / 16 * 16, Fp, Mp, Fp);
}
#endif

/* Set to 0 (tests, comparisons) to run the FFN's gate and up products, SwiGLU and the split into
   planes one after another where amx_swiglu would do them in one pass; the passes'
   count of column shares through it (tests: that it ran). */
int xl_amx_swiglu = 1;
long xl_amx_swiglu_passes = 0;

/* Whether amx_swiglu can run here (decode_step.py's library_switch asks): where the tiles do. */
int xl_amx_swiglu_available(void) { return xl_amx_available(); }

/* Rows of a quantized weight dequantized at a time into a thread's tile, for the GEMM. The GEMM packs
   the activations again for each tile: with 256 rows one ad hoc 512-token prefill of the packaged
   model ran ~15% slower than float32. */
#define XL_TILE_ROWS 1024

/* A product's scratch: a quantized weight's tile for the GEMM, the AMX products' own, and A split
   into planes (amx_gemm.c; NULL where the tiles do not run this product). */
typedef struct {
  float *tile;
  void *amx;
  const xl_bf16 *planes;
} xl_scratch;

/* C[:, n0:n1] = A [rows, K] @ W[n0:n1]^T (W [N, K] row-major, float or, where Q->bits != 0, quantized;
   C's row stride ldc): the row kernel for up to XL_MAX_ROWS rows (OpenBLAS's GEMM would pack the
   weight first), the AMX tiles where A's planes are given, the GEMM otherwise (a quantized weight
   XL_TILE_ROWS rows at a time through ``tile``, dequantized there: the GEMM's arithmetic on the
   values MLX's quantized matmul uses). */
static void product_cols(xl_sgemm_fn sgemm, long rows, long n0, long n1, long K, const float *A, const float *W,
                         const xl_quant *Q, long N, float *C, long ldc, const xl_scratch *X) {
  float *tile = X->tile;
  if (n1 <= n0 || rows <= 0) return;
  if (rows <= XL_MAX_ROWS) {
    mat_rows_n(W, Q, N, A, C, ldc, n0, n1, K, rows);
#ifdef XL_AMX
  } else if (X->planes) {
    amx_product(rows, n0, n1, K, X->planes, W, Q, N, C, ldc, X->amx);
#endif
  } else if (!Q->bits) {
    sgemm(XL_ROW_MAJOR, XL_NO_TRANS, XL_TRANS, (int)rows, (int)(n1 - n0), (int)K, 1.0f, A, (int)K, W + n0 * K,
          (int)K, 0.0f, C + n0, (int)ldc);
  } else {
    for (long c0 = n0; c0 < n1; c0 += XL_TILE_ROWS) {
      const long c1 = n1 - c0 < XL_TILE_ROWS ? n1 : c0 + XL_TILE_ROWS;
      dequantize_rows(Q, N, c0, c1, K, tile);
      sgemm(XL_ROW_MAJOR, XL_NO_TRANS, XL_TRANS, (int)rows, (int)(c1 - c0), (int)K, 1.0f, A, (int)K, tile, (int)K,
            0.0f, C + c0, (int)ldc);
    }
  }
}

/* This thread's share [n0, n1) of N output columns (multiples of 16 but for the last). */
static void column_share(long N, int t, int T, long *n0, long *n1) {
  *n0 = N * t / T / 16 * 16;
  *n1 = t == T - 1 ? N : N * (t + 1) / T / 16 * 16;
}

/* product_cols over this thread's share of the N columns. */
static void product_share(xl_sgemm_fn sgemm, int t, int T, long rows, long N, long K, const float *A,
                          const float *W, const xl_quant *Q, float *C, long ldc, const xl_scratch *X) {
  long n0, n1;
  column_share(N, t, T, &n0, &n1);
  product_cols(sgemm, rows, n0, n1, K, A, W, Q, N, C, ldc, X);
}

/* Per-thread scratch (floats): the kernel's for chunks of L steps, and a tile of a quantized weight
   (none for a float model). */
static long kernel_scratch(const xl_model *M, long L) { return L * L + L * M->DV + L * M->DQK + 6 * (L + 16); }

/* The widest product input: E, NH*DV or F. */
static long widest_input(const xl_model *M) {
  long widest = M->E > M->NH * M->DV ? M->E : M->NH * M->DV;
  return widest > M->F ? widest : M->F;
}

static long tile_floats(const xl_model *M) {
  int quantized = M->q_embedding.bits || M->q_head.bits;
  for (long b = 0; b < M->num_blocks; b++)
    for (int w = 0; w < XL_WEIGHTS; w++) quantized |= M->blocks[b].quant[w].bits != 0;
  return quantized ? XL_TILE_ROWS * widest_input(M) : 0;
}

/* Whether a prefill of ``tokens`` tokens runs its products on the AMX tiles. */
static int amx_runs(long tokens) { return xl_amx && tokens > XL_MAX_ROWS && xl_amx_available(); }

/* Per-thread floats of the AMX products' scratch, and of the two plane buffers (none where they
   do not run): the first for inputs of width E, the second for NH*DV and F. */
static long amx_scratch_floats(const xl_model *M, long tokens) {
  return amx_runs(tokens) ? xl_amx_scratch_bytes(widest_input(M)) / 4 + 16 : 0;
}
static long planes_floats(long tokens, long K) { return 3 * xl_round32(tokens) * xl_round32(K) / 2 + 16; }

long xl_prefill_work_floats(const xl_model *M, long tokens, long L, int threads) {
  const long P = 2 * M->NH * M->DQK + 2 * M->NH * M->DV + 2 * M->NH, HV = M->NH * M->DV;
  const long planes = amx_runs(tokens) ? planes_floats(tokens, M->E) + planes_floats(tokens, HV > M->F ? HV : M->F) : 0;
  /* x, xn, y [E]; the projections [P]; h, the gated norm [NH*DV]; gate, up [F] per token */
  return tokens * (3 * M->E + P + 2 * HV + 2 * M->F) + planes +
         (long)threads * (kernel_scratch(M, L) + tile_floats(M) + amx_scratch_floats(M, tokens));
}

/* The chunkwise kernel for one head of one row (s = row * NH + head) over the row's S tokens:
   q, k, v, the soft-capped i~ and logsigmoid(f~) are columns of proj [S, P] (the row's); h
   [S, HV] gets the head's outputs in its columns; the state goes from B->C, n, m (NULL: zero) to
   B->C_out, n_out, m_out (which may be the same memory). ``last_only`` (the last block, where
   nothing reads h elsewhere): h only at position S - 1, and q only read there; the state as
   always. */
XL_CLONES static void head_prefill(const xl_model *M, const xl_block *B, xl_sgemm_fn sgemm, const float *proj, long P,
                                   long S, long L, long s, long head, int last_only, float *h, float *scratch) {
  const long NH = M->NH, DQK = M->DQK, DV = M->DV, QK = NH * DQK, HV = NH * DV;
  const float scale = 1.0f / sqrtf((float)DQK), eps = M->step_eps;
  /* w and arg take L + 1 entries (the state's decay after the chunk's weights) */
  float *Sm = scratch, *Tb = Sm + L * L, *Kw = Tb + L * DV, *bc = Kw + L * DQK, *u = bc + L + 16, *mc = u + L + 16,
        *den = mc + L + 16, *w = den + L + 16, *arg = w + L + 16;
  float *C = B->C_out + s * DQK * DV, *n = B->n_out + s * DQK;
  int live = B->C != NULL; /* C and n may be non-zero */
  float m = B->m ? B->m[s] : 0.0f;
  if (live) {
    memmove(C, B->C + s * DQK * DV, (size_t)(DQK * DV) * sizeof(float));
    memmove(n, B->n + s * DQK, (size_t)DQK * sizeof(float));
  }
  const long iq = head * DQK, ik = QK + head * DQK, iv = 2 * QK + head * DV, ii = 2 * QK + 2 * HV + head,
             i_f = ii + NH;
  for (long c0 = 0; c0 < S; c0 += L) {
    const long Lc = S - c0 < L ? S - c0 : L;
    const float *rows = proj + c0 * P, *Q = rows + iq, *K = rows + ik, *V = rows + iv;
    float *H = h + c0 * HV + head * DV;
    /* b = cumsum of logsigmoid(f~); u = i~ - b; m_comb[t] = b[t] + max(m, max_{s<=t} u[s]) */
    float run = -INFINITY, acc = 0.0f;
    for (long t = 0; t < Lc; t++) {
      acc += rows[t * P + i_f];
      bc[t] = acc;
      u[t] = rows[t * P + ii] - acc;
      run = fmaxf(run, u[t]);
      mc[t] = acc + fmaxf(m, run);
    }
    /* the outputs of positions t0..Lc-1 (rows t of Sm, Tb, H and entries t of den, arg, w): all
       of them, or in the last block only the row's last, so only in its final chunk, from the
       state entering that chunk */
    if (!last_only || c0 + Lc == S) {
      const long t0 = last_only ? Lc - 1 : 0, R = Lc - t0;
      /* intra-chunk: scores[t, s] = q_t.k_s / sqrt(DQK) * exp(b_t - b_s + i~_s - m_comb[t]), s <= t */
      sgemm(XL_ROW_MAJOR, XL_NO_TRANS, XL_TRANS, (int)R, (int)Lc, (int)DQK, scale, Q + t0 * P, (int)P, K, (int)P,
            0.0f, Sm + t0 * L, (int)L);
      for (long t = t0; t < Lc; t++) {
        float *row = Sm + t * L;
        const float base = bc[t] - mc[t];
        for (long j = 0; j <= t; j++) arg[j] = base + u[j];
        exp_row(arg, w, t + 1);
        for (long j = 0; j <= t; j++) row[j] *= w[j];
        for (long j = t + 1; j < Lc; j++) row[j] = 0.0f;
        den[t] = xl_sum(row, t + 1);
      }
      sgemm(XL_ROW_MAJOR, XL_NO_TRANS, XL_NO_TRANS, (int)R, (int)DV, (int)Lc, 1.0f, Sm + t0 * L, (int)L, V, (int)P,
            0.0f, H + t0 * HV, (int)HV);
      /* from the entering state: q_t C exp(b_t + m - m_comb[t]) and q_t.n likewise */
      if (live) {
        sgemm(XL_ROW_MAJOR, XL_NO_TRANS, XL_NO_TRANS, (int)R, (int)DV, (int)DQK, scale, Q + t0 * P, (int)P, C,
              (int)DV, 0.0f, Tb + t0 * DV, (int)DV);
        for (long t = t0; t < Lc; t++) arg[t] = bc[t] + m - mc[t];
        exp_row(arg + t0, w + t0, R);
        for (long t = t0; t < Lc; t++) {
          den[t] += w[t] * scale * xl_dot(Q + t * P, n, DQK);
          float *out = H + t * HV;
          const float *tb = Tb + t * DV;
          for (long b = 0; b < DV; b++) out[b] += w[t] * tb[b];
        }
      }
      for (long t = t0; t < Lc; t++) arg[t] = -mc[t];
      exp_row(arg + t0, w + t0, R);
      for (long t = t0; t < Lc; t++) {
        const float d = 1.0f / (fmaxf(fabsf(den[t]), w[t]) + eps);
        float *out = H + t * HV;
        for (long b = 0; b < DV; b++) out[b] *= d;
      }
    }
    /* the state after the chunk: a_s = g - b_s + i~_s, m' = max(g + m, max a), C' = exp(g + m - m') C
       + sum_s exp(a_s - m') k_s v_s^T, n' likewise */
    const float g = bc[Lc - 1];
    float a_max = -INFINITY;
    for (long t = 0; t < Lc; t++) a_max = fmaxf(a_max, g + u[t]);
    const float m_next = fmaxf(g + m, a_max);
    for (long t = 0; t < Lc; t++) arg[t] = g + u[t] - m_next;
    arg[Lc] = g + m - m_next;
    exp_row(arg, w, Lc + 1);
    const float decay = live ? w[Lc] : 0.0f;
    if (!live) memset(C, 0, (size_t)(DQK * DV) * sizeof(float)); /* C_out's memory held anything */
    for (long a = 0; a < DQK; a++) n[a] = live ? decay * n[a] : 0.0f;
    for (long t = 0; t < Lc; t++) {
      const float *k = K + t * P;
      float *kw = Kw + t * DQK;
      for (long a = 0; a < DQK; a++) {
        kw[a] = k[a] * w[t];
        n[a] += kw[a];
      }
    }
    sgemm(XL_ROW_MAJOR, XL_TRANS, XL_NO_TRANS, (int)DQK, (int)DV, (int)Lc, 1.0f, Kw, (int)DQK, V, (int)P, decay, C,
          (int)DV);
    m = m_next;
    live = 1;
  }
  B->m_out[s] = m; /* S >= 1 (xl_prefill checks): the loop wrote C and n */
}

/* tokens [rows, S] -> logits of each row's last position [rows, V] (soft-capped); every block's
   state after the prompt in its *_out arrays (which may be its input state's memory). ``work``:
   xl_prefill_work_floats(M, rows * S, L, M->threads) floats; ``sgemm``: OpenBLAS's cblas_sgemm,
   set to one thread by the caller. Returns 1 for a token outside the vocabulary, 2 for bad sizes. */
int xl_prefill(const xl_model *M, const long *tokens, long rows, long S, long L, void *sgemm_ptr, float *work,
               float *logits) {
  if (rows < 1 || S < 1 || L < 1) return 2;
  const long E = M->E, NH = M->NH, DQK = M->DQK, DV = M->DV, F = M->F, V = M->V, T = rows * S;
  const long QK = NH * DQK, HV = NH * DV, P = 2 * QK + 2 * HV + 2 * NH;
  for (long r = 0; r < T; r++)
    if (tokens[r] < 0 || tokens[r] >= V) return 1;
  const xl_sgemm_fn sgemm = (xl_sgemm_fn)sgemm_ptr;
  float *x = work, *xn = x + T * E, *y = xn + T * E, *proj = y + T * E, *h = proj + T * P, *gn = h + T * HV,
        *gate = gn + T * HV, *up = gate + T * F, *scratch = up + T * F;
  int threads = M->threads > 0 ? M->threads : 1;
  /* the AMX products: A's planes for inputs of width E (xn) and of NH*DV or F (gn, SwiGLU's) */
  const int amx = amx_runs(T);
  const long per_thread = kernel_scratch(M, L) + tile_floats(M) + amx_scratch_floats(M, T);
  xl_bf16 *planes_e = NULL, *planes_f = NULL;
  if (amx) {
    planes_e = (xl_bf16 *)(((unsigned long)(scratch + threads * per_thread) + 63) & ~63UL);
    planes_f = (xl_bf16 *)(((unsigned long)(planes_e + 3 * xl_round32(T) * xl_round32(E)) + 63) & ~63UL);
  }
  xl_barrier team = xl_barrier_for(threads); /* decode_step.c: why not libgomp's */
#pragma omp parallel num_threads(threads)
  {
    int t = 0, TT = 1, sense = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
    TT = omp_get_num_threads();
#endif
    long r0, r1;
    float *mine = scratch + t * per_thread, *tile = mine + kernel_scratch(M, L);
    xl_scratch none = {tile, tile + tile_floats(M), NULL}, on_e = none, on_f = none;
    share(T, t, TT, &r0, &r1);
    for (long j = r0; j < r1; j++) weight_row(M->embedding, &M->q_embedding, V, tokens[j], E, x + j * E);
    for (long index = 0; index < M->num_blocks; index++) {
      const xl_block *B = M->blocks + index;
      /* in the last block only each row's last position needs q, o, the kernel's output and all
         after it: the logits read no other, and the state needs only k, v and the gates at every
         position (the rest of the block is ~3/4 of its products, q and o half of the first) */
      const int last = index == M->num_blocks - 1;
      const long Tn = last ? rows : T; /* the rows from out_proj on */
      on_e.planes = amx ? planes_e : NULL;
      on_f.planes = amx && Tn > XL_MAX_ROWS ? planes_f : NULL;
      share(T, t, TT, &r0, &r1);
      for (long j = r0; j < r1; j++) {
        rms_norm(x + j * E, B->norm_mlstm, B->norm_mlstm_eps, xn + j * E, E);
        /* the last positions' rows together in y (free until out_proj): q's and o's input */
        if (last && j % S == S - 1) memcpy(y + j / S * E, xn + j * E, (size_t)E * sizeof(float));
      }
      if (amx) xl_amx_split(xn, E, r0, r1, 0, E, T, E, planes_e);
      xl_barrier_wait(&team, TT, &sense);
      {
        /* q|k|v|o|i|f as columns of proj [T, P]; weights that follow each other in memory (a fused
           copy's rows) as one product where both are for every position or both for the last
           ones (the last block's q and o: written to each row's last row of proj, S rows apart) */
        const float *W[6] = {B->w_q, B->w_k, B->w_v, B->w_o, B->w_i, B->w_f};
        const long count[6] = {QK, QK, HV, HV, NH, NH};
        const int every[6] = {!last, 1, 1, !last, 1, 1};
        long col = 0;
        for (int a = 0; a < 6;) {
          long N = count[a];
          int b = a + 1;
          const xl_quant *Q = &B->quant[XL_Q + a];
          while (b < 6 && !Q->bits && !B->quant[XL_Q + b].bits && every[b] == every[a] &&
                 W[b] == W[b - 1] + count[b - 1] * E)
            N += count[b++];
          if (every[a]) product_share(sgemm, t, TT, T, N, E, xn, W[a], Q, proj + col, P, &on_e);
          else product_share(sgemm, t, TT, rows, N, E, y, W[a], Q, proj + (S - 1) * P + col, S * P, &none);
          col += N;
          a = b;
        }
      }
      xl_barrier_wait(&team, TT, &sense);
      share(T, t, TT, &r0, &r1);
      for (long j = r0; j < r1; j++) { /* the gates: i~ soft-capped, logsigmoid of f~ soft-capped */
        float *gi = proj + j * P + 2 * QK + 2 * HV, *gf = gi + NH;
        for (long hd = 0; hd < NH; hd++) {
          gi[hd] = soft_cap(gi[hd] + B->b_i[hd], M->has_gate_cap, M->gate_cap);
          gf[hd] = log_sigmoid(soft_cap(gf[hd] + B->b_f[hd], M->has_gate_cap, M->gate_cap));
        }
      }
      xl_barrier_wait(&team, TT, &sense);
      for (long s = t; s < rows * NH; s += TT) {
        const long r = s / NH, head = s % NH;
        head_prefill(M, B, sgemm, proj + r * S * P, P, S, L, s, head, last, h + r * S * HV, mine);
      }
      xl_barrier_wait(&team, TT, &sense);
      if (last) {
        if (t == 0)
          for (long r = 0; r < rows; r++) memmove(x + r * E, x + (r * S + S - 1) * E, (size_t)E * sizeof(float));
        xl_barrier_wait(&team, TT, &sense);
      }
      share(Tn, t, TT, &r0, &r1);
      for (long j = r0; j < r1; j++) {
        const long at = last ? j * S + S - 1 : j;
        norm_gate_row(M, B, h + at * HV, proj + at * P + 2 * QK + HV, gn + j * HV);
      }
      if (on_f.planes) xl_amx_split(gn, HV, r0, r1, 0, HV, Tn, HV, planes_f);
      xl_barrier_wait(&team, TT, &sense);
      product_share(sgemm, t, TT, Tn, E, HV, gn, B->w_out, &B->quant[XL_OUT], y, E, &on_f);
      xl_barrier_wait(&team, TT, &sense);
      share(Tn, t, TT, &r0, &r1);
      for (long j = r0; j < r1; j++) {
        for (long c = 0; c < E; c++) x[j * E + c] += y[j * E + c];
        rms_norm(x + j * E, B->norm_ffn, B->norm_ffn_eps, xn + j * E, E);
      }
      on_e.planes = on_f.planes ? planes_e : NULL; /* Tn rows now */
      if (on_e.planes) xl_amx_split(xn, E, r0, r1, 0, E, Tn, E, planes_e);
      xl_barrier_wait(&team, TT, &sense);
      {
        /* gate and up: this thread's columns of each, then SwiGLU on them (no barrier between) */
        long n0, n1;
        column_share(F, t, TT, &n0, &n1);
        /* planes_f: its last reader (out_proj) is behind the barriers since */
#ifdef XL_AMX
        if (on_f.planes && xl_amx_swiglu && amx_one_stretch(E)) {
          amx_swiglu(Tn, n0, n1, E, on_e.planes, B->w_gate, &B->quant[XL_GATE], B->w_up, &B->quant[XL_UP], F, planes_f,
                     on_e.amx);
#pragma omp atomic
          xl_amx_swiglu_passes++;
        } else
#endif
        {
          product_cols(sgemm, Tn, n0, n1, E, xn, B->w_gate, &B->quant[XL_GATE], F, gate, F, &on_e);
          product_cols(sgemm, Tn, n0, n1, E, xn, B->w_up, &B->quant[XL_UP], F, up, F, &on_e);
          if (n1 > n0)
            for (long j = 0; j < Tn; j++) swiglu_row(gate + j * F + n0, up + j * F + n0, n1 - n0);
          if (on_f.planes) xl_amx_split(gate, F, 0, Tn, n0, n1, Tn, F, planes_f);
        }
      }
      xl_barrier_wait(&team, TT, &sense);
      product_share(sgemm, t, TT, Tn, E, F, gate, B->w_down, &B->quant[XL_DOWN], y, E, &on_f);
      xl_barrier_wait(&team, TT, &sense);
      share(Tn, t, TT, &r0, &r1);
      for (long j = r0; j < r1; j++)
        for (long c = 0; c < E; c++) x[j * E + c] += y[j * E + c];
      xl_barrier_wait(&team, TT, &sense);
    }
    /* each row's last position: the out norm, then the head in groups of up to XL_MAX_ROWS rows */
    if (t == 0)
      for (long r = 0; r < rows; r++) {
        /* x holds only the last positions after the last block (a model of no blocks: all of them) */
        const float *last = x + (M->num_blocks > 0 ? r : r * S + S - 1) * E;
        if (M->out_norm) rms_norm(last, M->out_norm, M->out_norm_eps, xn + r * E, E);
        else memcpy(xn + r * E, last, (size_t)E * sizeof(float));
      }
    xl_barrier_wait(&team, TT, &sense);
    share(V, t, TT, &r0, &r1);
    for (long r = 0; r < rows; r += XL_MAX_ROWS) {
      const long R = rows - r < XL_MAX_ROWS ? rows - r : XL_MAX_ROWS;
      mat_rows_n(M->lm_head, &M->q_head, V, xn + r * E, logits + r * V, V, r0, r1, E, R);
      if (M->has_logit_cap)
        for (long b = r; b < r + R; b++) soft_cap_row(logits + b * V + r0, r1 - r0, M->logit_cap);
    }
  }
  return 0;
}
