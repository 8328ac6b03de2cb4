"""mLSTM recurrence math in pure MLX ops: the reference every fast kernel is tested against.

Shapes (per call): q, k ``[B, NH, S, DQK]``, v ``[B, NH, S, DV]``, gate pre-activations
i, f ``[B, NH, S]``; state ``(C [B, NH, DQK, DV], n [B, NH, DQK], m [B, NH, 1])``; output
h ``[B, NH, S, DV]`` in q's dtype. All math runs in float32; the returned state is cast to
``state_dtype``. ``state=None`` means zeros. The four kernels agree to float32 round-off and
the final state of any of them continues exactly in any other (the stabilizer m included).

Notation follows ../shared/docs/xlstm-reference.md section 2: lf = logsigmoid(f~), b = inclusive
cumsum of lf within a chunk, g = b at the chunk's end, a_t = g - b_t + i~_t.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import mlx.core as mx

MLSTMState = tuple[mx.array, mx.array, mx.array]
ONE_TOKEN_KERNELS = ("step", "step_fused")

# Input-gate pre-activation used for padded time steps: exp(_NEG - m) == 0 for any reachable m,
# and a finite value keeps gradients free of inf - inf.
_NEG = -1e30


def log_sigmoid(x: mx.array) -> mx.array:
    """log(sigmoid(x)) computed stably as -softplus(-x)."""
    return -mx.logaddexp(mx.zeros_like(x), -x)


def zero_state(
    batch_size: int, num_heads: int, qk_head_dim: int, v_head_dim: int, dtype: mx.Dtype = mx.float32
) -> MLSTMState:
    """The empty mLSTM state (C, n, m) of one layer."""
    return (
        mx.zeros((batch_size, num_heads, qk_head_dim, v_head_dim), dtype=dtype),
        mx.zeros((batch_size, num_heads, qk_head_dim), dtype=dtype),
        mx.zeros((batch_size, num_heads, 1), dtype=dtype),
    )


def check_inputs(q: mx.array, k: mx.array, v: mx.array, i: mx.array, f: mx.array) -> None:
    # (NX-AI's 2024 gates [B, NH, S, 1] gave a wrong h silently)
    if not (q.ndim == 4 and k.shape == q.shape and v.ndim == 4 and v.shape[:3] == q.shape[:3]
            and i.shape == f.shape == q.shape[:3]):
        raise ValueError("mLSTM kernels take q, k [B, NH, S, DQK], v [B, NH, S, DV], i, f [B, NH, S]; got "
                         f"{q.shape}, {k.shape}, {v.shape}, i {i.shape}, {f.shape}")


def _state_f32(q: mx.array, v: mx.array, state: MLSTMState | None) -> MLSTMState:
    B, NH, _, DQK = q.shape
    if state is None:
        return zero_state(B, NH, DQK, v.shape[-1])
    C, n, m = state
    if C.shape != (B, NH, DQK, v.shape[-1]) or n.shape != (B, NH, DQK) or m.shape != (B, NH, 1):
        raise ValueError(f"the mLSTM state is C {(B, NH, DQK, v.shape[-1])}, n {(B, NH, DQK)}, m {(B, NH, 1)}; "
                         f"got {C.shape}, {n.shape}, {m.shape}")
    return C.astype(mx.float32), n.astype(mx.float32), m.astype(mx.float32)


def _cast_state(state: MLSTMState, dtype: mx.Dtype | None) -> MLSTMState:
    return state if dtype is None else tuple(s.astype(dtype) for s in state)


# --------------------------------------------------------------------------------------- step
def mlstm_step(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    i: mx.array,
    f: mx.array,
    state: MLSTMState | None = None,
    *,
    eps: float = 1e-6,
    chunk_size: int = 64,
    state_dtype: mx.Dtype | None = mx.float32,
) -> tuple[mx.array, MLSTMState]:
    """One recurrent step (S must be 1). Returns h [B, NH, 1, DV] and the new state."""
    check_inputs(q, k, v, i, f)
    if q.shape[2] != 1:
        raise ValueError(f"mlstm_step takes one time step, got S={q.shape[2]}")
    C, n, m = _state_f32(q, v, state)
    dqk = q.shape[-1]
    qs = q[:, :, 0].astype(mx.float32) * (dqk**-0.5)  # [B, NH, DQK]
    kt = k[:, :, 0].astype(mx.float32)
    vt = v[:, :, 0].astype(mx.float32)
    it = i.astype(mx.float32)  # [B, NH, 1]
    lf = log_sigmoid(f.astype(mx.float32))

    m_new = mx.maximum(lf + m, it)
    f_act = mx.exp(lf + m - m_new)
    i_act = mx.exp(it - m_new)
    C = f_act[..., None] * C + i_act[..., None] * (kt[..., :, None] * vt[..., None, :])
    n = f_act * n + i_act * kt

    num = (qs[:, :, None, :] @ C)[:, :, 0]  # [B, NH, DV]
    qn = mx.sum(qs * n, axis=-1, keepdims=True)  # [B, NH, 1]
    den = mx.maximum(mx.abs(qn), mx.exp(-m_new)) + eps
    h = (num / den)[:, :, None, :]
    return h.astype(q.dtype), _cast_state((C, n, m_new), state_dtype)


# ------------------------------------------------------------------------------ deferred step
#: A decode state whose last rank-one updates are held apart from C: (C [B, NH, DQK, DV],
#: n [B, NH, DQK], m [B, NH, 1], K [B, NH, r, DQK], V [B, NH, r, DV], L [B, NH, R]).
#: The state it stands for is (exp(L[..., 0]) C + sum_s exp(L[..., 1 + s]) K_s^T V_s, n, m): L
#: holds the log weights of the base C and of the r pending terms (entries past 1 + r unused),
#: all relative to the current stabiliser m, so each is <= 0. A step reads C without writing it
#: and appends its (k, v); the step that would hold R terms folds them into a new base
#: (r = 0 again). R = L.shape[-1] and r = K.shape[2] are shapes, so a compiled step traces once
#: per r and no host value decides anything at run time.
DeferredMLSTMState = tuple[mx.array, mx.array, mx.array, mx.array, mx.array, mx.array]


def is_deferred(state) -> bool:
    """Whether ``state`` is a :data:`DeferredMLSTMState` (six arrays) rather than (C, n, m)."""
    return isinstance(state, (tuple, list)) and len(state) == 6


def deferred_terms(state) -> int:
    """R of a :data:`DeferredMLSTMState` (how many steps its C is written every), 0 for (C, n, m)."""
    return state[5].shape[-1] if is_deferred(state) else 0


def defer_state(state: MLSTMState, terms: int, term_dtype: mx.Dtype = mx.float32) -> DeferredMLSTMState:
    """(C, n, m) -> the same state as a :data:`DeferredMLSTMState` holding up to ``terms`` - 1
    pending steps (none yet); ``term_dtype``: the dtype its k, v are kept in (their own: exact)."""
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    if is_deferred(state):
        return tuple(state)
    C, n, m = state
    B, NH, DQK, DV = C.shape
    return (C, n, m, mx.zeros((B, NH, 0, DQK), dtype=term_dtype), mx.zeros((B, NH, 0, DV), dtype=term_dtype),
            mx.zeros((B, NH, terms), dtype=mx.float32))


def settle_state(state, state_dtype: mx.Dtype | None = None) -> MLSTMState:
    """A :data:`DeferredMLSTMState` -> (C, n, m) with its pending terms folded into C (float32
    math, C cast to ``state_dtype``, None: C's own); (C, n, m) is returned as it is."""
    if not is_deferred(state):
        return state
    C, n, m, K, V, L = state
    dtype = state_dtype or C.dtype
    r = K.shape[2]
    C = mx.exp(L[..., :1])[..., None] * C.astype(mx.float32)
    if r:
        w = mx.exp(L[..., 1 : 1 + r])[..., None]  # [B, NH, r, 1]
        C = C + (K.astype(mx.float32) * w).swapaxes(-1, -2) @ V.astype(mx.float32)
    return C.astype(dtype), n, m


def mlstm_step_deferred(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    i: mx.array,
    f: mx.array,
    state: DeferredMLSTMState,
    *,
    eps: float = 1e-6,
    state_dtype: mx.Dtype | None = mx.float32,
) -> tuple[mx.array, DeferredMLSTMState]:
    """:func:`mlstm_step` on a :data:`DeferredMLSTMState` (shapes as there): the same h to float32
    round-off, and the new state deferred again, its C a new base only when R terms are due."""
    if q.shape[2] != 1:
        raise ValueError(f"mlstm_step_deferred takes one time step, got S={q.shape[2]}")
    C, n, m, K, V, L = state
    r, R = K.shape[2], L.shape[-1]
    dqk = q.shape[-1]
    qs = q[:, :, 0].astype(mx.float32) * (dqk**-0.5)  # [B, NH, DQK]
    kt = k[:, :, 0].astype(mx.float32)
    it = i.astype(mx.float32)  # [B, NH, 1]
    lf = log_sigmoid(f.astype(mx.float32))
    m = m.astype(mx.float32)
    m_new = mx.maximum(lf + m, it)
    log_fa = lf + m - m_new
    n_new = mx.exp(log_fa) * n.astype(mx.float32) + mx.exp(it - m_new) * kt
    # Log weights after this step: the base's and each pending term's decay by fa, the new term ia.
    weights = mx.concatenate([L[..., : 1 + r] + log_fa, it - m_new], axis=-1)  # [B, NH, r + 2]
    K_all = mx.concatenate([K, k.astype(K.dtype)], axis=2)  # [B, NH, r + 1, DQK]
    V_all = mx.concatenate([V, v.astype(V.dtype)], axis=2)
    if r + 1 >= R:  # the base takes every term: a plain state, deferred again with none pending
        C_new, _, _ = settle_state((C, n, m, K_all, V_all, weights), mx.float32)
        num = (qs[:, :, None, :] @ C_new)[:, :, 0]
        out = (C_new.astype(state_dtype or mx.float32), K[:, :, :0], V[:, :, :0], mx.zeros_like(L))
    else:
        w = mx.exp(weights)
        num = w[..., :1] * (qs[:, :, None, :] @ C.astype(mx.float32))[:, :, 0]
        qk = (K_all.astype(mx.float32) @ qs[..., None])[..., 0]  # [B, NH, r + 1]
        num = num + ((w[..., 1:] * qk)[:, :, None, :] @ V_all.astype(mx.float32))[:, :, 0]
        pad = mx.zeros(weights.shape[:-1] + (R - r - 2,), dtype=mx.float32)
        out = (C, K_all, V_all, mx.concatenate([weights, pad], axis=-1))
    qn = mx.sum(qs * n_new, axis=-1, keepdims=True)
    den = mx.maximum(mx.abs(qn), mx.exp(-m_new)) + eps
    h = (num / den)[:, :, None, :]
    dtype = state_dtype or mx.float32
    return h.astype(q.dtype), (out[0], n_new.astype(dtype), m_new.astype(dtype), *out[1:])


# ----------------------------------------------------------------------------------- sequence
def mlstm_sequence(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    i: mx.array,
    f: mx.array,
    state: MLSTMState | None = None,
    *,
    eps: float = 1e-6,
    chunk_size: int = 64,
    state_dtype: mx.Dtype | None = mx.float32,
) -> tuple[mx.array, MLSTMState]:
    """A loop of :func:`mlstm_step` over the sequence axis."""
    check_inputs(q, k, v, i, f)
    state = _state_f32(q, v, state)
    hs = []
    for t in range(q.shape[2]):
        h, state = mlstm_step(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1],
            i[:, :, t : t + 1], f[:, :, t : t + 1], state, eps=eps, state_dtype=None,
        )
        hs.append(h)
    return mx.concatenate(hs, axis=2), _cast_state(state, state_dtype)


