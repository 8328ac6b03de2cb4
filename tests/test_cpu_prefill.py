"""The CPU prefill in C (xlstm_metal/kernels/cpu/prefill.py) against the MLX graph it stands for:
the same last logits and states for any length, rows, pieces and entering state, the tree read
at every call, a bounded work space, and the graph wherever the model or the state is not what
the C code computes."""

from __future__ import annotations

import ctypes

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from xlstm_metal import _blas, benchmark as bm
from xlstm_metal.generation.runner import xLSTMRunner
from xlstm_metal.kernels import register_mlstm_kernel
from xlstm_metal.kernels.cpu import decode_step as ds
from xlstm_metal.kernels.cpu import prefill as cp
from xlstm_metal.kernels.mlstm import defer_state, mlstm_chunkwise
from xlstm_metal.quantization import dequantize_model

from conftest import tiny_model

pytestmark = [
    pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the C prefill runs where MLX runs on the CPU"),
    # .ci/run installs a compiler and OpenBLAS; without them the C code is not built. With the row
    # kernel off (XLSTM_METAL_GEMV_ROWS=0, a one-thread build) fused projections take the layout
    # OpenBLAS's GEMV reads, which the C prefill does not
    pytest.mark.skipif(ds.library() is None or _blas.openblas_sgemm() is None or not _blas.gemv_rows(),
                       reason="no C compiler or no OpenBLAS, or the row kernel is off: the C prefill is "
                              "not built or does not read the fused layouts"),
]


def _rel(a, b) -> float:
    a, b = np.array(a), np.array(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _ids(rows: int, length: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 97, (rows, length)), dtype=mx.int32)


def _float64_twin(model):
    """``model`` (a second build of the one under test) on its dequantized weights in float64; the
    mLSTM kernels compute in float32 whatever their inputs. The yardstick where the float32 graph's
    own round-off nears the bound: in the tiny 4-bit model, heads nearly shut, the norms divide by
    a tiny spread, and the float32 graph was 2.3e-5 from this twin, the C prefill 5e-6 (GCC 12's
    build; 9e-6 from clang 14's) and so 1.7e-5 (3.6e-5 with clang 14) from the float32 graph."""
    twin = dequantize_model(model)
    twin.set_dtype(mx.float64)
    mx.eval(twin.parameters())
    return twin


def _assert_same(model, ids, state=None, chunk_size=None, tol=3e-5, reference=None):
    """The C prefill (asserted to run) against the graph's prefill, logits and every state entry:
    the float32 graph's, or ``reference``'s (a float64 twin, given the same state in float64)."""
    got = cp.prefill(model, ids, state, chunk_size)
    assert got is not None, cp.unsupported_reason(model)
    with cp.switched(False):
        if reference is None:
            expected = model.prefill(ids, state, chunk_size=chunk_size)
        else:
            wide = None if state is None else [tuple(a.astype(mx.float64) for a in entry) for entry in state]
            expected = reference.prefill(ids, wide, chunk_size=chunk_size)
    assert got[0].shape == expected[0].shape == (ids.shape[0], model.config.vocab_size)
    assert _rel(got[0], expected[0]) < tol, f"logits: {_rel(got[0], expected[0]):.3g}"
    for block, (ours, theirs) in enumerate(zip(got[1], expected[1])):
        for name, a, b in zip("Cnm", ours, theirs):
            assert a.shape == b.shape and a.dtype == mx.float32, (block, name)
            assert _rel(a, b) < tol, f"block {block} {name}: {_rel(a, b):.3g}"
    return got


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True, "add_out_norm": False},
    {"gate_soft_cap": None, "output_logit_soft_cap": None, "num_heads": 4, "num_blocks": 3},
], ids=["default", "tied-no-out-norm", "no-caps-4-heads"])
@pytest.mark.parametrize("rows, length", [(1, 1), (1, 16), (2, 37), (3, 100)])
def test_c_prefill_equals_the_graph_from_the_zero_state(overrides, rows, length):
    """Lengths of one token, one whole chunk (16) and chunks with a short last one."""
    model = tiny_model(seed=3, **overrides)
    assert cp.unsupported_reason(model) is None
    _assert_same(model, _ids(rows, length, seed=length))


def _recipe(path: str, module: nn.Module):
    """The packaged model's kind of mix: embeddings at 6 bits, the gates in float, the rest at 4."""
    if not hasattr(module, "to_quantized") or path.endswith(("igate_preact", "fgate_preact")):
        return False
    return {"group_size": 64, "bits": 6} if path == "backbone.embeddings" else {"group_size": 32, "bits": 4}


