"""Connectors: bit-exact round trips MLX <-> PyTorch <-> NumPy (bfloat16 too), shared memory
where promised, parameter trees in NX-AI's names, states in NX-AI's layout."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import tiny_model

from xlstm_metal import connectors as cn

DTYPES = ["float32", "bfloat16", "float16", "int32", "int64", "uint8", "bool_"]


def _sample(dtype: str) -> mx.array:
    x = mx.random.normal((3, 5, 7), key=mx.random.key(1)) * 100
    if dtype == "bool_":
        return x > 0
    out = x.astype(getattr(mx, dtype))
    mx.eval(out)
    return out


def _bits(x: mx.array) -> np.ndarray:
    if x.dtype in (mx.bfloat16, mx.float16):
        return np.array(x.view(mx.uint16))
    return np.array(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trips_are_bit_exact(dtype):
    x = _sample(dtype)
    via_torch = cn.to_mlx(cn.to_torch(x))
    via_numpy = cn.to_mlx(cn.to_numpy(x), dtype=dtype)
    via_both = cn.to_mlx(cn.to_torch(cn.to_numpy(x)), dtype=dtype) if dtype != "bfloat16" else \
        cn.to_mlx(cn.bf16_bits_to_torch(cn.to_numpy(x, bf16="bits")))
    for y in (via_torch, via_numpy, via_both):
        assert y.dtype == x.dtype and y.shape == x.shape
        assert np.array_equal(_bits(y), _bits(x))


def test_bf16_special_values_and_widening():
    bits = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x3F81], dtype=np.uint16)  # +-0, +-inf, NaN, subnormal
    x = cn.to_mlx(bits, dtype="bfloat16")
    assert np.array_equal(cn.to_numpy(x, bf16="bits"), bits)
    t = cn.to_torch(x)
    assert t.dtype == torch.bfloat16 and np.array_equal(t.view(torch.int16).numpy().view(np.uint16), bits)
    assert np.array_equal(cn.to_numpy(t, bf16="bits"), bits)
    wide = cn.to_numpy(x, bf16="float32")
    assert wide.dtype == np.float32 and (wide.view(np.uint32) >> 16 == bits).all()


def test_memory_is_shared_where_promised():
    x = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    mx.eval(x)
    a, t = cn.to_numpy(x), cn.to_torch(x)
    assert np.shares_memory(a, np.asarray(x)) and t.data_ptr() == a.ctypes.data
    tt = torch.arange(5, dtype=torch.float32)
    n = cn.to_numpy(tt)
    tt[0] = 42.0
    assert n[0] == 42.0
    b = cn.to_torch(np.arange(4.0))
    assert b.dtype == torch.float64


def test_no_silent_casts():
    with pytest.raises(TypeError, match="do not cast"):
        cn.to_mlx(np.zeros(3, np.float32), dtype="bfloat16")


def test_parameter_trees_and_nxai_state_dict_load_into_nxai():
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    model = tiny_model(seed=2)
    model.set_dtype(mx.bfloat16)
    flat = cn.flat_parameters(model)
    tree = cn.tree_to_torch(model.parameters())
    back = cn.tree_to_mlx(tree)
    assert np.array_equal(np.array(back["backbone"]["blocks"][1]["ffn"]["proj_down"]["weight"].view(mx.uint16)),
                          np.array(model.backbone.blocks[1].ffn.proj_down.weight.view(mx.uint16)))
    sd = cn.nxai_state_dict(model)
    assert "embedding.weight" in sd and sd["embedding.weight"].dtype == torch.bfloat16
    c = model.config
    theirs = xLSTMLarge(xLSTMLargeConfig(embedding_dim=c.embedding_dim, num_heads=c.num_heads,
                                         num_blocks=c.num_blocks, vocab_size=c.vocab_size,
                                         chunkwise_kernel="chunkwise--native_autograd",
                                         sequence_kernel="native_sequence__native", step_kernel="native"))
    theirs = theirs.to(torch.bfloat16)
    theirs.load_state_dict(sd, strict=True)  # every name and shape matches NX-AI's
    again = cn.from_nxai_state_dict(theirs.state_dict(), c)
    assert set(again) == set(flat)
    assert all(np.array_equal(np.array(again[k].view(mx.uint16)), np.array(flat[k].view(mx.uint16))) for k in flat)


def test_large_state_to_nxai_round_trip_and_continues_nxai_model():
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    model = tiny_model(seed=6)
    ids = np.random.default_rng(0).integers(0, 97, (2, 21))
    _, state = model(mx.array(ids[:, :20]))
    theirs_state = cn.state_to_nxai(model, state)
    assert sorted(theirs_state) == [0, 1] and theirs_state[0][0].shape == (2, 2, 16, 32)
    back = cn.state_from_nxai(model, theirs_state)
    for s, b in zip(state, back):
        assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(s, b))
    # NX-AI's model continues from our state exactly as ours does.
    c = model.config
    theirs = xLSTMLarge(xLSTMLargeConfig(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16,
                                         mode="inference", return_last_states=True, autocast_kernel_dtype="float32",
                                         chunkwise_kernel="chunkwise--native_autograd",
                                         sequence_kernel="native_sequence__native", step_kernel="native")).eval()
    theirs.load_state_dict(cn.nxai_state_dict(model))
    ours_next, _ = model(mx.array(ids[:, 20:]), state)
    with torch.no_grad():
        their_next, _ = theirs(torch.tensor(ids[:, 20:]), theirs_state)
    assert np.allclose(np.array(ours_next), their_next.numpy(), rtol=1e-4, atol=1e-4 * np.abs(their_next.numpy()).max())
    assert c.num_blocks == 2


def test_2024_state_round_trip_with_sqrt_dh_scaling():
    import xlstm_metal

    model = xlstm_metal.create_xlstm_model(vocab_size=50, num_layers=2, signature=(1, 1), inp_dim=32,
                                           head_dim=8, head_num=4, seed=0)
    ids = mx.array(np.random.default_rng(1).integers(0, 50, (2, 9)).astype(np.int32))
    _, state = model(ids)
    nx = cn.state_to_nxai(model, state)
    kinds = [b.kind for b in model.blocks]
    m_index = kinds.index("mLSTM")
    C_ours = np.array(state[m_index][0])
    DH = model.blocks[m_index].xlstm.mlstm_cell.head_dim
    C_nx = nx[f"block_{m_index}"]["mlstm_state"][0].numpy()
    assert DH == 16 and np.allclose(C_nx * np.sqrt(DH), C_ours, rtol=1e-6)  # NX-AI C = ours / sqrt(DH)
    back = cn.state_from_nxai(model, nx)
    for s, b in zip(state, back):
        assert len(s) == len(b)
        for x, y in zip(s, b):
            assert x.shape == y.shape and np.array_equal(np.array(x), np.array(y))  # DH = 16: sqrt(DH) = 4, exact


def _nxai_large(config, **fields):
    """NX-AI's xLSTMLarge (native torch kernels, float32) for our xLSTM-Large ``config``."""
    import dataclasses

    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    names = {f.name for f in dataclasses.fields(xLSTMLargeConfig)}
    own = {k: v for k, v in dataclasses.asdict(config).items() if k in names}
    own.update(chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
               step_kernel="native", mode="inference", return_last_states=True, autocast_kernel_dtype="float32",
               inference_state_dtype="float32", **fields)
    return xLSTMLarge(xLSTMLargeConfig(**own)).eval()


