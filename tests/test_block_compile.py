"""One mx.compile for all blocks of the same structure (xlstm_metal/models/block_compile.py), as
prefill() runs its compiled blocks: the same values as each block compiled on its own, one trace
per new input signature for all blocks, blocks that differ traced on their own."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import tiny_model
from xlstm_metal.kernels.cpu import prefill as cpu_prefill
from xlstm_metal.models import block_compile
from xlstm_metal.models import xlstm_large as xl
from xlstm_metal.quantization import quantize_model


@pytest.fixture(autouse=True)
def _graph_prefill():
    """prefill() through the MLX graph (its compiled blocks are what these tests are about), not
    the CPU's C prefill (tests/test_cpu_prefill.py)."""
    with cpu_prefill.switched(False):
        yield


def _ids(length: int, batch: int = 2, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 97, (batch, length)), dtype=mx.int32)


def _count_traces(monkeypatch) -> list:
    traces = []
    original = block_compile._Shared._traced

    def counting(self, arrays, *args):
        traces.append(self.method)
        return original(self, arrays, *args)

    monkeypatch.setattr(block_compile._Shared, "_traced", counting)
    return traces


@pytest.mark.parametrize("fused", [False, True])
def test_prefill_traces_once_for_all_blocks_and_matches_each_block_compiled_alone(monkeypatch, fused):
    model = tiny_model(seed=3, num_blocks=4)
    if fused:
        model.fuse_projections()
    traces = _count_traces(monkeypatch)
    ids = _ids(1024)
    last, state = model.prefill(ids)  # 2 x 1024 tokens: the compiled blocks
    # chained (fused): the first block takes no pending FFN output, the others one: two traces
    assert traces == (["step", "step"] if fused else ["__call__"])
    # The reference: the same pieces with every block compiled on its own (the pre-S22 form).
    chained = model._chains_residuals()
    alone = [mx.compile(b.step if chained else b.__call__, inputs=b.state) for b in model.backbone.blocks]
    monkeypatch.setattr(type(model), "_compiled_blocks", lambda self, c: alone)
    ref_last, ref_state = model.prefill(ids)
    assert mx.array_equal(last, ref_last)
    for a, b in zip(state, ref_state):
        assert all(mx.array_equal(x, y) for x, y in zip(a, b))
    # And the plain forward agrees to round-off.
    full = model(ids)[0][:, -1]
    assert float(mx.abs(last - full).max()) <= 1e-4 * float(mx.abs(full).max())


def test_a_new_length_traces_again_for_all_blocks_and_the_first_block_keeps_its_arrays(monkeypatch):
    model = tiny_model(seed=4, num_blocks=3).fuse_projections()
    first = model.backbone.blocks[0]
    own = {k: id(v) for k, v in first.norm_mlstm.items()}
    traces = _count_traces(monkeypatch)
    model.prefill(_ids(1024))
    model.prefill(_ids(1024, seed=1))  # the same shape: replayed
    model.prefill(_ids(1040))  # a new length: traced again for all three blocks
    # two traces per length (the first block has no pending FFN output to add; see above)
    assert len(traces) == 4
    # the trace swapped the first block's arrays for tracers only while it ran
    assert {k: id(v) for k, v in first.norm_mlstm.items()} == own
    assert all(isinstance(v, mx.array) for v in first.parameters()["norm_mlstm"].values())


def test_blocks_that_differ_are_traced_on_their_own(monkeypatch):
    model = tiny_model(seed=5, num_blocks=3)
    ids = _ids(1024)
    reference = model(ids)[0][:, -1]
    # block 1 quantized, blocks 0 and 2 float: two structures
    quantize_model(model.backbone.blocks[1], bits=8, group_size=32)
    reference_q = model(ids)[0][:, -1]
    assert float(mx.abs(reference_q - reference).max()) > 0  # quantizing changed something
    traces = _count_traces(monkeypatch)
    last, _ = model.prefill(ids)
    assert len(traces) == 2
    assert float(mx.abs(last - reference_q).max()) <= 1e-4 * float(mx.abs(reference_q).max())
    # a setting outside the arrays (the norm's eps) also makes a block differ
    model2 = tiny_model(seed=6, num_blocks=2)
    model2.backbone.blocks[1].norm_ffn.eps = 1e-2
    sigs = [block_compile.module_signature(b) for b in model2.backbone.blocks]
    assert sigs[0] != sigs[1]
    model2.backbone.blocks[1].norm_ffn.eps = model2.backbone.blocks[0].norm_ffn.eps
    assert block_compile.module_signature(model2.backbone.blocks[0]) == \
        block_compile.module_signature(model2.backbone.blocks[1])


