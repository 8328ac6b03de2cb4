"""sLSTM: kernel, cell and neuron against NX-AI's vanilla sLSTM backend (torch, CPU, float32);
step = sequence, state continuation, both weight layouts, gradients."""

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS before mlx is imported)

import mlx.core as mx
import numpy as np
import pytest
import torch
from xlstm.blocks.slstm.layer import sLSTMLayer, sLSTMLayerConfig
from xlstm.blocks.slstm.src.vanilla import slstm_forward, slstm_pointwise_function_registry

from xlstm_metal.cells.slstm import sLSTMCell
from xlstm_metal.kernels.slstm import slstm_sequence, slstm_step, slstm_zero_state
from xlstm_metal.neurons.slstm import sLSTMNeuron

TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def np_(x):
    return np.array(x.astype(mx.float32)) if isinstance(x, mx.array) else x.detach().numpy()


def random_inputs(B=2, S=9, NH=2, DH=8, seed=0):
    rng = np.random.default_rng(seed)
    wx = rng.normal(size=(B, S, NH, 4, DH)).astype(np.float32) * 2.0
    wx[..., 0, :] += rng.uniform(-4, 4, size=(NH, DH)).astype(np.float32)  # input gates far apart
    R = rng.normal(size=(NH, DH, 4 * DH)).astype(np.float32) * 0.5
    return wx, R


def nxai_kernel(wx, R, state=None):
    """NX-AI's vanilla slstm_forward on our layouts. Returns h [B, S, NH, DH], (c, n, m, h)."""
    B, S, NH, G, DH = wx.shape
    x = torch.tensor(wx).permute(1, 0, 3, 2, 4).reshape(S, B, G * NH * DH)  # S, B, (G, NH, DH)
    R_int = torch.tensor(R).permute(0, 2, 1).contiguous()  # vanilla layout [NH, 4 DH, DH]
    b = torch.zeros(G * NH * DH)
    if state is None:
        states = torch.zeros(4, B, NH * DH)
    else:  # ours (c, n, m, h) -> NX-AI's (y, c, n, m)
        c, n, m, h = (torch.tensor(np_(s)).reshape(B, NH * DH) for s in state)
        states = torch.stack([h, c, n, m])
    all_states, last, _ = slstm_forward(x, states, R_int, b, slstm_pointwise_function_registry["slstm"])
    hs = all_states[0, 1:].reshape(S, B, NH, DH).permute(1, 0, 2, 3).numpy()
    y, c, n, m = (t.reshape(B, NH, DH).numpy() for t in last)
    return hs, (c, n, m, y)


def test_kernel_matches_nxai_vanilla():
    wx, R = random_inputs()
    h, state = slstm_sequence(mx.array(wx), mx.array(R))
    h_ref, state_ref = nxai_kernel(wx, R)
    assert rel_err(np_(h), h_ref) <= TOL
    for ours, ref in zip(state, state_ref):
        assert rel_err(np_(ours), ref) <= TOL


def test_step_equals_sequence_and_compiled_equals_eager():
    wx, R = random_inputs(S=7, seed=1)
    h_seq, st_seq = slstm_sequence(mx.array(wx), mx.array(R), compiled=True)
    state, hs = slstm_zero_state(2, 2, 8), []
    for t in range(wx.shape[1]):
        h, state = slstm_step(mx.array(wx[:, t]), mx.array(R), state, compiled=False)
        hs.append(h)
    assert rel_err(np_(mx.stack(hs, axis=1)), np_(h_seq)) <= 1e-6
    for a, b in zip(state, st_seq):
        assert rel_err(np_(a), np_(b)) <= 1e-6


def test_state_continuation_matches_nxai():
    wx, R = random_inputs(S=10, seed=2)
    h_full, st_full = slstm_sequence(mx.array(wx), mx.array(R))
    h1, st1 = slstm_sequence(mx.array(wx[:, :4]), mx.array(R))
    h2, st2 = slstm_sequence(mx.array(wx[:, 4:]), mx.array(R), st1)
    assert rel_err(np_(mx.concatenate([h1, h2], axis=1)), np_(h_full)) <= 1e-6
    for a, b in zip(st2, st_full):
        assert rel_err(np_(a), np_(b)) <= 1e-6
    # NX-AI continuing from our intermediate state gives the same second half.
    h2_ref, st2_ref = nxai_kernel(wx[:, 4:], R, st1)
    assert rel_err(np_(h2), h2_ref) <= TOL
    assert rel_err(np_(st2[2]), st2_ref[2]) <= TOL  # the stabilizer m continues too


