"""The streaming GEMV (xlstm_metal/kernels/fast/gemv.py) and the decode chain's float stages on it.

On CUDA the kernel is held to a float32 product at decode shapes, rows, dtypes and schedules,
and each chain stage on it (``decode_chain.CHAIN_ROWS``) to the stage's reference ops. On a CPU
the dispatch falls back to ``x @ w.T`` and the chain's switch leaves every other width alone.
"""

import mlx.core as mx
import numpy as np
import pytest

from xlstm_metal.cells.norms import MultiHeadLayerNorm, RMSNorm
from xlstm_metal.kernels.fast import decode_chain as chain
from xlstm_metal.kernels.fast import gemv
from xlstm_metal.kernels.fast.step import cuda_available

from test_decode_chain import _reference, _rel  # the stages' reference ops, the distance

cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX's CUDA backend")


def test_rows_matmul_falls_back_where_the_kernel_does_not_run():
    # float32, more rows than the kernel takes, a K not a multiple of 8 (and every case on a CPU):
    # the product is x @ w.T, bit for bit.
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((24, 40)).astype(np.float32))
    for x in (mx.array(rng.standard_normal((1, 40)).astype(np.float32)),
              mx.array(rng.standard_normal((3, 1, 40)).astype(np.float32)).astype(mx.bfloat16)):
        wx = w.astype(x.dtype)
        assert not gemv.rows_supported(x, wx) or cuda_available()
        if not gemv.rows_supported(x, wx):
            assert mx.array_equal(gemv.rows_matmul(x, wx), x @ wx.T)
    x = mx.zeros((1, 12), dtype=mx.bfloat16)
    assert not gemv.rows_supported(x, mx.zeros((5, 12), dtype=mx.bfloat16))  # K % 8
    q = mx.quantize(mx.array(rng.standard_normal((24, 64)).astype(np.float32)).astype(mx.bfloat16), group_size=32, bits=8)
    x8 = mx.array(rng.standard_normal((1, 64)).astype(np.float32)).astype(mx.bfloat16)
    assert not gemv.rows_supported(x8, q[0], q[1], q[2], group_size=32, bits=4)  # 8-bit words are not 4-bit ones
    assert not gemv.rows_supported(x8, q[0], q[1], q[2], group_size=32, bits=6)  # only 16, 8 and 4 bits
    if not gemv.rows_supported(x8, *q, group_size=32, bits=8):
        ref = mx.quantized_matmul(x8, *q, transpose=True, group_size=32, bits=8)
        assert mx.array_equal(gemv.rows_matmul(x8, *q, group_size=32, bits=8), ref)


def test_rows_switch_takes_its_widths_at_one_row(monkeypatch):
    monkeypatch.setattr(chain, "CHAIN_MERGE", {4: 4, 8: 0, 16: 4})
    monkeypatch.setattr(chain, "CHAIN_ROWS", frozenset())
    assert chain.merge_mode(16, 1) == 4
    monkeypatch.setattr(chain, "CHAIN_ROWS", frozenset({16}))
    assert chain.rows_apply(16, 1) and not chain.rows_apply(16, 2) and not chain.rows_apply(8, 1)
    assert chain.merge_mode(16, 1) == 0 and chain.merge_mode(4, 1) == 4  # its stages run unmerged
    monkeypatch.setattr(chain, "CHAIN_ROWS", frozenset({8, 16, 4, 6}))
    assert chain.rows_apply(8, 1, 64) and not chain.rows_apply(8, 1, 16) and chain.rows_apply(4, 1, 128)
    assert not chain.rows_apply(6, 1) and not chain.rows_apply(4, 2)
    monkeypatch.setattr(chain, "CHAIN_ROWS", frozenset())
    assert not chain.rows_apply(16, 1)


def test_rows_template_and_launch():
    t = dict(gemv.rows_template(mx.bfloat16, 4096, 1, unroll=4, rows_per_warp=2, early=False))
    assert (t["KD"], t["SR"], t["U"], t["RPW"], t["PRE"]) == (4096, 1, 4, 2, False)
    assert gemv.rows_launch(21888)["grid"][0] == 21888 // gemv.WARPS * 32 * gemv.WARPS
    assert gemv.rows_launch(21888, blocks=4)["grid"][0] == 4 * gemv.SMS * 32 * gemv.WARPS
    assert gemv.rows_launch(100, rows_per_warp=2)["grid"][0] == 7 * 32 * gemv.WARPS  # ceil(100 / 16)
    assert [gemv.staged_rows(r) for r in (1, 2)] == [1, 2]
    assert dict(gemv.rows_template(mx.bfloat16, 4096, 1))["PF"] == 0
    assert dict(gemv.rows_template(mx.bfloat16, 4096, 1, prefetch=8192))["PF"] == 8192
    for bad in (-16, 100):  # the bulk request takes multiples of 16 bytes
        with pytest.raises(ValueError, match="multiple of 16"):
            gemv.rows_template(mx.bfloat16, 4096, 1, prefetch=bad)


