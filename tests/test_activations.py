"""xlstm_metal.cells.activations: values against float64 references over the whole float32
range, special values, half-precision inputs, gradients against MLX's ops, compile."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from xlstm_metal.cells import activations as act

TINY = 2.0**-126  # smallest normal float32


def _f64(name, x):
    x = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if name == "exp":
            return np.exp(x)
        if name == "sigmoid":
            return 1.0 / (1.0 + np.exp(-x))
        if name == "silu":
            return x / (1.0 + np.exp(-x))
        return np.tanh(x)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([
        np.linspace(-110.0, 100.0, 200_001),
        np.linspace(88.0, 89.0, 20_001),  # float32 exp overflows at 88.7228
        rng.normal(0.0, 3.0, 50_000),
        np.logspace(-30, 1.5, 5_000), -np.logspace(-30, 1.5, 5_000),
        [0.0, 1e-45, -1e-45, 3e38, -3e38],
    ]).astype(np.float32)


MLX_OPS = {"exp": mx.exp, "sigmoid": mx.sigmoid, "silu": nn.silu, "tanh": mx.tanh}


@pytest.mark.parametrize("name", ["exp", "sigmoid", "silu", "tanh"])
def test_values_float32(name):
    x = _inputs()
    y = np.array(getattr(act, name)(mx.array(x)), dtype=np.float64)
    ref = _f64(name, x)
    with np.errstate(over="ignore", invalid="ignore"):
        ref32 = ref.astype(np.float32).astype(np.float64)
        err = np.abs(y - ref)
    # silu(x) = x / (1 + exp(-x)) is 0 once exp(-x) overflows (x < -88.4), where |silu| < 3e-37.
    tiny = 89 * TINY if name == "silu" else TINY
    normal = np.isfinite(ref32) & (np.abs(ref) >= tiny)
    rel = err[normal] / np.abs(ref)[normal]
    assert rel.max() < 4e-7, (name, rel.max(), x[normal][np.argmax(rel)])
    # Below that: denormal or flushed to zero.
    small = np.isfinite(ref) & (np.abs(ref) < tiny)
    assert np.all(err[small] <= tiny)
    # Overflow exactly where float32 overflows (a result within an ulp of FLT_MAX may go
    # either way).
    over = ~np.isfinite(ref32)
    near_max = np.abs(ref) > 3.4e38
    assert np.all(np.isinf(y[over & ~near_max])) and np.all(np.isfinite(y[~over & ~near_max]))


@pytest.mark.parametrize("name", ["exp", "sigmoid", "silu", "tanh"])
def test_special_values_match_mlx(name):
    x = mx.array([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e30, -1e30, 200.0, -200.0] * 512)
    y = np.array(getattr(act, name)(x))
    ref = np.array(MLX_OPS[name](x))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(y[ok], ref[ok], rtol=1e-6, atol=1e-37)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("name", ["exp", "sigmoid", "silu", "tanh"])
def test_half_inputs_computed_in_float32(name, dtype):
    x16 = mx.array(np.random.default_rng(1).normal(0.0, 4.0, 4096).astype(np.float32)).astype(dtype)
    y = getattr(act, name)(x16)
    assert y.dtype == dtype
    expected = MLX_OPS[name](x16.astype(mx.float32)).astype(dtype)
    y32, e32 = np.array(y.astype(mx.float32)), np.array(expected.astype(mx.float32))
    # The float32 results agree to ~1e-7; after rounding to 8 (11) bits they may differ by one
    # ulp where they straddle a rounding boundary.
    ulp = 2.0**-7 if dtype == mx.bfloat16 else 2.0**-10
    np.testing.assert_allclose(y32, e32, rtol=ulp * 1.01, atol=1e-6)
    assert np.mean(y32 != e32) < 0.02


@pytest.mark.parametrize("name", ["exp", "sigmoid", "silu", "tanh"])
def test_gradients_match_mlx_ops(name):
    x = mx.array(np.random.default_rng(2).normal(0.0, 5.0, 8192).astype(np.float32))
    w = mx.array(np.random.default_rng(3).normal(size=8192).astype(np.float32))

    def loss(fn):
        return lambda a: (fn(a) * w).sum()

    g = mx.grad(loss(getattr(act, name)))(x)
    g_ref = mx.grad(loss(MLX_OPS[name]))(x)
    np.testing.assert_allclose(np.array(g), np.array(g_ref), rtol=2e-5, atol=1e-6)
    # Compiled gradient (as in a compiled training step) and bf16 gradients.
    g_c = mx.compile(mx.grad(loss(getattr(act, name))))(x)
    np.testing.assert_allclose(np.array(g_c), np.array(g_ref), rtol=2e-5, atol=1e-6)
    g16 = mx.grad(loss(getattr(act, name)))(x.astype(mx.bfloat16))
    assert g16.dtype == mx.bfloat16


@pytest.mark.parametrize("name", ["exp", "sigmoid", "silu", "tanh"])
def test_inside_compile_and_strided_inputs(name):
    rng = np.random.default_rng(4)
    a = mx.array(rng.normal(0.0, 3.0, (3, 64, 96)).astype(np.float32))
    fn = getattr(act, name)
    gate = a[:, :, :48]  # a non-contiguous slice, as mx.split of a fused matmul gives
    y = mx.compile(lambda t: fn(t[:, :, :48]) * t[:, :, 48:])(a)
    ref = _f64(name, np.array(gate)) * np.array(a[:, :, 48:], dtype=np.float64)
    np.testing.assert_allclose(np.array(y), ref, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(fn(gate)), _f64(name, np.array(gate)), rtol=1e-6, atol=1e-7)


def test_disabled_and_other_dtypes_fall_back(monkeypatch):
    x = mx.array(np.linspace(-5.0, 5.0, 8192).astype(np.float32))
    monkeypatch.setattr(act, "_ENABLED", False)
    assert not act.fast_path_enabled()
    np.testing.assert_array_equal(np.array(act.sigmoid(x)), np.array(mx.sigmoid(x)))
    monkeypatch.setattr(act, "_ENABLED", True)
    # Integer input: MLX's op (which promotes to float32).
    assert act.exp(mx.arange(8192)).dtype == mx.float32
    # Small arrays (the gate soft caps, a batch-1 decode step) use MLX's ops too.
    small = mx.array([0.5, -2.0])
    np.testing.assert_array_equal(np.array(act.sigmoid(small)), np.array(mx.sigmoid(small)))
    with mx.stream(mx.cpu):
        assert act.fast_path_enabled() == (mx.default_device().type == mx.DeviceType.cpu)
