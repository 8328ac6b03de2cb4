"""Elementwise activations that are fast on MLX's CPU backend: exp, sigmoid, silu, tanh.

On a GPU (Metal, CUDA) these are MLX's own ops. On the CPU, MLX 0.32 evaluates its
transcendental functions one element at a time with a software ``fma`` (no SIMD on x86):
``mx.exp`` of 512 x 2048 float32 takes ~22 ms, ``nn.silu`` ~29 ms, where PyTorch's ``silu``
takes 2 ms. Here the same Cephes-style algorithm is written as plain MLX arithmetic under
``mx.compile``, which MLX's CPU backend turns into vectorised C++ loops:

    n = round(x * log2(e))              (the 1.5 * 2^23 "magic number" rounding)
    r = x - n * ln2                     (Cody-Waite: ln2 = C1 + C2, C1 exact in 9 bits)
    exp(x) = 2^n * (1 + r + r^2 P(r))   (degree-7 polynomial, Estrin's scheme)

with 2^n built from exponent bits (``astype(int32) << 23``, ``view(float32)``). Accuracy
against float64 (tests/test_activations.py): relative error <= 2.3e-7 for exp, sigmoid, silu and
tanh over the float32 range (exp: 3.2e-7 in [88.4, 88.72], just below overflow). Results below
2^-126 are denormals or flushed to zero (exp(x), sigmoid(x) for x < -87.3; silu(x) for
x < -88.4, where |silu| < 3e-37), as MLX's own CPU ``exp`` flushes below -88. +-inf and NaN give
what MLX's ops give (silu(-inf) is NaN, as in ``nn.silu``).

MLX fuses at most 11 levels of elementwise ops into one kernel, and keeps ``maximum`` /
``minimum`` / ``where`` vectorised only when they end a kernel, so the functions place
explicit kernel boundaries (a no-copy ``view`` there and back) right after each clamp and
before the polynomial: 4 kernels per call. 512 x 2048 float32 on the 2-core AMD EPYC test
machine (MLX 0.32.4): exp 3.9 ms (``mx.exp`` 22.0), sigmoid 4.1 (29.5), silu 4.2 (28.7), tanh
4.1 (29.6).

float16 / bfloat16 inputs are computed in float32 and cast back. Gradients come from
``mx.custom_function`` vjps with the analytic derivatives (exp' = exp, sigmoid' = s (1 - s),
silu' = s (1 + x (1 - s)), tanh' = 1 - tanh^2), so ``mx.grad`` / ``mx.vjp`` and ``mx.compile``
work as with MLX's ops; forward mode (``mx.jvp``) does not (MLX 0.32 does not call a
custom_function's jvp, and ``view`` has none). Inside another compiled function (a compiled
training or decode step), MLX inlines the inner compiled function, so nothing is compiled
twice. No host syncs. As with any ``mx.compile`` on the CPU, MLX builds each kernel once with
the system C++ compiler and caches it on disk (``/tmp/mlx/<version>/cpu``).

``XLSTM_METAL_FAST_ACTIVATIONS=0`` switches the CPU path back to MLX's ops (for comparisons).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

__all__ = ["exp", "sigmoid", "silu", "tanh", "fast_path_enabled"]

_LOG2E = 1.4426950408889634
_C1 = 0.693359375  # ln 2 = C1 + C2; C1 has 9 significant bits, so n * C1 is exact for |n| < 2^15
_C2 = -2.12194440e-4
# exp(r) = 1 + r + r^2 (P5 + P4 r + ... + P0 r^5) on |r| <= ln2 / 2 (Cephes expf).
_P0, _P1, _P2, _P3, _P4, _P5 = (
    1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
    5.0000001201e-1,
)
# z * log2(e) + _MAGIC is an integer-valued float in [2^23, 2^24) whose low 9 bits hold n + 127,
# for |n| < 2^22: so astype(int32) << 23 is the bit pattern of 2^n (the higher bits shift out).
_MAGIC = 12582912.0 + 127.0  # 1.5 * 2^23 + 127
_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# Below this many elements MLX's own op is as fast (4 kernels of a few microseconds each, and in
# eager mode ~0.1 ms of compile-cache lookup, against ~30 ns per element for MLX's op): e.g. the
# gate soft caps and a batch-1 decode step's activations stay on MLX's ops.
_MIN_SIZE = 4096


def fast_path_enabled() -> bool:
    """True when calls on the current default device take the compiled polynomial path."""
    return _ENABLED and mx.default_device().type == mx.DeviceType.cpu


_ENABLED = os.environ.get("XLSTM_METAL_FAST_ACTIVATIONS", "1").strip().lower() not in ("0", "false", "no", "off")


def _barrier(a: mx.array) -> mx.array:
    """A kernel boundary that copies nothing: MLX's compile does not fuse across ``view``."""
    return a.view(mx.int32).view(mx.float32)