def test_fresh_and_continued_rows_in_one_batch():
    """n == 0 marks the empty state per row: a batch mixing a fresh row and a continued row
    equals the two rows run alone (NX-AI tests n == 0 over the whole batch)."""
    wx, R = random_inputs(B=2, S=6, seed=3)
    _, st = slstm_sequence(mx.array(wx[:1, :3]), mx.array(R))
    fresh = slstm_zero_state(1, 2, 8)
    mixed = tuple(mx.concatenate([a, b], axis=0) for a, b in zip(st, fresh))
    h_mixed, _ = slstm_sequence(mx.array(wx[:, 3:]), mx.array(R), mixed)
    h_cont, _ = slstm_sequence(mx.array(wx[:1, 3:]), mx.array(R), st)
    h_fresh, _ = slstm_sequence(mx.array(wx[1:, 3:]), mx.array(R))
    assert rel_err(np_(h_mixed[:1]), np_(h_cont)) <= 1e-6
    assert rel_err(np_(h_mixed[1:]), np_(h_fresh)) <= 1e-6
    assert not np.allclose(np_(h_mixed[:1]), np_(slstm_sequence(mx.array(wx[:1, 3:]), mx.array(R))[0]))


def test_gradients_match_torch_autograd():
    wx, R = random_inputs(S=6, seed=4)
    rng = np.random.default_rng(5)
    w_out = rng.normal(size=(2, 6, 2, 8)).astype(np.float32)

    def loss(wx_, R_):
        h, (c, n, m, hl) = slstm_sequence(wx_, R_)
        return mx.sum(h * mx.array(w_out)) + mx.sum(c)

    g_wx, g_R = mx.grad(loss, argnums=(0, 1))(mx.array(wx), mx.array(R))

    twx = torch.tensor(wx, requires_grad=True)
    tR = torch.tensor(R, requires_grad=True)
    B, S, NH, G, DH = wx.shape
    x = twx.permute(1, 0, 3, 2, 4).reshape(S, B, -1)
    all_states, last, _ = slstm_forward(
        x, torch.zeros(4, B, NH * DH), tR.permute(0, 2, 1), torch.zeros(G * NH * DH),
        slstm_pointwise_function_registry["slstm"],
    )
    hs = all_states[0, 1:].reshape(S, B, NH, DH).permute(1, 0, 2, 3)
    (torch.sum(hs * torch.tensor(w_out)) + last[1].sum()).backward()
    assert rel_err(np_(g_wx), twx.grad.numpy()) <= 1e-3
    assert rel_err(np_(g_R), tR.grad.numpy()) <= 1e-3


# ----------------------------------------------------------------------------- layer level
def nxai_layer(E=32, NH=4, K=4, seed=0):
    torch.manual_seed(seed)
    cfg = sLSTMLayerConfig(embedding_dim=E, num_heads=NH, conv1d_kernel_size=K, backend="vanilla")
    layer = sLSTMLayer(cfg)
    layer.reset_parameters()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every weight off its init so a mixed-up tensor shows
        for _, p in layer.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer.eval()


