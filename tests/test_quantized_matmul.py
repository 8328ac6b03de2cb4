"""quantized_matmul (xlstm_metal/kernels/fast/quantized.py) against x @ dequantize(w).T.

The CUDA tests run only where MLX has its CUDA backend (the GPU machine: `python -m pytest
tests/test_quantized_matmul.py`); the CPU tests check the reference fallback and the layer
dispatch (FastQuantizedLinear, use_fast_quantized_layers) that CPU and Metal run.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from xlstm_metal.kernels.fast.quantized import (
    DECODE_MAX_ROWS,
    FastQuantizedEmbedding,
    FastQuantizedLinear,
    dequantized_matmul,
    fast_path_supported,
    fused_quantized_matmul,
    int_weights_apply,
    int_weights_reference,
    quantized_matmul,
    use_fast_quantized_layers,
)
from xlstm_metal.kernels.fast.step import cuda_available

from conftest import tiny_model

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


def _quantized(seed, N, K, group_size, bits, dtype):
    rng = np.random.default_rng(seed)
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32) / np.sqrt(K)).astype(dtype)
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return wq, scales, biases


def _x(seed, shape, dtype):
    rng = np.random.default_rng(seed + 1000)
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _reference64(x, wq, scales, biases, group_size, bits) -> np.ndarray:
    """x @ dequantize(w).T in float64 (the dequantized weights as MLX rounds them)."""
    w = np.array(mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits).astype(mx.float32), dtype=np.float64)
    xs = np.array(x.astype(mx.float32), dtype=np.float64)
    return xs @ w.T


def _rel_fro(out, ref: np.ndarray) -> float:
    o = np.array(out.astype(mx.float32), dtype=np.float64)
    assert np.isfinite(o).all()
    return float(np.linalg.norm(o - ref) / np.linalg.norm(ref))


# ----------------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 5, 8, 9, 33, 64, 300])
def test_cuda_matches_dequantized_reference(bits, group_size, M):
    # N not a multiple of 16 (a partial tile of output features); K not a multiple of the
    # warp's span (128 values at 4 bits, 64 at 8): the last span is partial.
    N, K = 200, 3 * group_size + (group_size if group_size == 32 else 0)
    wq, scales, biases = _quantized(M + bits + group_size, N, K, group_size, bits, mx.bfloat16)
    x = _x(M, (M, K), mx.bfloat16)
    assert fast_path_supported(x, wq, scales, biases, group_size, bits)
    ref = _reference64(x, wq, scales, biases, group_size, bits)
    path = fused_quantized_matmul if M <= DECODE_MAX_ROWS else dequantized_matmul
    for fn in (path, quantized_matmul):
        out = fn(x, wq, scales, biases, group_size=group_size, bits=bits)
        assert out.shape == (M, N) and out.dtype == mx.bfloat16
        # bf16 operands, float32 accumulation, bf16 output: ~2^-9 relative rounding.
        assert _rel_fro(out, ref) < 5e-3


@cuda
@pytest.mark.parametrize("mode, bits, group_size", [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M", [1, 2, 8, 9, 33, 64])
def test_cuda_float_format_decode_matches_the_exact_product(monkeypatch, mode, bits, group_size, dtype, M):
    """The fused float-format kernel against x @ dequantize(w).T in float64: the dequantized
    weights are exact in bf16 / fp16, so only the float32 sums' order and the output's rounding
    differ (~2^-9 relative in bf16). N not a multiple of 16, K not a multiple of the warp's span
    (128 values at 4 bits, 64 at 8): partial tiles and spans. Weights spread over many scales
    (each row's magnitude 2^-12 .. 2^4) so that every scale code path and the E2M1 / E4M3
    subnormal codes are hit. MLX 0.32.4's own CUDA product is no reference here: at 1-2 rows of
    mxfp4 it was off by up to 43% of a column's largest value (H200, session 47)."""
    from xlstm_metal.kernels.fast import quantized
    from xlstm_metal.kernels.fast.quantized import fused_float_format_matmul

    monkeypatch.setattr(quantized, "FLOAT_FORMAT_DECODE", {mode})  # quantized_matmul routes to it
    rng = np.random.default_rng(M + bits + group_size)
    N, K = 200, 352
    w = rng.standard_normal((N, K)) * np.exp2(rng.uniform(-12, 4, (N, 1)))
    wq, scales = mx.quantize(mx.array(w.astype(np.float32)), group_size=group_size, bits=bits, mode=mode)
    x = _x(M, (M, K), dtype)
    exact = np.array(mx.dequantize(wq, scales, None, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32),
                     dtype=np.float64)
    ref = np.array(x.astype(mx.float32), dtype=np.float64) @ exact.T
    # Per output feature: their magnitudes differ by 2^16. nvfp4's E4M3 scales flush the smallest
    # rows to zero (column 0): there the output must be exactly 0.
    column = np.abs(ref).max(axis=0)
    assert mode != "nvfp4" or (column == 0).any()
    column = np.where(column > 0, column, 1.0)
    outs = [fused_float_format_matmul(x, wq, scales, group_size=group_size, bits=bits, mode=mode),
            quantized_matmul(x, wq, scales, None, group_size=group_size, bits=bits, mode=mode)]
    for out in outs:
        assert out.shape == (M, N) and out.dtype == dtype
        o = np.array(out.astype(mx.float32), dtype=np.float64)
        assert np.isfinite(o).all() and (np.abs(o - ref) / column).max() < 1e-2


@cuda
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("depth", [1, 2, 4, 8])
@pytest.mark.parametrize("M", [1, 2])
def test_cuda_ring_depths_hints_and_tiles(bits, depth, M):
    # Every ring depth (weight chunks in flight per thread), each load hint and thread blocks
    # walking several tiles, at 1-2 rows: K with a partial last span and spans per warp not a
    # multiple of the depth (at 16 bits the plain T weights of the decode chain's float products).
    N, K = 200, 2880
    if bits == 16:
        w = _x(bits + depth, (N, K), mx.bfloat16) * (K ** -0.5)
        arrays = (w, w, w)
        ref = np.array(_x(M, (M, K), mx.bfloat16).astype(mx.float32), dtype=np.float64) @ np.array(
            w.astype(mx.float32), dtype=np.float64).T
        group_size = 32
    else:
        group_size = 64
        arrays = _quantized(bits + depth, N, K, group_size, bits, mx.bfloat16)
        ref = _reference64(_x(M, (M, K), mx.bfloat16), *arrays, group_size, bits)
    x = _x(M, (M, K), mx.bfloat16)
    outs = [fused_quantized_matmul(x, *arrays, group_size=group_size, bits=bits, depth=depth, load_hint=hint,
                                   max_blocks=blocks) for hint, blocks in ((0, None), (1, 3), (2, 1))]
    for out in outs:
        assert out.shape == (M, N) and _rel_fro(out, ref) < 5e-3
    # the same float32 sums in the same order whatever the blocks and hints: the same bits
    assert all(np.array_equal(np.array(o.astype(mx.float32)), np.array(outs[0].astype(mx.float32))) for o in outs)


@cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_float16_and_batched_leading_axes(bits):
    wq, scales, biases = _quantized(3, 96, 512, 64, bits, mx.float16)
    x = _x(3, (2, 3, 512), mx.float16)
    out = fused_quantized_matmul(x, wq, scales, biases, group_size=64, bits=bits)
    assert out.shape == (2, 3, 96) and out.dtype == mx.float16
    ref = _reference64(x.reshape(6, 512), wq, scales, biases, 64, bits).reshape(2, 3, 96)
    assert _rel_fro(out, ref) < 2e-3  # fp16 keeps 3 more mantissa bits than bf16


@cuda
def test_cuda_layer_shapes_agree_with_mlx_quantized_matmul():
    """A 7B-like projection (K = 4096, many groups) against MLX's own quantized product."""
    for bits in (4, 8):
        wq, scales, biases = _quantized(bits, 1040, 4096, 64, bits, mx.bfloat16)
        for M in (1, 16, 64):
            x = _x(M, (M, 4096), mx.bfloat16)
            out = fused_quantized_matmul(x, wq, scales, biases, group_size=64, bits=bits)
            ref = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=bits)
            ref64 = _reference64(x, wq, scales, biases, 64, bits)
            assert _rel_fro(out, ref64) < 5e-3
            assert _rel_fro(ref, ref64) < 5e-3


