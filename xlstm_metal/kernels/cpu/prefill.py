"""A prompt through an xLSTM-Large model on a CPU as one C call per piece (``prefill.c``).

On a CPU MLX runs every operation between a prefill's matrix products (norms, gates, the
chunkwise kernel's small products and exponentials, SwiGLU, copies) on one thread, while
OpenBLAS's second thread waits: about a quarter of a 512-token 125m prefill's wall time on a
2-core machine (benchmarks/NOTES.md). :func:`prefill` runs the whole prompt in C on all the
threads the BLAS uses, each running OpenBLAS's GEMM on its share of every product. It stands for
:meth:`xLSTMLarge.prefill <xlstm_metal.models.xlstm_large.xLSTMLarge.prefill>` where the model is
what the C code computes (the checks of :mod:`.decode_step`: float32 state, float32
``nn.Linear`` or MLX's affine quantized layers, the reference norms and cells; and one of this
package's sequence kernels, which all agree to float32 round-off), reading every weight from the
module tree as it stands at the call (a quantized one through tiles of dequantized rows for the
GEMM); anything else returns None and the MLX graph runs. Linux CPUs with the
OpenBLAS that :mod:`xlstm_metal._blas` loads; ``XLSTM_METAL_CPU_PREFILL=0`` turns it off. Where
the CPU has AMX (Intel Xeon, 4th generation on), the products run on its bf16 tiles as float32
products (:func:`amx_products`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ... import _blas
from . import decode_step as _step

ENABLED = os.environ.get("XLSTM_METAL_CPU_PREFILL", "1") != "0"

#: Most tokens (rows x positions) one C call takes: longer prompts go through in pieces, the
#: state carried (work space ~90 MB at 125m, ~600 MB at 7B).
PIECE_TOKENS = 2048


def switched(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Inside: :data:`ENABLED` is ``enabled`` (comparisons with the MLX graph in one process)."""
    return _step.switched_flag(sys.modules[__name__], enabled)


def amx_products(enabled: bool) -> contextlib.AbstractContextManager[bool]:
    """Inside: the C prefill's products (more than eight rows) run on AMX's bf16 tiles, each
    float32 value split into three bf16 parts (``amx_gemm.c``), where ``enabled`` and this CPU and
    build have them, else through OpenBLAS's SGEMM (comparisons and tests). Yields whether the
    tiles run inside."""
    return _step.library_switch("xl_amx", enabled)


def fused_swiglu(enabled: bool) -> contextlib.AbstractContextManager[bool]:
    """Inside: where the FFN's products run on the tiles (an input within one stretch of 768),
    its gate and up products, SwiGLU and the split of SwiGLU's output into the down product's
    planes run as one pass over 32 x 32 blocks (``prefill.c``'s ``amx_swiglu``) where ``enabled``,
    else one after another (tests compare both: the same bits). Yields whether the one pass can
    run inside."""
    return _step.library_switch("xl_amx_swiglu", enabled)


def tiles_run(lib: ctypes.CDLL) -> bool:
    """Whether the C library's products run on AMX tiles now: this CPU and build have them and
    :func:`amx_products` has not turned them off."""
    return bool(lib.xl_amx_available() and ctypes.c_int.in_dll(lib, "xl_amx").value)


def library_reason(lib: ctypes.CDLL) -> str | None:
    """Why the C library itself should leave prompts to the MLX graph whatever the model, or None:
    a one-thread build (:func:`xlstm_metal._blas.one_thread_reason`) where the tiles do not run.
    One thread of AMX tiles still beats OpenBLAS's threads (clang 14, 2-core Xeon, 125m, 512
    tokens: 1,191-1,407 tok/s against the graph's 854-861; without the tiles 805)."""
    one_thread = _blas.one_thread_reason(lib, "the C prefill")
    return None if one_thread is None or tiles_run(lib) else one_thread + ", and the AMX tiles do not run"


def _sequence_reason(plan: _step._Plan) -> str | None:
    """Why the blocks' sequence kernels are not what the C code computes, or None."""
    from ...cells.mlstm import mLSTMParallelKernelCell  # noqa: PLC0415
    from .. import get_mlstm_kernel  # noqa: PLC0415

    if len(plan.sequence) != 1:
        return "the blocks' sequence kernels differ"
    cell_type, kernel, chunk, _, dtype = next(iter(plan.sequence))
    if cell_type is not mLSTMParallelKernelCell:
        return "the sequence kernel cell is not the reference one"
    try:  # this package's kernels all agree with the reference to round-off; a user's may not
        own = get_mlstm_kernel(kernel).__module__.startswith("xlstm_metal.kernels")
    except KeyError:
        own = False
    if not own:
        return f"the sequence kernel {kernel!r} is not one of this package's"
    if dtype != mx.float32 or not isinstance(chunk, int) or chunk < 1:
        return "the sequence kernel's state is not float32 or its chunk size is not a positive integer"
    return None


