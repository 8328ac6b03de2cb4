"""Token embeddings whose gradient has the same bits in every run.

The gradient of a lookup ``weight[ids]`` sums the cotangent rows of repeated ids. MLX takes it
with a scatter-add, which on GPUs adds those rows with atomics in whatever order the threads
arrive: two runs of one training step then differ in the last bits of the embedding gradient,
and from there in everything (measured on an H100, MLX 0.32.4: five gradients of one batch, five
different results). Inside :func:`ordered_embedding_grads` the models' lookups of a plain
``nn.Embedding`` take their gradient from :func:`summed_rows` instead: the same sums, each in one
fixed order (on CUDA one kernel; MLX ops elsewhere). The forward values are the lookup's, bit for
bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from ..kernels.fast.quantized import check_quantized_rows
from ..kernels.fast.rows_sum import summed_rows_cuda
from ..kernels.fast.step import cuda_available

_ORDERED_GRADS = contextvars.ContextVar("xlstm_metal_ordered_embedding_grads", default=False)


@contextlib.contextmanager
def ordered_embedding_grads(enabled: bool = True) -> Iterator[None]:
    """Inside: :func:`embed_tokens` of a plain ``nn.Embedding`` differentiates through
    :func:`summed_rows` (the training step turns it on where the scatter-add is unordered)."""
    token = _ORDERED_GRADS.set(enabled)
    try:
        yield
    finally:
        _ORDERED_GRADS.reset(token)


def scatter_add_is_unordered() -> bool:
    """Whether MLX's scatter-add on the default device sums in thread order (every GPU backend;
    the CPU's is sequential). ``XLSTM_METAL_ORDERED_EMBEDDING_GRADS=0`` says no everywhere (MLX's
    scatter-add then runs, as before)."""
    if os.environ.get("XLSTM_METAL_ORDERED_EMBEDDING_GRADS", "1") == "0":
        return False
    return mx.default_device() != mx.cpu


def embed_tokens(embedding: nn.Module, ids: mx.array, model: nn.Module | None = None) -> mx.array:
    """ids [...] (integers) -> ``embedding(ids)`` [..., E]. The module in the tree is what runs;
    only a plain ``nn.Embedding`` inside :func:`ordered_embedding_grads` changes, and only in its
    gradient. A float-format quantized table's rows (mxfp4, nvfp4, mxfp8: their values are exact
    in any float dtype) come in ``model``'s float dtype (:func:`rows_dtype`): a bf16 model's
    activations stay bf16, a float32 model's float32.

    An id outside an ``nn.Embedding`` / ``nn.QuantizedEmbedding`` table ([0, V)) gets a row of
    NaN, so its batch row's logits (from that position, and in a prompt the positions its chunk
    shares) and state are NaN; other rows are untouched. MLX's gather read outside the table (a
    segmentation fault for ids far beyond it, another row's values for -1 or V), and the check
    must stay on the device (no host sync in a forward). The runner, generate, chat and serve
    refuse such ids before the forward."""
    count = embedding.weight.shape[0] if isinstance(embedding, (nn.Embedding, nn.QuantizedEmbedding)) else None
    outside = None
    if count is not None:
        outside = ids < 0
        if count <= mx.iinfo(ids.dtype).max:  # (else an overflow error: int16 ids, 50k rows)
            outside = outside | (ids >= count)
        ids = mx.where(outside, mx.array(0, ids.dtype), ids)
    if type(embedding) is nn.Embedding:
        rows = take_rows(embedding.weight, ids)
    else:
        if isinstance(embedding, nn.QuantizedEmbedding):  # MLX's gather reads their rows unchecked
            check_quantized_rows(embedding["weight"], embedding["scales"], embedding.get("biases"))
        rows = embedding(ids)
        if model is not None and is_float_format(embedding):
            dtype = model_float_dtype(model)
            rows = rows if rows.dtype == dtype else rows.astype(dtype)
    if outside is not None:
        rows = mx.where(outside[..., None], mx.array(float("nan"), rows.dtype), rows)
    return rows


def is_float_format(embedding: nn.Module) -> bool:
    """Whether ``embedding`` is a table in one of MLX's float quantization formats (uint8 scales)."""
    return isinstance(embedding, nn.QuantizedEmbedding) and getattr(embedding, "mode", "affine") != "affine"


