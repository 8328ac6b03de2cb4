"""The SwiGLU feed-forward cell of xLSTM-Large blocks."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from ..config import xLSTMConfig
from ..kernels.fast.skinny import (
    FastLinear, gate_up_swiglu_product, linear_product, swiglu_linear_product, uses_gate_up_swiglu, uses_swiglu_product,
)
from ..kernels.fast.train_rows import (
    swiglu_down_residual, swiglu_joined, swiglu_joined_supported, swiglu_output_recomputed,
)
from .activations import silu
from .fused import FusedLayers, fusion_groups, linear_output, plain_linear_weight

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
                if down is not None and swiglu_output_recomputed():  # SwiGLU's output not kept
                    return swiglu_down_residual(joined, down)  # (+ a residual_into_output's x)
                return linear_output(self.proj_down, swiglu_joined(joined))
        if mx.default_device() != mx.cpu:
            weight = self._joined_gate_up_weight(x)
            if weight is not None and uses_gate_up_swiglu(x, weight):  # SwiGLU in gate|up's epilogue
                return linear_output(self.proj_down, gate_up_swiglu_product(x, weight))
            joined = None if weight is None else linear_product(x, weight)
            if joined is not None:  # inference on CUDA: SwiGLU reads the fused product, no split
                down = plain_linear_weight(self.proj_down) if type(self.proj_down) is FastLinear else None
                if down is not None and uses_swiglu_product(joined, down):  # SwiGLU inside proj_down's launch
                    return swiglu_linear_product(joined, down)
                return linear_output(self.proj_down, swiglu_joined(joined))
        gate, up = _GATE_UP.outputs(self, x)
        if mx.default_device() == mx.cpu:  # the CPU's fast activations (their own vjp)
            return linear_output(self.proj_down, silu(gate) * up)
        return linear_output(self.proj_down, swiglu(gate, up))

    def _joined_gate_up(self, x: mx.array) -> mx.array | None:
        """The fused gate|up product [..., 2F] when :meth:`_joined_gate_up_weight` finds its
        weight, else None."""
        weight = self._joined_gate_up_weight(x)
        return None if weight is None else linear_product(x, weight)

    def _joined_gate_up_weight(self, x: mx.array) -> mx.array | None:
        """The joined gate|up weight [2F, E] when :meth:`fuse_projections` made gate and up one
        bias-free float matmul and :func:`swiglu_joined` runs for its product (CUDA, bf16 / fp16;
        it does the ops' bf16 operations in their order, so the bits are :func:`swiglu`'s, in one
        pass at the copy rate instead of MLX's fused kernel over two strided column slices); else
        None. ``XLSTM_METAL_PREFILL_SWIGLU=0`` turns it off."""
        if _GATE_UP.key not in self:  # not fused (the training step's traced groups stay as they are)
            return None
        layers, fused = _GATE_UP._current(self)
        if fused is None or os.environ.get("XLSTM_METAL_PREFILL_SWIGLU") == "0" \
                or any("bias" in layer for layer in layers):
            return None
        groups = fusion_groups(layers)
        if len(groups) != 1 or groups[0][0][0] != "linear" or groups[0][1] != [0, 1]:
            return None
        weight = fused[0]["weight"]
        if weight.dtype != x.dtype or not swiglu_joined_supported(x.dtype, weight.shape[0] // 2):
            return None
        return weight


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