@cuda
def test_cuda_strided_x_compiled_and_repeated():
    wq, scales, biases = _quantized(5, 64, 256, 32, 4, mx.bfloat16)
    base = _x(5, (256, 4), mx.bfloat16)
    x = base.T  # a transposed view: [4, 256] with strides (1, 4)
    fn = mx.compile(lambda a: fused_quantized_matmul(a, wq, scales, biases, group_size=32, bits=4))
    ref = _reference64(x, wq, scales, biases, 32, 4)
    for _ in range(3):  # same inputs, same answer: no race between the warps' partial sums
        assert _rel_fro(fn(x), ref) < 5e-3
    out1, out2 = fused_quantized_matmul(x, wq, scales, biases, group_size=32, bits=4), fn(x)
    assert np.array_equal(np.array(out1.astype(mx.float32)), np.array(out2.astype(mx.float32)))


@cuda
def test_cuda_unsupported_cases_use_the_reference():
    wq, scales, biases = _quantized(6, 32, 128, 64, 4, mx.bfloat16)
    x32 = _x(6, (2, 128), mx.float32)
    assert not fast_path_supported(x32, wq, scales, biases, 64, 4)
    out = quantized_matmul(x32, wq, scales, biases, group_size=64, bits=4)
    ref = mx.quantized_matmul(x32, wq, scales, biases, transpose=True, group_size=64, bits=4)
    assert np.array_equal(np.array(out), np.array(ref))
    wq3, s3, b3 = _quantized(6, 32, 128, 64, 3, mx.bfloat16)
    assert not fast_path_supported(x32.astype(mx.bfloat16), wq3, s3, b3, 64, 3)


@cuda
def test_cuda_quantized_model_decode_and_prefill_match_reference():
    """A quantized bf16 model: logits through the fast layers equal those of MLX's own
    quantized layers (one row takes the fused kernel, a long prompt the dequantize+GEMM)."""
    mx.random.seed(0)
    ref_model = tiny_model(embedding_dim=128, num_heads=2, num_blocks=2, vocab_size=256)
    ref_model.set_dtype(mx.bfloat16)
    nn.quantize(ref_model, group_size=32, bits=4)
    # nn.quantize brings our classes in (FastQuantizedTree): the reference goes back to MLX's.
    back = {FastQuantizedLinear: nn.QuantizedLinear, FastQuantizedEmbedding: nn.QuantizedEmbedding}
    switched = 0
    for _, module in ref_model.named_modules():
        switched += type(module) in back
        module.__class__ = back.get(type(module), type(module))
    assert switched > 0
    fast_model = tiny_model(embedding_dim=128, num_heads=2, num_blocks=2, vocab_size=256)
    nn.quantize(fast_model, group_size=32, bits=4)
    fast_model.update(ref_model.parameters())
    assert sum(type(m) is FastQuantizedLinear for _, m in fast_model.named_modules()) > 0
    for S in (1, DECODE_MAX_ROWS + 36):
        ids = mx.array(np.random.default_rng(S).integers(0, 256, (1, S)).astype(np.int32))
        ref, _ = ref_model(ids)
        out, _ = fast_model(ids)
        ref64 = np.array(ref.astype(mx.float32), dtype=np.float64)
        assert _rel_fro(out, ref64) < 2e-2