# ----------------------------------------------------------------------------------- parallel
def _gaps(lf: mx.array) -> mx.array:
    """[..., L, L]: b_t - b_s = lf_{s+1} + ... + lf_t for t >= s (0 above the diagonal), each
    summed from its own first term. The difference of two cumsums b loses ~ulp(b): over a whole
    long sequence of strong forgetting b reaches ~-8,000, and its float32 spacing (~5e-4) became
    the decay weights' error (1e-4 relative in the outputs at 2-4k steps). lf [..., L]."""
    L = lf.shape[-1]
    later = mx.where(mx.arange(L)[:, None] > mx.arange(L)[None, :], lf[..., :, None], 0.0)  # [.., r, s]: r > s
    return mx.cumsum(later, axis=-2)


def _parallel_outputs(
    q: mx.array, k: mx.array, v: mx.array, b: mx.array, ig: mx.array,
    C0: mx.array, n0: mx.array, m0: mx.array, eps: float, gaps: mx.array | None = None,
) -> mx.array:
    """Quadratic (parallel) form over the last sequence axis, from the entering state.

    q (already scaled by 1/sqrt(DQK)), k [..., L, DQK]; v [..., L, DV]; b = inclusive cumsum of
    logsigmoid(f~) [..., L]; ig = i~ [..., L]; C0 [..., DQK, DV], n0 [..., DQK], m0 [..., 1];
    ``gaps``: :func:`_gaps` of the log forget gates (else b's differences, exact enough within a
    chunk). Leading axes are batch-like (B, NH, and the chunk axis for the chunkwise kernel).
    """
    L = q.shape[-2]
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    if gaps is None:
        gaps = b[..., :, None] - b[..., None, :]
    log_d = gaps + ig[..., None, :]
    log_d = mx.where(causal, log_d, -mx.inf)
    m_intra = mx.max(log_d, axis=-1)  # finite: the diagonal is always there
    m_inter = b + m0
    m_comb = mx.maximum(m_inter, m_intra)  # [..., L]

    scores = (q @ mx.swapaxes(k, -1, -2)) * mx.exp(log_d - m_comb[..., None])
    q_inter = q * mx.exp(m_inter - m_comb)[..., None]
    num = q_inter @ C0 + scores @ v
    den = (q_inter @ n0[..., None])[..., 0] + mx.sum(scores, axis=-1)
    den = mx.maximum(mx.abs(den), mx.exp(-m_comb)) + eps
    return num / den[..., None]