@pytest.mark.parametrize("bits, group", [(4, 32), (4, 64), (8, 64), (3, 32), (6, 64), ("mixed", None), ("mxfp4", 32),
                                         ("nvfp4", 16)])
def test_c_prefill_reads_quantized_weights(bits, group):
    """Quantized weights: the row kernel on their packed integers up to 8 tokens, beyond that the
    GEMM on tiles of dequantized rows; a 4-bit float format read as affine 8-bit."""
    def build():
        model = tiny_model(seed=14, ffn_proj_factor=40.0, tie_word_embeddings=bits == "mixed")
        if bits == "mixed":
            nn.quantize(model, class_predicate=_recipe)
        elif bits in ("mxfp4", "nvfp4"):
            nn.quantize(model, mode=bits)
        else:
            nn.quantize(model, group_size=group, bits=bits)
        return model

    model = build()
    assert model.config.ffn_dim == 2560 and isinstance(model.blocks[1].ffn.proj_up, nn.QuantizedLinear)
    assert cp.unsupported_reason(model) is None
    exact = _float64_twin(build())
    for rows, length in ((1, 5), (2, 37), (10, 3)):  # 10 rows: the last block's q and o through the GEMM
        _, state = _assert_same(model, _ids(rows, length, seed=length), reference=exact)
    # pieces, from an entering state
    _assert_same(model, _ids(10, 20, seed=1), state, chunk_size=7, reference=exact)
    model.fuse_projections()  # quantized fused copies: the C code reads each layer's own arrays
    _assert_same(model, _ids(2, 37, seed=2), reference=exact)


def test_fused_projections_pieces_and_an_entering_state():
    model = tiny_model(seed=4)
    model.fuse_projections()  # q|k|v|o|i|f rows of one matrix: one product in C
    ids = _ids(2, 90, seed=1)
    _, state = _assert_same(model, ids[:, :41])
    _assert_same(model, ids[:, 41:], state)  # from a prefill's state
    _assert_same(model, ids, chunk_size=20)  # pieces of 16 (whole chunks), the state carried
    _assert_same(model, ids, chunk_size=7)  # pieces shorter than a chunk
    # a decode step's state (the C step's) continues
    for token in (5, 9):
        _, state = ds.decode_step(model, mx.array([[token], [token + 1]], dtype=mx.int32), state)
    _assert_same(model, ids[:, :30], state)


@pytest.mark.parametrize("overrides", [{"tie_word_embeddings": True}, {"num_blocks": 1, "chunk_size": 64}],
                         ids=["tied-fused", "one-block"])
def test_fused_tied_head_and_a_single_block(overrides):
    """fuse_projections() stores a tied head in the GEMV layout; with one block the first block
    is also the last (only the last positions go on after its kernel)."""
    model = tiny_model(seed=2, **overrides)
    model.fuse_projections()
    _assert_same(model, _ids(2, 70, seed=9))


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("rows", [1, 10])
@pytest.mark.parametrize("blocks, chunk", [(1, 16), (2, 1), (2, 5)])
def test_the_last_blocks_last_positions(blocks, chunk, rows, fused):
    """The last block computes q, o and the kernel's output only at each row's last position (its
    q and o products: the row kernel up to 8 rows, the GEMM beyond; separate weights or a fused
    copy's): prompts shorter than a chunk and with a short last chunk, from the zero state and
    from an entering one, a model of one block (the first block is the last) and chunks of one.
    The per-head layer norm's eps raised to h's scale so that the kernel's denominator shows
    (with 1e-6 the norm cancels it)."""
    model = tiny_model(seed=15, num_blocks=blocks, chunk_size=chunk)
    for block in model.blocks:
        block.mlstm_layer.multihead_norm.eps = 1.0
    if fused:
        model.fuse_projections()
    for length in (3, 37):
        _, state = _assert_same(model, _ids(rows, length, seed=length))
        _assert_same(model, _ids(rows, length, seed=length + 1), state)


