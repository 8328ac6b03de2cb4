"""Gradients of the chunkwise mLSTM for the fused kernels: ``mx.custom_function`` with its own vjp.

``mx.fast.cuda_kernel`` has no vjp, so :func:`mlstm_chunkwise_fused` runs through
:func:`chunkwise_differentiable`: the forward is the fused CUDA kernels (``chunkwise_scan``
where they do not run: CPU, Metal, other dtypes or sizes) and keeps nothing but its inputs and
outputs. Where the forward ran the kernels, the backward is CUDA kernels too
(:mod:`.chunkwise_bwd`; ``XLSTM_METAL_FUSED_MLSTM_BWD=0`` selects the one below). The MLX-ops
backward here, their reference, recomputes what it needs and never holds a layer's per-chunk
states longer than its own few steps:

1. the state entering every chunk (C, n, m), again by the fused states kernel (or the
   closed form of :func:`~xlstm_metal.kernels.fast.chunkwise.scan_states`);
2. phase 2 (outputs within each chunk from the entering state, the reference's
   ``_parallel_outputs``) differentiated by ``mx.vjp`` with the stabiliser m held fixed:
   dq, the intra-chunk parts of dk, dv and of the gates, and the cotangents dC_c, dn_c of the
   entering states;
3. phase 1 (the states) by hand. C_c = exp(P_c + m_0 - m_c) C_0 + sum_{j<c} w_cj X_j with
   X_j = sum_t exp(a_jt - a*_j) k_jt v_jt^T, so with G_j = sum_{c>j} w_cj dC_c (one matmul over
   chunks, the final state's cotangent the last row):
   dk_jt += e_jt (G_j v_jt + Gn_j), dv_jt += e_jt G_j^T k_jt, e_jt = exp(a_jt - a*_j);
   the log weight of (j, t) gets k_jt . dk_jt (its input gate and, negated, the cumulative
   forget gate at t), the cumulative forget gate at the end of chunk c-1 gets
   <dC_c, C_c> + <dn_c, n_c>; the chunk cumsums and logsigmoid are then differentiated by
   ``mx.vjp`` of the reference's gate prep.

Why holding m fixed is exact: (C, n, m) stands for (C e^m, n e^m) and h = C q / max(|n q|,
e^{-m}) does not change when m moves with C and n, so every path through m carries zero
gradient; the reference's autodiff, which differentiates through the max that picks m,
gives the same numbers to float32 round-off (tests/test_chunkwise_grad.py). The same holds for
a returned state's m when whatever uses the state reads it as that product (the kernels
continuing from it do); the cotangent of the returned m alone is not propagated.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterator

import mlx.core as mx

from ..mlstm import MLSTMState, _cast_state, _parallel_outputs, _state_f32, check_chunk_size, chunk_gates, chunk_inputs
from .chunkwise import chunk_gaps, chunk_prefix, chunk_weights, mlstm_chunkwise_scan, scan_states
from .chunkwise_bwd import fused_backward, fused_backward_enabled

_functions: dict[tuple[float, int, bool, bool, bool, int | None, bool], Callable] = {}
_FINAL_STATES_READ = contextvars.ContextVar("xlstm_metal_final_states_read", default=True)
_PRODUCT_TERMS: contextvars.ContextVar[int | None] = contextvars.ContextVar("xlstm_metal_product_terms", default=None)
_KEEP_STATES: contextvars.ContextVar[bool] = contextvars.ContextVar("xlstm_metal_keep_states", default=False)


@contextlib.contextmanager
def final_states_unread() -> Iterator[None]:
    """Inside: the caller promises that what it differentiates reads no final state (C, n, m)
    returned by :func:`chunkwise_differentiable` (a training step's loss reads the logits
    alone). The returned states then carry no gradient (``mx.stop_gradient``) and the backward
    leaves out the terms of their cotangents, which are zero: at the 1.3b shape two batched
    GEMVs per layer of <dC_f, C_f> and <dn_f, n_f> on zeros (5.6 ms of a 228 ms H200 step,
    S5R3 trace). The gradients are the same numbers."""
    token = _FINAL_STATES_READ.set(False)
    try:
        yield
    finally:
        _FINAL_STATES_READ.reset(token)


@contextlib.contextmanager
def product_terms(terms: int | None) -> Iterator[None]:
    """Inside: the fused CUDA kernels (forward and backward) multiply their float32 operands (the
    states C and their cotangents, the weighted keys, the L x L score matrices) on the tensor
    cores as ``terms`` bf16 terms each: 3 (float32's precision, the default everywhere), 2, or 1
    (the operand rounded to bf16, as NX-AI's Triton kernels cast their state and scores to the
    inputs' dtype for the dot products; a third of the products). A training setting
    (``TrainingConfig.mlstm_products``); None keeps each kernel's default. Read when the forward
    is traced; the backward uses what its forward used."""
    if terms not in (None, 1, 2, 3):
        raise ValueError(f"product terms must be 1, 2 or 3 (or None), got {terms!r}")
    token = _PRODUCT_TERMS.set(terms)
    try:
        yield
    finally:
        _PRODUCT_TERMS.reset(token)


def keep_states_enabled() -> bool:
    """Whether training keeps the forward's entering states for the backward
    (:func:`entering_states_kept`): on unless ``XLSTM_METAL_MLSTM_KEEP_STATES=0`` (H200, 1.3b,
    GPU round S9R2: 171.3 ms per step against 173.3 recomputing them, peak 39.13 against 38.79 GB)."""
    return os.environ.get("XLSTM_METAL_MLSTM_KEEP_STATES", "1") != "0"


@contextlib.contextmanager
def entering_states_kept(keep: bool = True) -> Iterator[None]:
    """Inside (``keep``): where the fused CUDA kernels run with one bf16 term per product
    (:func:`product_terms` 1, whose backward reads the per-chunk states as bf16), the forward
    keeps the states entering every chunk (C rounded to bf16, n, m: 1.6 GB at the 1.3b shape,
    batch 4 x 2,048) for the backward, which then does not run the states kernel again (4.1 ms of
    a 170 ms H200 step, S8R3 trace). The forward's kernel computes them from the raw gates, the
    backward's from the gates MLX prepared: the same states to float32 round-off. Read when the
    forward is traced."""
    token = _KEEP_STATES.set(bool(keep))
    try:
        yield
    finally:
        _KEEP_STATES.reset(token)


def _chunked(x: mx.array, L: int, NC: int) -> mx.array:
    """[B, NH, S, D] -> [B, NH, NC, L, D], zero-padded to NC * L steps."""
    B, NH, S, D = x.shape
    if NC * L != S:
        x = mx.pad(x, [(0, 0), (0, 0), (0, NC * L - S), (0, 0)])
    return x.reshape(B, NH, NC, L, D)


def _unchunked(x: mx.array, S: int) -> mx.array:
    B, NH, NC, L, D = x.shape
    return x.reshape(B, NH, NC * L, D)[:, :, :S]


def _dot(a: mx.array, b: mx.array, axes: int) -> mx.array:
    """<a, b> over the last ``axes`` axes as one batched matrix product: no elementwise product
    in memory (a layer's entering states C are 256 MB at the 1.3b shape)."""
    lead = a.shape[: a.ndim - axes]
    return (a.reshape(*lead, 1, -1) @ b.reshape(*lead, -1, 1))[..., 0, 0]


def _forward(q, k, v, i, f, C0, n0, m0, eps: float, L: int, fused: bool, terms: int | None = None):
    """h [B, NH, S, DV] (q's dtype) and the final state (float32)."""
    if not fused:
        h, final = mlstm_chunkwise_scan(q, k, v, i, f, (C0, n0, m0), eps=eps, chunk_size=L, state_dtype=None)
        return (h, *final)
    from .chunkwise_fused import fused_forward

    h, final = fused_forward(q, k.astype(q.dtype), v.astype(q.dtype), i, f, (C0, n0, m0), eps, L, q.dtype,
                             terms=terms)
    return (h, *final)


def _forward_keeping(q, k, v, i, f, C0, n0, m0, eps: float, L: int, terms: int):
    """:func:`_forward` by the fused kernels (one segment) plus the states entering every chunk
    for the backward: C in the backward's storage (bf16 for one term), n, m (float32)."""
    from .chunkwise_bwd import _state_dtype
    from .chunkwise_fused import fused_forward

    h, final, (C_loc, n_loc, m_loc) = fused_forward(q, k.astype(q.dtype), v.astype(q.dtype), i, f, (C0, n0, m0),
                                                    eps, L, q.dtype, terms=terms, keep_states=True)
    return (h, *final, C_loc.astype(_state_dtype(terms)), n_loc, m_loc)


def _entering_states(q, k, v, i, f, C0, n0, m0, L: int, fused: bool):
    """(C, n, m) entering every chunk: [B, NH, NC, DQK, DV], [B, NH, NC, DQK], [B, NH, NC]."""
    if fused:
        from .chunkwise_fused import chunk_gates as kernel_gates
        from .chunkwise_fused import chunk_states

        C_enter, n_enter, m_enter, _ = chunk_states(k.astype(q.dtype), v.astype(q.dtype), *kernel_gates(i, f, L),
                                                    (C0, n0, m0))
        return C_enter, n_enter, m_enter
    C_enter, n_enter, m_enter, _ = scan_states(chunk_inputs(q, k, v, i, f, L), C0, n0, m0)
    return C_enter, n_enter, m_enter[..., 0]


def _backward(primals, cotangents, outputs, eps: float, L: int, fused: bool, has_state: bool,
              final_grad: bool = True):
    q, k, v, i, f, C0, n0, m0 = primals
    dh, dC_f, dn_f, _dm_f = cotangents
    _h, C_f, n_f, m_f = outputs
    B, NH, S, dqk = q.shape
    NC = -(-S // L)
    f32 = mx.float32
    C_enter, n_enter, m_enter = (mx.stop_gradient(x) for x in _entering_states(q, k, v, i, f, C0, n0, m0, L, fused))
    bcum, igc = chunk_gates(i, f, L)  # [B, NH, NC, L]

    # Phase 2 (outputs within each chunk), m held fixed.
    m_fixed = m_enter[..., None]

    def outputs_phase(qf, kf, vf, b, ig, Ce, ne):
        qc = _chunked(qf * (dqk**-0.5), L, NC)
        return _parallel_outputs(qc, _chunked(kf, L, NC), _chunked(vf, L, NC), b, ig, Ce, ne, m_fixed, eps)

    kf, vf = k.astype(f32), v.astype(f32)
    (_, grads) = mx.vjp(outputs_phase, [q.astype(f32), kf, vf, bcum, igc, C_enter, n_enter],
                        [_chunked(dh.astype(f32), L, NC)])
    dq, dk, dv, db, dig, dC_enter, dn_enter = grads

    # Phase 1 (states across chunks): rows c = 0..NC of the cotangents, the final state last.
    g = bcum[..., -1]
    a = g[..., None] - bcum + igc  # [B, NH, NC, L]
    a_max = mx.max(a, axis=-1)
    P = chunk_prefix(g)
    m_all = mx.concatenate([m_enter, m_f.astype(f32)], axis=-1)  # [B, NH, NC+1]
    w = chunk_weights(chunk_gaps(g), a_max, m_all)  # [B, NH, NC+1, NC]
    dC_all = mx.concatenate([dC_enter, dC_f.astype(f32)[:, :, None]], axis=2).reshape(B, NH, NC + 1, -1)
    dn_all = mx.concatenate([dn_enter, dn_f.astype(f32)[:, :, None]], axis=2)
    wT = mx.swapaxes(w, -1, -2)
    G = (wT @ dC_all).reshape(dC_enter.shape)  # [B, NH, NC, DQK, DV]
    Gn = wT @ dn_all  # [B, NH, NC, DQK]
    e = mx.exp(a - a_max[..., None])[..., None]  # [B, NH, NC, L, 1]
    kc, vc = _chunked(kf, L, NC), _chunked(vf, L, NC)
    dk1 = e * (vc @ mx.swapaxes(G, -1, -2) + Gn[..., None, :])
    dv1 = e * (kc @ G)
    dk = dk + _unchunked(dk1, S)
    dv = dv + _unchunked(dv1, S)
    da = mx.sum(kc * dk1, axis=-1)  # [B, NH, NC, L]: the log weight of step (j, t)

    if has_state:
        decay0 = mx.exp(P + m0 - m_all)  # [B, NH, NC+1]
        dC0 = (decay0[..., None, :] @ dC_all).reshape(C0.shape)
        dn0 = (decay0[..., None, :] @ dn_all)[..., 0, :]
        dm0 = (_dot(dC0, C0, 2) + _dot(dn0, n0, 1))[..., None]
    else:  # the zero state made by the caller: its gradient is never read
        dC0, dn0, dm0 = mx.zeros_like(C0), mx.zeros_like(n0), mx.zeros_like(m0)

    # Cumulative log forget gate F (global) at the end of chunk c-1 weighs the whole state
    # entering chunk c; at step (j, t) it is minus the log weight of that step's write. (Also
    # the gradient w.r.t. the entering m if phase 2 took it as an input, but that path runs
    # through the max that picks m: more round-off, ~1e-4 at saturated gates.)
    E = _dot(dC_enter, C_enter, 2) + _dot(dn_enter, n_enter, 1)  # [B, NH, NC]
    if final_grad:
        E_f = _dot(dC_f.astype(f32), C_f, 2) + _dot(dn_f.astype(f32), n_f, 1)
    else:  # the final state is read by nothing differentiated: its cotangents are zero
        E_f = mx.zeros(E.shape[:-1], f32)
    E_ends = mx.concatenate([E[..., 1:], E_f[..., None]], axis=-1)  # chunk j's last step: c = j + 1
    last = (mx.arange(L) == L - 1).astype(f32)
    dF = E_ends[..., None] * last - da  # [B, NH, NC, L]
    # F[j, t] = (sum of the earlier chunks' last b) + b[j, t]: back to the chunk cumsums b.
    R = mx.sum(dF, axis=-1)
    later = mx.cumsum(R, axis=-1, reverse=True) - R
    db = db + dF + later[..., None] * last
    dig = dig + da
    _, (di, df) = mx.vjp(lambda i_, f_: chunk_gates(i_, f_, L), [i, f], [db, dig])
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), di.astype(i.dtype), df.astype(f.dtype),
            dC0.astype(C0.dtype), dn0.astype(n0.dtype), dm0.astype(m0.dtype))


def _differentiable(eps: float, L: int, fused: bool, has_state: bool, final_grad: bool = True,
                    terms: int | None = None, keep: bool = False) -> Callable:
    key = (float(eps), int(L), bool(fused), bool(has_state), bool(final_grad), terms, bool(keep))
    fn = _functions.get(key)
    if fn is None and keep:  # (h, C, n, m) and the kept entering states (C, n, m)

        @mx.custom_function
        def fn(q, k, v, i, f, C0, n0, m0):
            return _forward_keeping(q, k, v, i, f, C0, n0, m0, eps, L, terms)

        @fn.vjp
        def fn_vjp(primals, cotangents, outputs):
            if fused_backward_enabled():
                return fused_backward(primals, cotangents[:4], outputs[:4], eps, L, has_state, final_grad, terms,
                                      kept=outputs[4:])
            return _backward(primals, cotangents[:4], outputs[:4], eps, L, fused, has_state, final_grad)

        _functions[key] = fn
    elif fn is None:

        @mx.custom_function
        def fn(q, k, v, i, f, C0, n0, m0):
            return _forward(q, k, v, i, f, C0, n0, m0, eps, L, fused, terms)

        @fn.vjp
        def fn_vjp(primals, cotangents, outputs):
            if fused and fused_backward_enabled():
                return fused_backward(primals, cotangents, outputs, eps, L, has_state, final_grad, terms)
            return _backward(primals, cotangents, outputs, eps, L, fused, has_state, final_grad)

        _functions[key] = fn
    return fn


def _state_segments(num_chunks: int) -> int:
    from .chunkwise_fused import state_segments

    return state_segments(num_chunks)


def chunkwise_differentiable(
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
    fused: bool = False,
) -> tuple[mx.array, MLSTMState]:
    """Same contract as :func:`xlstm_metal.kernels.mlstm.mlstm_chunkwise`, differentiable by
    the vjp above. ``fused``: forward by the CUDA kernels (the caller checks they run).

    q, k [B, NH, S, DQK]; v [B, NH, S, DV]; i, f [B, NH, S]; state (C, n, m) or None.
    Returns h [B, NH, S, DV] (q's dtype) and the final (C, n, m) in ``state_dtype`` (without
    gradient inside :func:`final_states_unread`).
    """
    L = check_chunk_size(chunk_size)
    L = L if fused else min(L, q.shape[2])
    C0, n0, m0 = _state_f32(q, v, state)
    final_grad = _FINAL_STATES_READ.get()
    terms = _PRODUCT_TERMS.get() if fused else None
    # The forward's entering states kept for the backward: one bf16 term (the backward stores the
    # states as bf16), one segment.
    keep = fused and terms == 1 and _KEEP_STATES.get() and _state_segments(-(-q.shape[2] // L)) == 1
    h, C, n, m, *_ = _differentiable(eps, L, fused, state is not None, final_grad, terms, keep)(
        q, k, v, i, f, C0, n0, m0)
    if not final_grad:
        C, n, m = (mx.stop_gradient(x) for x in (C, n, m))
    return h, _cast_state((C, n, m), state_dtype)
