"""The skinny decode product (xlstm_metal/kernels/fast/skinny.py) against x @ w.T.

Kernel tests run only where MLX has its CUDA backend (the GPU machine); elsewhere
:func:`linear_product` is ``x @ w.T`` and the tests at the end check the dispatch, the layer
class and the model wiring.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from xlstm_metal.benchmark import shape_config
from xlstm_metal.kernels.fast.skinny import (
    MAX_ROWS,
    FastLinear,
    KERNELS,
    SkinnyConfig,
    decode_matmul,
    default_config,
    k_splits,
    linear_product,
    set_skinny_gemm,
    skinny_gemm_kernel,
    skinny_matmul,
    skinny_supported,
    use_fast_linear_layers,
    uses_skinny_kernel,
)
from xlstm_metal.kernels.fast.step import cuda_available

from conftest import tiny_model

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")

#: bf16 operands, float32 accumulation, one rounding to bf16 (2^-9 relative) at the end; MLX's
#: own bf16 matmul is held to the same bound below.
TOL_BF16 = 4e-3


@pytest.fixture
def skinny_on():
    """The mma.sync kernel selected for the test, then the previous choice back."""
    before = skinny_gemm_kernel()
    set_skinny_gemm(True)
    yield
    set_skinny_gemm(before)


def _operands(seed, M, N, K, dtype=mx.bfloat16, lead=()):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((*lead, M, K)).astype(np.float32)).astype(dtype)
    w = mx.array((rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)).astype(dtype)
    return x, w


def _reference64(x, w):
    """x @ w.T of the (already rounded) operands in float64."""
    return np.array(x.astype(mx.float32), dtype=np.float64) @ np.array(w.astype(mx.float32), dtype=np.float64).T


def _rel(out, ref) -> float:
    out = np.array(out.astype(mx.float32), dtype=np.float64)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def _layer_shapes(scale=8):
    """The 7B model's five products with every width divided by ``scale`` (multiples of 8 kept)."""
    c = shape_config("7b")
    E, F = c.embedding_dim // scale, -(-c.ffn_dim // (8 * scale)) * 8
    V = -(-c.vocab_size // (8 * scale)) * 8
    qkvoif = 2 * (c.qk_dim // scale) + 2 * (c.v_dim // scale) + 2 * c.num_heads
    return {"q|k|v|o|i|f": (qkvoif, E), "out_proj": (E, E), "gate|up": (2 * F, E), "proj_down": (E, F),
            "lm_head": (V, E)}


@cuda
@pytest.mark.parametrize("M", [1, 2, 7, 16, 33, 64])
def test_cuda_7b_layer_shapes(M):
    for i, (kind, (N, K)) in enumerate(_layer_shapes().items()):
        x, w = _operands(100 * M + i, M, N, K)
        ref = _reference64(x, w)
        out = skinny_matmul(x, w)
        assert out.shape == (M, N) and out.dtype == mx.bfloat16
        assert _rel(out, ref) <= TOL_BF16, (kind, _rel(out, ref))
        assert _rel(x @ w.T, ref) <= TOL_BF16  # the bound holds for MLX's own product too


@cuda
@pytest.mark.parametrize("config", [SkinnyConfig(tm=1, w=8, u=2, stages=4),
                                    SkinnyConfig(tm=2, w=4, u=2, stages=4),
                                    SkinnyConfig(tm=1, w=4, u=4, stages=3),
                                    SkinnyConfig(tm=2, w=2, u=2, stages=2)])
@pytest.mark.parametrize("M", [3, 64])
def test_cuda_configs_partial_tiles(config, M):
    # N not a multiple of a block's rows, K a multiple of 8 but not of a k step (64 or 128):
    # partial tiles, partial last step, k split across blocks (one tile) or not (K tiny).
    for N, K in ((200, 1000), (37, 24), (1, 8), (300, 4104)):
        x, w = _operands(N + K + M, M, N, K)
        for splits in (None, 3, 64):  # k whole (the default), or split with the partial sums added
            out = skinny_matmul(x, w, config, splits)
            assert out.shape == (M, N) and out.dtype == x.dtype
            assert _rel(out, _reference64(x, w)) <= TOL_BF16, (N, K, splits)


@cuda
def test_cuda_float16_leading_axes_and_strided_x():
    x, w = _operands(5, 4, 96, 512, mx.float16, lead=(2,))
    out = skinny_matmul(x, w)
    assert out.shape == (2, 4, 96) and out.dtype == mx.float16
    assert _rel(out, _reference64(x, w)) <= TOL_BF16
    xt = x.transpose(1, 0, 2)  # [4, 2, 512], not row-contiguous: copied before the launch
    assert _rel(skinny_matmul(xt, w), _reference64(xt, w)) <= TOL_BF16


def assert_compiled_repeated_and_gradient() -> None:
    """The product switched on (by the caller), compiled and called three times, and its gradient
    (the custom vjp: the two plain products), each within one bf16 rounding of float64."""
    x, w = _operands(6, 16, 256, 384)
    assert uses_skinny_kernel(x, w)
    f = mx.compile(linear_product)
    for _ in range(3):
        assert _rel(f(x, w), _reference64(x, w)) <= TOL_BF16
    # The custom vjp: the two plain products.
    xf, wf = x.astype(mx.float32), w.astype(mx.float32)
    gx, gw = mx.grad(lambda a, b: linear_product(a, b).astype(mx.float32).sum(), argnums=(0, 1))(x, w)
    rx, rw = mx.grad(lambda a, b: (a @ b.T).sum(), argnums=(0, 1))(xf, wf)
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    assert _rel(gx, np.array(rx, dtype=np.float64)) <= TOL_BF16
    assert _rel(gw, np.array(rw, dtype=np.float64)) <= TOL_BF16


@cuda
def test_cuda_compiled_repeated_and_gradient(skinny_on):
    assert_compiled_repeated_and_gradient()


@cuda
def test_cuda_switch_and_dispatch(skinny_on):
    x, w = _operands(7, 16, 64, 64)
    assert uses_skinny_kernel(x, w) and not uses_skinny_kernel(x[:1], w)  # one row: MLX's GEMV
    assert not uses_skinny_kernel(mx.zeros((MAX_ROWS + 1, 64), mx.bfloat16), w)
    assert not uses_skinny_kernel(x.astype(mx.float32), w.astype(mx.float32))
    set_skinny_gemm(False)
    assert not uses_skinny_kernel(x, w)


def assert_model_decode_matches_matmul_path(batch: int) -> None:
    """A bf16 model's decode of 3 tokens for ``batch`` rows with the product switched on (by the
    caller) against the same with MLX's matmul."""
    from xlstm_metal.benchmark import random_model

    config = shape_config("125m", num_blocks=2, embedding_dim=256, num_heads=2, vocab_size=101)
    model = random_model(config, dtype="bfloat16", seed=5).fuse_projections()
    tokens = mx.array(np.random.default_rng(batch).integers(0, model.config.vocab_size, (batch, 3)), dtype=mx.int32)

    def decode():
        state, outs = None, []
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t : t + 1], state)
            outs.append(logits.astype(mx.float32))
        return mx.concatenate(outs, axis=1)

    with_kernel = decode()
    set_skinny_gemm(False)
    with_matmul = decode()
    a, b = np.array(with_kernel), np.array(with_matmul)
    assert np.isfinite(a).all()
    # Same math; bf16 activations round differently where the summation order differs.
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 3e-2


