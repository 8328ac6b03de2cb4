"""The xLSTM-Large block: pre-norm mLSTM layer and pre-norm SwiGLU FFN, each with a residual."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cells.ffn import FeedForward
from ..cells.norms import RMSNorm
from ..config import xLSTMConfig
from ..kernels.fast.decode import add_rms_norm
from ..kernels.mlstm import MLSTMState
from ..neurons.mlstm import mLSTMNeuron


class mLSTMBlock(nn.Module):
    """x [B, S, E], state (C, n, m) | None -> (x' [B, S, E], new state)."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        norm = dict(eps=config.norm_eps, force_float32=config.norm_reduction_force_float32)
        self.norm_mlstm = RMSNorm(config.embedding_dim, **norm)
        self.mlstm_layer = mLSTMNeuron(config)
        self.norm_ffn = RMSNorm(config.embedding_dim, **norm)
        self.ffn = FeedForward(config)

    def __call__(self, x: mx.array, state: MLSTMState | None = None) -> tuple[mx.array, MLSTMState]:
        """x: the residual stream, in the weights' dtype or (see ``xLSTMLarge.residual_dtype``)
        float32; the layers compute in the norms' dtype and their outputs add into x's."""
        if self.fused_step(x):
            x, y, state = self.step(x, None, state)
            return x + y, state
        y, state = self.mlstm_layer(_normed(self.norm_mlstm(x), self.norm_mlstm), state)
        if self.mlstm_layer.fused:  # inference fast path: the residual add inside the norm's launch
            x, xn = add_rms_norm(x, y, self.norm_ffn)
            return x + self.ffn(_normed(xn, self.norm_ffn)), state
        x = x + y
        return x + self.ffn(_normed(self.norm_ffn(x), self.norm_ffn)), state

    def fused_step(self, x: mx.array) -> bool:
        """True for one token once ``fuse_projections()`` selected the fused step kernel: then
        :meth:`step` runs (fewer CUDA launches, the same math)."""
        return x.shape[1] == 1 and self.mlstm_layer.recurrent_kernel_cell.takes_raw_gates

    def step(self, x: mx.array, pending: mx.array | None, state: MLSTMState | None = None):
        """One token, the block's input being ``x + pending`` ([B, 1, E]; ``pending`` the previous
        block's FFN output, or None) -> (x', ffn output, state): the block's output is
        ``x' + ffn output``. Each residual add runs with the RMSNorm that reads it
        (:func:`~xlstm_metal.kernels.fast.decode.add_rms_norm`: one CUDA launch), so a chain of
        blocks leaves each FFN residual to the next block's norm."""
        if pending is None:
            xn = self.norm_mlstm(x)
        else:
            x, xn = add_rms_norm(x, pending, self.norm_mlstm)
        y, state = self.mlstm_layer(_normed(xn, self.norm_mlstm), state)
        x, xn = add_rms_norm(x, y, self.norm_ffn)
        return x, self.ffn(_normed(xn, self.norm_ffn)), state


def _normed(out: mx.array, norm: RMSNorm) -> mx.array:
    """A norm's output in its weight's dtype: a float32 residual stream under bf16 weights is
    normalised in float32 and rounded once, and the projections then run in bf16 (a float32
    input would promote their matmuls to float32)."""
    return out if out.dtype == norm.weight.dtype else out.astype(norm.weight.dtype)
