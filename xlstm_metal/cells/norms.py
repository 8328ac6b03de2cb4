"""Normalisation cells and the soft cap. Reductions run in float32 (bf16 norms gave NaNs in
another MLX port); the result is cast back to the input dtype before the weight is applied.

A config with ``use_bias`` gives the block norms a bias too (transformers' and NX-AI's
``use_bias=True``): :class:`BiasedRMSNorm`, :class:`BiasedMultiHeadLayerNorm`. They are classes
of their own because the fused kernels take a norm by ``type(norm) is RMSNorm`` (and
``MultiHeadLayerNorm``) and read its weight only: a biased norm is never one of those types, so
every fast path runs its module instead (the reference ops, bias included).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .activations import tanh


def soft_cap(x: mx.array, cap: float | None) -> mx.array:
    """cap * tanh(x / cap); identity when cap is None."""
    return x if cap is None else cap * tanh(x / cap)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis. x: [..., D]."""

    def __init__(self, dims: int, eps: float = 1e-6, force_float32: bool = True):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
        self.force_float32 = force_float32

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == self.weight.dtype:
            # One kernel: MLX's rms_norm accumulates in float32 and rounds x * rsqrt(...) to x's
            # dtype before the weight, i.e. exactly the cast-normalise-cast-multiply below,
            # without three extra passes over x (0.9 ms per norm at 16k x 4096 bf16 on an H100).
            return mx.fast.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        xf = x.astype(mx.float32) if self.force_float32 else x
        normed = mx.fast.rms_norm(xf, None, self.eps).astype(dtype)
        return normed * self.weight


class BiasedRMSNorm(RMSNorm):
    """RMSNorm(x) + bias [D] (transformers' ``xLSTMRMSNorm`` with ``use_bias``). x: [..., D]."""

    def __init__(self, dims: int, eps: float = 1e-6, force_float32: bool = True):
        super().__init__(dims, eps=eps, force_float32=force_float32)
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x) + self.bias


def rms_norm(dims: int, *, bias: bool = False, eps: float = 1e-6, force_float32: bool = True) -> RMSNorm:
    """An :class:`RMSNorm` over ``dims``, a :class:`BiasedRMSNorm` with ``bias``."""
    return (BiasedRMSNorm if bias else RMSNorm)(dims, eps=eps, force_float32=force_float32)


class MultiHeadLayerNorm(nn.Module):
    """Layer norm per head (biased variance, no bias), then the flattened [NH * DH] weight.

    x: [B, S, NH, DH] -> [B, S, NH * DH].
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, force_float32: bool = True):
        super().__init__()
        self.weight = mx.ones((num_heads * head_dim,))
        self.eps = eps
        self.force_float32 = force_float32

    def __call__(self, x: mx.array) -> mx.array:
        B, S, NH, DH = x.shape
        dtype = x.dtype
        if self.force_float32 and dtype != mx.float32 and mx.default_device() != mx.cpu:
            normed = layer_norm_float32(x, self.eps)
        else:
            xf = x.astype(mx.float32) if self.force_float32 else x
            normed = mx.fast.layer_norm(xf, None, None, self.eps).astype(dtype)
        return normed.reshape(B, S, NH * DH) * self.weight


class BiasedMultiHeadLayerNorm(MultiHeadLayerNorm):
    """MultiHeadLayerNorm(x) + bias [NH * DH] (transformers' ``xLSTMMultiHeadLayerNorm`` with
    ``use_bias``). x: [B, S, NH, DH] -> [B, S, NH * DH]."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, force_float32: bool = True):
        super().__init__(num_heads, head_dim, eps=eps, force_float32=force_float32)
        self.bias = mx.zeros((num_heads * head_dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x) + self.bias


def multi_head_layer_norm(num_heads: int, head_dim: int, *, bias: bool = False, eps: float = 1e-6,
                          force_float32: bool = True) -> MultiHeadLayerNorm:
    """A :class:`MultiHeadLayerNorm`, a :class:`BiasedMultiHeadLayerNorm` with ``bias``."""
    cls = BiasedMultiHeadLayerNorm if bias else MultiHeadLayerNorm
    return cls(num_heads, head_dim, eps=eps, force_float32=force_float32)


_layer_norms: dict[float, object] = {}


def layer_norm_float32(x: mx.array, eps: float) -> mx.array:
    """``mx.fast.layer_norm`` (no weight, no bias) of x in float32, rounded back to x's dtype,
    with a vjp that keeps x itself for the backward and casts it again there: autodiff keeps
    the float32 copy (at the 1.3b shape and 8,192 tokens, 67 MB per block instead of the bf16
    input that the layer before keeps anyway). The gradient is autodiff's, op for op."""
    fn = _layer_norms.get(eps)
    if fn is None:

        def norm(xf):
            return mx.fast.layer_norm(xf, None, None, eps)

        @mx.custom_function
        def fn(x):
            return norm(x.astype(mx.float32)).astype(x.dtype)

        @fn.vjp
        def fn_vjp(primals, cotangent, _output):
            x = primals[0] if isinstance(primals, (list, tuple)) else primals  # one input: MLX passes it alone
            _, (dx,) = mx.vjp(norm, [x.astype(mx.float32)], [cotangent.astype(mx.float32)])
            return dx.astype(x.dtype)

        _layer_norms[eps] = fn
    return fn(x)