def _amx_model(kind: str) -> nn.Module:
    """The AMX tests' models: "float" E = 48, F = 72; "4-bit" E = 96, F = 160 (MLX's groups need
    multiples of 32); "wide" F = 792 and "wide-e" E = 800, F = 400 (past one stretch of 768)."""
    if kind == "4-bit":
        model = tiny_model(seed=16, embedding_dim=96, num_heads=3, ffn_proj_factor=5 / 3,
                           ffn_round_up_to_multiple_of=32)
        nn.quantize(model, group_size=32, bits=4)
        assert model.config.ffn_dim == 160
    elif kind == "wide":
        model = tiny_model(seed=17, ffn_proj_factor=12.375, ffn_round_up_to_multiple_of=8)
        assert model.config.ffn_dim == 792
    elif kind == "wide-e":  # E = 800: the products from xn (q|k|v|o|i|f, gate, up) and out_proj in stretches
        model = tiny_model(seed=18, embedding_dim=800, ffn_proj_factor=0.5, ffn_round_up_to_multiple_of=8, num_blocks=1)
        assert model.config.ffn_dim == 400
    else:
        model = tiny_model(seed=16, embedding_dim=48, ffn_proj_factor=1.5, ffn_round_up_to_multiple_of=8)
        assert model.config.ffn_dim == 72
    return model


@pytest.mark.parametrize("kind", ["float", "4-bit", "wide", "wide-e"])
def test_amx_products_equal_the_graph_and_openblas(kind):
    """Where the CPU has AMX the products beyond 8 rows run on its bf16 tiles (each float32 value
    in three bf16 parts): widths that are not multiples of the tiles' 32 (E = 48 and F = 72 in
    float; 96 and 160 quantized, MLX's groups needing multiples of 32), widths past one stretch
    of K (F = 792 and E = 800: 768 and then 24 or 32, the accumulators carried), rows that are not multiples
    of 32 (3 x 45, 13 x 7), an entering state, against the graph and against OpenBLAS's SGEMM,
    from which they differ in the last bits only."""
    model = _amx_model(kind)
    ids, more = _ids(3, 45, seed=4), _ids(13, 7, seed=5)
    outputs = {}
    for enabled in (True, False):
        with cp.amx_products(enabled) as runs:
            assert runs == (enabled and ds.library().xl_amx_available() == 1)
            logits, state = _assert_same(model, ids)
            outputs[runs] = (logits, _assert_same(model, more[:3], state)[0], _assert_same(model, more)[0])
    if len(outputs) == 2:  # this CPU has AMX: both forms ran, and not as the same arithmetic
        for tiles, blas in zip(outputs[True], outputs[False]):
            assert 0 < _rel(tiles, blas) < 3e-5