def _exp_parts(z: mx.array):
    """For z (float32, clamped so that n = round(z log2 e) lies in [-127, 128]): r and s with
    exp(z) = exp(r) * s, s = 2^n (0 for n = -127, inf for n = 128), |r| <= ln2 / 2. Two
    kernels (``view`` ends fusion): s from the exponent bits, and r, ending in a boundary so
    that the polynomial and what follows it fit in one more kernel."""
    s = ((z * _LOG2E + _MAGIC).astype(mx.int32) << 23).view(mx.float32)
    # The same n in float, written as _MAGIC + log2e * z so that compile's common-subexpression
    # pass does not merge it with the line above (which would cost one more kernel).
    n = (mx.multiply(_LOG2E, z) + _MAGIC) - _MAGIC
    r = _barrier((z - n * _C1) - n * _C2)
    return r, s


def _expm1_poly(r: mx.array) -> mx.array:
    """exp(r) - 1 = r + r^2 P(r) by Estrin's scheme (5 levels of ops)."""
    r2 = r * r
    r4 = r2 * r2
    return ((r + r2 * (_P5 + _P4 * r)) + r4 * (_P3 + _P2 * r)) + (r4 * r2) * (_P1 + _P0 * r)


def _exp32(x: mx.array) -> mx.array:
    # Below -88.3, n <= -127: s = 0 (exp < 2^-126.5 flushes to zero).
    z = _barrier(mx.maximum(x, -88.3))
    # n <= 127 keeps s finite; above 88.38, r grows past ln2 / 2 (to 0.69 at the overflow
    # threshold 88.72, where the polynomial is still good to 3.4e-7) and y * s overflows to inf.
    t = _barrier(mx.minimum(z * _LOG2E + _MAGIC, _MAGIC + 127.0))
    s = (t.astype(mx.int32) << 23).view(mx.float32)
    n = t - _MAGIC
    r = (z - n * _C1) - n * _C2
    return (_expm1_poly(r) + 1.0) * s


def _sigmoid_exp_neg(x: mx.array) -> mx.array:
    """exp(-x) for sigmoid / silu: -x clamped to [-20, 89]. Below -20, 1 / (1 + exp) is 1.0 in
    float32 anyway; above 88.38 exp(-x) becomes inf, so sigmoid is 0 (true value < 4e-39)."""
    r, s = _exp_parts(_barrier(mx.clip(-x, -20.0, 89.0)))
    return (_expm1_poly(r) + 1.0) * s


def _sigmoid32(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + _sigmoid_exp_neg(x))


def _silu32(x: mx.array) -> mx.array:
    # x / (1 + exp(-x)): one rounding, and one kernel fewer than x * (1 / (1 + exp(-x))) (4.2
    # vs 7.2 ms at 512 x 2048). silu(-inf) is NaN, as in nn.silu (-inf * 0).
    return x / (1.0 + _sigmoid_exp_neg(x))


def _tanh32(x: mx.array) -> mx.array:
    # tanh(x) = expm1(2x) / (expm1(2x) + 2), exact near 0 (expm1 = s (exp(r) - 1) + (s - 1)),
    # and +-1.0 in float32 for |x| > 9, so 2x is clamped to [-40, 40].
    r, s = _exp_parts(_barrier(mx.clip(x * 2.0, -40.0, 40.0)))
    em1 = _expm1_poly(r) * s + (s - 1.0)
    return em1 / (em1 + 2.0)


_compiled = {name: mx.compile(fn) for name, fn in
             (("exp", _exp32), ("sigmoid", _sigmoid32), ("silu", _silu32), ("tanh", _tanh32))}


@mx.custom_function
def _exp_f32(x):
    return _compiled["exp"](x)


@_exp_f32.vjp
def _exp_vjp(primals, cotangent, output):
    return cotangent * output


@mx.custom_function
def _sigmoid_f32(x):
    return _compiled["sigmoid"](x)


@_sigmoid_f32.vjp
def _sigmoid_vjp(primals, cotangent, output):
    return cotangent * (output * (1.0 - output))


def _silu_grad(x: mx.array) -> mx.array:
    s = _compiled["sigmoid"](x)
    return s * (1.0 + x * (1.0 - s))


@mx.custom_function
def _silu_f32(x):
    return _compiled["silu"](x)


@_silu_f32.vjp
def _silu_vjp(primals, cotangent, output):
    return cotangent * _silu_grad(primals)


@mx.custom_function
def _tanh_f32(x):
    return _compiled["tanh"](x)


@_tanh_f32.vjp
def _tanh_vjp(primals, cotangent, output):
    return cotangent * (1.0 - output * output)


def _apply(fast, slow, x: mx.array) -> mx.array:
    if x.size < _MIN_SIZE or x.dtype not in _FLOAT_DTYPES or not fast_path_enabled():
        return slow(x)
    if x.dtype == mx.float32:
        return fast(x)
    return fast(x.astype(mx.float32)).astype(x.dtype)


def exp(x: mx.array) -> mx.array:
    """exp(x); see the module docstring for the CPU path's accuracy."""
    return _apply(_exp_f32, mx.exp, x)


def sigmoid(x: mx.array) -> mx.array:
    """1 / (1 + exp(-x))."""
    return _apply(_sigmoid_f32, mx.sigmoid, x)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) (``nn.silu``)."""
    return _apply(_silu_f32, nn.silu, x)


def tanh(x: mx.array) -> mx.array:
    """tanh(x)."""
    return _apply(_tanh_f32, mx.tanh, x)