# ------------------------------------------------------------------------------------ CPU
@pytest.mark.skipif(cuda_available(), reason="the CPU fallback")
@pytest.mark.parametrize("bits", [4, 8])
def test_off_cuda_is_mlx_quantized_matmul(bits):
    wq, scales, biases = _quantized(7, 48, 128, 64, bits, mx.float32)
    x = _x(7, (3, 128), mx.float32)
    assert not fast_path_supported(x, wq, scales, biases, 64, bits)
    out = quantized_matmul(x, wq, scales, biases, group_size=64, bits=bits)
    ref = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=bits)
    assert np.array_equal(np.array(out), np.array(ref))
    assert _rel_fro(out, _reference64(x, wq, scales, biases, 64, bits)) < 1e-5


def test_fast_quantized_linear_keeps_keys_and_values():
    mx.random.seed(1)
    model = tiny_model()
    # Through a plain parent: its update_modules leaves MLX's classes (the model's own switches them).
    nn.quantize(nn.Sequential(model), group_size=32, bits=4)
    ids = mx.array([[0, 5, 9, 3, 7]])
    before, _ = model(ids)
    keys = [k for k, _ in tree_flatten(model.parameters())]
    n_quantized = sum(type(m) is nn.QuantizedLinear for _, m in model.named_modules())
    assert n_quantized > 0
    assert use_fast_quantized_layers(model) == n_quantized
    assert sum(isinstance(m, FastQuantizedLinear) for _, m in model.named_modules()) == n_quantized
    assert not any(type(m) is nn.QuantizedLinear for _, m in model.named_modules())
    assert [k for k, _ in tree_flatten(model.parameters())] == keys
    after, _ = model(ids)
    assert np.array_equal(np.array(before), np.array(after))
    assert use_fast_quantized_layers(model) == 0  # already switched


def test_fast_quantized_linear_is_what_runs():
    """The switched layer's own arrays drive the output (module tree as the source of truth)."""
    layer = nn.QuantizedLinear(64, 16, bias=True, group_size=32, bits=4)
    use_fast_quantized_layers(layer_holder := nn.Sequential(layer))
    assert isinstance(layer_holder.layers[0], FastQuantizedLinear)
    x = _x(8, (2, 64), mx.float32)
    y = layer_holder(x)
    ref = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True,
                              group_size=32, bits=4) + layer.bias
    assert np.allclose(np.array(y), np.array(ref), atol=1e-6)
    layer.bias = layer.bias + 1.0
    assert np.allclose(np.array(layer_holder(x)), np.array(ref) + 1.0, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_fuse_switches_quantized_layers_and_keeps_results(bits):
    """fuse() on a quantized model: every quantized linear layer (fused projections, out_proj,
    proj_down, lm_head) runs quantized_matmul, keys stay, logits equal the unfused model's."""
    model = tiny_model(seed=2, tie_word_embeddings=False)
    nn.quantize(model, group_size=32, bits=bits)
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref, _ = model(ids)
    keys = [k for k, _ in tree_flatten(model.parameters())]
    model.fuse_projections()
    assert [k for k, _ in tree_flatten(model.parameters())] == keys
    for block in model.backbone.blocks:
        for layer in (block.mlstm_layer.out_proj, block.ffn.proj_down, block.ffn.proj_up,
                      block.mlstm_layer.q):
            assert isinstance(layer, FastQuantizedLinear)
    assert isinstance(model.lm_head, FastQuantizedLinear)
    out, _ = model(ids)
    assert np.allclose(np.array(out), np.array(ref), rtol=1e-4, atol=1e-4)
    # Decoding continues from prefill state alike.
    state = model.make_state(1)
    _, state = model(ids[:, :4], state)
    step, _ = model(ids[:, 4:5], state)
    assert np.allclose(np.array(step[0, -1]), np.array(ref[0, 4]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bits,group_size", [(8, 64), (8, 128), (4, 128), (4, 64)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
def test_int_weights_reference_is_the_exact_product(bits, group_size, dtype):
    # The integer-weights decode path's math (fp16 x scaled by 2^e per row and group, exact
    # integer weights, each group's scale and bias on the float32 sums) equals x @ W.T with W =
    # s * q + b in exact arithmetic, to float32 round-off: including a group of tiny values, one
    # of large ones and an all-zero group (at bf16 outside fp16's range without the scaling).
    # The dequantize-first path rounds W to x's dtype: 10-100x further from the exact product.
    rng = np.random.default_rng(bits + group_size)
    N, K = 96, 1024
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32) * 0.05).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    xv = rng.standard_normal((3, K)).astype(np.float32) * 3
    xv[0, :group_size] *= 1e-6
    xv[0, 2 * group_size:3 * group_size] = 0
    if dtype == mx.bfloat16:
        xv[1, group_size:2 * group_size] *= 3e5  # beyond fp16's 65504 unless scaled
    x = mx.array(xv).astype(dtype)
    y = int_weights_reference(x, wq, s, b, group_size=group_size, bits=bits)
    assert y.dtype == mx.float32 and y.shape == (3, N)
    xs = np.array(x.astype(mx.float32), dtype=np.float64)
    exact = xs @ np.array(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size,
                                        bits=bits), dtype=np.float64).T
    err = np.abs(np.array(y, dtype=np.float64) - exact).max(axis=1) / np.abs(exact).max(axis=1)
    assert err.max() <= 1e-6, err
    rounded = xs @ _reference64(mx.eye(K, dtype=dtype), wq, s, b, group_size, bits)
    assert (np.abs(rounded - exact).max(axis=1) / np.abs(exact).max(axis=1)).min() > 10 * err.max()