@pytest.mark.parametrize("kind", ["float", "4-bit", "wide-e"])
def test_swiglu_in_one_pass_is_the_same_bits(kind):
    """The FFN's gate and up products, SwiGLU and the split into the down product's planes in one
    pass over blocks (amx_swiglu) against the three passes one after another: the same bits of
    logits and states. F = 72 (the second thread's share ends mid-block, the planes' padding to
    96), 4-bit weights with F = 160, rows not a multiple of 32 (3 x 45); E = 800, past one
    stretch, takes the three passes either way."""
    model = _amx_model(kind)
    lib = ds.library()
    passes = ctypes.c_long.in_dll(lib, "xl_amx_swiglu_passes")
    ids, outputs = _ids(3, 45, seed=4), {}
    for enabled in (True, False):
        before = passes.value
        with cp.fused_swiglu(enabled) as runs:
            assert runs == (enabled and lib.xl_amx_available() == 1)
            logits, state = _assert_same(model, ids)
            outputs[enabled] = [logits, *(a for entry in state for a in entry)]
        # the one pass ran where it can (not in the last block: 3 rows there), and nowhere else
        assert (passes.value > before) == (runs and kind != "wide-e")
    for fused, apart in zip(outputs[True], outputs[False]):
        assert np.array_equal(np.array(fused), np.array(apart))


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            flags = set(next((line for line in info if line.startswith("flags")), "").split())
    except OSError:
        return False
    return {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw"} <= flags


def test_the_build_has_the_tiles_where_the_cpu_and_compiler_do():
    """The library falls back to a build without AMX only where the compiler cannot assemble it:
    on an AMX CPU with GCC (12 here) the tiles must be there, or a mistake in amx_gemm.c would
    silently leave every prefill on OpenBLAS (as one did while this was written)."""
    import subprocess

    lib = ds.library()
    compiler = _blas._compiler()
    version = subprocess.run([compiler, "-dumpversion"], capture_output=True, text=True).stdout.strip()
    gcc = "gcc" in subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.lower()
    if _cpu_has_amx() and gcc and int(version.split(".")[0]) >= 12:
        assert lib.xl_amx_available() == 1
    if lib.xl_amx_available():
        assert lib.xl_amx_peak_gflops(1, 20000) > 0


def test_amx_sgemm_is_a_float32_product():
    """xl_amx_sgemm (benchmarks/cpu_limits.py's measure of the tiles' products) against float64:
    as close as OpenBLAS's float32 product, on sizes off the tiles' 32; refuses where the tiles
    do not run."""
    lib = ds.library()
    rng = np.random.default_rng(0)
    for m, n, k in ((70, 45, 100), (130, 300, 900)):
        a = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        c = np.full((m, n), np.nan, np.float32)
        status = lib.xl_amx_sgemm(m, n, k, ds._pointer(a), ds._pointer(w), ds._pointer(c), 2)
        if not lib.xl_amx_available():
            assert status == 1
            return
        assert status == 0
        exact = a.astype(np.float64) @ w.astype(np.float64).T
        err = np.abs(c - exact).mean() / np.abs(exact).mean()
        blas = np.abs(a @ w.T - exact).mean() / np.abs(exact).mean()
        assert err < 2 * blas and err < 1e-6, (err, blas)


def test_continuing_equals_one_call():
    """The state after a prompt in two calls is the one after it in one (the kernel's m included)."""
    model = tiny_model(seed=5)
    ids = _ids(1, 70, seed=2)
    whole = cp.prefill(model, ids)
    first = cp.prefill(model, ids[:, :33])
    second = cp.prefill(model, ids[:, 33:], first[1])
    assert _rel(second[0], whole[0]) < 3e-5
    for a, b in zip(second[1][1], whole[1][1]):
        assert _rel(a, b) < 3e-5


def test_the_tree_is_read_at_every_call():
    model, other = tiny_model(seed=6), tiny_model(seed=7)
    ids = _ids(1, 24, seed=3)
    before = cp.prefill(model, ids)[0]
    model.load_weights(list(tree_flatten(other.parameters())))
    after = _assert_same(model, ids)[0]
    assert _rel(after, before) > 1e-3
    assert _rel(after, cp.prefill(other, ids)[0]) < 1e-6
    model.blocks[0].norm_ffn.eps = 0.5  # a plain attribute the C code reads
    _assert_same(model, ids)
    for block in model.blocks:  # the sequence kernel's chunk size
        block.mlstm_layer.parallel_kernel_cell.chunk_size = 8
    _assert_same(model, ids)
    # and its eps: h / (den + eps) is rescaled per head by the layer norm after it, so only an eps
    # that shrinks h to the norm's own eps shows (the step kernel's stays 1e-6)
    before = cp.prefill(model, ids)[0]
    for block in model.blocks:
        block.mlstm_layer.parallel_kernel_cell.eps = 1e4
    assert _rel(_assert_same(model, ids)[0], before) > 1e-3


class _Zeros(nn.Module):
    def __call__(self, x):
        return mx.zeros((*x.shape[:-1], 64), x.dtype)


def test_models_it_does_not_compute_run_the_graph():
    ids = _ids(1, 20, seed=4)
    microscaled = tiny_model(seed=8)
    nn.quantize(microscaled, group_size=32, bits=8, mode="mxfp8")  # no affine form (mxfp4's is read)
    assert "quantized in a way the C code does not read" in cp.unsupported_reason(microscaled)
    assert cp.prefill(microscaled, ids) is None
    swapped = tiny_model(seed=8)
    swapped.blocks[1].mlstm_layer.out_proj = _Zeros()  # a user's module: the graph calls it
    assert cp.prefill(swapped, ids) is None
    plain = tiny_model(seed=8)
    assert _rel(swapped.prefill(ids)[0], plain.prefill(ids)[0]) > 1e-3  # the zero module ran
    half = tiny_model(seed=8)
    half.update(nn.utils.tree_map(lambda p: p.astype(mx.bfloat16), half.parameters()))
    assert cp.prefill(half, ids) is None
    deferred = [defer_state(block_state, 4) for block_state in plain.make_state(1)]  # CUDA's decode form
    assert cp.prefill(plain, ids, deferred) is None
    assert cp.prefill(plain, ids.astype(mx.float32)) is None  # not token ids: the graph says so


def test_a_kernel_of_the_users_runs_in_the_graph():
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return mlstm_chunkwise(*args, **kwargs)

    register_mlstm_kernel("test_prefill_counting", counting)
    model = tiny_model(seed=9)
    for block in model.blocks:
        block.mlstm_layer.parallel_kernel_cell.kernel = "test_prefill_counting"
    assert cp.unsupported_reason(model) == "the sequence kernel 'test_prefill_counting' is not one of this package's"
    model.prefill(_ids(1, 20))
    assert len(calls) == model.config.num_blocks


def test_subclass_prefill_and_the_switch(monkeypatch):
    from xlstm_metal.models.xlstm_large import xLSTMLarge

    class Shifted(xLSTMLarge):
        def prefill(self, input_ids, state=None, *, chunk_size=None):
            logits, state = super().prefill(input_ids, state, chunk_size=chunk_size)
            return logits + 1.0, state

    model = tiny_model(seed=10)
    shifted = Shifted(model.config)
    shifted.update(model.parameters())
    assert cp.unsupported_reason(shifted) == "Shifted.prefill is not xLSTMLarge's"
    monkeypatch.setattr(cp, "ENABLED", False)
    assert cp.unsupported_reason(model) == "turned off by XLSTM_METAL_CPU_PREFILL=0"
    assert cp.prefill(model, _ids(1, 5)) is None


def test_token_ids_outside_the_vocabulary_are_refused():
    model = tiny_model(seed=11)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 97\)"):
        model.prefill(mx.array([[1, 2, 97]], dtype=mx.int32))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.prefill(mx.array([[-1, 2]], dtype=mx.int32))


