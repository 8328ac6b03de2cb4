"""The embedding gradient's per-id row sums in one CUDA kernel, beside the ops reference
(:func:`xlstm_metal.cells.embedding.summed_rows_reference`).

Why: the reference's segmented scan takes log2(n) passes over the sorted rows; at the 1.3b
training shape (8,192 tokens, E = 2,048, float32) it took 3.5 ms on an H100 against 0.6 ms for
MLX's unordered scatter-add, 1.4% of the training step. Here one thread per (run of equal ids,
column) adds the run's rows in sorted order, reading each value once straight from its
unsorted place, and writes that id's row: each output element has one writer and one order,
so no atomics and the same bits every run. Rows of absent ids keep the launch's zero fill.
"""

from __future__ import annotations

import mlx.core as mx

from .tensor_cores import kernel_tag

_THREADS = 256

# Block b covers columns [(b % CB) * 256, +256) of sorted position i = b / CB (CB = column
# blocks); only a run's first position sums (its run, in sorted order).
_SOURCE = """
    const unsigned cb = (E + 255) / 256;
    const unsigned i = blockIdx.x / cb;
    const unsigned col = (blockIdx.x % cb) * 256 + threadIdx.x;
    if (col >= E) return;
    const int id = sorted_ids[i];
    if (i > 0 && sorted_ids[i - 1] == id) return;
    float acc = 0.0f;
    for (unsigned j = i; j < N && sorted_ids[j] == id; ++j)
        acc += static_cast<float>(values[size_t(order[j]) * E + col]);
    out[size_t(id) * E + col] = acc;
"""

_kernels: dict[tuple, object] = {}


def summed_rows_cuda(values: mx.array, order: mx.array, sorted_ids: mx.array, num_rows: int) -> mx.array:
    """values [n, E] (float32, bf16 or fp16), order [n] (uint32: the positions sorted by (id,
    position)), sorted_ids [n] (int32: ids[order]) -> out [num_rows, E] float32, out[r] the sum
    of the values of id r in sorted order (0 where none is)."""
    n, E = values.shape
    key = (values.dtype,)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name=f"xlstm_rows_sum_{kernel_tag(key)}",
            input_names=["values", "order", "sorted_ids"],
            output_names=["out"],
            source=_SOURCE,
        )
        _kernels[key] = kernel
    blocks = n * -(-E // _THREADS)
    return kernel(
        inputs=[values, order, sorted_ids],
        template=[("E", E), ("N", n)],
        grid=(blocks * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(num_rows, E)],
        output_dtypes=[mx.float32],
        init_value=0,
    )[0]