def test_signature_sees_a_stale_fusion_and_unknown_attributes():
    model = tiny_model(seed=7, num_blocks=2).fuse_projections()
    a, b = model.backbone.blocks
    assert block_compile.module_signature(a) == block_compile.module_signature(b)
    # replacing a layer of block 1 after fusing makes its fused group stale (it runs the tree's layers)
    b.mlstm_layer.q = nn.Linear(*b.mlstm_layer.q.weight.shape[::-1], bias=False)
    assert block_compile.module_signature(a) != block_compile.module_signature(b)
    c, d = tiny_model(seed=8, num_blocks=2).backbone.blocks
    c.norm_ffn.note, d.norm_ffn.note = object(), object()  # not comparable: each block on its own
    assert block_compile.module_signature(c) != block_compile.module_signature(d)


def test_short_pieces_take_the_shared_trace_only_on_a_gpu_when_asked(monkeypatch):
    model = tiny_model(seed=9, num_blocks=2).fuse_projections()
    traces = _count_traces(monkeypatch)
    ids = _ids(64)
    eager, _ = model.prefill(ids)  # CPU: a short piece runs eagerly
    assert traces == []
    monkeypatch.setattr(xl, "_queue_layers", lambda: True)  # as on a GPU
    model.prefill(ids)  # eagerly there too by default
    assert traces == []
    monkeypatch.setattr(xl, "_SHORT_COMPILED", True)  # XLSTM_METAL_PREFILL_SHORT_COMPILED=1
    queued, _ = model.prefill(ids)
    assert traces == ["step", "step"]
    assert float(mx.abs(queued - eager).max()) <= 1e-4 * float(mx.abs(eager).max())
    # blocks of two structures: a short piece stays eager even there
    quantize_model(model.backbone.blocks[1], bits=8, group_size=32)
    model.prefill(_ids(80))
    assert traces == ["step", "step"]


def test_each_signature_is_taken_at_its_blocks_first_call_and_the_called_block_traces(monkeypatch):
    # On a GPU the first block's kernels run while the host takes the later blocks' signatures.
    model = tiny_model(seed=10, num_blocks=3)
    taken = []
    original = block_compile.module_signature
    monkeypatch.setattr(block_compile, "module_signature", lambda m: taken.append(m) or original(m))
    cache: dict = {}
    blocks = model.backbone.blocks
    calls = block_compile.compile_alike(blocks, "__call__", cache)
    assert taken == []  # nothing taken before a call
    x = mx.random.normal((1, 4, model.config.embedding_dim), key=mx.random.key(0))
    state = model.make_state(1)
    y, _ = calls[0](x, state[0])
    assert taken == [blocks[0]]
    calls[0](x, state[0])  # the same list: bound once
    assert taken == [blocks[0]]
    # the template of a shared trace is the block called last with its signature: block 0 changed
    # (a different eps) after it traced still leaves block 1 tracing block 1's own code
    calls[1](x, state[1])
    shared = next(iter(cache.values()))
    assert shared.template is blocks[1]
    blocks[0].norm_ffn.eps = 0.5
    again = block_compile.compile_alike(blocks, "__call__", cache)
    z, _ = again[1](x[:, :3], state[1])  # a new shape: traced with block 1
    assert float(mx.abs(z - blocks[1](x[:, :3], state[1])[0]).max()) <= 1e-5
    assert len(cache) == 1  # block 0 has not been called since it changed
    again[0](x, state[0])
    assert len(cache) == 2
    assert block_compile.signature_count(blocks) == 2


def test_queued_prefill_keeps_at_most_two_layers_in_flight_across_pieces(monkeypatch):
    # On a GPU each layer is queued and the host waits for the one before it; a layer queued and
    # not yet waited for holds its buffers. At a piece's seam the host must wait for the last
    # piece's last layer before queuing a second layer of the next (three in flight there put
    # ~4 GiB on a 7B 131k-token prefill on an H100).
    model = tiny_model(seed=11, num_blocks=3).fuse_projections()
    ids = _ids(40, batch=1)
    reference, _ = model.prefill(ids, chunk_size=16)  # CPU: layer by layer
    queued, waited, most = [], [0], [0]  # the queued layers' output lists (kept: ids stay unique)
    real_async, real_eval = mx.async_eval, mx.eval

    def async_eval(*args):
        if len(args) == 1 and isinstance(args[0], list):  # one layer's outputs
            queued.append(args[0])
            most[0] = max(most[0], len(queued) - waited[0])
        return real_async(*args)

    def evaluate(*args):
        for index, layer in enumerate(queued):
            if len(args) == 1 and args[0] is layer:  # the stream runs in order: all before it ran
                waited[0] = max(waited[0], index + 1)
        return real_eval(*args)

    monkeypatch.setattr(xl, "_queue_layers", lambda: True)  # as on a GPU
    monkeypatch.setattr(mx, "async_eval", async_eval)
    monkeypatch.setattr(mx, "eval", evaluate)
    logits, _ = model.prefill(ids, chunk_size=16)  # three pieces of 16, 16 and 8 tokens
    assert len(queued) == 9  # every layer of every piece queued
    assert most[0] == 2
    assert float(mx.abs(logits - reference).max()) <= 1e-5 * float(mx.abs(reference).max())