@cuda
@pytest.mark.parametrize("batch", [2, 16])
def test_cuda_model_decode_matches_matmul_path(batch, skinny_on):
    assert_model_decode_matches_matmul_path(batch)


@pytest.fixture
def decode_on():
    """The decode kernel (:func:`decode_matmul`) selected for the test, then the previous choice back."""
    before = skinny_gemm_kernel()
    set_skinny_gemm("decode")
    yield
    set_skinny_gemm(before)


@cuda
@pytest.mark.parametrize("M", [2, 9, 16, 33, 64])
def test_cuda_decode_kernel_7b_layer_shapes_and_partial_tiles(M):
    shapes = list(_layer_shapes().values()) + [(37, 24), (200, 1000), (1, 8)]  # partial tiles, K % 32 != 0
    for i, (N, K) in enumerate(shapes):
        x, w = _operands(300 * M + i, M, N, K)
        out = decode_matmul(x, w)
        assert out.shape == (M, N) and out.dtype == mx.bfloat16
        assert _rel(out, _reference64(x, w)) <= TOL_BF16, (N, K, _rel(out, _reference64(x, w)))
    half = max(1, M // 2)  # two leading rows of `half`: at most 64 in all
    x, w = _operands(9, half, 96, 512, mx.float16, lead=(2,))
    out = decode_matmul(x, w)
    assert out.shape == (2, half, 96) and out.dtype == mx.float16
    assert _rel(out, _reference64(x, w)) <= TOL_BF16


@cuda
@pytest.mark.parametrize("M", [2, 9, 16])
def test_cuda_decode_kernel_with_x_in_the_ring_is_the_same_product(M, monkeypatch, decode_on):
    """x carried in the weights' ring (quantized.X_AHEAD): the same reads in the same order, so the
    same bits as the kernel loading x as each span starts, partial tiles and SwiGLU pairs included."""
    from xlstm_metal.kernels.fast import quantized

    shapes = [(21888, 4096), (4096, 10944), (37, 24), (200, 1000)]
    for i, (N, K) in enumerate(shapes):
        x, w = _operands(900 * M + i, M, N, K)
        monkeypatch.setitem(quantized.X_AHEAD, 16, 0)
        want, want_pair = decode_matmul(x, w), quantized.fused_swiglu_matmul(x, w, w, w, group_size=32, bits=16) \
            if N % 16 == 0 else None
        monkeypatch.setitem(quantized.X_AHEAD, 16, 1)
        got = decode_matmul(x, w)
        assert np.array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))), (N, K)
        if N % 16 == 0:
            pair = quantized.fused_swiglu_matmul(x, w, w, w, group_size=32, bits=16)
            assert np.array_equal(np.array(pair.astype(mx.float32)), np.array(want_pair.astype(mx.float32))), (N, K)