def rows_dtype(embedding: nn.Module, model: nn.Module) -> mx.Dtype:
    """The dtype of the rows :func:`embed_tokens` looks up in ``embedding`` for ``model``: a float
    table's, an affine quantized table's scales', and for a float format the dtype of the first
    float parameter outside quantized layers in ``model``'s tree (a norm: the model's float dtype;
    float32 where there is none)."""
    if is_float_format(embedding):
        return model_float_dtype(model)
    return (embedding.scales if "scales" in embedding else embedding.weight).dtype


def model_float_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype of the first floating-point array of ``model``'s tree, breadth first, outside
    quantized layers (float32 where there is none). Cheap (it stops at the first: a few modules
    in), unlike counting them all (``quantization.float_dtype``: ~3 ms at the 7B shape), for it
    runs on every forward call of a model with a float-format table."""
    queue = [model]
    while queue:
        module = queue.pop(0)
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        values = list(module.values()) if isinstance(module, dict) else list(module)
        for value in values:
            if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
                return value.dtype
        queue.extend(v for v in values if isinstance(v, (dict, list)))
    return mx.float32


def take_rows(weight: mx.array, ids: mx.array) -> mx.array:
    """weight [V, E], ids [...] -> weight[ids] [..., E]; inside :func:`ordered_embedding_grads`
    its gradient comes from :func:`summed_rows` (for embedding modules of other kinds whose lookup
    is a row gather, e.g. the tensor-parallel ``VocabShardedEmbedding``)."""
    return _lookup(weight, ids) if _ORDERED_GRADS.get() else weight[ids]


@mx.custom_function
def _lookup(weight: mx.array, ids: mx.array) -> mx.array:
    return mx.take(weight, ids, axis=0)


@_lookup.vjp
def _lookup_vjp(primals, cotangent, output):
    weight, ids = primals
    rows = summed_rows(cotangent.reshape(-1, weight.shape[-1]), ids.reshape(-1), weight.shape[0])
    return rows.astype(weight.dtype), mx.zeros_like(ids)


def summed_rows(values: mx.array, ids: mx.array, num_rows: int) -> mx.array:
    """values [n, E], ids [n] in [0, num_rows) -> out [num_rows, E] float32 with out[r] the sum of
    the values whose id is r (0 where none is), each sum taken in one fixed order: on CUDA one
    kernel (:func:`~xlstm_metal.kernels.fast.rows_sum.summed_rows_cuda`), elsewhere
    :func:`summed_rows_reference`."""
    if cuda_available():
        order, sorted_ids = _sorted_by_id(ids, num_rows)
        return summed_rows_cuda(values, order, sorted_ids, num_rows)
    return summed_rows_reference(values, ids, num_rows)


def _sorted_by_id(ids: mx.array, num_rows: int) -> tuple[mx.array, mx.array]:
    """ids [n] in [0, num_rows) -> (order [n] uint32, ids[order] int32): the positions sorted by
    (id, position)."""
    n = ids.shape[0]
    # Unique keys id * n + position: the order is fixed whether or not the sort is stable. 32-bit
    # keys where they fit (any vocabulary at training's token counts), which every backend sorts.
    key_type = mx.uint32 if num_rows * n <= 2**32 else mx.int64
    order = mx.argsort(ids.astype(key_type) * n + mx.arange(n).astype(key_type))
    return order, mx.take(ids, order).astype(mx.int32)


def summed_rows_reference(values: mx.array, ids: mx.array, num_rows: int) -> mx.array:
    """:func:`summed_rows` in MLX ops. The rows are sorted by (id, position); an inclusive
    segmented scan (Hillis-Steele: log2(n) shifted adds, each a fixed tree) leaves each run's
    total at its last row; each id's last row is found with a scatter-max of positions (integers:
    the same whatever the order) and gathered. No float atomics anywhere, so the bits do not
    depend on a GPU's thread order."""
    n, E = values.shape
    position = mx.arange(n)
    order, sorted_ids = _sorted_by_id(ids, num_rows)
    v = mx.take(values, order, axis=0).astype(mx.float32)
    new_run = mx.concatenate([mx.array([True]), sorted_ids[1:] != sorted_ids[:-1]])
    run_start = mx.cummax(mx.where(new_run, position, 0))
    step = 1
    while step < n:
        shifted = mx.concatenate([mx.zeros((step, E), mx.float32), v[:-step]])
        v = mx.where((position - step >= run_start)[:, None], v + shifted, v)
        step *= 2
    last = mx.full((num_rows,), -1, mx.int32).at[sorted_ids].maximum(position.astype(mx.int32))
    return mx.where((last >= 0)[:, None], mx.take(v, mx.maximum(last, 0), axis=0), 0.0)
