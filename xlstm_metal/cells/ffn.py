"""The SwiGLU feed-forward cell of xLSTM-Large blocks."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import xLSTMConfig
from .activations import silu
from .mlstm import fuse_linears, fused_linear_outputs, unfuse_linears


class FeedForward(nn.Module):
    """proj_down(silu(proj_up_gate(x)) * proj_up(x)). x: [B, S, E] -> [B, S, E]."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        E, F, bias = config.embedding_dim, config.ffn_dim, config.use_bias
        self.proj_up_gate = nn.Linear(E, F, bias=bias)
        self.proj_up = nn.Linear(E, F, bias=bias)
        self.proj_down = nn.Linear(F, E, bias=bias)

    def fuse(self) -> None:
        """Inference fast path: one matmul for gate|up (see :func:`fuse_linears`)."""
        self._fused_gate_up = fuse_linears([self.proj_up_gate, self.proj_up])

    def unfuse(self) -> None:
        if self.pop("_fused_gate_up", None) is not None:
            unfuse_linears([self.proj_up_gate, self.proj_up])

    def __call__(self, x: mx.array) -> mx.array:
        if "_fused_gate_up" in self:
            gate, up = fused_linear_outputs(x, self["_fused_gate_up"], [self.proj_up_gate, self.proj_up])
        else:
            gate, up = self.proj_up_gate(x), self.proj_up(x)
        return self.proj_down(silu(gate) * up)