def _check_rows_matmul(dtype, rows, N, K, **conf):
    rng = np.random.default_rng(N + K + rows)
    x = mx.array(rng.standard_normal((rows, K)).astype(np.float32)).astype(dtype)
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32) * K ** -0.5).astype(dtype)
    assert gemv.rows_supported(x, w)
    y = gemv.rows_matmul(x, w, **conf)
    ref = x.astype(mx.float32) @ w.astype(mx.float32).T
    assert y.dtype == dtype and y.shape == (rows, N)
    assert _rel(y, ref) <= 8e-3  # float32 sums, one rounding to T


@cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("N,K", [(4096, 4096), (4096, 10944), (300, 264), (37, 72)])
def test_cuda_rows_matmul(dtype, rows, N, K):
    _check_rows_matmul(dtype, rows, N, K)


@cuda
@pytest.mark.parametrize("conf", [{"unroll": 4, "rows_per_warp": 2, "resident": 2}, {"blocks": 1, "early": False},
                                  {"unroll": 16, "resident": 2, "load_hint": 2}, {"load_hint": 0, "resident": 0}],
                         ids=["u4r2", "b1", "u16h2", "h0-unbounded"])
def test_cuda_rows_matmul_schedules(conf):
    _check_rows_matmul(mx.bfloat16, 1, 4099, 10944, **conf)  # a feature count no schedule divides


@cuda
@pytest.mark.parametrize("prefetch", [16, 4096, 65536])
@pytest.mark.parametrize("N,K", [(4099, 4096), (37, 72)])  # rows of 8 KB and of 144 bytes (less than asked for)
def test_cuda_rows_matmul_prefetch_changes_no_value(prefetch, N, K):
    # The L2 requests only move bytes early: the products equal those without, bit for bit.
    rng = np.random.default_rng(N)
    x = mx.array(rng.standard_normal((1, K)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32) * K ** -0.5).astype(mx.bfloat16)
    assert mx.array_equal(gemv.rows_matmul(x, w, prefetch=prefetch), gemv.rows_matmul(x, w))
    q = mx.quantize(w, group_size=64, bits=8) if K % 64 == 0 else None
    if q is not None:
        assert mx.array_equal(gemv.rows_matmul(x, *q, group_size=64, bits=8, prefetch=prefetch),
                              gemv.rows_matmul(x, *q, group_size=64, bits=8))


# K: groups of 128 too; 67 chunks of 32 values (an odd count: 4 bits' last chunk rotated alone).
_QUANTIZED_CASES = [(rows, N, K, g) for rows, N, K in [(1, 4096, 11008), (2, 300, 4096), (1, 37, 128)]
                    for g in (32, 64, 128)] + [(1, 64, 32 * 67, 32)]


@cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows,N,K,group_size", _QUANTIZED_CASES)
def test_cuda_rows_matmul_quantized(bits, dtype, rows, N, K, group_size):
    # Against the float32 product of the dequantized weights (the kernel rounds no weight to T).
    rng = np.random.default_rng(N + group_size + bits)
    x = mx.array(rng.standard_normal((rows, K)).astype(np.float32)).astype(dtype)
    w, s, b = mx.quantize(mx.array(rng.standard_normal((N, K)).astype(np.float32) * K ** -0.5).astype(dtype),
                          group_size=group_size, bits=bits)
    assert gemv.rows_supported(x, w, s, b, group_size, bits)
    y = gemv.rows_matmul(x, w, s, b, group_size=group_size, bits=bits)
    deq = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
    ref = x.astype(mx.float32) @ deq.T
    assert y.dtype == dtype and y.shape == (rows, N) and _rel(y, ref) <= 8e-3


@cuda
@pytest.mark.parametrize("blocks,early,prefetch", [(4, False, 0), (2, True, 0), (3, False, 0), (4, False, 8192)])
@pytest.mark.parametrize("shape", ["7b", "small"])
@pytest.mark.parametrize("dtype,bits", [(mx.bfloat16, 16), (mx.float16, 16), (mx.bfloat16, 8), (mx.bfloat16, 4)],
                         ids=["bf16", "fp16", "8bit", "4bit"])
