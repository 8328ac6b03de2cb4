"""One decode step of an xLSTM-Large model on a CPU as one C call (``decode_step.c``).

MLX's CPU back-end spends ~5 us of host and stream time on each node of a step's graph, and a
125m step has ~800 of them around its one-row products (benchmarks/NOTES.md, session 21). Where
the model is what that kernel computes (float32 state, plain float32 ``nn.Linear`` or affine
``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding`` layers of 2 to 8 bits, the reference norms,
cells and kernels; 1 to :data:`MAX_ROWS` rows, more in groups of that many where the weights
are quantized) :func:`decode_step` runs the whole step in C, reading every weight from the
module tree as it stands at the call (several rows read each weight row once: OpenBLAS's GEMM
would pack every matrix first; quantized weights as their packed integers, which is why
quantization saves time here too, where MLX's quantized matmul is slower than float32 on CPUs);
anything else (a LoRA layer, a user's module, bf16, more rows of float weights, a custom kernel)
returns None and the caller runs the MLX graph, the reference. It runs beside the BLAS
forwarder's row kernel (Linux CPUs: :func:`xlstm_metal._blas.gemv_rows`, whose row-major weights
it reads the same way);
``XLSTM_METAL_CPU_STEP=0`` turns it off.

The C source is compiled once per machine into the cache (as the BLAS forwarder is: any C
compiler, OpenMP where it has it); without a compiler the MLX graph runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ... import _blas
from ...quantization import MODES

SOURCE = Path(__file__).with_name("decode_step.c")
ENABLED = os.environ.get("XLSTM_METAL_CPU_STEP", "1") != "0"

_f32p = ctypes.POINTER(ctypes.c_float)


class _Quant(ctypes.Structure):
    """decode_step.c's xl_quant: a weight in MLX's affine quantization (bits 0: a float weight)."""
    _fields_ = [("w", ctypes.c_void_p), ("scales", _f32p), ("biases", _f32p), ("bits", ctypes.c_long),
                ("group", ctypes.c_long)]


#: The block weights that may be quantized, in xl_block.quant's order (decode_step.c's XL_Q ...).
_QUANT_FIELDS = ("w_q", "w_k", "w_v", "w_o", "w_i", "w_f", "w_out", "w_gate", "w_up", "w_down")


class _Block(ctypes.Structure):
    _fields_ = [(name, _f32p) for name in (
        "norm_mlstm", "w_q", "w_k", "w_v", "w_o", "w_i", "w_f", "b_i", "b_f", "mh_norm", "w_out", "norm_ffn",
        "w_gate", "w_up", "w_down", "C", "n", "m", "C_out", "n_out", "m_out")] + [
        ("norm_mlstm_eps", ctypes.c_float), ("mh_eps", ctypes.c_float), ("norm_ffn_eps", ctypes.c_float),
        ("quant", _Quant * len(_QUANT_FIELDS))]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_long) for name in ("E", "NH", "DQK", "DV", "F", "V", "num_blocks")] + [
        ("threads", ctypes.c_int), ("has_gate_cap", ctypes.c_int), ("has_logit_cap", ctypes.c_int),
        ("gate_cap", ctypes.c_float), ("logit_cap", ctypes.c_float), ("step_eps", ctypes.c_float),
        ("out_norm_eps", ctypes.c_float), ("embedding", _f32p), ("out_norm", _f32p), ("lm_head", _f32p),
        ("blocks", ctypes.POINTER(_Block)), ("work", _f32p), ("q_embedding", _Quant), ("q_head", _Quant)]


# ----------------------------------------------------------------------------- the library
_LIBRARY: ctypes.CDLL | None = None
#: Why the C step cannot run on this machine (no compiler, a failed build), or None.
UNAVAILABLE: str | None = None
#: Most rows one C step takes (more go through the MLX graph: OpenBLAS's GEMM is the better
#: product there). The C source's XL_MAX_ROWS.
MAX_ROWS = 8


def _build() -> Path:
    """The compiled library (the forwarder's row kernel, then ``decode_step.c``), made once per
    source and compiler into the cache."""
    cc = _blas._compiler()
    if cc is None:
        raise OSError("no C compiler (cc, gcc, clang or $CC) to build the CPU decode step")
    # prefill.c (kernels/cpu/prefill.py) shares this file's structures and helpers, and runs its
    # products through amx_gemm.c where the CPU has AMX
    source = _blas.ROW_KERNEL_SOURCE + "".join(
        SOURCE.with_name(name).read_text() for name in (SOURCE.name, "amx_gemm.c", "prefill.c"))
    key = hashlib.sha256(f"{source}|{cc}".encode()).hexdigest()[:16]
    target = _blas._cache_dir() / f"decode-step-{key}" / "libxlstm_decode_step.so"
    if not target.is_file():
        try:
            _blas.build_library(cc, source, target, ["-lm"], "the CPU decode step")
        except OSError:  # a compiler or assembler without AMX's instructions: OpenBLAS's GEMM only
            _blas.build_library(cc, source, target, ["-lm", "-DXL_NO_AMX"], "the CPU decode step")
    return target


def library() -> ctypes.CDLL | None:
    """The C step's library (built on first use), or None where it cannot be (:data:`UNAVAILABLE`)."""
    global _LIBRARY, UNAVAILABLE
    if _LIBRARY is None and UNAVAILABLE is None:
        try:
            lib = ctypes.CDLL(str(_build()))
            lib.xl_decode_step_buffers.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(ctypes.c_long),
                                                   ctypes.c_long, _f32p, _f32p, _f32p]
            lib.xl_decode_step_buffers.restype = ctypes.c_int
            lib.xl_work_floats.argtypes = [ctypes.POINTER(_Model), ctypes.c_long]
            lib.xl_work_floats.restype = ctypes.c_long
            lib.xl_max_rows.restype = ctypes.c_int
            lib.xl_wide_unpack_available.restype = ctypes.c_int
            lib.xl_amx_available.restype = ctypes.c_int
            lib.xl_openmp.restype = ctypes.c_int
            lib.xl_amx_peak_gflops.argtypes = [ctypes.c_int, ctypes.c_long]
            lib.xl_amx_peak_gflops.restype = ctypes.c_double
            lib.xl_amx_sgemm.argtypes = [ctypes.c_long] * 3 + [_f32p] * 3 + [ctypes.c_int]
            lib.xl_amx_sgemm.restype = ctypes.c_int
            lib.xl_prefill.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(ctypes.c_long), ctypes.c_long,
                                       ctypes.c_long, ctypes.c_long, ctypes.c_void_p, _f32p, _f32p]
            lib.xl_prefill.restype = ctypes.c_int
            lib.xl_prefill_work_floats.argtypes = [ctypes.POINTER(_Model), ctypes.c_long, ctypes.c_long, ctypes.c_int]
            lib.xl_prefill_work_floats.restype = ctypes.c_long
            lib.xl_fp4_as_affine8.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_long] * 3 + [
                ctypes.c_int, ctypes.c_int, ctypes.c_void_p, _f32p, _f32p]
            lib.xl_fp4_as_affine8.restype = None
            if lib.xl_max_rows() != MAX_ROWS:
                raise OSError(f"the CPU decode step's library takes {lib.xl_max_rows()} rows, not {MAX_ROWS}")
            _LIBRARY = lib
        except (OSError, subprocess.SubprocessError) as err:
            UNAVAILABLE = str(err)
    return _LIBRARY