def mlstm_parallel(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    i: mx.array,
    f: mx.array,
    state: MLSTMState | None = None,
    *,
    eps: float = 1e-6,
    chunk_size: int = 64,
    state_dtype: mx.Dtype | None = mx.float32,
) -> tuple[mx.array, MLSTMState]:
    """Quadratic form over the whole sequence (memory O(S^2)); the final state in closed form."""
    check_inputs(q, k, v, i, f)
    C0, n0, m0 = _state_f32(q, v, state)
    dqk = q.shape[-1]
    qf = q.astype(mx.float32) * (dqk**-0.5)
    kf, vf = k.astype(mx.float32), v.astype(mx.float32)
    ig = i.astype(mx.float32)
    lf = log_sigmoid(f.astype(mx.float32))
    b = mx.cumsum(lf, axis=-1)
    h = _parallel_outputs(qf, kf, vf, b, ig, C0, n0, m0, eps, gaps=_gaps(lf))

    # Final state: C_S = sum_j exp(b_S - b_j + i_j - m_S) k_j v_j^T + exp(b_S + m0 - m_S) C0,
    # b_S - b_j summed from the end (not a difference of cumsums: see _gaps).
    g = b[..., -1:]  # [B, NH, 1]
    a = mx.cumsum(lf, axis=-1, reverse=True, inclusive=False) + ig
    m_new = mx.maximum(g + m0, mx.max(a, axis=-1, keepdims=True))
    w = mx.exp(a - m_new)[..., None] * kf  # [B, NH, S, DQK]
    decay = mx.exp(g + m0 - m_new)
    C = decay[..., None] * C0 + mx.swapaxes(w, -1, -2) @ vf
    n = decay * n0 + mx.sum(w, axis=-2)
    return h.astype(q.dtype), _cast_state((C, n, m_new), state_dtype)


