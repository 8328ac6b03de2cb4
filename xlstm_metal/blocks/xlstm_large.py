"""The xLSTM-Large block: pre-norm mLSTM layer and pre-norm SwiGLU FFN, each with a residual."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cells.ffn import FeedForward
from ..cells.norms import RMSNorm
from ..config import xLSTMConfig
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
        y, state = self.mlstm_layer(self.norm_mlstm(x), state)
        x = x + y
        return x + self.ffn(self.norm_ffn(x)), state