@cuda
def test_cuda_decode_kernel_compiled_gradient_and_model(decode_on):
    assert_compiled_repeated_and_gradient()
    assert_model_decode_matches_matmul_path(16)


def _swiglu64(x, w):
    """silu(gate) * up of the float64 product, gate and up rounded to x's dtype first (as stored)."""
    joined = mx.array(_reference64(x, w).astype(np.float32)).astype(x.dtype).astype(mx.float32)
    g, u = np.split(np.array(joined, dtype=np.float64), 2, axis=-1)
    return g / (1 + np.exp(-g)) * u


@pytest.fixture
def gate_up_swiglu_on(monkeypatch, decode_on):
    import xlstm_metal.kernels.fast.skinny as skinny

    monkeypatch.setattr(skinny, "DECODE_SWIGLU", True)


@cuda
@pytest.mark.parametrize("M", [2, 9, 16])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_cuda_gate_up_swiglu_epilogue_is_the_product_then_swiglu(M, dtype, gate_up_swiglu_on):
    """One launch (SwiGLU in the paired decode kernel's epilogue) against the decode product then
    SwiGLU's kernel: the same sums in the same order, so at most the mma's rounding between its
    rows g and g + 8 apart; and against float64."""
    from xlstm_metal.kernels.fast.skinny import gate_up_swiglu_product, uses_gate_up_swiglu
    from xlstm_metal.kernels.fast.train_rows import swiglu_joined

    F7 = shape_config("7b").ffn_dim
    for i, (F, K) in enumerate([(F7, 4096), (24, 136), (8, 8)]):
        x, w = _operands(700 * M + i, M, 2 * F, K, dtype)
        assert uses_gate_up_swiglu(x, w)
        out = gate_up_swiglu_product(x, w)
        assert out.shape == (M, F) and out.dtype == dtype
        ref = swiglu_joined(decode_matmul(x, w))
        a, b = np.array(out.astype(mx.float32)), np.array(ref.astype(mx.float32))
        assert np.mean(a == b) >= 0.99, (F, K, np.mean(a == b))
        assert np.max(np.abs(a - b)) <= 2 ** -6 * np.max(np.abs(b)), (F, K)
        assert _rel(out, _swiglu64(x, w)) <= 2 * TOL_BF16, (F, K, _rel(out, _swiglu64(x, w)))