# ---------------------------------------------------------------------------------- chunkwise

class ChunkedInputs(NamedTuple):
    """Kernel inputs cut into chunks of L steps, in float32. q is scaled by 1/sqrt(DQK).

    q, k [B, NH, NC, L, DQK]; v [B, NH, NC, L, DV]; b (cumsum of logsigmoid(f~)), i, a
    [B, NH, NC, L]; g, a_max [B, NH, NC]; each chunk's contribution to the state, stabilized
    by its own a_max: contrib_C [B, NH, NC, DQK, DV], contrib_n [B, NH, NC, DQK].
    """

    q: mx.array
    k: mx.array
    v: mx.array
    b: mx.array
    i: mx.array
    g: mx.array
    a_max: mx.array
    contrib_C: mx.array
    contrib_n: mx.array

    @property
    def num_chunks(self) -> int:
        return self.q.shape[2]


def check_chunk_size(chunk_size) -> int:
    """``chunk_size`` as an int >= 1, else a ValueError naming it (0 was a ZeroDivisionError, a
    negative one an MLX padding error, 2.5 a std::bad_cast, deep inside the chunkwise kernels)."""
    try:
        L = operator.index(chunk_size)  # an int or a numpy integer; 2.5 and "64" are not
    except TypeError:
        L = 0
    if isinstance(chunk_size, bool) or L < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return L


