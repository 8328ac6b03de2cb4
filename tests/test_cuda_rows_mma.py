"""The streaming tensor-core product (xlstm_metal/kernels/fast/rows_mma.py) against x @ w.T in float64.

Kernel tests run only where MLX has its CUDA backend (the GPU machine); elsewhere the function is
``x @ w.T`` and the tests at the end check that and the argument checks.
"""

import mlx.core as mx
import numpy as np
import pytest

from xlstm_metal.kernels.fast.rows_mma import MAX_ROWS, rows_mma_matmul, rows_mma_supported
from xlstm_metal.kernels.fast.step import cuda_available

from test_cuda_skinny import TOL_BF16 as TOL
from test_cuda_skinny import _operands, _reference64
from test_cuda_skinny import _rel as _rel_to

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


def _rel(out, x, w) -> float:
    """The largest difference of ``out`` from x @ w.T in float64, relative to its largest value."""
    return _rel_to(out, _reference64(x, w))


@cuda
@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 16])
@pytest.mark.parametrize("settings", [{}, {"unroll": 8, "resident": 2}, {"unroll": 2, "resident": 4, "load_hint": 0},
                                      {"unroll": 4, "resident": 2, "x_early": True, "load_hint": 1},
                                      {"unroll": 3, "resident": 0, "blocks_per_sm": 1}])
def test_cuda_shapes_partial_tiles_and_tails(M, settings):
    # 7B widths / 8, partial 16-feature tiles, K not a multiple of 32 (nor of WARPS * U spans),
    # fewer tiles than blocks, one feature, one chunk.
    for N, K in ((1536, 512), (2736, 512), (512, 1368), (37, 24), (200, 1000), (1, 8), (4099, 72)):
        x, w = _operands(N + K + M, M, N, K)
        out = rows_mma_matmul(x, w, **settings)
        assert out.shape == (M, N) and out.dtype == mx.bfloat16
        assert _rel(out, x, w) <= TOL, (N, K, _rel(out, x, w))


@cuda
def test_cuda_float16_leading_axes_nonfinite_free_padding_and_compiled():
    x, w = _operands(3, 5, 96, 512, mx.float16, lead=(2,))  # 10 rows: the padded x rows are never stored
    out = rows_mma_matmul(x, w)
    assert out.shape == (2, 5, 96) and out.dtype == mx.float16
    assert _rel(out, x, w) <= TOL
    f = mx.compile(lambda a, b: rows_mma_matmul(a, b))
    x, w = _operands(4, 16, 4096, 4096)
    for _ in range(3):
        assert _rel(f(x, w), x, w) <= TOL
    # An inf in the last row of x reaches only that row's outputs (the padding reads row M - 1).
    x, w = _operands(5, 3, 64, 256)
    x = mx.concatenate([x[:2], mx.full((1, 256), float("inf"), dtype=x.dtype)])
    out = np.array(rows_mma_matmul(x, w).astype(mx.float32))
    assert np.isfinite(out[:2]).all() and not np.isfinite(out[2]).all()


# ------------------------------------------------------------------ everywhere (CPU included)
def test_reference_off_cuda_and_argument_checks():
    x, w = _operands(8, 4, 48, 64, mx.float32)
    assert not rows_mma_supported(x, w)  # float32: the reference
    assert np.array_equal(np.array(rows_mma_matmul(x, w)), np.array(x @ w.T))
    xb, wb = x.astype(mx.bfloat16), w.astype(mx.bfloat16)
    assert rows_mma_supported(xb, wb) == cuda_available()
    assert not rows_mma_supported(mx.zeros((MAX_ROWS + 1, 64), mx.bfloat16), wb)
    assert not rows_mma_supported(xb[:, :60], wb[:, :60])  # K % 8 != 0
    for bad in ({"unroll": 0}, {"load_hint": 3}, {"resident": -1}):
        with pytest.raises(ValueError, match="rows_mma_matmul"):
            rows_mma_matmul(xb, wb, **bad)