def test_cuda_stages_on_the_streaming_product(monkeypatch, blocks, early, prefetch, shape, dtype, bits):
    monkeypatch.setattr(chain, "CHAIN_ROWS", frozenset({bits}))
    monkeypatch.setattr(chain, "ROWS_BLOCKS", blocks)
    monkeypatch.setattr(chain, "ROWS_EARLY", early)
    monkeypatch.setattr(chain, "ROWS_PREFETCH", {4: prefetch, 8: prefetch, 16: prefetch})
    monkeypatch.setattr(chain, "CHAIN_FLOAT", True)
    rng = np.random.default_rng(blocks)
    E, NH, DV, F = (4096, 8, 512, 10944) if shape == "7b" else (256, 2, 128, 320)

    def weight(n, k):
        w = mx.array(rng.standard_normal((n, k)).astype(np.float32) * k ** -0.5).astype(dtype)
        if bits == 16:
            return dict(w=w, scales=w, biases=w, group_size=32, bits=16)
        q, s, b = mx.quantize(w, group_size=64, bits=bits)
        return dict(w=q, scales=s, biases=b, group_size=64, bits=bits)

    def call(fn, *args, wd):
        out = fn(*args, wd["w"], wd["scales"], wd["biases"], group_size=wd["group_size"], bits=wd["bits"])
        ref = _reference(fn, *args, wd["w"], wd["scales"], wd["biases"], group_size=wd["group_size"], bits=wd["bits"])
        return out, ref

    norm = RMSNorm(E)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, E).astype(np.float32)).astype(dtype)
    x = mx.array(rng.standard_normal((1, 1, E)).astype(np.float32))
    pending = mx.array(rng.standard_normal((1, 1, E)).astype(np.float32)).astype(dtype)
    wu = weight(2 * F, E)
    out = chain.norm_quantized_matmul(x, pending, norm, wu["w"], wu["scales"], wu["biases"], group_size=wu["group_size"],
                                      bits=bits, write_xn=True)
    ref = _reference(chain.norm_quantized_matmul, x, pending, norm, wu["w"], wu["scales"], wu["biases"],
                     group_size=wu["group_size"], bits=bits, write_xn=True)
    assert _rel(out[0], ref[0]) <= 1e-6 and _rel(out[1], ref[1]) <= 1e-2 and _rel(out[2], ref[2]) <= 2e-2
    plain, plain_ref = call(chain.norm_quantized_matmul, x, None, norm, wd=wu)
    assert _rel(plain[2], plain_ref[2]) <= 2e-2
    y, y_ref = call(chain.swiglu_quantized_matmul, out[2], wd=weight(E, F))
    assert _rel(y, y_ref) <= 2e-2
    mh = MultiHeadLayerNorm(NH, DV)
    mh.weight = mx.array(rng.uniform(0.5, 1.5, NH * DV).astype(np.float32)).astype(dtype)
    h = mx.array(rng.standard_normal((1, NH, 1, DV)).astype(np.float32)).astype(dtype)
    r, r_ref = call(chain.gate_norm_quantized_matmul, h, out[2], F, mh, x, wd=weight(E, NH * DV))
    assert r.dtype == mx.float32 and _rel(r, r_ref) <= 2e-2


def _ffn_case(rng, E, F, dtype, bits):
    norm = RMSNorm(E)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, E).astype(np.float32)).astype(dtype)

    def weight(n, k):
        w = mx.array(rng.standard_normal((n, k)).astype(np.float32) * k ** -0.5).astype(dtype)
        return (w, w, w, 32, 16) if bits == 16 else (*mx.quantize(w, group_size=64, bits=bits), 64, bits)

    return norm, weight(2 * F, E), weight(E, F)


def test_paired_rows_template_and_the_ffn_switch(monkeypatch):
    t = dict(gemv.rows_template(mx.bfloat16, 4096, 1, unroll=4, rows_per_warp=2, pair=10944))
    assert (t["PAIR"], t["RPW"], t["U"]) == (10944, 2, 4)
    assert dict(gemv.rows_template(mx.bfloat16, 4096, 1))["PAIR"] == 0
    with pytest.raises(ValueError, match="rows_per_warp=2"):
        gemv.rows_template(mx.bfloat16, 4096, 1, pair=64)
    rng = np.random.default_rng(3)
    norm, gu, down = _ffn_case(rng, 64, 96, mx.bfloat16, 16)
    x = mx.array(rng.standard_normal((1, 1, 64)).astype(np.float32))
    monkeypatch.setattr(chain, "ROWS_SWIGLU", False)
    assert not chain.ffn_rows_supported(x, norm, gu, down)
    monkeypatch.setattr(chain, "ROWS_SWIGLU", True)
    assert not chain.ffn_rows_supported(x, norm, gu, None)
    assert not chain.ffn_rows_supported(x, norm, gu, _ffn_case(rng, 64, 128, mx.bfloat16, 8)[2])  # bits differ