@cuda
def test_cuda_gate_up_swiglu_epilogue_quantized_weights_and_gradient(gate_up_swiglu_on):
    """4- and 8-bit joined weights through the paired kernel against the unpaired one then SwiGLU;
    the differentiable wrapper's gradient against the ops'."""
    from xlstm_metal.kernels.fast import quantized
    from xlstm_metal.kernels.fast.skinny import _swiglu_reference, gate_up_swiglu_product
    from xlstm_metal.kernels.fast.train_rows import swiglu_joined

    x, w = _operands(5, 3, 2 * 64, 256)
    for bits in (4, 8):
        wq, s, b = mx.quantize(w, group_size=64, bits=bits)
        out = quantized.fused_swiglu_matmul(x, wq, s, b, group_size=64, bits=bits)
        ref = swiglu_joined(quantized.fused_quantized_matmul(x, wq, s, b, group_size=64, bits=bits))
        a, r = np.array(out.astype(mx.float32)), np.array(ref.astype(mx.float32))
        assert out.shape == (3, 64) and np.max(np.abs(a - r)) <= 2 ** -6 * np.max(np.abs(r)), bits
    cot = mx.array(np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)).astype(mx.bfloat16)
    _, got = mx.vjp(gate_up_swiglu_product, [x, w], [cot])
    _, want = mx.vjp(lambda x, w: _swiglu_reference(x @ w.T), [x, w], [cot])
    for g, r in zip(got, want):
        assert np.array_equal(np.array(g.astype(mx.float32)), np.array(r.astype(mx.float32)))


@cuda
def test_cuda_gate_up_swiglu_epilogue_in_the_model(gate_up_swiglu_on, monkeypatch):
    """A bf16 model's decode at 16 rows through the FFN's paired launch (every block takes it)
    against the same with MLX's matmul."""
    import xlstm_metal.kernels.fast.skinny as skinny

    calls = []
    real = skinny._decode_swiglu_bare  # the fused step calls its products bare (inference_products)
    monkeypatch.setattr(skinny, "_decode_swiglu_bare", lambda x, w: calls.append(x.shape) or real(x, w))
    assert_model_decode_matches_matmul_path(16)
    assert len(calls) == 2 * 3  # two blocks, three tokens


# ------------------------------------------------------------------ everywhere (CPU included)
def test_decode_matmul_launches_the_decode_kernel_with_its_load_hint(monkeypatch):
    import xlstm_metal.kernels.fast.quantized as quantized
    import xlstm_metal.kernels.fast.skinny as skinny

    calls = []

    def kernel(x, w, scales, biases, **kw):
        calls.append((scales is w and biases is w, kw))
        return x @ w.T

    monkeypatch.setattr(skinny, "skinny_supported", lambda x, w: True)  # the device check stood in for
    monkeypatch.setattr(quantized, "fused_quantized_matmul", kernel)
    monkeypatch.setattr(skinny, "DECODE_LOAD_HINT", 2)
    x, w = _operands(11, 16, 40, 64)
    assert mx.array_equal(skinny.decode_matmul(x, w), x @ w.T).item()
    # bits 16 (the float weights as they are: w stands in for the unread scales and biases), the hint
    assert calls == [(True, {"group_size": 32, "bits": 16, "load_hint": 2})]


def test_kernel_choices_parse_and_refuse_unknown():
    before = skinny_gemm_kernel()
    try:
        for choice in KERNELS:
            set_skinny_gemm(choice)
            assert skinny_gemm_kernel() == choice
        set_skinny_gemm(True)
        assert skinny_gemm_kernel() == "mma"
        with pytest.raises(ValueError, match="one of off, mma, wgmma, decode, stream, auto"):
            set_skinny_gemm("fastest")
    finally:
        set_skinny_gemm(before)
    if not cuda_available():
        with pytest.raises(ValueError, match="decode_matmul"):
            decode_matmul(mx.zeros((4, 64), mx.bfloat16), mx.zeros((8, 64), mx.bfloat16))



def test_linear_product_is_matmul_off_cuda_or_for_float32():
    x, w = _operands(8, 5, 48, 64, mx.float32)
    assert np.array_equal(np.array(linear_product(x, w)), np.array(x @ w.T))
    if not cuda_available():
        assert not skinny_supported(x.astype(mx.bfloat16), w.astype(mx.bfloat16))
        with pytest.raises(ValueError, match="skinny_matmul"):
            skinny_matmul(x.astype(mx.bfloat16), w.astype(mx.bfloat16))