# ------------------------------------------------------------------------- the model's arrays
class _Unsupported(Exception):
    """The model is not what the C step computes (the message says what differs); ``reads``:
    what was read up to there (the same reads give the same verdict)."""

    def __init__(self, reason: str, reads: "_Reads | None" = None):
        super().__init__(reason)
        self.reads = reads


class _Reads:
    """What :func:`_collect` read from the model: modules' entries (arrays, submodules) checked
    by identity, lists by their items, plain attributes by value. :meth:`unchanged` tells in
    ~0.1 ms whether a later tree would give the same plan (a full walk costs ~1 ms at 125m)."""

    def __init__(self) -> None:
        self.entries: list[tuple[Any, tuple]] = []
        self.values: list[tuple[Any, str, Any]] = []

    def entries_of(self, container: Any) -> Any:
        self.entries.append((container, tuple(dict.items(container)) if isinstance(container, dict)
                             else tuple(container)))
        return container

    def value(self, obj: Any, name: str) -> Any:
        value = getattr(obj, name)
        self.values.append((obj, name, value))
        return value

    def unchanged(self) -> bool:
        for container, items in self.entries:
            if len(container) != len(items):
                return False
            if isinstance(container, dict):
                if any(dict.get(container, key, None) is not item for key, item in items):
                    return False
            elif any(a is not b for a, b in zip(container, items)):
                return False
        return all(_same(getattr(obj, name), value) for obj, name, value in self.values)


def _same(a: Any, b: Any) -> bool:
    """a is b, or of one type and equal (an mx.Dtype does not compare with None)."""
    return a is b or (type(a) is type(b) and a == b)


class _Quantized:
    """A weight [rows, cols] in MLX's affine quantization as the C code reads it: the packed
    integers (uint32 [rows, cols * bits / 32]), scales and biases [rows, cols / group], from their
    row ``row`` on (a layer's rows in a fused group)."""

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array, bits: int, group: int, row: int = 0):
        self.weight, self.scales, self.biases, self.bits, self.group = weight, scales, biases, bits, group
        self.row = row

    def arrays(self) -> list[mx.array]:
        return [self.weight, self.scales, self.biases]


#: The 4-bit float (e2m1) codes as 2 v + 12: their values (0, 0.5, 1, 1.5, 2, 3, 4, 6 and the
#: negatives) lie on a half-step grid from -6 to 6, so a group of them times a scale s is affine
#: with 8-bit integers, scale s / 2 and bias -6 s, exactly.
_FP4_LEVELS = (12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0)
#: The 4-bit float formats and their (bits, group size): mxfp4 and nvfp4.
FP4_MODES = {mode: fixed for mode, fixed in MODES.items() if fixed is not None and fixed[0] == 4}


class _FP4AsAffine(_Quantized):
    """A 4-bit float format's weight (mxfp4: E8M0 scales, groups of 32; nvfp4: E4M3 scales, groups
    of 16) as the C code reads affine 8-bit weights: the same values, in arrays derived on first
    use (a layer whose fused group the plan reads instead is never converted), kept by the plan
    and rebuilt with it when the layer's arrays change. MLX's own quantized graph prefilled 512
    tokens of the 125m shape at 23 tok/s on a 2-core EPYC, the C code ~1,000 (BENCHMARKS.md,
    "Quantization modes")."""

    def __init__(self, weight: mx.array, scales: mx.array, mode: str, group: int, row: int = 0,
                 shared: list | None = None):
        self.source, self.mode, self.bits, self.group, self.row = (weight, scales), mode, 8, group, row
        self.shared = [None] if shared is None else shared  # one conversion for a fused group's layers

    def arrays(self) -> list[mx.array]:
        if self.shared[0] is None:
            self.shared[0] = fp4_as_affine8(*self.source, self.mode, self.group)
        return list(self.shared[0])

    weight = property(lambda self: self.arrays()[0])
    scales = property(lambda self: self.arrays()[1])
    biases = property(lambda self: self.arrays()[2])

    def at_row(self, row: int) -> "_FP4AsAffine":
        """The same conversion (shared, done once) read from ``row`` on: one layer of a fused group."""
        return _FP4AsAffine(*self.source, self.mode, self.group, row, self.shared)


