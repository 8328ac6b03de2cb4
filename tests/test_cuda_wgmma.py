"""The Hopper skinny product (xlstm_metal/kernels/fast/skinny_wgmma.py) against x @ w.T.

Kernel tests run only where MLX has its CUDA backend (an sm_90 GPU: the kernel uses ``wgmma``);
elsewhere the tests at the end check the launch arithmetic and the dispatch of
:func:`linear_product`.
"""

import mlx.core as mx
import numpy as np
import pytest

from xlstm_metal.kernels.fast import skinny_wgmma as wg
from xlstm_metal.kernels.fast.skinny import (
    linear_product,
    set_skinny_gemm,
    skinny_gemm_enabled,
    skinny_gemm_kernel,
    uses_skinny_kernel,
)
from xlstm_metal.kernels.fast.step import cuda_available

from test_cuda_skinny import (
    TOL_BF16,
    _layer_shapes,
    _operands,
    _reference64,
    _rel,
    assert_compiled_repeated_and_gradient,
    assert_model_decode_matches_matmul_path,
    assert_vjp_is_the_plain_products,
)

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


@pytest.fixture
def wgmma_on():
    """The wgmma product selected for the test, then the previous choice back."""
    before = skinny_gemm_kernel()
    set_skinny_gemm("wgmma")
    yield
    set_skinny_gemm(before)


@cuda
@pytest.mark.parametrize("M", [1, 2, 7, 16, 33, 64])
def test_cuda_7b_layer_shapes(M):
    for i, (kind, (N, K)) in enumerate(_layer_shapes().items()):
        x, w = _operands(100 * M + i, M, N, K)
        out = wg.wgmma_matmul(x, w)
        assert out.shape == (M, N) and out.dtype == mx.bfloat16
        assert _rel(out, _reference64(x, w)) <= TOL_BF16, (kind, _rel(out, _reference64(x, w)))


@cuda
@pytest.mark.parametrize("config", [wg.WgmmaConfig(tm=1, stages=6), wg.WgmmaConfig(tm=2, stages=4),
                                    wg.WgmmaConfig(tm=3, stages=3), wg.WgmmaConfig(tm=4, stages=2),
                                    wg.WgmmaConfig(tm=2, stages=4, swizzle=False)])
@pytest.mark.parametrize("M", [5, 24, 64])
def test_cuda_configs_partial_tiles_and_splits(config, M):
    # N not a multiple of a block's rows, K a multiple of 8 but not of 64: partial tiles, a partial
    # last step (zero-filled), k split across blocks or not; x rows padded to a multiple of 8.
    for N, K in ((200, 1000), (37, 24), (1, 8), (300, 4104)):
        x, w = _operands(N + K + M, M, N, K)
        for splits in (None, 1, 3, 64):
            out = wg.wgmma_matmul(x, w, config, splits)
            assert out.shape == (M, N) and out.dtype == x.dtype
            assert _rel(out, _reference64(x, w)) <= TOL_BF16, (N, K, splits)


@cuda
def test_cuda_float16_leading_axes_and_strided_x():
    x, w = _operands(5, 4, 96, 512, mx.float16, lead=(2,))
    out = wg.wgmma_matmul(x, w)
    assert out.shape == (2, 4, 96) and out.dtype == mx.float16
    assert _rel(out, _reference64(x, w)) <= TOL_BF16
    xt = x.transpose(1, 0, 2)  # [4, 2, 512], not row-contiguous: copied before the launch
    assert _rel(wg.wgmma_matmul(xt, w), _reference64(xt, w)) <= TOL_BF16


@cuda
def test_cuda_exact_on_small_integers():
    # Small integers are exact in bf16 and their products' sums exact in float32: any misplaced
    # element of the swizzled tiles or of the accumulator layout changes the result.
    rng = np.random.default_rng(3)
    for M, N, K in ((64, 256, 512), (16, 130, 136), (3, 64, 64)):
        xi = rng.integers(-3, 4, (M, K)).astype(np.float32)
        wi = rng.integers(-3, 4, (N, K)).astype(np.float32)
        for tm, splits, swizzle in ((1, 1, True), (2, 2, True), (3, 3, True), (1, 1, False), (2, 3, False)):
            out = wg.wgmma_matmul(mx.array(xi).astype(mx.bfloat16), mx.array(wi).astype(mx.bfloat16),
                                  wg.WgmmaConfig(tm=tm, stages=3, swizzle=swizzle), splits)
            want = xi @ wi.T  # exact in float32; the kernel rounds each sum once to bf16 (2^-9)
            got = np.array(out.astype(mx.float32))
            assert np.all(np.abs(got - want) <= np.abs(want) * 2.0 ** -8), (M, N, K, tm, splits, swizzle)


