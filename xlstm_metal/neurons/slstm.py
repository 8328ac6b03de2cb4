"""sLSTM neuron (NX-AI's sLSTMLayer): conv + gate projections wired into the sLSTM kernel cell.

    x_c        = silu(causal_conv(x))          (only when conv1d_kernel_size > 0)
    i~, f~     = W_i x_c, W_f x_c              (block-diagonal per head)
    z~, o~     = W_z x,   W_o x
    h, state   = sLSTMCell([i~, f~, z~, o~], state)
    out        = GroupNorm_per_head(dropout(h))

Naming quirk kept from NX-AI: the module called ``fgate`` produces the INPUT-gate
pre-activation and ``igate`` the forget-gate one, so checkpoints load by name.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cells.slstm import sLSTMCell
from ..cells.xlstm_2024 import CausalConv1d, LinearHeadwise, Module2024, MultiHeadLayerNorm


class sLSTMNeuron(Module2024):
    """x [B, S, E], state (c, n, m, h[, conv]) or None -> (y [B, S, E], state).

    State: c, n, m, h each [B, NH, DH] float32, then the conv state [B, K-1, E] when K > 0.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int = 4,
        conv1d_kernel_size: int = 4,
        group_norm_weight: bool = True,
        dropout: float = 0.0,
        layout: str = "cuda",
    ):
        super().__init__()
        E = embedding_dim
        self.embedding_dim = E
        self.num_heads = num_heads
        self.conv1d_kernel_size = conv1d_kernel_size
        if conv1d_kernel_size > 0:
            self.conv1d = CausalConv1d(E, conv1d_kernel_size)
        self.fgate = LinearHeadwise(E, num_heads)  # -> input gate (NX-AI naming)
        self.igate = LinearHeadwise(E, num_heads)  # -> forget gate (NX-AI naming)
        self.zgate = LinearHeadwise(E, num_heads)
        self.ogate = LinearHeadwise(E, num_heads)
        self.slstm_cell = sLSTMCell(E, num_heads, layout)
        self.group_norm = MultiHeadLayerNorm(num_heads, E // num_heads, weight=group_norm_weight)
        self.dropout = nn.Dropout(dropout)

    def zero_state(self, batch_size: int, conv_dtype: mx.Dtype = mx.float32) -> tuple[mx.array, ...]:
        state = self.slstm_cell.zero_state(batch_size)
        if self.conv1d_kernel_size > 0:
            state = state + (self.conv1d.zero_state(batch_size, conv_dtype),)
        return state

    def __call__(self, x: mx.array, state: tuple | None = None) -> tuple[mx.array, tuple]:
        B, S, E = x.shape
        NH, DH = self.num_heads, E // self.num_heads
        cell_state, conv_state = None, None
        if state is not None:
            cell_state = tuple(state[:4])
            conv_state = state[4] if self.conv1d_kernel_size > 0 else None
        if self.conv1d_kernel_size > 0:
            x_conv, conv_state = self.conv1d(x, conv_state)
            x_conv = nn.silu(x_conv)
        else:
            x_conv = x
        gates = [self.fgate(x_conv), self.igate(x_conv), self.zgate(x), self.ogate(x)]  # i, f, z, o
        wx = mx.stack([g.reshape(B, S, NH, DH) for g in gates], axis=3)  # [B, S, NH, 4, DH]
        h, cell_state = self.slstm_cell(wx, cell_state)
        out = self.group_norm(self.dropout(h))
        new_state = tuple(cell_state) + ((conv_state,) if self.conv1d_kernel_size > 0 else ())
        return out, new_state


__all__ = ["sLSTMNeuron"]