def test_int_weights_apply_where_a_span_lies_in_one_group(monkeypatch):
    from xlstm_metal.kernels.fast import quantized as q  # noqa: PLC0415

    monkeypatch.setattr(q, "INT_WEIGHTS", {4: 1, 8: 1})
    assert int_weights_apply(8, 64, 1) and int_weights_apply(8, 128, 2)
    assert not int_weights_apply(8, 32, 1)  # a warp's span (64 values at 8 bits) holds two groups
    assert int_weights_apply(4, 128, 8)  # 4 bits: a span of 128 values
    assert not int_weights_apply(4, 64, 1)
    assert not int_weights_apply(8, 64, 9)  # a second tile of x rows
    assert not int_weights_apply(8, 64, 1, split=2)
    assert not int_weights_apply(16, 64, 1)
    monkeypatch.setattr(q, "INT_WEIGHTS", {4: 1, 8: 0})
    assert not int_weights_apply(8, 64, 1)


def test_fused_kernel_refuses_too_many_rows():
    wq, scales, biases = _quantized(9, 16, 64, 32, 4, mx.bfloat16)
    x = _x(9, (DECODE_MAX_ROWS + 1, 64), mx.bfloat16)
    with pytest.raises(ValueError, match="rows"):
        fused_quantized_matmul(x, wq, scales, biases, group_size=32, bits=4)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_matmul_matches_reference(bits):
    """The prefill path (dequantize, then a GEMM in x's dtype) on any device."""
    wq, scales, biases = _quantized(10, 48, 128, 32, bits, mx.float32)
    x = _x(10, (2, 5, 128), mx.float32)
    out = dequantized_matmul(x, wq, scales, biases, group_size=32, bits=bits)
    ref = _reference64(x.reshape(10, 128), wq, scales, biases, 32, bits).reshape(2, 5, 48)
    assert out.shape == (2, 5, 48) and out.dtype == mx.float32
    assert _rel_fro(out, ref) < 1e-5


def test_decode_launch_spreads_tiles_over_all_walking_blocks():
    from xlstm_metal.kernels.fast.quantized import decode_launch

    def blocks(n, most=None, split=1):
        launch = decode_launch(n, most, split)
        assert launch["threadgroup"] == (256, 1, 1)
        return launch["grid"][0] // 256

    assert blocks(21888) == 1368 and blocks(200) == 13  # a block per 16-feature tile
    # 1,368 tiles on all 264 blocks (48 of 6, 216 of 5: 10 or 11 per SM at 2 per SM), not 228 of 6
    assert blocks(21888, 264) == 264 and blocks(21888, 396) == 396
    assert blocks(50304, 264) == 264 and blocks(4096, 264) == 256 and blocks(200, 3) == 3
    # K in shares: a multiple of the shares (each block keeps its share), at least one of each
    assert blocks(4096, 263, 4) == 260 and blocks(4096, 2, 4) == 4 and blocks(4096, None, 4) == 1024


def test_decode_settings_from_the_environment(monkeypatch):
    from xlstm_metal.kernels.fast import quantized

    monkeypatch.setenv("XLSTM_METAL_TEST_PER_BITS", "4:2, 16:5")
    assert quantized._per_bits("XLSTM_METAL_TEST_PER_BITS", {4: 1, 8: 3}) == {4: 2, 8: 3, 16: 5}
    monkeypatch.setenv("XLSTM_METAL_TEST_PER_BITS", "4=2")
    with pytest.raises(ValueError, match="XLSTM_METAL_TEST_PER_BITS must read like"):
        quantized._per_bits("XLSTM_METAL_TEST_PER_BITS", {})
    assert quantized.launch_bounds(0) == ""
    assert "__launch_bounds__(256, 3)" in quantized.launch_bounds(3)
    # the bound ends the header: it redefines the keyword of the kernel MLX writes after it
    assert quantized.launch_bounds(2).rstrip().endswith("__launch_bounds__(256, 2)")


def test_chain_blocks_per_width(monkeypatch):
    from xlstm_metal.kernels.fast import decode_chain, quantized

    monkeypatch.setattr(decode_chain, "CHAIN_BLOCKS", None)
    monkeypatch.setattr(decode_chain, "WALK_BLOCKS", {4: 264, 8: 0, 16: 0})
    assert decode_chain._launch(21888, 4) == quantized.decode_launch(21888, 264)
    assert decode_chain._launch(21888, 8) == quantized.decode_launch(21888)  # a block per tile
    monkeypatch.setattr(decode_chain, "CHAIN_BLOCKS", 7)  # XLSTM_METAL_CHAIN_BLOCKS: every width
    assert decode_chain._launch(21888, 16)["grid"][0] == 7 * 256