def _ready(model: nn.Module) -> tuple[ctypes.CDLL, _step._Plan, int] | str:
    """(library, plan, sgemm address), or why the C prefill does not stand for ``model``."""
    from ...models.xlstm_large import xLSTMLarge  # noqa: PLC0415

    if not ENABLED:
        return "turned off by XLSTM_METAL_CPU_PREFILL=0"
    if mx.default_device() != mx.cpu:
        return "not on the CPU"
    if type(model).prefill is not xLSTMLarge.prefill:
        return f"{type(model).__name__}.prefill is not xLSTMLarge's"
    sgemm = _blas.openblas_sgemm()
    if sgemm is None:
        return "no OpenBLAS loaded by xlstm_metal._blas (its GEMM runs the products)"
    lib = _step.library()
    if lib is None:
        return _step.UNAVAILABLE
    reason = library_reason(lib)
    if reason is not None:
        return reason
    try:
        plan = _step._plan(model, lib)
    except _step._Unsupported as err:
        return str(err)
    reason = _sequence_reason(plan)
    return reason if reason is not None else (lib, plan, sgemm)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :func:`prefill` would not stand for ``model.prefill`` (None: it would)."""
    ready = _ready(model)
    return ready if isinstance(ready, str) else None


def prefill(model: nn.Module, input_ids: mx.array, state: list | None = None,
            chunk_size: int | None = None) -> tuple[mx.array, list] | None:
    """``xLSTMLarge.prefill(input_ids, state, chunk_size=...)`` in C: input_ids [B, S] -> (logits
    of the last position [B, V], the state after the prompt: (C [B, NH, DQK, DV], n [B, NH, DQK],
    m [B, NH, 1]) per block), equal to the MLX graph's to float32 round-off. The prompt goes
    through in pieces of at most ``chunk_size`` positions (and :data:`PIECE_TOKENS` tokens in
    all). None where it does not apply (see the module docstring): then the caller runs the graph."""
    if not ENABLED or input_ids.ndim != 2 or input_ids.shape[1] == 0 \
            or not mx.issubdtype(input_ids.dtype, mx.integer):
        return None
    ready = _ready(model)
    if isinstance(ready, str):
        return None
    lib, plan, sgemm = ready
    c = plan.model
    rows, S, count = input_ids.shape[0], input_ids.shape[1], c.num_blocks
    NH, DQK, DV, V = c.NH, c.DQK, c.DV, c.V
    views = _step._state_views(state, c, rows)
    if views is None:
        return None
    _, _, chunk, eps, _ = next(iter(plan.sequence))
    L = min(chunk, S)
    piece = max(1, min(S, PIECE_TOKENS // rows, chunk_size or S))
    if piece >= L:  # pieces of whole chunks: the kernel's chunks are then the graph's
        piece = piece // L * L
    tokens = np.ascontiguousarray(np.array(input_ids, copy=False), dtype=np.int64)
    C = np.empty((count, rows, NH, DQK, DV), np.float32)
    n = np.empty((count, rows, NH, DQK), np.float32)
    m = np.empty((count, rows, NH, 1), np.float32)
    logits = np.empty((rows, V), np.float32)
    model_c = _step._Model.from_buffer_copy(c)
    model_c.step_eps = eps  # the sequence kernel's
    blocks = (_step._Block * count)()
    ctypes.memmove(blocks, plan.blocks, ctypes.sizeof(blocks))
    model_c.blocks = blocks
    with plan.lock:  # one call at a time through the plan's work space
        floats = lib.xl_prefill_work_floats(ctypes.byref(model_c), rows * piece, L, c.threads)
        if plan.prefill_work is None or plan.prefill_work.size < floats:
            plan.prefill_work = None
            plan.prefill_work = np.empty(floats, np.float32)
        work = _step._pointer(plan.prefill_work)
        for start in range(0, S, piece):
            part = np.ascontiguousarray(tokens[:, start:start + piece])
            for index, block in enumerate(blocks):
                if start == 0 and not views:
                    block.C = block.n = block.m = None
                else:  # the entering state: the caller's, then the previous piece's (in place)
                    source = views[index] if start == 0 else (C[index], n[index], m[index])
                    block.C, block.n, block.m = (_step._pointer(a) for a in source)
                block.C_out, block.n_out, block.m_out = (_step._pointer(a[index]) for a in (C, n, m))
            with _blas.openblas_threads(1):  # each OpenMP thread runs its own share's GEMM
                status = lib.xl_prefill(ctypes.byref(model_c), part.ctypes.data_as(ctypes.POINTER(ctypes.c_long)),
                                        rows, part.shape[1], L, sgemm, work, _step._pointer(logits))
            if status == 1:
                raise ValueError(f"input_ids hold token ids outside the vocabulary [0, {V})")
            if status != 0:
                raise RuntimeError(f"the C prefill refused its sizes (status {status})")
    new_state = _step._mlx_state(C, n, m)
    out = mx.array(logits)
    mx.eval(out, new_state)
    return out, new_state