@cuda
def test_cuda_compiled_repeated_and_gradient(wgmma_on):
    assert_compiled_repeated_and_gradient()


@cuda
@pytest.mark.parametrize("batch", [2, 16, 64])
def test_cuda_model_decode_matches_matmul_path(batch, wgmma_on):
    assert_model_decode_matches_matmul_path(batch)


@pytest.fixture
def streamk_on(monkeypatch):
    """The wgmma product with its stream-K schedule selected for the test, then the previous choice back."""
    before = skinny_gemm_kernel()
    set_skinny_gemm("wgmma")
    monkeypatch.setattr(wg, "SCHEDULE", "streamk")
    yield
    set_skinny_gemm(before)


@cuda
@pytest.mark.parametrize("M", [3, 16, 64])
def test_cuda_streamk_exact_on_small_integers(M):
    # Exact sums: a misplaced partial sum, a segment added twice or left out, or a tile stored by
    # the wrong block changes the result. Grids: one block (every tile whole), tiles shared by
    # 2 to many blocks, whole tiles between shared ones, one k step per block; K not a multiple
    # of 64 (a zero-filled last step), N not a multiple of the tile.
    rng = np.random.default_rng(M)
    for N, K in ((256, 512), (130, 1000), (64, 136)):
        xi = rng.integers(-3, 4, (M, K)).astype(np.float32)
        wi = rng.integers(-3, 4, (N, K)).astype(np.float32)
        want = xi @ wi.T
        x, w = mx.array(xi).astype(mx.bfloat16), mx.array(wi).astype(mx.bfloat16)
        for cfg in (wg.WgmmaConfig(tm=1, stages=3), wg.WgmmaConfig(tm=2, stages=4),
                    wg.WgmmaConfig(tm=3, stages=3, swizzle=False)):
            units = -(-N // cfg.rows_per_block()) * -(-K // wg.BK)
            for blocks in sorted({1, 2, 3, units // 3 + 1, units - 1, units, 264}):
                out = wg.wgmma_matmul(x, w, cfg, schedule="streamk", blocks=max(1, blocks))
                got = np.array(out.astype(mx.float32))
                assert np.all(np.abs(got - want) <= np.abs(want) * 2.0 ** -8), (N, K, cfg, blocks)


@cuda
@pytest.mark.parametrize("M", [2, 16, 33, 64])
def test_cuda_streamk_7b_layer_shapes(M):
    for i, (kind, (N, K)) in enumerate(_layer_shapes().items()):
        x, w = _operands(300 * M + i, M, N, K)
        ref = _reference64(x, w)
        for blocks in (None, 97):
            out = wg.wgmma_matmul(x, w, schedule="streamk", blocks=blocks)
            assert out.shape == (M, N) and out.dtype == mx.bfloat16
            assert _rel(out, ref) <= TOL_BF16, (kind, blocks, _rel(out, ref))


@cuda
def test_cuda_streamk_side_by_side_and_deterministic():
    # Independent products in one evaluation are independent nodes of MLX's CUDA graph and may run
    # at once: each launch keeps its arrival flags in its own buffer, so they must not disturb
    # each other. The same product twice gives the same bits (the last segment to arrive adds
    # the partial sums in the blocks' order, whichever it is).
    xs = [_operands(40 + i, 16, 520, 2048)[0] for i in range(6)]
    ws = [_operands(50 + i, 16, 520, 2048)[1] for i in range(6)]
    outs = [wg.wgmma_matmul(x, w, schedule="streamk", blocks=61) for x, w in zip(xs, ws)]
    again = [wg.wgmma_matmul(x, w, schedule="streamk", blocks=61) for x, w in zip(xs, ws)]
    mx.eval(outs, again)
    for x, w, out, out2 in zip(xs, ws, outs, again):
        assert _rel(out, _reference64(x, w)) <= TOL_BF16
        assert np.array_equal(np.array(out.astype(mx.float32)), np.array(out2.astype(mx.float32)))


@cuda
def test_cuda_streamk_compiled_repeated_and_gradient(streamk_on):
    assert_compiled_repeated_and_gradient()


@cuda
@pytest.mark.parametrize("batch", [16, 64])
def test_cuda_streamk_model_decode_matches_matmul_path(batch, streamk_on):
    assert_model_decode_matches_matmul_path(batch)


@cuda
@pytest.mark.parametrize("M", [3, 16, 64])
def test_cuda_streamk_swiglu_same_bits_as_two_launches(M):
    # SwiGLU made in shared memory from the gate|up product: the bits of SwiGLU's own kernel
    # followed by the stream-K product with the same launch shape (grid, tiles, k order).
    from xlstm_metal.kernels.fast.train_rows import swiglu_joined

    for N, K in ((300, 1000), (4096 // 8, 10944 // 8)):
        y = _operands(7 * M + N, M, 8, 2 * K)[0] * 3  # gate|up [M, 2K]
        w = _operands(11 * M + K, M, N, K)[1]
        cfg = wg.swiglu_config(M, N)
        runs = [("streamk", None, blocks) for blocks in (None, 7)] + [("split", splits, None) for splits in (None, 1, 3)]
        for schedule, splits, blocks in runs:
            grid = blocks or wg.streamk_grid(N, K, cfg, 2 * wg.padded_rows(M))
            fused = wg.wgmma_swiglu_matmul(y, w, cfg, blocks=grid, schedule=schedule, splits=splits)
            two = wg.wgmma_matmul(swiglu_joined(y), w, cfg, splits=splits, schedule=schedule, blocks=grid)
            assert fused.shape == (M, N) and fused.dtype == mx.bfloat16
            assert np.array_equal(np.array(fused.astype(mx.float32)), np.array(two.astype(mx.float32))), \
                (N, K, schedule, splits, blocks)
            assert _rel(fused, _reference64(swiglu_joined(y), w)) <= TOL_BF16


@cuda
@pytest.mark.parametrize("batch", [16, 64])
@pytest.mark.parametrize("schedule", ["split", "hybrid"])
def test_cuda_model_decode_with_folds_matches_matmul_path(batch, schedule, wgmma_on, monkeypatch):
    import xlstm_metal.kernels.fast.skinny as skinny

    monkeypatch.setattr(wg, "SCHEDULE", schedule)
    monkeypatch.setattr(skinny, "SWIGLU_IN_PRODUCT", True)
    monkeypatch.setattr(skinny, "NORM_GATE_IN_PRODUCT", True)
    assert_model_decode_matches_matmul_path(batch)


@cuda
@pytest.mark.parametrize("M", [16, 64])
@pytest.mark.parametrize("schedule", ["split", "streamk"])
def test_cuda_ffn_takes_swiglu_into_proj_down(M, schedule, wgmma_on, monkeypatch):
    import xlstm_metal.kernels.fast.skinny as skinny

    monkeypatch.setattr(wg, "SCHEDULE", schedule)
    monkeypatch.setattr(skinny, "SWIGLU_IN_PRODUCT", True)
    from xlstm_metal.cells.ffn import FeedForward
    from xlstm_metal.benchmark import shape_config

    ffn = FeedForward(shape_config("125m", embedding_dim=256))
    mx.eval(ffn.parameters())
    ffn.update(nn_tree_map(lambda a: a.astype(mx.bfloat16), ffn.parameters()))
    ffn.fuse_projections()
    skinny.use_fast_linear_layers(ffn)
    x = _operands(M, M, 8, 256)[0].reshape(M, 1, 256)
    joined = ffn._joined_gate_up(x)
    assert joined is not None and skinny.uses_swiglu_product(joined, ffn.proj_down.weight)
    fused = ffn(x)
    monkeypatch.setattr(skinny, "SWIGLU_IN_PRODUCT", False)
    assert not skinny.uses_swiglu_product(joined, ffn.proj_down.weight)
    assert np.array_equal(np.array(fused.astype(mx.float32)), np.array(ffn(x).astype(mx.float32)))


def _norm_gate_operands(seed, B, NH, DV, N, o_offset):
    from xlstm_metal.cells.norms import MultiHeadLayerNorm

    rng = np.random.default_rng(seed)
    h = mx.array(rng.standard_normal((B, NH, 1, DV)).astype(np.float32) * 2 + 0.5).astype(mx.bfloat16)
    wide = mx.array(rng.standard_normal((B, 1, NH * DV + 24)).astype(np.float32)).astype(mx.bfloat16)
    o = wide[..., o_offset: o_offset + NH * DV]  # a column slice, as the projections' product gives it
    norm = MultiHeadLayerNorm(NH, DV, eps=1e-6)
    norm.weight = mx.array(rng.standard_normal(NH * DV).astype(np.float32)).astype(mx.bfloat16)
    w = _operands(seed + 1, B, N, NH * DV)[1]
    return h, o, norm, w


@cuda
@pytest.mark.parametrize("B", [3, 16, 64])
def test_cuda_streamk_norm_gate_matches_two_launches(B):
    # The output cell's norm and gate inside out_proj's launch against the norm-gate kernel then
    # the product: the same ops and roundings, the heads' statistics summed in another order (so
    # within float32 round-off of each normed value, one bf16 rounding of the product). o~ as a
    # slice at an aligned (16-byte) and an unaligned column offset (read element by element).
    from xlstm_metal.kernels.fast.decode import output_norm_gate

    for NH, DV, N in ((4, 128, 300), (8, 512 // 4 * 4, 4096 // 8)):
        for o_offset in (16, 3):
            h, o, norm, w = _norm_gate_operands(B * 10 + o_offset, B, NH, DV, N, o_offset)
            x = output_norm_gate(h, o, norm)  # [B, 1, NH DV]
            ref = _reference64(x.reshape(B, NH * DV), w)
            for schedule, splits, blocks in (("streamk", None, None), ("streamk", None, 5), ("split", None, None),
                                             ("split", 1, None), ("split", 3, None)):
                out = wg.wgmma_norm_gate_matmul(h, o, norm.weight, norm.eps, w, blocks=blocks, schedule=schedule,
                                                splits=splits)
                assert out.shape == (B, 1, N) and out.dtype == mx.bfloat16
                assert _rel(out.reshape(B, N), ref) <= TOL_BF16, (NH, DV, o_offset, schedule, splits, blocks)


def nn_tree_map(fn, tree):
    from mlx.utils import tree_map
    return tree_map(fn, tree)


# ------------------------------------------------------------------ everywhere (CPU included)
def test_norm_gate_product_dispatch(monkeypatch):
    import xlstm_metal.kernels.fast.decode as decode
    import xlstm_metal.kernels.fast.skinny as skinny
    from xlstm_metal.cells.mlstm import mLSTMOutputCell

    h, o, norm, w = _norm_gate_operands(0, 16, 2, 128, 64, 8)
    # The GPU's parts stood in for: what is under test is the choice and the output cell's wiring.
    monkeypatch.setattr(decode, "_kernels_on", lambda: True)
    monkeypatch.setattr(wg, "wgmma_norm_gate_supported", lambda *a: True)
    monkeypatch.setattr(skinny, "_kernel_for", lambda x, w: "wgmma")
    assert not skinny.NORM_GATE_IN_PRODUCT  # off by default
    assert not skinny.uses_norm_gate_product(h, o, norm, w)
    monkeypatch.setattr(skinny, "NORM_GATE_IN_PRODUCT", True)
    for schedule in wg.SCHEDULES:
        monkeypatch.setattr(wg, "SCHEDULE", schedule)
        assert skinny.uses_norm_gate_product(h, o, norm, w)
    monkeypatch.setattr(skinny, "_kernel_for", lambda x, w: "off")
    assert not skinny.uses_norm_gate_product(h, o, norm, w)  # MLX's product: the norm-gate launch
    monkeypatch.setattr(skinny, "_kernel_for", lambda x, w: "wgmma")
    monkeypatch.setattr(skinny, "NORM_GATE_IN_PRODUCT", False)
    assert not skinny.uses_norm_gate_product(h, o, norm, w)
    monkeypatch.setattr(skinny, "NORM_GATE_IN_PRODUCT", True)
    assert not skinny.uses_norm_gate_product(h, o, _rms_norm(256), w)  # another norm: its own ops
    # mLSTMOutputCell.fused hands norm, gate and out_proj to the fused launch where it applies.
    import xlstm_metal.cells.mlstm as cells_mlstm

    calls = []
    monkeypatch.setattr(cells_mlstm, "norm_gate_linear_product", lambda *a: calls.append(a) or "fused")

    class Layers:
        multihead_norm = norm
        out_proj = skinny.FastLinear(256, 64, bias=False)
    Layers.out_proj.weight = w
    assert mLSTMOutputCell().fused(Layers, h, o) == "fused" and len(calls) == 1
    monkeypatch.undo()  # the real checks: on the CPU the output cell's own ops
    out = mLSTMOutputCell().fused(Layers, h, o)
    if not cuda_available():
        assert out.shape == (16, 1, 64) and len(calls) == 1


def _rms_norm(E):
    from xlstm_metal.cells.norms import RMSNorm
    return RMSNorm(E)


def test_swiglu_product_dispatch_and_vjp(monkeypatch):
    import xlstm_metal.kernels.fast.skinny as skinny

    joined = _operands(1, 16, 8, 2 * 64)[0]
    w = _operands(2, 16, 40, 64)[1]
    assert not skinny.SWIGLU_IN_PRODUCT  # off by default
    monkeypatch.setattr(skinny, "SWIGLU_IN_PRODUCT", True)
    before = skinny_gemm_kernel()
    try:
        set_skinny_gemm("wgmma")
        assert skinny.uses_swiglu_product(joined, w) == cuda_available()
        assert not skinny.uses_swiglu_product(joined[:, :100], w)  # not [.., 2K]
        set_skinny_gemm("off")
        assert not skinny.uses_swiglu_product(joined, w)  # MLX's products: SwiGLU's own launch
        set_skinny_gemm("wgmma")
        monkeypatch.setattr(skinny, "SWIGLU_IN_PRODUCT", False)
        assert not skinny.uses_swiglu_product(joined, w)
    finally:
        set_skinny_gemm(before)
    # The fused launch's gradient: the ops' (the kernel stood in for by them).
    monkeypatch.setattr(wg, "wgmma_swiglu_matmul", lambda j, w: skinny._swiglu_reference(j) @ w.T)
    jf, wf = joined.astype(mx.float32), w.astype(mx.float32)
    c = mx.array(np.random.default_rng(0).standard_normal((16, 40)).astype(np.float32))
    got = mx.vjp(skinny._wgmma_swiglu_product, [jf, wf], [c])[1]
    want = mx.vjp(lambda j, w: skinny._swiglu_reference(j) @ w.T, [jf, wf], [c])[1]
    for g, h in zip(got, want):
        assert np.allclose(np.array(g), np.array(h), rtol=1e-6, atol=1e-6)

def test_streamk_partition_covers_every_step_once():
    for tiles, steps in ((97, 64), (32, 171), (1, 1), (3, 5), (393, 64)):
        units = tiles * steps
        for blocks in sorted({1, 2, 7, 131, 264, units - 1, units} - {0}):
            seen = np.zeros((tiles, steps), dtype=int)
            shares = np.zeros(tiles, dtype=int)
            for b, segments in enumerate(wg.streamk_segments(tiles, steps, blocks)):
                slots = [slot for _, _, _, slot in segments if slot >= 0]
                assert len(slots) == len(set(slots)) <= 2  # at most two shared tiles, distinct slots
                for tile, first, end, slot in segments:
                    assert 0 <= first < end <= steps
                    seen[tile, first:end] += 1
                    shares[tile] += 1
                    assert (slot < 0) == (first == 0 and end == steps and shares[tile] == 1)
                    assert all(wg.streamk_owner(tile * steps + k, units, blocks) == b for k in (first, end - 1))
            assert np.all(seen == 1), (tiles, steps, blocks)
            # balanced: no block has more than one unit above another
            sizes = [sum(e - f for _, f, e, _ in segs) for segs in wg.streamk_segments(tiles, steps, blocks)]
            assert max(sizes) - min(sizes) <= 1


def test_split_fit_keeps_one_wave(monkeypatch):
    monkeypatch.setattr(wg, "TARGET_BLOCKS", 264)
    cfg = wg.default_config(16, 4096)
    shapes = dict(_layer_shapes(scale=1))

    def blocks(kind):
        n, k = shapes[kind]
        return -(-n // cfg.rows_per_block()) * wg.k_splits(n, k, cfg)
    assert not wg.SPLIT_FIT  # off by default: at least TARGET_BLOCKS blocks
    assert [blocks(kind) for kind in ("q|k|v|o|i|f", "out_proj", "proj_down")] == [291, 256, 288]
    monkeypatch.setattr(wg, "SPLIT_FIT", True)
    assert [blocks(kind) for kind in ("q|k|v|o|i|f", "out_proj", "proj_down")] == [194, 256, 256]
    assert wg.k_splits(*shapes["gate|up"], cfg) == 1  # enough row tiles: no split either way


def test_hybrid_schedule_by_segments_per_tile(monkeypatch):
    monkeypatch.setattr(wg, "SMS", 132)
    shapes = dict(_layer_shapes(scale=1))
    cfg = wg.default_config(16, 4096)
    got = {kind: wg._resolved_schedule("hybrid", n, k, cfg, 16, None) for kind, (n, k) in shapes.items()}
    # 264 blocks: gate|up (171 tiles x 64 steps, 41 units a block) and the LM head share a tile
    # among at most 3 blocks; the others' tiles spread over 4-10 blocks.
    assert got == {"q|k|v|o|i|f": "split", "out_proj": "split", "gate|up": "streamk", "proj_down": "split",
                   "lm_head": "streamk"}
    assert wg._resolved_schedule("split", 21888, 4096, cfg, 16, None) == "split"
    assert wg._resolved_schedule("streamk", 4096, 4096, cfg, 16, None) == "streamk"


def test_streamk_grid(monkeypatch):
    monkeypatch.setattr(wg, "SMS", 132)
    cfg16, cfg64 = wg.default_config(16, 4096), wg.default_config(64, 4096)
    # Two blocks of 109 / 97 KB fit an SM's 228 KB: 264 blocks, at most one per unit.
    assert wg.streamk_grid(4096, 4096, cfg16, 16) == 264 and wg.streamk_grid(4096, 4096, cfg64, 64) == 264
    assert wg.streamk_grid(128, 128, cfg16, 16) == 2  # one tile of two k steps
    assert wg.streamk_grid(4096, 4096, cfg16, 16, blocks=100) == 100
    # A small ring (20 KB a block) would fit 11 blocks: registers cap it at STREAMK_MAX_PER_SM.
    assert wg.streamk_grid(4096, 4096, wg.WgmmaConfig(tm=1, stages=2), 8) == 132 * wg.STREAMK_MAX_PER_SM == 396

def test_config_checks_shared_memory_and_splits(monkeypatch):
    with pytest.raises(ValueError):
        wg.WgmmaConfig(tm=5)
    with pytest.raises(ValueError):
        wg.WgmmaConfig(stages=1)
    assert [wg.padded_rows(m) for m in (1, 8, 9, 16, 33, 64)] == [8, 8, 16, 16, 40, 64]
    # A ring slot is (64 tm + NW) rows of 128 bytes, plus 1 KB for the 1024-byte alignment.
    assert wg.WgmmaConfig(tm=2, stages=4).shared_bytes(64) == 4 * 192 * 128 + 1024
    monkeypatch.setattr(wg, "TARGET_BLOCKS", 264)
    for rows in (1, 16, 17, 64):
        cfg = wg.default_config(rows, 4096)
        assert cfg.shared_bytes(wg.padded_rows(rows)) <= 227 * 1024
        for n, k in _layer_shapes(scale=1).values():
            splits = wg.k_splits(n, k, cfg)
            tiles = -(-n // cfg.rows_per_block())
            steps = -(-k // wg.BK)
            per = -(-steps // splits)  # the kernel's k steps per split
            assert 1 <= splits <= steps and (splits - 1) * per < steps  # no empty split
            # Half the target in row tiles alone: no split; fewer: about the target's blocks.
            assert splits == 1 if 2 * tiles >= 264 else tiles * splits >= 132
        assert wg.k_splits(50304, 4096, cfg) == 1  # the LM head: enough row tiles alone
    assert wg.k_splits(4096, 4096, wg.WgmmaConfig(), requested=5) == 5
    assert wg.k_splits(4096, 64, wg.WgmmaConfig(), requested=5) == 1  # one k step: nothing to split
    monkeypatch.setattr(wg, "TARGET_BLOCKS", 0)
    assert wg.k_splits(4096, 4096, wg.WgmmaConfig()) == 1  # 0: never split


def test_selection_and_dispatch():
    before = skinny_gemm_kernel()
    x, w = _operands(10, 16, 64, 64)
    try:
        for value, kernel in ((True, "mma"), ("1", "mma"), ("wgmma", "wgmma"), (False, "off"), ("0", "off")):
            set_skinny_gemm(value)
            assert skinny_gemm_kernel() == kernel and skinny_gemm_enabled() == (kernel != "off")
        set_skinny_gemm("wgmma")
        assert uses_skinny_kernel(x, w) == cuda_available()  # CUDA, bf16, 2..64 rows
        assert not uses_skinny_kernel(x[:1], w)  # one row: MLX's GEMV
        with pytest.raises(ValueError, match="skinny product"):
            set_skinny_gemm("cublas")
        assert skinny_gemm_kernel() == "wgmma"  # a bad choice changes nothing
        xf, wf = x.astype(mx.float32), w.astype(mx.float32)
        assert np.array_equal(np.array(linear_product(xf, wf)), np.array(xf @ wf.T))  # float32: MLX
    finally:
        set_skinny_gemm(before)
    if not cuda_available():
        with pytest.raises(ValueError, match="wgmma_matmul"):
            wg.wgmma_matmul(x, w)


def test_wgmma_vjp_is_the_plain_products(monkeypatch):
    import xlstm_metal.kernels.fast.skinny as skinny

    monkeypatch.setattr(wg, "wgmma_matmul", lambda x, w, config=None, splits=None: x @ w.T)
    assert_vjp_is_the_plain_products(skinny._wgmma_product)


def test_auto_picks_the_decode_kernel_by_rows_on_hopper(monkeypatch):
    import xlstm_metal.kernels.fast.skinny as skinny

    # The operand checks and the GPU's generation stood in for (they need a GPU): what is under
    # test is the choice by rows.
    monkeypatch.setattr(skinny, "skinny_supported", lambda x, w: True)
    monkeypatch.setattr(skinny, "AUTO_ROWS", range(16, 65))
    monkeypatch.setattr(skinny, "_hopper", [True])
    w = mx.zeros((8, 64), dtype=mx.bfloat16)
    before = skinny_gemm_kernel()
    try:
        set_skinny_gemm("auto")
        assert skinny_gemm_kernel() == "auto" and skinny_gemm_enabled()
        assert [skinny._kernel_for(mx.zeros((m, 64), dtype=mx.bfloat16), w) for m in (1, 2, 15, 16, 64)] == [
            "off", "off", "off", "decode", "decode"]
        assert skinny._kernel_for(mx.zeros((2, 8, 64), dtype=mx.bfloat16), w) == "decode"  # rows: all but the last axis
        monkeypatch.setattr(skinny, "AUTO_ROWS", range(2, 17))  # the shipped range
        assert [skinny._kernel_for(mx.zeros((m, 64), dtype=mx.bfloat16), w) for m in (1, 2, 16, 17, 64)] == [
            "off", "decode", "decode", "off", "off"]
        # fp16 was not measured against cuBLASLt: MLX's matmul under "auto".
        assert skinny._kernel_for(mx.zeros((16, 64), dtype=mx.float16), w.astype(mx.float16)) == "off"
        monkeypatch.setattr(skinny, "_hopper", [False])  # another GPU generation: MLX's matmul
        assert skinny._kernel_for(mx.zeros((16, 64), dtype=mx.bfloat16), w) == "off"
        set_skinny_gemm("wgmma")  # chosen outright: no check of rows beyond the kernel's own
        assert skinny._kernel_for(mx.zeros((2, 64), dtype=mx.bfloat16), w) == "wgmma"
    finally:
        set_skinny_gemm(before)