def fp4_as_affine8_reference(weight: mx.array, scales: mx.array, mode: str) -> tuple[mx.array, mx.array, mx.array]:
    """A 4-bit float format's weight (uint32 [rows, cols / 8] codes, uint8 scales) as affine 8-bit
    (packed levels uint32 [rows, cols / 4], float32 scales and biases), in MLX's ops: the reference
    of :func:`fp4_as_affine8`."""
    rows, words = weight.shape
    codes = (weight[..., None] >> mx.arange(0, 32, 4, dtype=mx.uint32)) & 0xF  # code j at bits 4 j
    levels = mx.take(mx.array(_FP4_LEVELS, dtype=mx.uint8), codes.reshape(rows, words * 8).astype(mx.int32))
    scale = mx.power(mx.array(2.0), scales.astype(mx.float32) - 127.0) if mode == "mxfp4" \
        else mx.from_fp8(scales, dtype=mx.float32)
    # 4 levels per word, little-endian: MLX's 8-bit layout
    return mx.view(levels, mx.uint32), scale * 0.5, scale * -6.0


def fp4_as_affine8(weight: mx.array, scales: mx.array, mode: str, group: int) -> tuple[mx.array, mx.array, mx.array]:
    """:func:`fp4_as_affine8_reference` in one C pass over the codes (``xl_fp4_as_affine8``, on the C
    step's threads): a 7B mxfp4 model's conversion took MLX's ops ~110 s on a 2-core EPYC."""
    lib = library()
    if lib is None:
        raise OSError(f"the CPU decode step's library is unavailable: {UNAVAILABLE}")
    mx.eval(weight, scales)
    codes, groups = (np.ascontiguousarray(np.array(a, copy=False)) for a in (weight, scales))  # no copy if contiguous
    rows, cols = codes.shape[0], codes.shape[1] * 8
    levels = np.empty((rows, cols // 4), np.uint32)
    out_scales, out_biases = (np.empty(groups.shape, np.float32) for _ in range(2))
    lib.xl_fp4_as_affine8(codes.ctypes.data, groups.ctypes.data, rows, cols, group, int(mode == "mxfp4"),
                          max(1, _blas.gemv_threads()), levels.ctypes.data, _pointer(out_scales),
                          _pointer(out_biases))
    return mx.array(levels), mx.array(out_scales), mx.array(out_biases)


def _quantized(reads: _Reads, layer: Any, rows: int, cols: int, what: str) -> _Quantized:
    """``layer``'s quantized weight, where the C code computes what MLX's affine quantized matmul
    does (2 to 8 bits, groups of a multiple of 16 that divide ``cols``) or a 4-bit float format
    (mxfp4, nvfp4: read as affine 8-bit, :class:`_FP4AsAffine`); else _Unsupported."""
    bits, group, mode = (reads.value(layer, name) for name in ("bits", "group_size", "mode"))
    if FP4_MODES.get(mode) == (bits, group) and not cols % group \
            and layer.weight.dtype == mx.uint32 and layer.weight.shape == (rows, cols // 8) \
            and layer.scales.dtype == mx.uint8 and layer.scales.shape == (rows, cols // group):
        return _FP4AsAffine(layer.weight, layer.scales, mode, group)
    if mode != "affine" or bits not in (2, 3, 4, 5, 6, 8) or group % 16 or cols % group \
            or layer.get("biases") is None:
        raise _Unsupported(f"{what} is quantized in a way the C code does not read ({mode}, {bits} bits, "
                           f"groups of {group})", reads)
    if layer.weight.dtype != mx.uint32 or layer.weight.shape != (rows, cols * bits // 32) \
            or layer.scales.shape != (rows, cols // group) or layer.biases.shape != (rows, cols // group):
        raise _Unsupported(f"{what}'s quantized arrays do not hold a [{rows}, {cols}] weight", reads)
    return _Quantized(layer.weight, layer.scales, layer.biases, bits, group)


def _plain_weight(reads: _Reads, layer: Any, rows: int, cols: int, what: str,
                  bias: bool = False) -> tuple[mx.array | _Quantized, Any]:
    """(weight [rows, cols], bias or None) of a plain float32 ``nn.Linear`` or an affine
    ``nn.QuantizedLinear`` (or a subclass that computes as one)."""
    from ...cells.fused import fusion_kind  # noqa: PLC0415 (cells import the kernels)

    reads.entries_of(layer)
    kind = fusion_kind(layer)
    if kind is not None and kind[0] == "quantized":
        weight = _quantized(reads, layer, rows, cols, what)
    elif kind == ("linear", mx.float32):
        if layer.weight.shape != (rows, cols):
            raise _Unsupported(f"{what} has shape {layer.weight.shape}, not {(rows, cols)}", reads)
        weight = layer.weight
    else:
        raise _Unsupported(f"{what} is not a float32 nn.Linear or an affine nn.QuantizedLinear", reads)
    has_bias = "bias" in layer
    if has_bias and not bias:
        raise _Unsupported(f"{what} has a bias", reads)
    if has_bias and (layer.bias.dtype != mx.float32 or layer.bias.shape != (rows,)):
        raise _Unsupported(f"{what}'s bias is not float32 [{rows}]", reads)
    return weight, (layer.bias if has_bias else None)


def _norm(reads: _Reads, norm: Any, cls: type, size: int, what: str) -> tuple[mx.array, float]:
    """(weight, eps) of a float32 norm of exactly type ``cls`` (a biased norm is another type)."""
    reads.entries_of(norm)
    if type(norm) is not cls or norm.weight.dtype != mx.float32 or norm.weight.shape != (size,):
        raise _Unsupported(f"{what} is not a float32 {cls.__name__} over {size}", reads)
    return norm.weight, reads.value(norm, "eps")


def _fused_rows(reads: _Reads, owner: nn.Module, fusion: Any) -> dict[int, tuple[mx.array, int] | _Quantized]:
    """Where the graph reads each layer's rows while ``fuse_projections()``'s copy is current
    (:meth:`~xlstm_metal.cells.fused.FusedLayers._current`): {layer index: (the fused float
    weight, the layer's first row in it), or the fused quantized arrays from that row}; empty
    where each layer runs its own weight."""
    from ...cells.fused import fusion_groups  # noqa: PLC0415

    layers, fused = fusion._current(owner)
    if fused is None:
        return {}
    rows: dict[int, tuple[mx.array, int] | _Quantized] = {}
    for (kind, members), group in zip(fusion_groups(layers), reads.entries_of(fused)):
        reads.entries_of(group)
        start = 0
        as_affine = _FP4AsAffine(group["weight"], group["scales"], kind[3], kind[1]) \
            if kind[0] == "quantized" and kind[3] in FP4_MODES else None
        for j in members:
            if kind == ("linear", mx.float32):
                rows[j] = (group["weight"], start)
            elif kind[0] == "quantized" and kind[3] == "affine" and kind[4]:
                rows[j] = _Quantized(group["weight"], group["scales"], group["biases"], kind[2], kind[1], start)
            elif as_affine is not None:
                rows[j] = as_affine.at_row(start)
            start += layers[j].weight.shape[0]
    return rows


def _collect(model: nn.Module) -> tuple[list, dict, _Reads]:
    """The model's arrays in the C step's order, its sizes and what was read; or _Unsupported."""
    from ...blocks.xlstm_large import mLSTMBlock  # noqa: PLC0415
    from ...cells.ffn import _GATE_UP, FeedForward  # noqa: PLC0415
    from ...cells.mlstm import (  # noqa: PLC0415
        mLSTMOutputCell, mLSTMProjectionCell, mLSTMRecurrentKernelCell,
    )
    from ...cells.norms import MultiHeadLayerNorm, RMSNorm  # noqa: PLC0415
    from ...models.xlstm_large import Backbone, xLSTMLarge  # noqa: PLC0415
    from ...neurons.mlstm import mLSTMNeuron  # noqa: PLC0415

    reads = _Reads()
    if not isinstance(model, xLSTMLarge) or type(model)._logits is not xLSTMLarge._logits:
        raise _Unsupported("not an xLSTMLarge model", reads)
    reads.entries_of(model)
    if type(model.backbone) is not Backbone:
        raise _Unsupported("not an xLSTMLarge model", reads)
    c = reads.value(model, "config")
    residual = reads.value(model, "residual_dtype")
    if (residual is not None and residual != mx.float32) or reads.value(c, "inference_state_dtype") != "float32":
        raise _Unsupported("the residual stream or the state is not float32", reads)
    E, NH, DQK, DV, F, V = (reads.value(c, name) for name in (
        "embedding_dim", "num_heads", "qk_head_dim", "v_head_dim", "ffn_dim", "vocab_size"))
    backbone = reads.entries_of(model.backbone)
    embeddings = reads.entries_of(backbone.embeddings)
    if isinstance(embeddings, nn.QuantizedEmbedding):
        table = _quantized(reads, embeddings, V, E, "backbone.embeddings")
    elif type(embeddings) is nn.Embedding and embeddings.weight.dtype == mx.float32 \
            and embeddings.weight.shape == (V, E):
        table = embeddings.weight
    else:
        raise _Unsupported("backbone.embeddings is not a float32 nn.Embedding or an nn.QuantizedEmbedding", reads)
    out_norm, out_eps = (_norm(reads, backbone.out_norm, RMSNorm, E, "backbone.out_norm") if "out_norm" in backbone
                         else (None, 0.0))
    head = table if reads.value(c, "tie_word_embeddings") else \
        _plain_weight(reads, model.lm_head, V, E, "lm_head")[0]
    arrays: list = [table, out_norm, head]
    # eps: the out norm's, then each block's (norm_mlstm, multihead_norm, norm_ffn)
    eps, caps, step_eps = [out_eps], set(), set()
    # what prefill.py needs besides: the blocks' sequence kernels (name, chunk size, eps)
    sequence: set = set()
    for index, block in enumerate(reads.entries_of(backbone.blocks)):
        where = f"backbone.blocks.{index}"
        if type(block) is not mLSTMBlock:
            raise _Unsupported(f"{where} is not the reference mLSTM block", reads)
        reads.entries_of(block)
        if type(block.mlstm_layer) is not mLSTMNeuron or type(block.ffn) is not FeedForward:
            raise _Unsupported(f"{where} is not the reference mLSTM block", reads)
        layer, ffn = reads.entries_of(block.mlstm_layer), reads.entries_of(block.ffn)
        kernel = layer.recurrent_kernel_cell
        if type(layer.projection_cell) is not mLSTMProjectionCell or type(layer.output_cell) is not mLSTMOutputCell \
                or type(kernel) is not mLSTMRecurrentKernelCell \
                or reads.value(kernel, "step_kernel") not in ("step", "step_fused") \
                or reads.value(kernel, "state_dtype") != mx.float32:
            raise _Unsupported(f"{where}.mlstm_layer's cells or step kernel are not the reference ones", reads)
        w_i, b_i = _plain_weight(reads, layer.igate_preact, NH, E, f"{where}.mlstm_layer.igate_preact", bias=True)
        w_f, b_f = _plain_weight(reads, layer.fgate_preact, NH, E, f"{where}.mlstm_layer.fgate_preact", bias=True)
        projected = [_plain_weight(reads, getattr(layer, name), rows, E, f"{where}.mlstm_layer.{name}")[0]
                     for name, rows in (("q", NH * DQK), ("k", NH * DQK), ("v", NH * DV), ("ogate_preact", NH * DV))]
        gate_up = [_plain_weight(reads, ffn.proj_up_gate, F, E, f"{where}.ffn.proj_up_gate")[0],
                   _plain_weight(reads, ffn.proj_up, F, E, f"{where}.ffn.proj_up")[0]]
        # while fuse_projections()'s copies are current the graph reads them: so does the C step
        fused = _fused_rows(reads, layer, layer.projection_cell.fusion)
        projected, (w_i, w_f) = [fused.get(j, w) for j, w in enumerate(projected)], \
            [fused.get(4 + j, w) for j, w in enumerate((w_i, w_f))]
        fused = _fused_rows(reads, ffn, _GATE_UP)
        gate_up = [fused.get(j, w) for j, w in enumerate(gate_up)]
        norm_mlstm, mlstm_eps = _norm(reads, block.norm_mlstm, RMSNorm, E, f"{where}.norm_mlstm")
        mh_norm, mh_eps = _norm(reads, layer.multihead_norm, MultiHeadLayerNorm, NH * DV, f"{where}.mlstm_layer.multihead_norm")
        norm_ffn, ffn_eps = _norm(reads, block.norm_ffn, RMSNorm, E, f"{where}.norm_ffn")
        arrays += [
            norm_mlstm, *projected, w_i, w_f, b_i, b_f, mh_norm,
            _plain_weight(reads, layer.out_proj, E, NH * DV, f"{where}.mlstm_layer.out_proj")[0],
            norm_ffn,
            *gate_up,
            _plain_weight(reads, ffn.proj_down, E, F, f"{where}.ffn.proj_down")[0],
        ]
        eps += [mlstm_eps, mh_eps, ffn_eps]
        step_eps.add(reads.value(kernel, "eps"))
        parallel = reads.entries_of(layer.parallel_kernel_cell)
        sequence.add((type(parallel), reads.value(parallel, "kernel"), reads.value(parallel, "chunk_size"),
                      reads.value(parallel, "eps"), reads.value(parallel, "state_dtype")))
        # the graph caps the gates with the projection cell's value (set from the config)
        caps.add(reads.value(layer.projection_cell, "gate_soft_cap"))
        if reads.value(layer.projection_cell, "num_heads") != NH:
            raise _Unsupported(f"{where}.mlstm_layer's projection cell has other heads than the config", reads)
    if len(caps) > 1:
        raise _Unsupported("the blocks' gate soft caps differ", reads)
    if len(step_eps) > 1:
        raise _Unsupported("the blocks' step kernels differ in eps", reads)
    sizes = dict(E=E, NH=NH, DQK=DQK, DV=DV, F=F, V=V, num_blocks=len(backbone.blocks),
                 gate_cap=caps.pop() if caps else None, logit_cap=reads.value(c, "output_logit_soft_cap"),
                 step_eps=step_eps.pop() if step_eps else 0.0, eps=tuple(eps), sequence=sequence)
    return arrays, sizes, reads


def _pointer(view: np.ndarray) -> Any:
    return view.ctypes.data_as(_f32p)


def _view(array: mx.array, what: str) -> np.ndarray:
    """A float32 array's memory as NumPy sees it (no copy); row-major and contiguous, or _Unsupported."""
    view = np.array(array, copy=False)
    if view.dtype != np.float32 or not view.flags.c_contiguous:
        raise _Unsupported(f"{what} is not a contiguous float32 array")
    return view


class _Plan:
    """The C structures for one set of the model's arrays (kept alive here), its work and output
    buffers; rebuilt whenever the tree holds other arrays."""

    _BLOCK_FIELDS = ("norm_mlstm", "w_q", "w_k", "w_v", "w_o", "w_i", "w_f", "b_i", "b_f", "mh_norm", "w_out",
                     "norm_ffn", "w_gate", "w_up", "w_down")

    def __init__(self, reads: _Reads, arrays: list, sizes: dict, threads: int, lib: ctypes.CDLL):
        self.reads, self.threads = reads, threads
        self.sequence = sizes["sequence"]  # prefill.py's check: {(cell type, kernel, chunk, eps, dtype)}
        self.prefill_work: np.ndarray | None = None  # prefill.py's work space, kept between calls
        self.lock = threading.Lock()
        s = sizes
        NH, count = s["NH"], s["num_blocks"]
        self.views: dict[int, np.ndarray] = {}
        self.zeros_bias = np.zeros(NH, np.float32)  # gate projections without a bias

        self.converted: dict[int, mx.array] = {}  # float32 copies of bf16/float16 scales and biases

        def ptr(array, what):
            """A pointer to ``array`` or, for (array, row), to that row of it (None: a quantized
            weight, which ``quant`` points to)."""
            if array is None or isinstance(array, _Quantized):
                return None
            array, row = array if isinstance(array, tuple) else (array, 0)
            view = self.views.get(id(array))
            if view is None:
                view = self.views[id(array)] = _view(array, what)
            return _pointer(view[row:])

        def quant(target: _Quant, weight, what: str) -> None:
            """``target`` = the C view of a quantized ``weight`` (unchanged for a float one)."""
            if not isinstance(weight, _Quantized):
                return
            packed = self.views.get(id(weight.weight))
            if packed is None:
                packed = self.views[id(weight.weight)] = np.array(weight.weight, copy=False)
                if not packed.flags.c_contiguous:
                    raise _Unsupported(f"{what}'s packed weight is not contiguous")
            target.w = packed[weight.row:].ctypes.data
            for name in ("scales", "biases"):
                array = getattr(weight, name)
                if array.dtype != mx.float32:  # once per array (a fused group's layers share it)
                    if id(array) not in self.converted:
                        self.converted[id(array)] = array.astype(mx.float32)
                        mx.eval(self.converted[id(array)])
                    array = self.converted[id(array)]
                setattr(target, name, ptr((array, weight.row), f"{what}'s {name}"))
            target.bits, target.group = weight.bits, weight.group

        self.blocks = (_Block * count)()
        per_block = len(self._BLOCK_FIELDS)
        for index in range(count):
            block = self.blocks[index]
            own = arrays[3 + index * per_block: 3 + (index + 1) * per_block]
            for name, array in zip(self._BLOCK_FIELDS, own):
                if name in ("b_i", "b_f") and array is None:
                    setattr(block, name, _pointer(self.zeros_bias))
                else:
                    setattr(block, name, ptr(array, f"backbone.blocks.{index}'s {name}"))
                if name in _QUANT_FIELDS:
                    quant(block.quant[_QUANT_FIELDS.index(name)], array, f"backbone.blocks.{index}'s {name}")
            block.norm_mlstm_eps, block.mh_eps, block.norm_ffn_eps = s["eps"][1 + 3 * index: 4 + 3 * index]
        model = self.model = _Model()
        for name in ("E", "NH", "DQK", "DV", "F", "V", "num_blocks"):
            setattr(model, name, s[name])
        model.threads = threads
        model.has_gate_cap, model.gate_cap = s["gate_cap"] is not None, s["gate_cap"] or 0.0
        model.has_logit_cap, model.logit_cap = s["logit_cap"] is not None, s["logit_cap"] or 0.0
        model.step_eps, model.out_norm_eps = s["step_eps"], s["eps"][0]
        model.embedding = ptr(arrays[0], "backbone.embeddings.weight")
        model.out_norm = ptr(arrays[1], "backbone.out_norm.weight")
        model.lm_head = ptr(arrays[2], "lm_head.weight")
        quant(model.q_embedding, arrays[0], "backbone.embeddings")
        quant(model.q_head, arrays[2], "lm_head")
        self.lib = lib
        self._by_rows: dict[int, _Rows] = {}
        #: Quantized weights in the tree: then more than MAX_ROWS rows still take the C step.
        self.quantized = any(isinstance(a, _Quantized) for a in arrays)

    def rows(self, count: int) -> "_Rows":
        """The structures and buffers for ``count`` rows (made on first use)."""
        found = self._by_rows.get(count)
        if found is None:
            found = self._by_rows[count] = _Rows(self, count)
        return found


class _Rows:
    """A plan's C structures for one row count: the blocks (their state pointers set by each
    step), the token buffer and the work space; the sizes of a step's output (the new state, then
    the logits: one MLX array the C code writes) and the last output's arrays (weak references)
    with its address, so the state a caller passes back is read where the step wrote it."""

    def __init__(self, plan: _Plan, rows: int):
        c = plan.model
        self.blocks = (_Block * c.num_blocks)()
        ctypes.memmove(self.blocks, plan.blocks, ctypes.sizeof(self.blocks))
        self.shapes = ((rows, c.NH, c.DQK, c.DV), (rows, c.NH, c.DQK), (rows, c.NH, 1))
        self.sizes = [c.num_blocks * int(np.prod(shape)) for shape in self.shapes]  # C, n, m of every block
        self.state_floats = sum(self.sizes)
        self.logits_shape = (rows, 1, c.V)
        self.tokens = (ctypes.c_long * rows)()
        self.model = _Model.from_buffer_copy(c)
        self.model.blocks = self.blocks
        self.work = np.empty(plan.lib.xl_work_floats(ctypes.byref(self.model), rows), np.float32)
        self.model.work = _pointer(self.work)
        self.returned: tuple[tuple, int] | None = None

    def returned_address(self, state: list | None) -> int | None:
        """The address of the step output that ``state`` is, every array the one the last step
        returned (still alive, so its memory too) and still where the step wrote it (an array
        given new values, ``C[...] = x``, is the same object with other memory); else None."""
        if self.returned is None or state is None:
            return None
        refs, address = self.returned
        if len(state) * 3 != len(refs):
            return None
        i = 0
        for block_state in state:
            if not isinstance(block_state, (tuple, list)) or len(block_state) != 3:
                return None
            for array in block_state:
                if refs[i]() is not array:
                    return None
                i += 1
        blocks, starts = len(state), (0, self.sizes[0], self.sizes[0] + self.sizes[1])
        try:
            for index, block_state in enumerate(state):
                for array, start, size in zip(block_state, starts, self.sizes):
                    # the memory's address through the buffer protocol (~0.4 us; a NumPy view ~1.4)
                    if ctypes.addressof(ctypes.c_char.from_buffer(memoryview(array))) != \
                            address + 4 * (start + index * size // blocks):
                        return None
        except (TypeError, ValueError, BufferError):  # no writable buffer: not the step's memory
            return None
        return address

    def outputs(self, out: mx.array, blocks: int) -> tuple[mx.array, list]:
        """The step's output array -> (logits [rows, 1, V], [(C, n, m) per block]), views of it."""
        logits = out[self.state_floats:].reshape(self.logits_shape)
        parts, start = [], 0
        for size, shape in zip(self.sizes, self.shapes):
            parts.append(out[start: start + size].reshape(blocks * shape[0], *shape[1:]))
            start += size
        return logits, _per_block(parts, blocks)


@contextlib.contextmanager
def switched_flag(module: Any, enabled: bool) -> Iterator[None]:
    """Inside: ``module.ENABLED`` is ``enabled``; its previous value afterwards."""
    previous, module.ENABLED = module.ENABLED, enabled
    try:
        yield
    finally:
        module.ENABLED = previous


def switched(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Inside: :data:`ENABLED` is ``enabled`` (comparisons of the C step with the MLX graph in one
    process); its previous value afterwards."""
    return switched_flag(sys.modules[__name__], enabled)


@contextlib.contextmanager
def library_switch(flag: str, enabled: bool) -> Iterator[bool]:
    """Inside: the library's ``int flag`` is ``enabled`` (its previous value afterwards). Yields
    whether that form runs inside: ``enabled`` and the library's ``<flag>_available()``."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the CPU decode step is not built: {UNAVAILABLE}")
    value = ctypes.c_int.in_dll(lib, flag)
    previous, value.value = value.value, int(enabled)
    try:
        yield bool(enabled and getattr(lib, f"{flag}_available")())
    finally:
        value.value = previous


def wide_unpacking(enabled: bool) -> contextlib.AbstractContextManager[bool]:
    """Inside: quantized products at 2, 3, 5 and 6 bits (and 4 bits in groups of 16, which MLX
    does not make) unpack with AVX-512BW where ``enabled`` and this CPU and build have it, else
    the portable way (tests compare both). Yields whether the AVX-512BW form runs inside."""
    return library_switch("xl_wide_unpack", enabled)


def held_bytes(model: nn.Module) -> int:
    """Bytes of NumPy buffers the C step and the C prefill (prefill.py) keep with ``model``
    between calls (their work space): memory that MLX's own counters do not see (the step's
    outputs are MLX's arrays)."""
    plan = getattr(model, "_cpu_step_plan", None)
    if not isinstance(plan, _Plan):
        return 0
    rows = sum(r.work.nbytes for r in plan._by_rows.values())
    return rows + (plan.prefill_work.nbytes if plan.prefill_work is not None else 0)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :func:`decode_step` would not stand for ``model(input_ids, state)`` (None: it would,
    for 1 to :data:`MAX_ROWS` rows): an xLSTMLarge whose class keeps xLSTMLarge's ``__call__``."""
    from ...models.xlstm_large import xLSTMLarge  # noqa: PLC0415

    if not ENABLED:
        return "turned off by XLSTM_METAL_CPU_STEP=0"
    if not _blas.gemv_rows():
        return ("the BLAS forwarder's row kernel is off (it streams the rows the C step reads: Linux CPUs)"
                + (f": {_blas.GEMV_ROWS_REASON}" if _blas.GEMV_ROWS_REASON else ""))
    if getattr(type(model), "__call__", None) is not xLSTMLarge.__call__:
        return f"{type(model).__name__}.__call__ is not xLSTMLarge's"
    if mx.default_device() != mx.cpu:
        return "not on the CPU"
    lib = library()
    if lib is None:
        return UNAVAILABLE
    one_thread = _blas.one_thread_reason(lib, "the C step")
    if one_thread is not None:
        return one_thread
    try:
        _plan(model, lib)
    except _Unsupported as err:
        return str(err)
    return None


class _Refused:
    """A model the C step does not compute, and what was read to find that out."""

    def __init__(self, reads: _Reads, threads: int, reason: str):
        self.reads, self.threads, self.reason = reads, threads, reason


def _plan(model: nn.Module, lib: ctypes.CDLL) -> _Plan:
    """The model's plan: the cached one while the tree reads the same (:meth:`_Reads.unchanged`)
    and the threads are the same, else a new one; _Unsupported (cached alike) where it does not apply."""
    threads = max(1, _blas.gemv_threads())
    cached = getattr(model, "_cpu_step_plan", None)
    if cached is not None and cached.threads == threads and cached.reads.unchanged():
        if isinstance(cached, _Refused):
            raise _Unsupported(cached.reason)
        return cached
    reads = _Reads()
    try:
        arrays, sizes, reads = _collect(model)
        mx.eval([a.arrays() if isinstance(a, _Quantized) else a[0] if isinstance(a, tuple) else a
                 for a in arrays if a is not None])
        plan = _Plan(reads, arrays, sizes, threads, lib)
    except _Unsupported as err:
        plan = _Refused(err.reads or reads, threads, str(err))
    try:  # not in the module tree: a cache of what the tree holds, checked on every call
        object.__setattr__(model, "_cpu_step_plan", plan)
    except AttributeError:
        pass
    if isinstance(plan, _Refused):
        raise _Unsupported(plan.reason)
    return plan


def _state_views(state: list | None, c: _Model, rows: int) -> list | None:
    """The entering state's memory per block ([C, n, m] NumPy views) for ``rows`` rows of the
    model ``c``, [] for the zero state (None); None where the C code cannot read it (a deferred
    decode state: CUDA's; other shapes or dtypes; a strided view: the graph reads it as it is)."""
    if state is None:
        return []
    shapes = ((rows, c.NH, c.DQK, c.DV), (rows, c.NH, c.DQK), (rows, c.NH, 1))
    if len(state) != c.num_blocks or any(
            not isinstance(block_state, (tuple, list)) or len(block_state) != 3
            or any(a.shape != shape or a.dtype != mx.float32 for a, shape in zip(block_state, shapes))
            for block_state in state):
        return None
    mx.eval(state)
    try:
        return [[_view(a, "the state") for a in block_state] for block_state in state]
    except _Unsupported:
        return None


def _mlx_state(C: np.ndarray, n: np.ndarray, m: np.ndarray) -> list:
    """The C prefill's state buffers [blocks, rows, ...] -> [(C, n, m) per block] as MLX arrays
    (lazy: the caller evaluates). MLX copies each buffer into an array of its own: one copy per
    buffer and a split (36 copies of 12 blocks' states took 1.0-1.4 ms at 125m, three and their
    splits 0.2-0.3 ms)."""
    return _per_block([mx.array(buffer.reshape(-1, *buffer.shape[2:])) for buffer in (C, n, m)], C.shape[0])


def _quantized_plan(model: nn.Module) -> bool:
    """Whether the C step serves ``model`` and reads quantized weights. Beyond MAX_ROWS rows only
    those take the C step in groups: float weights are read once for all rows by MLX's GEMM (125m
    float32, 16 rows: 85 ms a step, against 113 in two C calls; 9 rows level), while MLX's CPU
    quantized products go row by row below 16 rows and dequantize every weight above (125m 4-bit,
    9 / 16 / 32 rows: 1,014 / 480 / 642 ms a step, the C calls 50 / 76 / 168; 2-core EPYC)."""
    lib = library()
    if lib is None:
        return False
    try:
        return _plan(model, lib).quantized
    except _Unsupported:
        return False


def _decode_step_in_groups(model: nn.Module, input_ids: mx.array, state: list | None) -> tuple[mx.array, list] | None:
    """:func:`decode_step` for more than :data:`MAX_ROWS` rows of a quantized model: groups of up
    to MAX_ROWS rows, one C call each (rows never mix), the logits and states joined along the
    batch axis. Such a model (kept quantized where the C step serves it) ran MLX's quantized
    products there: the packaged model's 12 rows decoded ~10x slower than 8 (lm-eval's
    generate_until, 16 requests: 10.5 s against 0.95 s; :func:`_quantized_plan`)."""
    B = input_ids.shape[0]
    parts = []
    for first in range(0, B, MAX_ROWS):
        rows = slice(first, min(first + MAX_ROWS, B))
        part = decode_step(model, input_ids[rows],
                           None if state is None else [tuple(a[rows] for a in block) for block in state])
        if part is None:
            return None
        parts.append(part)
    logits = mx.concatenate([logits for logits, _ in parts], axis=0)
    new_state = [tuple(mx.concatenate([part_state[b][i] for _, part_state in parts], axis=0) for i in range(3))
                 for b in range(len(parts[0][1]))]
    mx.eval(logits, new_state)
    return logits, new_state


def _per_block(parts: list, count: int) -> list:
    """[C, n, m], each every block's stacked ([count * rows, ...]) -> [(C, n, m) per block]."""
    return list(zip(*(mx.split(part, count, axis=0) if count > 1 else [part] for part in parts)))


def decode_step(model: nn.Module, input_ids: mx.array, state: list | None) -> tuple[mx.array, list] | None:
    """``xLSTMLarge.__call__(model, input_ids, state)`` for one token of each of B rows
    (input_ids [B, 1]) as one C call per :data:`MAX_ROWS` rows (more than that: quantized
    models only, see :func:`_quantized_plan`): (logits [B, 1, V], the new
    state: (C [B, NH, DQK, DV], n [B, NH, DQK], m [B, NH, 1]) per block), equal to the MLX
    graph's to float32 round-off. None where it does not apply (see the module docstring): then
    the caller runs the model."""
    if not ENABLED or mx.default_device() != mx.cpu or input_ids.ndim != 2 or input_ids.shape[1] != 1 \
            or input_ids.shape[0] < 1 or not _blas.gemv_rows():
        return None
    if input_ids.shape[0] > MAX_ROWS:
        return _decode_step_in_groups(model, input_ids, state) if _quantized_plan(model) else None
    lib = library()
    if lib is None:
        return None
    try:
        plan = _plan(model, lib)
    except _Unsupported:
        return None
    c = plan.model
    B = input_ids.shape[0]
    tokens = [row[0] for row in input_ids.tolist()]
    with plan.lock:  # one step at a time through the plan's buffers
        rows = plan.rows(B)
        address = rows.returned_address(state)
        if address is None:  # a state of the caller's (or the zero state): its arrays' memory
            views = _state_views(state, c, B)
            if views is None:
                return None
            for index, block in enumerate(rows.blocks):
                if not views:
                    block.C = block.n = block.m = None
                else:
                    block.C, block.n, block.m = (_pointer(v) for v in views[index])
        # the new state and the logits, written by the C code into one array of MLX's (no copies)
        out = mx.zeros((rows.state_floats + B * c.V,), dtype=mx.float32)
        mx.eval(out)
        base = np.array(out, copy=False).ctypes.data
        rows.tokens[:] = tokens
        if lib.xl_decode_step_buffers(ctypes.byref(rows.model), rows.tokens, B,
                                      ctypes.cast(base + 4 * rows.state_floats, _f32p),
                                      None if address is None else ctypes.cast(address, _f32p),
                                      ctypes.cast(base, _f32p)) != 0:
            raise ValueError(f"token ids {tokens} are not all inside the vocabulary [0, {c.V})")
        logits, new_state = rows.outputs(out, c.num_blocks)
        mx.eval(logits, new_state)
        rows.returned = (tuple(weakref.ref(a) for block_state in new_state for a in block_state), base)
    return logits, new_state
