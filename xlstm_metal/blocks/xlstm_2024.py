"""Blocks of the 2024 xLSTM (NX-AI's xLSTMBlock): pre-norm residual around the neuron, and for
sLSTM blocks a pre-norm residual gated FFN.

    x = x + neuron(LayerNorm_xlstm(x))
    x = x + FFN(LayerNorm_ffn(x))          (sLSTM blocks with a feedforward config)
"""

from __future__ import annotations

import mlx.core as mx

from ..cells.xlstm_2024 import GatedFeedForward, LayerNorm, Module2024
from ..neurons.mlstm_2024 import mLSTMNeuron2024
from ..neurons.slstm import sLSTMNeuron


class _Block2024(Module2024):
    kind = ""

    def zero_state(self, batch_size: int, conv_dtype: mx.Dtype = mx.float32) -> tuple[mx.array, ...]:
        """Zero state; recurrent parts in float32, the conv window (past inputs) in ``conv_dtype``;
        None for a user's module."""
        zero = getattr(self.xlstm, "zero_state", None)
        return None if zero is None else zero(batch_size, conv_dtype)

    def __call__(self, x: mx.array, state: tuple | None = None) -> tuple[mx.array, tuple]:
        """x [B, S, E], this block's state or None -> (x [B, S, E], state)."""
        y, state = self.xlstm(self.xlstm_norm(x), state)
        x = x + y
        if "ffn" in self:
            x = x + self.ffn(self.ffn_norm(x))
        return x, state


class mLSTMBlock2024(_Block2024):
    """Pre-up-projection mLSTM block (no FFN). State (C, n, m, conv)."""

    kind = "mLSTM"

    def __init__(self, embedding_dim: int, **neuron_kwargs):
        super().__init__()
        self.xlstm_norm = LayerNorm(embedding_dim)
        self.xlstm = mLSTMNeuron2024(embedding_dim, **neuron_kwargs)


class sLSTMBlock(_Block2024):
    """sLSTM block with a gated FFN (unless ``ffn_hidden`` is None). State (c, n, m, h[, conv])."""

    kind = "sLSTM"

    def __init__(
        self,
        embedding_dim: int,
        ffn_hidden: int | None,
        ffn_act_fn: str = "gelu",
        ffn_bias: bool = False,
        ffn_dropout: float = 0.0,
        **neuron_kwargs,
    ):
        super().__init__()
        self.xlstm_norm = LayerNorm(embedding_dim)
        self.xlstm = sLSTMNeuron(embedding_dim, **neuron_kwargs)
        if ffn_hidden is not None:
            self.ffn_norm = LayerNorm(embedding_dim)
            self.ffn = GatedFeedForward(embedding_dim, ffn_hidden, ffn_act_fn, ffn_bias, ffn_dropout)


__all__ = ["mLSTMBlock2024", "sLSTMBlock"]