def _logits_close(ours, theirs, ids):
    with torch.no_grad():
        expected = theirs(torch.tensor(ids))[0].numpy()
    got = np.array(ours(mx.array(ids.astype(np.int32)))[0])
    assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected)), np.max(np.abs(got - expected))


@pytest.mark.parametrize("weight_mode", ["single", "fused"])
def test_use_bias_models_cross_to_nxai_and_back(weight_mode):
    """use_bias=True: every bias crosses both ways, the out norm's included (NX-AI's model has
    one, ours built from the config, like transformers', none: the export wrote no
    backbone.out_norm.bias, so NX-AI's strict load failed, and the import's bias had no place)."""
    import dataclasses

    from test_parity_nxai import official_model

    from xlstm_metal.config import xLSTMConfig
    from xlstm_metal.loading import load_weights_strict
    from xlstm_metal.models.xlstm_large import xLSTMLarge

    ids = np.random.default_rng(0).integers(0, 97, (2, 23))
    # Ours -> NX-AI: every bias random, the out norm's absent (zeros stand in).
    ours = tiny_model(seed=4, use_bias=True)
    rng = np.random.default_rng(4)
    biases = [(k, mx.array(rng.normal(0, 0.3, v.shape).astype(np.float32)))
              for k, v in cn.flat_parameters(ours).items() if k.endswith(".bias") and "gate_preact" not in k]
    assert any(".norm_mlstm." in k for k, _ in biases) and any("multihead_norm" in k for k, _ in biases)
    ours.load_weights(biases, strict=False)
    theirs = _nxai_large(ours.config)
    sd = cn.nxai_state_dict(ours)
    assert torch.count_nonzero(sd["backbone.out_norm.bias"]) == 0
    theirs.load_state_dict(sd, strict=True)
    _logits_close(ours, theirs, ids)
    # NX-AI -> ours: its own random biases, the out norm's too.
    theirs, config = official_model(seed=5, weight_mode=weight_mode, use_bias=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name.endswith(".bias") and "norm" not in name and "gate_preact" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    assert torch.count_nonzero(theirs.state_dict()["backbone.out_norm.bias"]) > 0
    ours = xLSTMLarge(xLSTMConfig.from_dict(dataclasses.asdict(config)))
    load_weights_strict(ours, cn.from_nxai_state_dict(theirs.state_dict(), ours.config, ours), "NX-AI")
    _logits_close(ours, theirs, ids)
    # ... and back into NX-AI's model (single weights): the out norm's bias is NX-AI's own.
    again = cn.nxai_state_dict(ours)
    assert torch.equal(again["backbone.out_norm.bias"], theirs.state_dict()["backbone.out_norm.bias"])
    single = _nxai_large(ours.config, weight_mode="single")
    single.load_state_dict(again, strict=True)
    _logits_close(ours, single, ids)