def _tokens(text: str) -> list[str]:
    """C++ tokens of ``text`` after its // comments (an independent reading: a regex, not the
    scanner under test), preprocessor lines as whole lines with their blanks collapsed."""
    import re

    text = re.sub(r'("(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\')|//[^\n]*', lambda m: m.group(1) or "", text)
    out = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            out.append(" ".join(line.split()))
            continue
        out += re.findall(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|[A-Za-z_]\w*|\d[\w.]*|<<=|>>=|->|\+\+|--|<<|>>'
                          r'|<=|>=|==|!=|&&|\|\||::|[-+*/%&|^!~<>=]=?|\S', line)
    return out


def test_compact_source_keeps_every_token_of_the_kernels():
    # MLX hashes a custom kernel's whole source at every launch (host time per byte): the
    # decode kernels go to it without comments and blanks, token for token the same program.
    from xlstm_metal.kernels.fast import decode, decode_chain, quantized
    from xlstm_metal.kernels.fast.tensor_cores import compact_source, launch_bounds

    sources = [quantized._HEADER + launch_bounds(256, 2), decode._GATE_HEADER, decode._STEP_FINISH_SOURCE,
               decode._STEP_GATED_SOURCE, decode._STEP_GATED_SOURCE_V2, decode._STEP_GATED_SOURCE_V3,
               decode._INPROJ_PROLOGUE, quantized.decode_source(), quantized.decode_source(split=True),
               decode_chain._norm_source(1e-6, True, True),
               decode_chain._source(decode_chain._SWIGLU_SIZES, decode_chain._SWIGLU_PROLOGUE)]
    for text in sources:
        small = compact_source(text)
        assert _tokens(small) == _tokens(text)
        assert compact_source(small) == small
        assert len(small) < 0.8 * len(text)
    tricky = '  x  =  - y ;  // "not" a string\n  #define F (a)\n  s = "a  //  b\\" c";  q = \'/\';\n\n'
    assert compact_source(tricky) == 'x=- y;\n#define F (a)\ns="a  //  b\\" c";q=\'/\';\n'