def test_model_prefill_takes_it_and_restores_the_blas_threads(monkeypatch):
    model = tiny_model(seed=12)
    calls = []
    real = cp.prefill
    monkeypatch.setattr(cp, "prefill", lambda *a: calls.append(1) or real(*a))
    threads = _blas.info()["threads"]
    ids = _ids(2, 30, seed=5)
    logits, _ = model.prefill(ids)
    assert calls == [1]
    assert _blas.info()["threads"] == threads
    full, _ = model(ids)  # the plain forward pass (the graph)
    assert _rel(logits, full[:, -1]) < 3e-5


def test_prefills_from_several_threads_restore_the_blas_threads():
    """Two models' C prefills at once from two threads: each right, OpenBLAS's thread count back
    where it was (each call sets it to one and restores it: the pairs must not interleave)."""
    from concurrent.futures import ThreadPoolExecutor

    models = [tiny_model(seed=20), tiny_model(seed=21)]
    ids = _ids(1, 200, seed=10)
    with cp.switched(False):
        expected = [m.prefill(ids)[0] for m in models]
    threads = _blas.info()["threads"]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda i: [cp.prefill(models[i % 2], ids)[0] for _ in range(5)], range(4)))
    assert _blas.info()["threads"] == threads
    for i, outs in enumerate(got):
        assert all(_rel(out, expected[i % 2]) < 3e-5 for out in outs)


def test_work_space_is_bounded_by_the_piece(monkeypatch):
    monkeypatch.setattr(cp, "PIECE_TOKENS", 64)
    model = tiny_model(seed=13)
    _assert_same(model, _ids(1, 64, seed=6))
    plan = model.__dict__["_cpu_step_plan"]
    size = plan.prefill_work.size
    _assert_same(model, _ids(1, 300, seed=7))  # five pieces, one work space
    assert plan.prefill_work.size == size
    _assert_same(model, _ids(4, 40, seed=8))  # 4 rows: pieces of 16 positions
    assert plan.prefill_work.size == size
    # the benchmarks' peak memory counts it (MLX's counters do not see NumPy's memory)
    assert ds.held_bytes(model) == plan.prefill_work.nbytes == 4 * size
    assert ds.held_bytes(tiny_model(seed=13)) == 0
    assert bm.measure_prefill(model, 64, warmup=False)["peak_mem_gb"] > 0
    assert round(bm._peak_gib(model) * 2**30) == mx.get_peak_memory() + ds.held_bytes(model)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_runner_generates_the_same_tokens_with_and_without_it(monkeypatch, temperature):
    model = tiny_model(seed=14)
    runs = []
    for enabled in (False, True):
        monkeypatch.setattr(cp, "ENABLED", enabled)
        runner = xLSTMRunner(model)
        runs.append(runner.generate(list(range(3, 60)), max_tokens=16, temperature=temperature, seed=3))
    assert len(runs[0]) == 16 and runs[0] == runs[1]
