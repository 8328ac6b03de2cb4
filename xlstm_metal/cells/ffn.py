"""The SwiGLU feed-forward cell of xLSTM-Large blocks."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import xLSTMConfig
from .activations import silu
from .fused import FusedLayers

_GATE_UP = FusedLayers("_fused_gate_up", ("proj_up_gate", "proj_up"))


class FeedForward(nn.Module):
    """proj_down(silu(proj_up_gate(x)) * proj_up(x)). x: [B, S, E] -> [B, S, E]."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        E, F, bias = config.embedding_dim, config.ffn_dim, config.use_bias
        self.proj_up_gate = nn.Linear(E, F, bias=bias)
        self.proj_up = nn.Linear(E, F, bias=bias)
        self.proj_down = nn.Linear(F, E, bias=bias)

    def fuse_projections(self) -> None:
        """Inference fast path: one matmul for gate|up (see :mod:`xlstm_metal.cells.fused`)."""
        _GATE_UP.fuse(self)

    def unfuse_projections(self) -> None:
        _GATE_UP.unfuse(self)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = _GATE_UP.outputs(self, x)
        return self.proj_down(silu(gate) * up)
