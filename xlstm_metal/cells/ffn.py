"""The SwiGLU feed-forward cell of xLSTM-Large blocks."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import xLSTMConfig
from ..kernels.fast.train_rows import swiglu_down, swiglu_joined, swiglu_joined_supported, train_recompute_enabled
from .activations import silu
from .fused import FusedLayers, linear_output, plain_linear_weight

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
        gate_layer, up_layer = self.proj_up_gate, self.proj_up
        if "weight" in gate_layer and "weight" in up_layer and gate_layer.weight.shape == up_layer.weight.shape \
                and swiglu_joined_supported(x.dtype, up_layer.weight.shape[0]):
            # the training step on CUDA: SwiGLU reads the joined gate|up product, one kernel each way
            joined = _GATE_UP.joined_product(self, x)
            if joined is not None:
                down = plain_linear_weight(self.proj_down)
                if down is not None and train_recompute_enabled():  # SwiGLU's output not kept
                    return swiglu_down(joined, down)
                return linear_output(self.proj_down, swiglu_joined(joined))
        gate, up = _GATE_UP.outputs(self, x)
        if mx.default_device() == mx.cpu:  # the CPU's fast activations (their own vjp)
            return linear_output(self.proj_down, silu(gate) * up)
        return linear_output(self.proj_down, swiglu(gate, up))


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up (``nn.silu``'s ops), with a vjp that keeps only gate and up for the
    backward and recomputes sigmoid(gate) there: autodiff of the ops keeps sigmoid(gate) and
    silu(gate) as well, two more [B, S, F] arrays per block (at the 1.3b shape and 8,192 tokens:
    2 x 90 MB per block; the H200 step's measured peak moved less, 58.0 -> 57.7 GB with the other
    changes of that round, so its peak is elsewhere). The gradients are the autodiff ones, op for op."""
    return nn.silu(gate) * up


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, _output):
    gate, up = primals
    s = mx.sigmoid(gate)
    d_silu = cotangent * up
    # silu = gate * s: d gate = d_silu * s + (d_silu * gate) * s (1 - s), as MLX differentiates it
    d_gate = d_silu * s + (d_silu * gate) * (s * (1 - s))
    return d_gate, cotangent * (gate * s)