def test_config_checks_defaults_and_splits(monkeypatch):
    import xlstm_metal.kernels.fast.skinny as skinny

    with pytest.raises(ValueError):
        SkinnyConfig(u=3)
    with pytest.raises(ValueError):
        SkinnyConfig(w=33)
    monkeypatch.setattr(skinny, "TARGET_BLOCKS", 0)
    assert k_splits(4096, 4096, default_config(16, 4096)) == 1  # 0: never split
    monkeypatch.setattr(skinny, "TARGET_BLOCKS", 264)
    for rows in (1, 2, 16, 17, 64):
        cfg = default_config(rows, 4096)
        assert cfg.w * 32 <= 1024 and cfg.shared_bytes(-(-rows // 8)) <= 227 * 1024
        for n, k in _layer_shapes(scale=1).values():
            splits = k_splits(n, k, cfg)
            tiles = -(-n // cfg.rows_per_block())
            steps = -(-k // cfg.k_step())
            per = -(-steps // splits)  # the kernel's k steps per split
            assert 1 <= splits <= steps and (splits - 1) * per < steps  # no empty split
            # Enough blocks for the GPU (whole k steps per split round the count down a little),
            # or no split at all.
            assert 4 * tiles * splits >= 3 * min(264, tiles * steps) or splits == 1
        assert k_splits(50304, 4096, cfg) == 1  # the LM head: enough row tiles alone


def test_auto_by_default_and_switch():
    import os

    # "auto" (the decode kernel where it wins, on Hopper GPUs) unless the environment picks another.
    env = os.environ.get("XLSTM_METAL_SKINNY_GEMM", "auto")
    assert skinny_gemm_kernel() == {"1": "mma", "0": "off"}.get(env, env)
    x, w = _operands(10, 16, 64, 64)
    before = skinny_gemm_kernel()
    try:
        set_skinny_gemm(True)  # on: used exactly where the kernel runs (CUDA, bf16/fp16, 2..64 rows)
        assert uses_skinny_kernel(x, w) == cuda_available()
        set_skinny_gemm(False)
        assert not uses_skinny_kernel(x, w)
    finally:
        set_skinny_gemm(before)


def test_fast_linear_keeps_keys_values_and_switches_back():
    layer = nn.Linear(64, 32, bias=False)
    x = mx.random.normal((3, 64), key=mx.random.key(0))
    ref = layer(x)
    container = nn.Sequential(layer, nn.Linear(32, 8))
    assert use_fast_linear_layers(container) == 2
    assert type(layer) is FastLinear and layer is container.layers[0]
    assert set(dict(nn.utils.tree_flatten(container.parameters()))) == {
        "layers.0.weight", "layers.1.weight", "layers.1.bias"}
    assert np.array_equal(np.array(layer(x)), np.array(ref))
    with_bias = container.layers[1]
    assert np.allclose(np.array(with_bias(ref)), np.array(nn.Linear.__call__(with_bias, ref)))
    assert use_fast_linear_layers(container, enabled=False) == 2
    assert type(layer) is nn.Linear


def test_fuse_projections_switches_linear_layers_and_keeps_results():
    model = tiny_model()
    tokens = mx.array([[1, 5, 9, 2]], dtype=mx.int32)
    ref, _ = model(tokens)
    model.fuse_projections()
    block = model.blocks[0]
    assert type(block.mlstm_layer.out_proj) is FastLinear and type(block.ffn.proj_down) is FastLinear
    out, _ = model(tokens)
    assert np.allclose(np.array(out), np.array(ref), rtol=1e-4, atol=1e-4)
    model.unfuse_projections()
    assert type(block.mlstm_layer.out_proj) is nn.Linear
    assert not any(type(m) is FastLinear for _, m in model.named_modules())


def assert_vjp_is_the_plain_products(product) -> None:
    """``product``'s gradients (its kernel replaced by the caller with ``x @ w.T``: the vjp, two
    plain products, is what is under test) equal those of ``x @ w.T``."""
    x, w = _operands(9, 6, 7, 16, mx.float32, lead=(2,))

    def loss(f):
        return lambda a, b: (f(a, b) ** 2).sum()

    got = mx.grad(loss(product), argnums=(0, 1))(x, w)
    want = mx.grad(loss(lambda a, b: a @ b.T), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        assert g.shape == r.shape and np.allclose(np.array(g), np.array(r), rtol=1e-5, atol=1e-5)


def test_custom_vjp_is_the_plain_products(monkeypatch):
    import xlstm_metal.kernels.fast.skinny as skinny

    monkeypatch.setattr(skinny, "skinny_matmul", lambda x, w, config=None: x @ w.T)
    assert_vjp_is_the_plain_products(skinny._skinny_product)
    # The decode kernel's and the streaming product's wrappers: the same vjp.
    monkeypatch.setattr(skinny, "decode_matmul", lambda x, w: x @ w.T)
    assert_vjp_is_the_plain_products(skinny._decode_product)
    monkeypatch.setattr(skinny.rows_mma, "rows_mma_matmul", lambda x, w: x @ w.T)
    assert_vjp_is_the_plain_products(skinny._stream_product)


def test_gate_up_swiglu_product_off_cuda_is_the_ops_and_the_paired_source_maps_rows():
    """Off CUDA the paired product is x @ w.T then SwiGLU; the paired kernel source maps tile t to
    rows 8t.. of both halves, and refuses split K."""
    from xlstm_metal.kernels.fast import quantized
    from xlstm_metal.kernels.fast.skinny import gate_up_swiglu_product, uses_gate_up_swiglu

    x, w = _operands(3, 4, 2 * 24, 40, mx.float32)
    assert not uses_gate_up_swiglu(x, w)
    joined = x @ w.T
    want = nn.silu(joined[:, :24]) * joined[:, 24:]
    assert np.allclose(np.array(gate_up_swiglu_product(x, w)), np.array(want), rtol=1e-6, atol=1e-6)
    src = quantized.decode_source(pair_store="y[0] = sum0 + sum1;")
    assert "row0 = (tl / SPLIT) * 8 + g, row1 = row0 + PAIR" in src and "ntiles = PAIR / 8" in src
    assert "y[0] = sum0 + sum1;" in src and "(N + 15) / 16" not in src
    with pytest.raises(ValueError, match="unsplit"):
        quantized.decode_source(pair_store=";", split=True)
    with pytest.raises(ValueError, match="prologue"):
        quantized.decode_source(prologue="__syncthreads();", x_ahead=True)
    ahead = quantized.decode_source(x_ahead=True)
    assert "load_x(sp, 0, xv)" not in ahead and "rx[d][t]" in ahead



def test_inference_products_call_the_kernels_without_their_vjp_wrapper(monkeypatch):
    # Inside inference_products() the decode step's products call their kernels bare (no
    # custom-vjp nodes in the graph); outside, and again after the block, the differentiable
    # wrappers. The kernels are stood in for (CPU), so only the dispatch is under test.
    from xlstm_metal.kernels.fast import skinny

    calls = []

    def stand_in(name, swiglu=False):
        def run(x, w):
            calls.append(name)
            y = x @ w.T
            if swiglu:
                gate, up = mx.split(y, 2, axis=-1)
                return nn.silu(gate) * up
            return y
        return run

    monkeypatch.setattr(skinny, "_kernel_for", lambda x, w: "decode")
    monkeypatch.setattr(skinny, "uses_gate_up_swiglu", lambda x, w: True)
    monkeypatch.setattr(skinny, "_decode_product", stand_in("wrapped product"))
    monkeypatch.setattr(skinny, "decode_matmul", stand_in("bare product"))
    monkeypatch.setattr(skinny, "_decode_swiglu_product", stand_in("wrapped swiglu", swiglu=True))
    monkeypatch.setattr(skinny, "_decode_swiglu_bare", stand_in("bare swiglu", swiglu=True))
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((4, 32), dtype=np.float32))
    w = mx.array(rng.standard_normal((24, 32), dtype=np.float32))
    gate_up = mx.array(rng.standard_normal((48, 32), dtype=np.float32))
    g, u = np.split(np.array(x) @ np.array(gate_up).T, 2, axis=-1)
    swiglu_ref = g / (1 + np.exp(-g)) * u
    outs = [skinny.linear_product(x, w), skinny.gate_up_swiglu_product(x, gate_up)]
    with skinny.inference_products():
        outs += [skinny.linear_product(x, w), skinny.gate_up_swiglu_product(x, gate_up)]
    outs.append(skinny.linear_product(x, w))
    assert calls == ["wrapped product", "wrapped swiglu", "bare product", "bare swiglu", "wrapped product"]
    for out, ref in zip(outs, [np.array(x) @ np.array(w).T, swiglu_ref] * 2 + [np.array(x) @ np.array(w).T]):
        np.testing.assert_allclose(np.array(out), ref, rtol=1e-4, atol=1e-4)
