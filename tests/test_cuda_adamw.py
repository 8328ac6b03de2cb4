"""The AdamW kernel (xlstm_metal/kernels/fast/adamw.py) against MLX's AdamW ops.

The kernel test runs only where MLX has its CUDA backend (the GPU machine): it compares the
kernel with MLX's ops evaluated on the CPU stream (IEEE rounding, one op at a time). The other
tests run everywhere and check ScaledAdamW's ops path against ``optim.AdamW``.
"""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from xlstm_metal.kernels.fast.adamw import ScaledAdamW, adamw_update
from xlstm_metal.kernels.fast.step import cuda_available

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


def _ops_update(g, p, m, v, lr, scale, b1, b2, eps, wd):
    """MLX's AdamW.apply_single (no bias correction) on g * scale in float32, op by op."""
    g = g.astype(mx.float32) * scale
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * mx.square(g)
    p = p * (1 - lr * wd)
    return p - lr * m / (mx.sqrt(v) + eps), m, v


@cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("shape", [(1,), (1027,), (96, 333), (2048, 5504)])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_kernel_equals_mlx_adamw(dtype, shape, wd):
    rng = np.random.default_rng(sum(shape))
    g = mx.array(rng.standard_normal(shape).astype(np.float32) * 1e-2).astype(dtype)
    p, m = (mx.array(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
    v = mx.array(np.abs(rng.standard_normal(shape)).astype(np.float32) * 1e-4)
    lr, scale = mx.array(3e-4, mx.float32), mx.array(0.37, mx.float32)
    ours = adamw_update(g, p, m * 1e-3, v, lr, scale, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd)
    with mx.stream(mx.cpu):
        ref = _ops_update(g, p, m * 1e-3, v, lr, scale, 0.9, 0.95, 1e-8, wd)
        mx.eval(ref)
    for a, b, name in zip(ours, ref, ("p", "m", "v")):
        a, b = np.array(a), np.array(b)
        assert a.dtype == np.float32 and a.shape == shape
        # op-for-op IEEE rounding: equal, or a last-bit difference where the GPU's sqrt/divide differ
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=0, err_msg=name)
        assert np.mean(a == b) > 0.99, name


@cuda
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_kernel_takes_gradients_at_any_offset(offset):
    """A gradient that is a view into a larger buffer (the trainer's joined projections' rows)
    at an offset the 16-byte loads cannot take (1, 2 bf16 elements) goes element by element:
    the same results as the aligned gradient's."""
    rng = np.random.default_rng(7)
    shape = (64, 96)
    flat = mx.array(rng.standard_normal(shape[0] * shape[1] + 4).astype(np.float32) * 1e-2).astype(mx.bfloat16)
    g = flat[offset:offset + shape[0] * shape[1]].reshape(shape)
    p, m = (mx.array(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
    v = mx.array(np.abs(rng.standard_normal(shape)).astype(np.float32) * 1e-4)
    lr, scale = mx.array(3e-4, mx.float32), mx.array(0.5, mx.float32)
    ours = adamw_update(g, p, m * 1e-3, v, lr, scale, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    aligned = adamw_update(mx.array(np.array(g.astype(mx.float32))).astype(mx.bfloat16), p, m * 1e-3, v, lr, scale,
                           b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    for a, b in zip(ours, aligned):
        assert mx.array_equal(a, b)


@pytest.mark.parametrize("scale", [None, 0.25])
def test_scaled_adamw_equals_adamw_of_scaled_gradients(scale):
    """ScaledAdamW with bf16 gradients and grad_scale = optim.AdamW with the float32 gradients
    times the scale (the kernel on CUDA, MLX's ops elsewhere: equal to float32 round-off)."""
    rng = np.random.default_rng(0)
    params = {"a": mx.array(rng.standard_normal((40, 30)).astype(np.float32)),
              "b": mx.array(rng.standard_normal((7,)).astype(np.float32))}
    grads = {k: mx.array(rng.standard_normal(v.shape).astype(np.float32)).astype(mx.bfloat16) for k, v in params.items()}
    ours = ScaledAdamW(learning_rate=1e-2, betas=[0.9, 0.95], weight_decay=0.1)
    ref = optim.AdamW(learning_rate=1e-2, betas=[0.9, 0.95], weight_decay=0.1)
    ours.init(params)
    ref.init(params)
    p1, p2 = dict(params), dict(params)
    for _ in range(3):
        ours.grad_scale = None if scale is None else mx.array(scale, mx.float32)
        p1 = ours.apply_gradients(grads, p1)
        f32 = {k: g.astype(mx.float32) * (1.0 if scale is None else mx.array(scale, mx.float32)) for k, g in grads.items()}
        p2 = ref.apply_gradients(f32, p2)
    for k in params:
        np.testing.assert_allclose(np.array(p1[k]), np.array(p2[k]), rtol=1e-6, atol=1e-7)
        assert not np.allclose(np.array(p1[k]), np.array(params[k]))
        if not cuda_available():
            assert mx.array_equal(p1[k], p2[k])


@cuda
def test_in_place_update_equals_the_kernel_and_takes_no_new_memory():
    """adamw_update(in_place=True): the kernel's results bit for bit, written over the
    parameter's, m's and v's buffers (the arrays passed in hold them afterwards; no new
    memory); ScaledAdamW(in_place=True) over three steps equals the out-of-place optimizer."""
    rng = np.random.default_rng(3)
    shape = (96, 333)

    def fresh(seed):
        r = np.random.default_rng(seed)
        return (mx.array(r.standard_normal(shape).astype(np.float32)),
                mx.array(r.standard_normal(shape).astype(np.float32) * 1e-3),
                mx.array(np.abs(r.standard_normal(shape)).astype(np.float32) * 1e-4))

    g = mx.array(rng.standard_normal(shape).astype(np.float32) * 1e-2).astype(mx.bfloat16)
    lr, scale = mx.array(3e-4, mx.float32), mx.array(0.37, mx.float32)
    kwargs = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    ref = adamw_update(g, *fresh(7), lr, scale, **kwargs)
    p, m, v = fresh(7)
    mx.eval(ref, p, m, v, g)
    before = mx.get_active_memory()
    out = adamw_update(g, p, m, v, lr, scale, in_place=True, **kwargs)
    mx.eval(out)
    assert mx.get_active_memory() - before < 4096  # only the 1-element ordering output
    for a, b, inp, name in zip(out, ref, (p, m, v), "pmv"):
        assert mx.array_equal(a, b), name
        assert mx.array_equal(inp, b), name  # the input's buffer holds the new values
        assert not mx.array_equal(b, fresh(7)["pmv".index(name)]), name

    params = {"a": mx.array(rng.standard_normal((40, 30)).astype(np.float32)),
              "b": mx.array(rng.standard_normal((7,)).astype(np.float32))}
    grads = {k: mx.array(rng.standard_normal(x.shape).astype(np.float32)).astype(mx.bfloat16)
             for k, x in params.items()}
    results = []
    for in_place in (False, True):
        opt = ScaledAdamW(learning_rate=1e-2, betas=[0.9, 0.95], weight_decay=0.1, in_place=in_place)
        current = {k: mx.array(np.array(x)) for k, x in params.items()}  # own buffers
        opt.init(current)
        for _ in range(3):
            opt.grad_scale = mx.array(0.5, mx.float32)
            current = opt.apply_gradients(grads, current)
            mx.eval(current, opt.state)
        results.append(current)
    for k in params:
        assert mx.array_equal(results[0][k], results[1][k]), k


def test_multi_groups_cut_evenly_below_the_limit():
    from xlstm_metal.kernels.fast.adamw import MULTI_MAX, multi_groups

    for count in (0, 1, 95, 96, 97, 122, 241, 363):
        groups = multi_groups([1] * count)
        assert [j for g in groups for j in g] == list(range(count))
        assert all(0 < len(g) <= MULTI_MAX for g in groups)
        assert len(groups) == -(-count // MULTI_MAX)
        assert len({len(g) for g in groups}) <= 2  # at most two kernels to compile per group kind


@cuda
def test_multi_tensor_update_equals_one_launch_per_parameter(monkeypatch):
    """ScaledAdamW in place with XLSTM_METAL_ADAMW_MULTI=1 (a few multi-tensor launches) gives
    the parameters, m and v of one launch per parameter bit for bit over three steps: 200
    parameters (three launches of bf16 gradients), sizes that are no multiple of 4, 1-element
    ones, a gradient that is an unaligned row view, float32 gradients (their own launch)."""
    rng = np.random.default_rng(11)
    shapes = [(96, 333), (7,), (1,), (2048,), (4, 2048), (130, 64)] * 33 + [(5, 3), (9,)]
    params = {f"w{j}": mx.array(rng.standard_normal(s).astype(np.float32)) for j, s in enumerate(shapes)}
    grads = {k: mx.array(rng.standard_normal(x.shape).astype(np.float32) * 1e-2).astype(mx.bfloat16)
             for k, x in params.items()}
    flat = mx.array(rng.standard_normal(64 * 96 + 3).astype(np.float32)).astype(mx.bfloat16)
    params["view"] = mx.array(rng.standard_normal((64, 96)).astype(np.float32))
    grads["view"] = flat[1:1 + 64 * 96].reshape(64, 96)  # 2-byte offset: element by element
    params["f32"] = mx.array(rng.standard_normal((33, 17)).astype(np.float32))
    grads["f32"] = mx.array(rng.standard_normal((33, 17)).astype(np.float32) * 1e-2)
    results = []
    for multi in ("0", "1"):
        monkeypatch.setenv("XLSTM_METAL_ADAMW_MULTI", multi)
        opt = ScaledAdamW(learning_rate=1e-2, betas=[0.9, 0.95], weight_decay=0.1, in_place=True)
        current = {k: mx.array(np.array(x)) for k, x in params.items()}  # own buffers
        opt.init(current)
        for step in range(3):
            opt.grad_scale = mx.array(0.5 + 0.1 * step, mx.float32)
            current = opt.apply_gradients(grads, current)
            mx.eval(current, opt.state)
        results.append((current, opt.state))
    (p0, s0), (p1, s1) = results
    for k in params:
        assert mx.array_equal(p0[k], p1[k]), k
        assert mx.array_equal(s0[k]["m"], s1[k]["m"]) and mx.array_equal(s0[k]["v"], s1[k]["v"]), k
        assert not mx.array_equal(p1[k], params[k]), k
