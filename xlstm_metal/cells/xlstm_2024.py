"""Cells of NX-AI's original (2024) xLSTM: norms, causal conv, block-diagonal projections, the
gated FFN and the 2024 mLSTM kernel cell.

Attribute names equal NX-AI's ``xLSTMLMModel.state_dict()`` names (``conv1d.conv.weight``,
``q_proj.weight``, ``mlstm_cell.igate.weight`` ...) and tensors keep NX-AI's shapes, so a
checkpoint loads by name. Norm weights there are residual: the effective scale is 1 + weight.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn


class Module2024(nn.Module):
    """nn.Module whose parameters may have names that start with "_".

    MLX hides attributes named ``_x`` from ``parameters()``; NX-AI's sLSTM cell stores its
    weights as ``_recurrent_kernel_`` and ``_bias_``. Classes list such names in
    ``_exposed_params``; these filters make them ordinary (trainable, saved) parameters.
    """

    _exposed_params: tuple[str, ...] = ()

    @staticmethod
    def valid_parameter_filter(module, key, value):
        if not isinstance(value, (dict, list, mx.array)):
            return False
        return not key.startswith("_") or key in getattr(type(module), "_exposed_params", ())

    @staticmethod
    def trainable_parameter_filter(module, key, value):
        return Module2024.valid_parameter_filter(module, key, value) and key not in module._no_grad

    def apply(self, map_fn, filter_fn=None):  # noqa: D102 (same as nn.Module.apply)
        return super().apply(map_fn, filter_fn or Module2024.valid_parameter_filter)


# ----------------------------------------------------------------------------------- norms
class LayerNorm(Module2024):
    """LayerNorm over the last axis with scale (1 + weight), optional bias, eps 1e-5.

    Statistics in float32, result cast back. x [..., D] -> [..., D].
    """

    def __init__(self, dims: int, bias: bool = False, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.zeros((dims,))
        if bias:
            self.bias = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        bias = self["bias"] if "bias" in self else None
        out = mx.fast.layer_norm(x.astype(mx.float32), 1.0 + self.weight.astype(mx.float32), None, self.eps)
        if bias is not None:
            out = out + bias.astype(mx.float32)
        return out.astype(x.dtype)


class MultiHeadLayerNorm(Module2024):
    """Group norm with one group per head (NX-AI's MultiHeadLayerNorm), scale 1 + weight.

    x [B, S, NH, DH] -> [B, S, NH * DH]; the weight is flattened [NH * DH].
    """

    def __init__(self, num_heads: int, head_dim: int, weight: bool = True, eps: float = 1e-5):
        super().__init__()
        if weight:
            self.weight = mx.zeros((num_heads * head_dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        B, S, NH, DH = x.shape
        out = mx.fast.layer_norm(x.astype(mx.float32), None, None, self.eps).reshape(B, S, NH * DH)
        if "weight" in self:
            out = out * (1.0 + self.weight.astype(mx.float32))
        return out.astype(x.dtype)


# ---------------------------------------------------------------------------- projections
#: Rows (tokens) from which LinearHeadwise runs as one dense GEMM on CUDA (training, prefill).
DENSE_HEADWISE_MIN_ROWS = 64


def _dense_headwise(rows: int) -> bool:
    """Whether LinearHeadwise multiplies by the dense block-diagonal matrix: on NVIDIA GPUs for
    ``rows`` >= DENSE_HEADWISE_MIN_ROWS (decode keeps the block products: it reads weights)."""
    from ..kernels.fast.step import cuda_available

    return rows >= DENSE_HEADWISE_MIN_ROWS and cuda_available()


def block_diagonal(weight: mx.array) -> mx.array:
    """[NH, out/NH, in/NH] blocks -> the dense [out, in] block-diagonal matrix (differentiable:
    its vjp hands each block its own part of the dense gradient)."""
    NH, o, i = weight.shape
    eye = mx.eye(NH, dtype=weight.dtype)
    return (eye[:, None, :, None] * weight[:, :, None, :]).reshape(NH * o, NH * i)


class LinearHeadwise(Module2024):
    """Block-diagonal linear map: the input splits into ``num_heads`` blocks, each projected
    by its own matrix. weight [NH, out/NH, in/NH] (NX-AI's LinearHeadwiseExpand), bias [out].

    x [..., in] -> [..., out].
    """

    def __init__(self, in_features: int, num_heads: int, out_features: int | None = None, bias: bool = False):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        if num_heads <= 0 or in_features % num_heads or out_features % num_heads:
            raise ValueError(
                f"LinearHeadwise: in_features {in_features} and out_features {out_features} must be "
                f"multiples of num_heads {num_heads}"
            )
        self.num_heads = num_heads
        self.weight = mx.zeros((num_heads, out_features // num_heads, in_features // num_heads))
        if bias:
            self.bias = mx.zeros((out_features,))

    def __call__(self, x: mx.array) -> mx.array:
        lead = x.shape[:-1]
        NH, d = self.num_heads, self.weight.shape[-1]
        if _dense_headwise(x.size // x.shape[-1]):
            # One GEMM with the block-diagonal matrix: the zeros add exactly, so the numbers are
            # the blocks' products. The tensor cores do the wasted work (NH x the needed
            # products) faster than thousands of tiny matmuls run, and the weight's gradient is
            # one GEMM too (the broadcast per-token form below made a [tokens, NH, d, out]
            # product and summed it).
            y = x @ mx.swapaxes(block_diagonal(self.weight), 0, 1)
            return y + self.bias if "bias" in self else y
        wt = mx.swapaxes(self.weight, -1, -2)  # [NH, in/NH, out/NH]
        if d <= 16:
            # Many tiny blocks (the mLSTM's 4x4 q/k/v): NH matmuls over all tokens. A per-token
            # batched matmul made 65k 1x4 @ 4x4 products at S=512: 20x slower (measured).
            xh = mx.swapaxes(x.reshape(-1, NH, d), 0, 1)  # [NH, T, d]
            y = mx.swapaxes(xh @ wt, 0, 1).reshape(*lead, -1)
        else:
            # Few wide blocks (sLSTM heads): per-token [1, d] @ [d, out] products measured faster
            # than the head-major form on CPU.
            y = (x.reshape(*lead, NH, 1, d) @ wt).reshape(*lead, -1)  # [..., NH*out/NH]
        if "bias" in self:
            y = y + self.bias
        return y


class _ConvWeights(Module2024):
    """The ``conv`` child of NX-AI's CausalConv1d: weight [D, 1, K] (torch layout), bias [D]."""

    def __init__(self, dims: int, kernel_size: int, bias: bool = True):
        super().__init__()
        self.weight = mx.zeros((dims, 1, kernel_size))
        if bias:
            self.bias = mx.zeros((dims,))


class CausalConv1d(Module2024):
    """Causal depthwise conv over time: y_t = sum_k w[k] x_{t-K+1+k} + b.

    x [B, S, D], state = the previous K-1 inputs [B, K-1, D] (None: zeros)
    -> (y [B, S, D], new state [B, K-1, D]). Step mode is the same call with S = 1.
    """

    def __init__(self, dims: int, kernel_size: int = 4, bias: bool = True):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"CausalConv1d needs kernel_size >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv = _ConvWeights(dims, kernel_size, bias)

    def zero_state(self, batch_size: int, dtype: mx.Dtype = mx.float32) -> mx.array:
        return mx.zeros((batch_size, self.kernel_size - 1, self.conv.weight.shape[0]), dtype=dtype)

    def __call__(self, x: mx.array, state: mx.array | None = None) -> tuple[mx.array, mx.array]:
        B, S, D = x.shape
        K = self.kernel_size
        if state is None:
            state = self.zero_state(B, x.dtype)
        xp = mx.concatenate([state.astype(x.dtype), x], axis=1)  # [B, S+K-1, D]
        w = self.conv.weight[:, 0, :]  # [D, K]
        y = xp[:, 0:S] * w[:, 0]
        for k in range(1, K):  # K is tiny (4): K shifted multiply-adds beat a grouped conv here
            y = y + xp[:, k : k + S] * w[:, k]
        if "bias" in self.conv:
            y = y + self.conv.bias
        return y, xp[:, S:]


# ----------------------------------------------------------------------------------- FFN
_ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu": nn.gelu,  # exact (erf) GeLU, as torch's default
    "relu": nn.relu,
    "relu^2": lambda x: mx.square(nn.relu(x)),
    "sigmoid": mx.sigmoid,
    "swish": nn.silu,
    "selu": nn.selu,
}


def round_up_dim(dims: int, factor: float, multiple_of: int = 64, round_up: bool = True) -> int:
    """NX-AI's up-projection width: factor * dims rounded (up by default) to ``multiple_of``."""
    q = factor * dims / multiple_of
    return int((math.ceil(q) if round_up else math.floor(q)) * multiple_of)


class GatedFeedForward(Module2024):
    """proj_down(act(gate) * up), [gate | up] = proj_up(x). x [B, S, E] -> [B, S, E]."""

    def __init__(self, dims: int, hidden: int, act_fn: str = "gelu", bias: bool = False, dropout: float = 0.0):
        super().__init__()
        if act_fn not in _ACTIVATIONS:
            raise ValueError(f"unknown feed-forward activation {act_fn!r}; choose from {sorted(_ACTIVATIONS)}")
        self.hidden = hidden
        self.act_fn = act_fn
        self.proj_up = nn.Linear(dims, 2 * hidden, bias=bias)
        self.proj_down = nn.Linear(hidden, dims, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def __call__(self, x: mx.array) -> mx.array:
        up = self.proj_up(x)
        gate, value = up[..., : self.hidden], up[..., self.hidden :]
        return self.dropout(self.proj_down(_ACTIVATIONS[self.act_fn](gate) * value))


# ------------------------------------------------------------------------- mLSTM (2024)
class mLSTMCell2024(Module2024):
    """The 2024 mLSTM kernel cell: i/f gates from concat(q, k, v), the mLSTM recurrence (a
    kernel from ``xlstm_metal.kernels``), per-head group norm.

    q, k, v [B, S, NH*DH]; state (C [B, NH, DH, DH], n [B, NH, DH], m [B, NH, 1]) or None
    -> (h [B, S, NH*DH], state).

    State convention: our kernels scale q by 1/sqrt(DH) where NX-AI's 2024 backends scale k, so
    outputs agree and our C, n equal NX-AI's times sqrt(DH) (see ``state_to_nxai``).
    """

    def __init__(self, inner_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        if inner_dim % num_heads:
            raise ValueError(f"mLSTM inner width {inner_dim} must be a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = inner_dim // num_heads
        self.eps = eps
        self.igate = nn.Linear(3 * inner_dim, num_heads)
        self.fgate = nn.Linear(3 * inner_dim, num_heads)
        self.outnorm = MultiHeadLayerNorm(num_heads, self.head_dim)

    def __call__(self, q, k, v, state, kernel: Callable, chunk_size: int = 64):
        B, S, _ = q.shape
        NH, DH = self.num_heads, self.head_dim
        qkv = mx.concatenate([q, k, v], axis=-1)
        i_pre = mx.swapaxes(self.igate(qkv), 1, 2)  # [B, NH, S]
        f_pre = mx.swapaxes(self.fgate(qkv), 1, 2)

        def heads(x):
            return mx.swapaxes(x.reshape(B, S, NH, DH), 1, 2)  # [B, NH, S, DH]

        h, state = kernel(heads(q), heads(k), heads(v), i_pre, f_pre, state, eps=self.eps, chunk_size=chunk_size)
        return self.outnorm(mx.swapaxes(h, 1, 2)), state

    def state_to_nxai(self, state):
        """Our (C, n, m) -> NX-AI's 2024 step state (C [B,NH,DH,DH], n [B,NH,DH,1], m [B,NH,1,1])."""
        C, n, m = state
        s = self.head_dim**-0.5
        return C * s, (n * s)[..., None], m[..., None]

    def state_from_nxai(self, state):
        """NX-AI's 2024 step state -> ours (inverse of :meth:`state_to_nxai`)."""
        C, n, m = state
        s = self.head_dim**0.5
        return C * s, n[..., 0] * s, m[..., 0]


__all__ = [
    "Module2024",
    "LayerNorm",
    "MultiHeadLayerNorm",
    "LinearHeadwise",
    "CausalConv1d",
    "GatedFeedForward",
    "mLSTMCell2024",
    "round_up_dim",
    "block_diagonal",
]
