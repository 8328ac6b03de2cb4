/* One decode step of an xLSTM-Large model (float32, one row) as one call, for CPUs.

   The reference is the MLX graph of xLSTMLarge.__call__ at one token; on a CPU MLX spends
   ~5 us of host and stream time on each of a step's ~800 graph nodes (benchmarks/NOTES.md,
   session 21), so a 125m step was ~30% bookkeeping around its one-row products. Here a step is
   the products (the rows streamed front to back, as the BLAS forwarder's row kernel reads
   them) and the few vector operations between them, in one OpenMP region whose threads split
   each product's rows; the arithmetic is the reference's, in float32, summed in another order.

   Layouts: every weight row-major [out, in] and contiguous; the state C [NH, DQK, DV],
   n [NH, DQK], m [NH] (batch 1). Python (decode_step.py) checks all of it and falls back to the
   MLX graph where anything differs. */
#include <math.h>
#include <stddef.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

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
  float *work;            /* xl_work_floats(model) floats */
} xl_model;

long xl_work_floats(const xl_model *M) {
  /* x, xn, y [E]; the projections q|k|v|o|i|f; h and the gated norm [NH*DV]; act [F] */
  return 3 * M->E + 2 * M->NH * M->DQK + 2 * M->NH * M->DV + 2 * M->NH + 2 * M->NH * M->DV + M->F;
}

/* y[n] = <W[n, :K], x> for n in [n0, n1): one row at a time, front to back, into 64 partial sums
   the compiler keeps in vector registers (as the BLAS forwarder's row kernel). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(XLSTM_NO_CLONES)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static void dot_rows(const float *restrict W, const float *restrict x, float *restrict y, long n0, long n1, long K) {
  for (long n = n0; n < n1; n++) {
    const float *restrict w = W + n * K;
    float acc[64] = {0.0f};
    long k = 0;
    for (; k + 64 <= K; k += 64)
      for (int j = 0; j < 64; j++) acc[j] += w[k + j] * x[k + j];
    float s = 0.0f;
    for (; k < K; k++) s += w[k] * x[k];
    for (int j = 0; j < 64; j++) s += acc[j];
    y[n] = s;
  }
}

/* This thread's share [r0, r1) of R rows. */
static void share(long R, int t, int T, long *r0, long *r1) {
  *r0 = R * t / T;
  *r1 = R * (t + 1) / T;
}

/* Rows [r0, r1) of matrices laid end to end (segment s: rows[s] rows of W[s], outputs at y[s]). */
static void dot_segments(int count, const float *const *W, const long *rows, float *const *y, const float *x,
                         long K, long r0, long r1) {
  long start = 0;
  for (int s = 0; s < count; s++) {
    long a = r0 > start ? r0 - start : 0, b = r1 - start < rows[s] ? r1 - start : rows[s];
    if (a < b) dot_rows(W[s], x, y[s], a, b, K);
    start += rows[s];
  }
}

static void rms_norm(const float *x, const float *w, float eps, float *out, long E) {
  float s = 0.0f;
  for (long j = 0; j < E; j++) s += x[j] * x[j];
  const float r = 1.0f / sqrtf(s / (float)E + eps);
  for (long j = 0; j < E; j++) out[j] = x[j] * r * w[j];
}

static float soft_cap(float v, int has, float cap) { return has ? cap * tanhf(v / cap) : v; }

static float log_sigmoid(float v) { return fminf(v, 0.0f) - log1pf(expf(-fabsf(v))); }

/* One head's step: the gates, C and n updated, h = C^T q / max(|n.q|, exp(-m)) + eps. */
static void head_step(const xl_model *M, const xl_block *B, long h, const float *q, const float *k, const float *v,
                      float i_raw, float f_raw, float *out) {
  const long DQK = M->DQK, DV = M->DV;
  const float i_pre = soft_cap(i_raw + B->b_i[h], M->has_gate_cap, M->gate_cap);
  const float lf = log_sigmoid(soft_cap(f_raw + B->b_f[h], M->has_gate_cap, M->gate_cap));
  const float m_old = B->m ? B->m[h] : 0.0f;
  const float m_new = fmaxf(lf + m_old, i_pre);
  const float fa = expf(lf + m_old - m_new), ia = expf(i_pre - m_new);
  const float scale = 1.0f / sqrtf((float)DQK);
  const float *C = B->C ? B->C + h * DQK * DV : NULL;
  float *Cn = B->C_out + h * DQK * DV, *nn = B->n_out + h * DQK;
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
    nn[a] = (B->n ? fa * B->n[h * DQK + a] : 0.0f) + ka;
    qn += qa * nn[a];
  }
  const float den = fmaxf(fabsf(qn), expf(-m_new)) + M->step_eps;
  for (long b = 0; b < DV; b++) out[b] /= den;
  B->m_out[h] = m_new;
}

