"""Quantized matrix products: x @ dequantize(w).T for MLX's quantized layouts.

The reference is MLX's own ``mx.quantized_matmul`` (what CPUs and Metal run). Faster kernels
for particular devices sit beside it here and are tested against it.
"""

from __future__ import annotations

import mlx.core as mx


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    *,
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> mx.array:
    """x [..., in] @ dequantize(w, scales, biases).T -> [..., out].

    w: packed [out, in * bits / 32] uint32; scales, biases: [out, in / group_size].
    """
    return mx.quantized_matmul(
        x, w, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits, mode=mode
    )