def test_nibble_pairs_in_one_lop3_are_the_masked_values_under_the_magic_exponent():
    # The 4-bit decode kernels make each pair of weights with one PTX lop3 (its truth table an
    # immediate): emulated bit by bit here, it must give (w & 0x000F000F) | MAGIC, whose halves are
    # MAGIC's float plus the two nibbles, exactly (bf16 128 + q, fp16 1024 + q).
    import re

    from xlstm_metal.kernels.fast import quantized

    asm = re.search(r'lop3\.b32 %0, %1, %2, %3, (0x[0-9A-Fa-f]+);" : "=r"\(v\) : "r"\(w\), "n"\((0x[0-9A-Fa-f]+)u\)',
                    quantized._HEADER)
    assert asm is not None
    lut, mask = int(asm.group(1), 16), int(asm.group(2), 16)
    magics = dict(zip(("bf16", "fp16"), (int(h, 16) for h in re.findall(r"MAGIC = (0x[0-9A-Fa-f]+)u", quantized._HEADER))))
    assert f"nibble_pair<{magics['fp16']:#010x}u>" in quantized.INT_HEADER  # the integer path's fp16 pairs
    words = np.random.default_rng(0).integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    for name, magic in magics.items():
        for shift in (0, 4, 8, 12):
            a = words >> np.uint32(shift)
            b, c = np.uint32(mask), np.uint32(magic)
            v = np.zeros_like(a)
            for bit in range(32):  # PTX: result bit = bit (a << 2 | b << 1 | c) of the table
                idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
                v |= ((np.uint32(lut) >> idx) & 1) << np.uint32(bit)
            np.testing.assert_array_equal(v, (a & b) | c)
            lo, hi = (v & 0xFFFF).astype(np.uint16), (v >> 16).astype(np.uint16)
            if name == "bf16":
                as_float = lambda h: (h.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
                base = 128.0
            else:
                as_float = lambda h: h.view(np.float16).astype(np.float32)  # noqa: E731
                base = 1024.0
            np.testing.assert_array_equal(as_float(lo) - base, (a & 0xF).astype(np.float32))
            np.testing.assert_array_equal(as_float(hi) - base, ((a >> 16) & 0xF).astype(np.float32))


@pytest.mark.parametrize("bits, group_size, K", [(4, 64, 64), (8, 64, 64), (4, 128, 128), (4, 32, 32)])
def test_one_group_per_row_takes_the_dequantized_product_on_cuda(monkeypatch, bits, group_size, K):
    """On CUDA, weights whose rows are one group each (K <= group_size) skip MLX's product, whose
    Hopper kernel (chosen there for exactly these) returned wrong values at several rows (session
    41, an H100); wider rows keep it. Here the CUDA check is pretended: the routing is what is tested,
    and the routed result is the dequantized product's."""
    from xlstm_metal.kernels.fast import quantized

    calls = []
    original = quantized.dequantized_matmul
    monkeypatch.setattr(quantized, "cuda_available", lambda: True)
    monkeypatch.setattr(quantized, "dequantized_matmul", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    w = mx.array(np.random.default_rng(0).normal(0, 0.05, (48, K)).astype(np.float32))
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    x = mx.array(np.random.default_rng(1).normal(0, 1, (12, K)).astype(np.float32))
    y = quantized.quantized_matmul(x, wq, scales, biases, group_size=group_size, bits=bits)
    assert calls == [(12, K)]
    ref = x @ mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits).T
    np.testing.assert_allclose(np.array(y), np.array(ref), rtol=1e-5, atol=1e-5)
    # Two groups per row: MLX's product, as before (float32 x: not our kernels' case either).
    wide = mx.concatenate([w, w], axis=1)
    wq2, s2, b2 = mx.quantize(wide, group_size=group_size, bits=bits)
    calls.clear()
    quantized.quantized_matmul(mx.concatenate([x, x], axis=1), wq2, s2, b2, group_size=group_size, bits=bits)
    assert calls == []


@pytest.mark.parametrize("mode, bits, group_size", [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_float_formats_prefill_takes_the_dequantized_product_on_cuda(monkeypatch, mode, bits, group_size, dtype):
    """On CUDA a float format's product over more than DECODE_MAX_ROWS rows of bf16 / fp16 x is
    dequantize + GEMM (MLX's own ran a 7B prefill 5x slower than 4-bit affine's: session 44, an
    H100); decode rows, float32 x and CPUs keep MLX's product. The CUDA check is pretended: the
    routing is tested, and the routed result equals MLX's product up to the GEMM's rounding."""
    from xlstm_metal.kernels.fast import quantized

    calls = []
    original = quantized.dequantized_matmul
    monkeypatch.setattr(quantized, "dequantized_matmul", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    monkeypatch.setattr(quantized, "many_rows_on_cpu", lambda x, mode: False)  # CUDA's routing alone (the CPU's: below)
    w = mx.array(np.random.default_rng(0).normal(0, 0.05, (48, 128)).astype(np.float32))
    wq, scales = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    assert scales.dtype == mx.uint8
    x = mx.array(np.random.default_rng(1).normal(0, 1, (2, DECODE_MAX_ROWS, 128)).astype(np.float32)).astype(dtype)

    def product(rows, dtype=dtype):
        return quantized.quantized_matmul(x.reshape(-1, 128)[:rows].astype(dtype), wq, scales, None,
                                          group_size=group_size, bits=bits, mode=mode)

    monkeypatch.setattr(quantized, "cuda_available", lambda: False)
    product(2 * DECODE_MAX_ROWS)
    assert calls == []  # not CUDA: MLX's product
    monkeypatch.setattr(quantized, "cuda_available", lambda: True)
    y = product(2 * DECODE_MAX_ROWS)
    assert calls == [(2 * DECODE_MAX_ROWS, 128)] and y.dtype == dtype
    ref = mx.quantized_matmul(x.reshape(-1, 128), wq, scales=scales, transpose=True, group_size=group_size,
                              bits=bits, mode=mode)
    # the dequantized weights are exact in bf16 / fp16: the two differ by the products' rounding
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32)), rtol=0.02, atol=0.02)
    exact = x.reshape(-1, 128).astype(mx.float32) @ mx.dequantize(wq, scales, None, group_size=group_size, bits=bits,
                                                                  mode=mode, dtype=mx.float32).T
    assert _rel_fro(y.astype(mx.float32), np.array(exact)) < 1e-2
    calls.clear()
    fused = []
    monkeypatch.setattr(quantized, "FLOAT_FORMAT_DECODE", {mode})  # XLSTM_METAL_FLOAT_FORMAT_DECODE=1
    monkeypatch.setattr(quantized, "fused_float_format_matmul", lambda x, *a, **k: fused.append(x.shape) or
                        mx.quantized_matmul(x, *a[:1], scales=a[1], transpose=True, group_size=group_size, bits=bits,
                                            mode=mode))
    product(DECODE_MAX_ROWS)  # decode rows: the fused kernel (test_float_formats_decode_routing)
    product(2 * DECODE_MAX_ROWS, mx.float32)  # float32 x: MLX's product
    assert calls == [] and fused == [(DECODE_MAX_ROWS, 128)]


@pytest.mark.parametrize("mode, bits, group_size", [("affine", 4, 64), ("affine", 8, 32), ("mxfp4", 4, 32),
                                                     ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_many_rows_on_the_cpu_take_dequantize_and_gemm(monkeypatch, mode, bits, group_size, dtype):
    """On the CPU from CPU_DEQUANTIZE_ROWS rows (16 affine, 65 float formats) a quantized product is
    dequantize + GEMM (MLX's CPU product goes row by row: 6-32x slower at 64-256 rows, session 49),
    fewer rows keep MLX's product; both equal the exact product over the dequantized weights to the
    GEMM's rounding."""
    from xlstm_metal.kernels.fast import quantized

    calls = []
    original = quantized.dequantized_matmul
    monkeypatch.setattr(quantized, "dequantized_matmul", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    rows = quantized.CPU_DEQUANTIZE_ROWS["affine" if mode == "affine" else "float"]
    assert rows == (16 if mode == "affine" else DECODE_MAX_ROWS + 1)
    rng = np.random.default_rng(0)
    w = mx.array(rng.normal(0, 0.05, (40, 128)).astype(np.float32))
    wq, *rest = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    scales, biases = rest[0], (rest[1] if mode == "affine" else None)
    x = mx.array(rng.normal(0, 1, (rows, 128)).astype(np.float32)).astype(dtype)
    exact = np.array(x.astype(mx.float32)) @ np.array(mx.dequantize(wq, scales, biases, group_size=group_size,
                                                                    bits=bits, mode=mode).astype(mx.float32)).T
    default = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        few = quantized.quantized_matmul(x[: rows - 1], wq, scales, biases, group_size=group_size, bits=bits,
                                         mode=mode)
        assert calls == []  # MLX's product
        many = quantized.quantized_matmul(x.reshape(1, *x.shape), wq, scales, biases, group_size=group_size,
                                          bits=bits, mode=mode)
        assert calls == [(1, rows, 128)] and many.shape == (1, rows, 40) and many.dtype == dtype
    finally:
        mx.set_default_device(default)
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    assert _rel_fro(many[0].astype(mx.float32), exact) < tol
    assert _rel_fro(few.astype(mx.float32), exact[: rows - 1]) < tol


@pytest.mark.parametrize("mode, bits, group_size", [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
def test_float_formats_decode_routing(monkeypatch, mode, bits, group_size):
    """On CUDA (pretended) a float format's product over 1 to DECODE_MAX_ROWS rows of bf16 / fp16
    x runs the fused float-format kernel: any leading axes, K a multiple of 32. Float32 x, K of
    an odd number of 16-value groups (nvfp4), affine weights and CPUs keep the other paths."""
    from xlstm_metal.kernels.fast import quantized

    fused = []
    monkeypatch.setattr(quantized, "fused_float_format_matmul",
                        lambda x, w, s, **k: fused.append((x.shape, k["mode"])) or mx.zeros((*x.shape[:-1], w.shape[0]), x.dtype))
    monkeypatch.setattr(quantized, "FLOAT_FORMAT_DECODE", {mode})  # XLSTM_METAL_FLOAT_FORMAT_DECODE=1
    rng = np.random.default_rng(2)

    def product(K, lead, dtype=mx.bfloat16):
        w = mx.array(rng.normal(0, 0.05, (40, K)).astype(np.float32))
        wq, scales = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
        x = mx.array(rng.normal(0, 1, (*lead, K)).astype(np.float32)).astype(dtype)
        assert quantized.float_format_kernel_takes(x, wq, scales, group_size, bits, mode) == (
            dtype != mx.float32 and K % 32 == 0 and 0 < np.prod(lead) <= DECODE_MAX_ROWS)
        return quantized.quantized_matmul(x, wq, scales, None, group_size=group_size, bits=bits, mode=mode)

    monkeypatch.setattr(quantized, "cuda_available", lambda: False)
    product(128, (1,))
    assert fused == []
    monkeypatch.setattr(quantized, "cuda_available", lambda: True)
    for lead in ((1,), (3, 1), (2, 32)):
        product(128, lead)
        product(96, lead, mx.float16)
    assert fused == [(lead + (K,), mode) for lead in ((1,), (3, 1), (2, 32)) for K in (128, 96)]
    fused.clear()
    monkeypatch.setattr(quantized, "FLOAT_FORMAT_DECODE", set())  # =0: MLX's product
    product(128, (1,))
    monkeypatch.setattr(quantized, "FLOAT_FORMAT_DECODE", set(quantized.FLOAT_FORMAT_TEMPLATES) - {mode})
    product(128, (1,))  # the others named, not this one
    monkeypatch.setattr(quantized, "FLOAT_FORMAT_DECODE", {mode})
    product(128, (1,), mx.float32)
    if mode == "nvfp4":
        product(48, (1,))  # three groups of 16: a 4-bit chunk (32 values) would run past K
    assert fused == []
    w = mx.array(rng.normal(0, 0.05, (40, 128)).astype(np.float32))
    wq, scales, biases = mx.quantize(w, group_size=32, bits=4)
    assert not quantized.float_format_kernel_takes(mx.zeros((1, 128), mx.bfloat16), wq, scales, 32, 4, "affine")


def test_float_format_decode_setting(monkeypatch, capsys):
    """XLSTM_METAL_FLOAT_FORMAT_DECODE: 1 all, 0 none, a comma list; unset, the formats whose
    kernel has matched the exact product on a GPU: all three since session 49 (nvfp4 on an H100)."""
    import subprocess
    import sys

    from xlstm_metal.kernels.fast import quantized
    from xlstm_metal.kernels.fast.quantized import _float_format_decode

    assert _float_format_decode("1") == {"mxfp4", "nvfp4", "mxfp8"} and _float_format_decode(" 0") == set()
    assert _float_format_decode("nvfp4, mxfp4") == {"nvfp4", "mxfp4"} and _float_format_decode("") == set()
    with pytest.raises(ValueError, match="must be 0, 1 or a comma list of mxfp4, nvfp4, mxfp8, not 'fp4'"):
        _float_format_decode("fp4")
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLSTM_METAL_FLOAT_FORMAT_DECODE"}
    out = subprocess.run([sys.executable, "-c", "from xlstm_metal.kernels.fast import quantized as q; "
                          "print(sorted(q.float_format_decode()))"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['mxfp4', 'mxfp8', 'nvfp4']"
    # A bad value is the command's error (exit 2, no traceback) where a float format's product runs.
    from xlstm_metal.cli import main

    monkeypatch.setattr(quantized, "FLOAT_FORMAT_DECODE", None)
    monkeypatch.setattr(quantized, "cuda_available", lambda: True)  # (the setting is read on CUDA)
    monkeypatch.setenv("XLSTM_METAL_FLOAT_FORMAT_DECODE", "fp4")
    monkeypatch.setattr("xlstm_metal.cli.bench.run", lambda args: quantized.quantized_matmul(
        mx.zeros((1, 64), mx.bfloat16), *mx.quantize(mx.zeros((32, 64)), group_size=32, bits=4, mode="mxfp4"),
        None, group_size=32, bits=4, mode="mxfp4"))
    assert main(["bench", "--shape", "125m"]) == 2
    assert "error: XLSTM_METAL_FLOAT_FORMAT_DECODE must be 0, 1 or a comma list" in capsys.readouterr().err


def test_quantize_model_and_loading_leave_our_quantized_layers(tmp_path):
    """quantize_model and loading a quantized checkpoint leave FastQuantizedLinear /
    FastQuantizedEmbedding (our dispatch, so MLX's faulty CUDA cases are avoided on every path,
    fused or not): same keys, same logits as the plain MLX layers."""
    from xlstm_metal.kernels.fast.quantized import FastQuantizedEmbedding
    from xlstm_metal.loading import load_model, save_model
    from xlstm_metal.quantization import quantize_model

    model = tiny_model(seed=4, tie_word_embeddings=True)
    quantize_model(model, bits=4, group_size=32)
    kinds = {type(m) for _, m in model.named_modules()}
    assert nn.QuantizedLinear not in kinds and nn.QuantizedEmbedding not in kinds
    assert FastQuantizedLinear in kinds and type(model.backbone.embeddings) is FastQuantizedEmbedding
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits, _ = model(ids)
    # The same arrays in MLX's own classes give the same logits.
    for _, m in model.named_modules():
        if type(m) is FastQuantizedLinear:
            m.__class__ = nn.QuantizedLinear
    model.backbone.embeddings.__class__ = nn.QuantizedEmbedding
    assert np.array_equal(np.array(model(ids)[0]), np.array(logits))
    save_model(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q")
    kinds = {type(m) for _, m in loaded.named_modules()}
    assert nn.QuantizedLinear not in kinds and nn.QuantizedEmbedding not in kinds
    assert type(loaded.backbone.embeddings) is FastQuantizedEmbedding
    np.testing.assert_allclose(np.array(loaded(ids)[0]), np.array(logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_float_format_pairs_are_the_exact_values_of_every_code(dtype):
    """The float-format decode kernel's fp_pair, emulated bit by bit from FP_PAIR_BITS (the
    constants its header is written from) and its byte permutes: every E2M1 code (mxfp4,
    nvfp4) and every E4M3 code but NaN (mxfp8), in either half of a pair, read as T and times
    2^D, equals MLX's dequantized value at scale 1 (E8M0 127), exactly."""
    import re

    from xlstm_metal.kernels.fast import quantized

    def half_as_float(h: np.ndarray) -> np.ndarray:
        if dtype == "bfloat16":
            return (h.astype(np.uint32) << 16).view(np.float32)
        return h.astype(np.uint16).view(np.float16).astype(np.float32)

    def mlx_values(mode: str, bits: int) -> np.ndarray:
        """MLX's value of each code (4 bits: 16 codes; 8 bits: 256), scale byte 127 (2^0)."""
        n, per_word = 1 << bits, 32 // bits
        words = [sum(c << (bits * i) for i, c in enumerate(range(j, j + per_word))) for j in range(0, n, per_word)]
        w = np.array(words + [0] * (-len(words) % bits), np.uint32).reshape(-1, bits)  # rows of 32 values
        scales = mx.full((w.shape[0], 1), 127, dtype=mx.uint8)
        out = mx.dequantize(mx.array(w), scales, None, group_size=32, bits=bits, mode=mode, dtype=mx.float32)
        return np.array(out).reshape(-1)[:n]

    header = quantized.FLOAT_FORMAT_HEADER
    selectors = [int(h, 16) for h in re.search(r"\(p & 1\) \? (0x[0-9a-fA-F]+)u : (0x[0-9a-fA-F]+)u", header).groups()]
    sel_odd, sel_even = selectors

    # 4 bits: codes (lo, hi) at bits 0-3 and 16-19
    shift, _, up = quantized.FP_PAIR_BITS[dtype, 4]
    assert f"<< (BF ? {quantized.FP_PAIR_BITS['bfloat16', 4][0]} : {quantized.FP_PAIR_BITS['float16', 4][0]})" in header
    lo, hi = (a.reshape(-1).astype(np.uint32) for a in np.meshgrid(np.arange(16), np.arange(16)))
    w = lo | (hi << 16)
    v = ((w & 0x00070007) << shift) | ((w & 0x00080008) << 12)
    scale = half_as_float(np.array([up & 0xFFFF]))[0]
    assert scale == half_as_float(np.array([up >> 16]))[0] == 2.0 ** (126 if dtype == "bfloat16" else 14)
    values = mlx_values("mxfp4", 4)
    np.testing.assert_array_equal(half_as_float(v & 0xFFFF) * scale, values[lo])
    np.testing.assert_array_equal(half_as_float(v >> 16) * scale, values[hi])
    assert sorted(set(np.abs(values).tolist())) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

    # 8 bits: bytes (e, e + 1) of a word to the high bytes of the halves through the byte permute
    shift, mask, up = quantized.FP_PAIR_BITS[dtype, 8]
    values = mlx_values("mxfp8", 8)
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32)
    scale = half_as_float(np.array([up & 0xFFFF]))[0]
    assert scale == 2.0 ** (120 if dtype == "bfloat16" else 8)

    def byte_perm(a: np.ndarray, selector: int) -> np.ndarray:
        src = [(a >> np.uint32(8 * i)) & 0xFF for i in range(4)] + [np.zeros_like(a)] * 4
        return sum(src[(selector >> (4 * i)) & 7] << np.uint32(8 * i) for i in range(4)).astype(np.uint32)

    for first, selector in ((0, sel_even), (2, sel_odd)):
        t = byte_perm(words, selector)
        v = ((t >> np.uint32(shift)) & np.uint32(mask)) | (t & np.uint32(0x80008000))
        for half, byte in ((v & 0xFFFF, first), (v >> 16, first + 1)):
            code = (words >> np.uint32(8 * byte)) & 0xFF
            finite = (code & 0x7F) != 0x7F  # E4M3's NaN codes
            got = half_as_float(half)[finite] * scale
            np.testing.assert_array_equal(got, values[code[finite]])
    assert np.isnan(values[0x7F]) and values[0x7E] == 448.0 and values[1] == 2.0 ** -9  # the extremes covered