/* sigmoid(o~) * LayerNorm per head (h) * weight, the mLSTM layer's output before out_proj. */
static void norm_gate(const xl_model *M, const xl_block *B, const float *h, const float *o, float *out) {
  const long NH = M->NH, DV = M->DV;
  for (long head = 0; head < NH; head++) {
    const float *x = h + head * DV;
    float mean = 0.0f, var = 0.0f;
    for (long b = 0; b < DV; b++) mean += x[b];
    mean /= (float)DV;
    for (long b = 0; b < DV; b++) var += (x[b] - mean) * (x[b] - mean);
    const float r = 1.0f / sqrtf(var / (float)DV + B->mh_eps);
    for (long b = 0; b < DV; b++) {
      const long j = head * DV + b;
      out[j] = (x[b] - mean) * r * B->mh_norm[j] / (1.0f + expf(-o[j]));
    }
  }
}

/* token -> logits [V] (soft-capped); every block's state written to its *_out arrays. */
int xl_decode_step(const xl_model *M, long token, float *logits) {
  if (token < 0 || token >= M->V) return 1;
  const long E = M->E, NH = M->NH, DQK = M->DQK, DV = M->DV, F = M->F;
  float *x = M->work, *xn = x + E, *y = xn + E;
  float *q = y + E, *k = q + NH * DQK, *v = k + NH * DQK, *o = v + NH * DV, *gi = o + NH * DV, *gf = gi + NH;
  float *h = gf + NH, *g = h + NH * DV, *act = g + NH * DV;
  memcpy(x, M->embedding + token * E, (size_t)E * sizeof(float));
  int threads = M->threads > 0 ? M->threads : 1;
#pragma omp parallel num_threads(threads)
  {
    int t = 0, T = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    T = omp_get_num_threads();
#endif
    long r0, r1;
    for (long index = 0; index < M->num_blocks; index++) {
      const xl_block *B = M->blocks + index;
#pragma omp single
      rms_norm(x, B->norm_mlstm, B->norm_mlstm_eps, xn, E);
      {
        const float *W[6] = {B->w_q, B->w_k, B->w_v, B->w_o, B->w_i, B->w_f};
        const long rows[6] = {NH * DQK, NH * DQK, NH * DV, NH * DV, NH, NH};
        float *const out[6] = {q, k, v, o, gi, gf};
        share(2 * NH * DQK + 2 * NH * DV + 2 * NH, t, T, &r0, &r1);
        dot_segments(6, W, rows, out, xn, E, r0, r1);
      }
#pragma omp barrier
      for (long head = t; head < NH; head += T)
        head_step(M, B, head, q + head * DQK, k + head * DQK, v + head * DV, gi[head], gf[head], h + head * DV);
#pragma omp barrier
#pragma omp single
      norm_gate(M, B, h, o, g);
      share(E, t, T, &r0, &r1);
      dot_rows(B->w_out, g, y, r0, r1, NH * DV);
#pragma omp barrier
#pragma omp single
      {
        for (long j = 0; j < E; j++) x[j] += y[j];
        rms_norm(x, B->norm_ffn, B->norm_ffn_eps, xn, E);
      }
      share(F, t, T, &r0, &r1);
      for (long j = r0; j < r1; j++) {  /* silu(gate) * up, each pair by one thread */
        float gate, up;
        dot_rows(B->w_gate + j * E, xn, &gate, 0, 1, E);
        dot_rows(B->w_up + j * E, xn, &up, 0, 1, E);
        act[j] = gate / (1.0f + expf(-gate)) * up;
      }
#pragma omp barrier
      share(E, t, T, &r0, &r1);
      dot_rows(B->w_down, act, y, r0, r1, F);
#pragma omp barrier
#pragma omp single
      for (long j = 0; j < E; j++) x[j] += y[j];
    }
#pragma omp single
    {
      if (M->out_norm) rms_norm(x, M->out_norm, M->out_norm_eps, xn, E);
      else memcpy(xn, x, (size_t)E * sizeof(float));
    }
    share(M->V, t, T, &r0, &r1);
    dot_rows(M->lm_head, xn, logits, r0, r1, E);
    if (M->has_logit_cap)
      for (long j = r0; j < r1; j++) logits[j] = soft_cap(logits[j], 1, M->logit_cap);
  }
  return 0;
}