def test_ffn_rows_reference_is_the_ffn():
    # Off CUDA (or with the kernels off) ffn_rows_matmul is RMSNorm -> gate|up -> SwiGLU -> down.
    from xlstm_metal.cells.ffn import swiglu

    rng = np.random.default_rng(5)
    norm, gu, down = _ffn_case(rng, 64, 96, mx.bfloat16, 16)
    x = mx.array(rng.standard_normal((1, 1, 64)).astype(np.float32))
    y = _reference(chain.ffn_rows_matmul, x, norm, gu, down)
    g = norm(x).astype(mx.bfloat16) @ gu[0].T
    want = swiglu(g[..., :96], g[..., 96:]) @ down[0].T
    assert y.shape == (1, 1, 64) and mx.array_equal(y, want)


@cuda
@pytest.mark.parametrize("prefetch", [0, 8192])
@pytest.mark.parametrize("shape", ["7b", "small"])
@pytest.mark.parametrize("dtype,bits", [(mx.bfloat16, 16), (mx.float16, 16), (mx.bfloat16, 8), (mx.bfloat16, 4)],
                         ids=["bf16", "fp16", "8bit", "4bit"])
def test_cuda_ffn_with_swiglu_in_the_epilogue_equals_the_two_stages(monkeypatch, prefetch, shape, dtype, bits):
    # Same sums in the same order, the same roundings: bit for bit what stage 4 then stage 5 give.
    monkeypatch.setattr(chain, "CHAIN_ROWS", frozenset({bits}))
    monkeypatch.setattr(chain, "ROWS_SWIGLU", True)
    monkeypatch.setattr(chain, "ROWS_PREFETCH", {4: prefetch, 8: prefetch, 16: prefetch})
    monkeypatch.setattr(chain, "CHAIN_FLOAT", True)
    E, F = (4096, 10944) if shape == "7b" else (256, 320)
    rng = np.random.default_rng(E + bits)
    norm, gu, down = _ffn_case(rng, E, F, dtype, bits)
    x = mx.array(rng.standard_normal((1, 1, E)).astype(np.float32))
    assert chain.ffn_rows_supported(x, norm, gu, down)
    y = chain.ffn_rows_matmul(x, norm, gu, down)
    _, _, gate_up = chain.norm_quantized_matmul(x, None, norm, *gu[:3], group_size=gu[3], bits=bits)
    two = chain.swiglu_quantized_matmul(gate_up, *down[:3], group_size=down[3], bits=bits)
    assert y.dtype == dtype and mx.array_equal(y, two)
    assert _rel(y, _reference(chain.ffn_rows_matmul, x, norm, gu, down)) <= 2e-2


@cuda
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_cuda_one_row_decode_takes_the_streaming_ffn_and_matches_ops(monkeypatch, bits):
    # A bf16 model (8 and 4 bits: quantized as the default recipe does) decoding one row on its
    # default path (4 bits: with its stages streaming) runs the FFN through ffn_rows_matmul, and
    # its logits stay those of the ops.
    import xlstm_metal.kernels.fast.decode as decode
    from conftest import tiny_model
    from xlstm_metal.quantization import quantize_model

    def model():
        m = tiny_model(seed=7, embedding_dim=128)
        m.set_dtype(mx.bfloat16)
        if bits != 16:
            quantize_model(m, bits=bits, group_size=64)
        return m.fuse_projections()

    monkeypatch.setattr(chain, "CHAIN_ROWS", chain.CHAIN_ROWS | {bits})
    calls = []
    real = chain.ffn_rows_matmul
    monkeypatch.setattr(chain, "ffn_rows_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok = mx.array([[5]], dtype=mx.int32)
    fast, out_fast, state = model(), [], None
    for _ in range(4):
        logits, state = fast(tok, state)
        out_fast.append(logits)
    assert len(calls) == 4 * len(fast.blocks)  # every block, every step
    monkeypatch.setattr(decode, "_kernels_on", lambda: False)
    ref, state = model(), None
    for a in out_fast:
        logits, state = ref(tok, state)
        assert _rel(a, logits) <= 3e-2, _rel(a, logits)