def chunk_gates(i: mx.array, f: mx.array, L: int) -> tuple[mx.array, mx.array]:
    """i, f [B, NH, S] -> (b = cumsum of logsigmoid(f~) within chunks, i~), both [B, NH, NC, L]
    float32, padded to whole chunks of L steps with steps that neither write (i~ = -1e30) nor
    decay (logsigmoid(f~) = 0) the state."""
    L = check_chunk_size(L)
    B, NH, S = i.shape
    pad = (-S) % L
    NC = (S + pad) // L
    lf = log_sigmoid(f.astype(mx.float32))
    ig = i.astype(mx.float32)
    if pad:
        lf = mx.pad(lf, [(0, 0), (0, 0), (0, pad)])
        ig = mx.pad(ig, [(0, 0), (0, 0), (0, pad)], constant_values=_NEG)
    return mx.cumsum(lf.reshape(B, NH, NC, L), axis=-1), ig.reshape(B, NH, NC, L)


def chunk_inputs(q: mx.array, k: mx.array, v: mx.array, i: mx.array, f: mx.array, chunk_size: int) -> ChunkedInputs:
    """Pad to whole chunks and compute what every chunkwise kernel needs before its
    inter-chunk recurrence. Padded steps neither write (i~ = -inf) nor decay
    (logsigmoid(f~) = 0) the state, so states stay exact for any sequence length."""
    check_inputs(q, k, v, i, f)
    B, NH, S, dqk = q.shape
    dv = v.shape[-1]
    L = min(check_chunk_size(chunk_size), S)
    pad = (-S) % L
    NC = (S + pad) // L

    qf = q.astype(mx.float32) * (dqk**-0.5)
    kf, vf = k.astype(mx.float32), v.astype(mx.float32)
    if pad:
        seq_pad = [(0, 0), (0, 0), (0, pad), (0, 0)]
        qf, kf, vf = (mx.pad(x, seq_pad) for x in (qf, kf, vf))

    kc = kf.reshape(B, NH, NC, L, dqk)
    vc = vf.reshape(B, NH, NC, L, dv)
    b, ig = chunk_gates(i, f, L)
    g = b[..., -1]
    a = g[..., None] - b + ig
    a_max = mx.max(a, axis=-1)
    # One batched matmul for all chunks' contributions; the recurrence then only rescales.
    kw = kc * mx.exp(a - a_max[..., None])[..., None]
    return ChunkedInputs(
        q=qf.reshape(B, NH, NC, L, dqk), k=kc, v=vc, b=b, i=ig, g=g, a_max=a_max,
        contrib_C=mx.swapaxes(kw, -1, -2) @ vc, contrib_n=mx.sum(kw, axis=-2),
    )

def mlstm_chunkwise(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    i: mx.array,
    f: mx.array,
    state: MLSTMState | None = None,
    *,
    eps: float = 1e-6,
    chunk_size: int = 64,
    state_dtype: mx.Dtype | None = mx.float32,
) -> tuple[mx.array, MLSTMState]:
    """Chunkwise form: states recurrent across chunks (phase 1), outputs parallel within (phase 2).

    Any sequence length: the last chunk is padded with steps that neither write (i~ = -inf) nor
    decay (logsigmoid(f~) = 0) the state, so the returned state is exact.
    """
    B, NH, S, _ = q.shape
    dv = v.shape[-1]
    ch = chunk_inputs(q, k, v, i, f, chunk_size)
    C, n, m = _state_f32(q, v, state)
    entering_C, entering_n, entering_m = [], [], []
    for c in range(ch.num_chunks):
        entering_C.append(C)
        entering_n.append(n)
        entering_m.append(m)
        g_c, a_c = ch.g[..., c : c + 1], ch.a_max[..., c : c + 1]  # [B, NH, 1]
        m_next = mx.maximum(g_c + m, a_c)
        decay, scale = mx.exp(g_c + m - m_next), mx.exp(a_c - m_next)
        C = decay[..., None] * C + scale[..., None] * ch.contrib_C[:, :, c]
        n = decay * n + scale * ch.contrib_n[:, :, c]
        m = m_next

    # Phase 2: every chunk in parallel from the state entering it.
    h = _parallel_outputs(
        ch.q, ch.k, ch.v, ch.b, ch.i,
        mx.stack(entering_C, axis=2), mx.stack(entering_n, axis=2), mx.stack(entering_m, axis=2),
        eps,
    )
    h = h.reshape(B, NH, -1, dv)[:, :, :S]
    return h.astype(q.dtype), _cast_state((C, n, m), state_dtype)
