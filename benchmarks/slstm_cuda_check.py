"""Compile-check the fused sLSTM kernels for every shape/dtype the tests and the benchmark
launch: ``python /work/notes/cuda_check.py benchmarks/slstm_cuda_check.py`` (no GPU needed)."""

import mlx.core as mx

from xlstm_metal.kernels.fast.slstm_fused import slstm_recurrence

for B, S, NH, DH, dtype in [(2, 7, 2, 8, mx.float32), (3, 5, 3, 24, mx.bfloat16), (1, 1, 4, 256, mx.bfloat16),
                            (16, 4, 4, 256, mx.bfloat16), (2, 3, 2, 7, mx.float32), (40, 3, 4, 256, mx.float32),
                            (2, 3, 1, 512, mx.float32), (4, 3, 4, 64, mx.float16)]:
    wx = mx.zeros((B, S, NH, 4, DH), dtype=dtype)
    R = mx.zeros((NH, DH, 4 * DH))
    bias = mx.zeros((NH, 4, DH))

    def loss(wx, R, bias):
        h, (c, n, m, hl) = slstm_recurrence(wx, R, None, bias=bias, backend="cuda")
        return h.astype(mx.float32).sum() + c.sum()

    mx.eval(mx.grad(loss, argnums=(0, 1, 2))(wx, R, bias))
    print("ok", B, S, NH, DH, dtype, flush=True)
