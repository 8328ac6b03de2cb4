"""The 2024 mLSTM neuron (NX-AI's mLSTMLayer, pre-up-projection block body).

    [x_m | z] = proj_up(x)                            (inner = proj_factor * E, rounded to 64)
    x_c       = silu(causal_conv(x_m))
    q, k, v   = Wq x_c, Wk x_c, Wv x_m                (block-diagonal, qkv_proj_blocksize wide)
    h, state  = mLSTMCell2024(q, k, v, state)         (gates on concat(q, k, v), group norm)
    y         = proj_down((h + learnable_skip * x_c) * silu(z))

Sequence mode runs a parallel-form kernel (chunkwise by default); a single token (S == 1)
runs the recurrent step: ``step_kernel`` "step" (the reference ops) or "step_fused" (one CUDA
launch on NVIDIA GPUs, :func:`xlstm_metal.kernels.fast.step.mlstm_step_fused`; the reference
elsewhere). Both continue exactly from each other's state.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cells.xlstm_2024 import CausalConv1d, LinearHeadwise, Module2024, mLSTMCell2024
from ..kernels import get_mlstm_kernel, mlstm_step, resolve_kernel_name
from ..kernels.fast.step import mlstm_step_fused
from ..kernels.mlstm import ONE_TOKEN_KERNELS, zero_state as mlstm_zero_state

STEP_KERNELS = {"step": mlstm_step, "step_fused": mlstm_step_fused}


def _sequence_kernel(name: str):
    if resolve_kernel_name(name) in ONE_TOKEN_KERNELS:  # (failed at the first prompt)
        raise ValueError(f"mlstm_kernel {name!r} runs one token at a time, not a prompt")
    return get_mlstm_kernel(name)


class mLSTMNeuron2024(Module2024):
    """x [B, S, E], state (C, n, m, conv) or None -> (y [B, S, E], state).

    State: C [B, NH, DH, DH], n [B, NH, DH], m [B, NH, 1] (float32; see mLSTMCell2024 for the
    sqrt(DH) convention), conv [B, K-1, inner].
    """

    def __init__(
        self,
        embedding_dim: int,
        inner_dim: int,
        num_heads: int = 4,
        conv1d_kernel_size: int = 4,
        qkv_proj_blocksize: int = 4,
        bias: bool = False,
        dropout: float = 0.0,
        kernel: str = "chunkwise",
        chunk_size: int = 64,
        step_kernel: str = "step",
    ):
        super().__init__()
        if step_kernel not in STEP_KERNELS:
            raise ValueError(f"unknown mLSTM step kernel {step_kernel!r}; choose from {tuple(STEP_KERNELS)}")
        self.step_kernel = step_kernel
        if conv1d_kernel_size < 1:
            raise ValueError(f"the 2024 mLSTM layer needs conv1d_kernel_size >= 1, got {conv1d_kernel_size}")
        if inner_dim % qkv_proj_blocksize:
            raise ValueError(f"mLSTM inner width {inner_dim} must be a multiple of qkv_proj_blocksize {qkv_proj_blocksize}")
        self.inner_dim = inner_dim
        self.num_heads = num_heads
        self.kernel_name = kernel
        self.chunk_size = chunk_size
        self._kernel = _sequence_kernel(kernel)
        proj_heads = inner_dim // qkv_proj_blocksize
        self.proj_up = nn.Linear(embedding_dim, 2 * inner_dim, bias=bias)
        self.q_proj = LinearHeadwise(inner_dim, proj_heads, bias=bias)
        self.k_proj = LinearHeadwise(inner_dim, proj_heads, bias=bias)
        self.v_proj = LinearHeadwise(inner_dim, proj_heads, bias=bias)
        self.conv1d = CausalConv1d(inner_dim, conv1d_kernel_size)
        self.mlstm_cell = mLSTMCell2024(inner_dim, num_heads)
        self.learnable_skip = mx.ones((inner_dim,))
        self.proj_down = nn.Linear(inner_dim, embedding_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def set_kernel(self, kernel: str) -> None:
        """Run sequences through the registered mLSTM kernel ``kernel`` (KeyError if unknown)."""
        self._kernel = _sequence_kernel(kernel)
        self.kernel_name = kernel

    def zero_state(self, batch_size: int, conv_dtype: mx.Dtype = mx.float32) -> tuple[mx.array, ...]:
        DH = self.mlstm_cell.head_dim
        return mlstm_zero_state(batch_size, self.num_heads, DH, DH) + (self.conv1d.zero_state(batch_size, conv_dtype),)

    def __call__(self, x: mx.array, state: tuple | None = None) -> tuple[mx.array, tuple]:
        cell_state, conv_state = (None, None) if state is None else (tuple(state[:3]), state[3])
        up = self.proj_up(x)
        x_m, z = up[..., : self.inner_dim], up[..., self.inner_dim :]
        x_c, conv_state = self.conv1d(x_m, conv_state)
        x_c = nn.silu(x_c)
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)
        kernel = STEP_KERNELS[self.step_kernel] if x.shape[1] == 1 else self._kernel
        h, cell_state = self.mlstm_cell(q, k, v, cell_state, kernel, self.chunk_size)
        y = self.proj_down((h + self.learnable_skip * x_c) * nn.silu(z))
        return self.dropout(y), tuple(cell_state) + (conv_state,)


__all__ = ["mLSTMNeuron2024"]