def ours_from(layer, layout="vanilla"):
    E, NH, K = layer.config.embedding_dim, layer.config.num_heads, layer.config.conv1d_kernel_size
    ours = sLSTMNeuron(E, NH, K, layout=layout)
    sd = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    if layout == "cuda":  # NX-AI's CUDA layout is the vanilla cell's "external" view
        cell = layer.slstm_cell
        sd["slstm_cell._recurrent_kernel_"] = cell._recurrent_kernel_int2ext(cell._recurrent_kernel_).reshape(NH, E // NH, -1)
        sd["slstm_cell._bias_"] = cell._bias_int2ext(cell._bias_).reshape(-1)
    from mlx.utils import tree_flatten, tree_unflatten

    expected = dict(tree_flatten(ours.parameters()))
    assert set(expected) == set(sd), set(expected) ^ set(sd)
    for k, v in sd.items():
        assert tuple(expected[k].shape) == tuple(v.shape), k
    ours.update(tree_unflatten([(k, mx.array(v.detach().numpy())) for k, v in sd.items()]))
    return ours


@pytest.mark.parametrize("layout", ["vanilla", "cuda"])
@pytest.mark.parametrize("K", [4, 0])
def test_layer_forward_and_state_match_nxai(layout, K):
    layer = nxai_layer(K=K, seed=K + 1)
    ours = ours_from(layer, layout)
    x = np.random.default_rng(6).normal(size=(2, 11, 32)).astype(np.float32)
    with torch.no_grad():
        ref, ref_state = layer(torch.tensor(x), return_last_state=True)
    out, state = ours(mx.array(x))
    assert rel_err(np_(out), ref.numpy()) <= TOL
    y, c, n, m = (t.reshape(2, 4, 8).numpy() for t in ref_state["slstm_state"])
    for ours_s, ref_s in zip(state[:4], (c, n, m, y)):
        assert rel_err(np_(ours_s), ref_s) <= TOL
    if K:
        assert rel_err(np_(state[4]), ref_state["conv_state"].numpy()) <= 1e-6
    else:
        assert len(state) == 4


def test_layer_prefill_then_step_equals_nxai_forward():
    layer = nxai_layer(seed=7)
    ours = ours_from(layer)
    x = np.random.default_rng(8).normal(size=(2, 12, 32)).astype(np.float32)
    with torch.no_grad():
        ref = layer(torch.tensor(x)).numpy()
    out, state = ours(mx.array(x[:, :5]))
    outs = [np_(out)]
    for t in range(5, 12):
        o, state = ours(mx.array(x[:, t : t + 1]), state)
        outs.append(np_(o))
    assert rel_err(np.concatenate(outs, axis=1), ref) <= TOL
    # NX-AI's own step path agrees with it too (so both references say the same).
    with torch.no_grad():
        st, steps = {}, []
        conv_state, slstm_state = None, None
        for t in range(12):
            o, st = layer.step(torch.tensor(x[:, t : t + 1]), conv_state=conv_state, slstm_state=slstm_state)
            conv_state, slstm_state = st["conv_state"], st["slstm_state"]
            steps.append(o.numpy())
    assert rel_err(np.concatenate(steps, axis=1), ref) <= TOL


def test_fgate_igate_naming_quirk():
    """The module named fgate feeds the INPUT gate: swapping the two weights changes the output,
    and our neuron with swapped weights no longer matches NX-AI."""
    layer = nxai_layer(seed=9)
    ours = ours_from(layer)
    x = mx.array(np.random.default_rng(10).normal(size=(1, 6, 32)).astype(np.float32))
    with torch.no_grad():
        ref = layer(torch.tensor(np.array(x))).numpy()
    assert rel_err(np_(ours(x)[0]), ref) <= TOL
    ours.fgate.weight, ours.igate.weight = ours.igate.weight, ours.fgate.weight
    assert rel_err(np_(ours(x)[0]), ref) > 1e-2


def test_cell_layouts_agree():
    rng = np.random.default_rng(11)
    R = mx.array(rng.normal(size=(2, 8, 32)).astype(np.float32))
    b = mx.array(rng.normal(size=(2, 4, 8)).astype(np.float32))
    wx = mx.array(rng.normal(size=(1, 5, 2, 4, 8)).astype(np.float32))
    outs = []
    for layout in ("cuda", "vanilla"):
        cell = sLSTMCell(16, 2, layout)
        cell.set_from_compute_layout(R, b)
        assert np.array_equal(np_(cell.recurrent_kernel()), np_(R))
        assert np.array_equal(np_(cell.gate_bias()), np_(b))
        outs.append(np_(cell(wx)[0]))
    assert np.array_equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="layout"):
        sLSTMCell(16, 2, "triton")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        sLSTMCell(18, 4)
