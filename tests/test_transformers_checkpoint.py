"""Checkpoints written by transformers' xLSTMForCausalLM.save_pretrained load and give its logits."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import xLSTMConfig as HFxLSTMConfig
from transformers import xLSTMForCausalLM

from xlstm_metal import load_model, save_model


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


@pytest.fixture(scope="module")
def hf_model():
    config = HFxLSTMConfig(
        vocab_size=101, hidden_size=128, num_hidden_layers=2, num_heads=2, chunk_size=16,  # E % 128 == 0: transformers and NX-AI agree on qk_dim
        autocast_kernel_dtype="float32",
    )
    torch.manual_seed(0)
    return randomize_weights(xLSTMForCausalLM(config).eval())


def randomize_weights(model, seed: int = 0):
    """Gate biases over a wide range and matrices at scale 0.3 (seeded): logits that would tell a
    wrong gate or projection apart, unlike transformers' near-zero initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate_preact.bias"):
                param.copy_(torch.empty_like(param).uniform_(-5, 7, generator=gen))
            elif param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_checkpoint_gives_hf_logits(hf_model, tmp_path, sharded):
    out = tmp_path / "hf"
    hf_model.save_pretrained(out, max_shard_size="40KB" if sharded else "5GB")
    assert (out / "model.safetensors.index.json").exists() == sharded
    ids = np.random.default_rng(1).integers(0, 101, size=(2, 45))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    model = load_model(out)
    logits, _ = model(mx.array(ids.astype(np.int32)))
    assert rel_err(np.array(logits), ref) <= 1e-4


def test_our_checkpoint_loads_in_transformers(hf_model, tmp_path):
    """save_model writes the exact HF format: transformers reads it back to the same logits."""
    src = tmp_path / "hf"
    hf_model.save_pretrained(src)
    ours = load_model(src)
    save_model(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "xlstm" and config["hidden_size"] == 128
    reloaded = xLSTMForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.tensor(np.random.default_rng(2).integers(0, 101, size=(1, 20)))
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits.numpy(), hf_model(ids).logits.numpy()) <= 1e-6


def test_tied_config_with_a_head_trained_apart_gives_transformers_logits(tmp_path):
    """transformers' xLSTMForCausalLM never ties its LM head: a checkpoint it writes with
    tie_word_embeddings=true (a tied model of ours fine-tuned there) holds a head of its own.
    load_model, mlx-lm's model and a re-save all give transformers' logits (the head was
    dropped: the embeddings gave other logits)."""
    from xlstm_metal.loading import read_weights
    from xlstm_metal.mlx_lm_model import Model, ModelArgs

    config = HFxLSTMConfig(vocab_size=101, hidden_size=128, num_hidden_layers=2, num_heads=2, chunk_size=16,
                           autocast_kernel_dtype="float32", tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = xLSTMForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    ids = np.random.default_rng(3).integers(0, 101, size=(1, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    x = mx.array(ids.astype(np.int32))
    ours = load_model(tmp_path / "hf")
    assert rel_err(np.array(ours(x)[0]), ref) <= 1e-4
    view = Model(ModelArgs.from_dict(json.loads((tmp_path / "hf" / "config.json").read_text())))
    view.load_weights(list(view.sanitize(read_weights(tmp_path / "hf")).items()), strict=True)
    assert rel_err(np.array(view(x)), ref) <= 1e-4
    save_model(ours, tmp_path / "ours")
    with torch.no_grad():
        again = xLSTMForCausalLM.from_pretrained(tmp_path / "ours").eval()(torch.tensor(ids)).logits.numpy()
    assert rel_err(np.array(load_model(tmp_path / "ours")(x)[0]), ref) <= 1e-4 and rel_err(again, ref) <= 1e-6


def test_widths_transformers_cannot_run_are_named_when_saved(tmp_path):
    """transformers' xLSTMConfig rounds q/k and v widths up to multiples of 64 (NX-AI's model and
    ours do not): a width-64 model (qk_dim 32) saved here warns, and transformers indeed fails
    on it; at width 128 (qk_dim 64) nothing is said and transformers gives our logits."""
    from conftest import tiny_model

    with pytest.warns(UserWarning, match="qk_dim 32 .* not a multiple of 64"):
        save_model(tiny_model(), tmp_path / "w64")
    hf = xLSTMForCausalLM.from_pretrained(tmp_path / "w64").eval()
    with pytest.raises(RuntimeError), torch.no_grad():
        hf(torch.tensor([[1, 2, 3]]))

    import warnings

    model = tiny_model(embedding_dim=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_model(model, tmp_path / "w128")
    ids = np.random.default_rng(3).integers(0, 97, size=(1, 12))
    with torch.no_grad():
        ref = xLSTMForCausalLM.from_pretrained(tmp_path / "w128").eval()(torch.tensor(ids)).logits.numpy()
    logits, _ = model(mx.array(ids.astype(np.int32)))
    assert rel_err(np.array(logits), ref) <= 1e-4


def _biased_hf_model() -> xLSTMForCausalLM:
    """transformers' model with use_bias=True (norm and projection biases), every parameter
    random: biases N(0, 0.3), norm weights U(0.5, 1.5), gate biases U(-5, 7)."""
    config = HFxLSTMConfig(vocab_size=101, hidden_size=128, num_hidden_layers=2, num_heads=2, chunk_size=16,
                           autocast_kernel_dtype="float32", use_bias=True)
    torch.manual_seed(0)
    model = xLSTMForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate_preact.bias"):
                param.copy_(torch.empty_like(param).uniform_(-5, 7, generator=gen))
            elif "norm" in name and name.endswith(".weight"):
                param.copy_(torch.empty_like(param).uniform_(0.5, 1.5, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


def test_biased_checkpoint_gives_transformers_logits_and_saves_back(tmp_path):
    """use_bias=True: norm_mlstm, norm_ffn and multihead_norm carry a bias beside the projections'
    (out_norm none, in transformers): each is a parameter under its checkpoint key, used by the
    forward, the fused prefill and the decode steps (their kernels have no bias: the modules run);
    a re-save holds exactly transformers' keys, and transformers and mlx-lm read it back."""
    from mlx.utils import tree_flatten

    from xlstm_metal.loading import read_weights
    from xlstm_metal.mlx_lm_model import Model, ModelArgs

    hf = _biased_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(5).integers(0, 101, size=(2, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    x = mx.array(ids.astype(np.int32))
    ours = load_model(tmp_path / "hf")
    params = dict(tree_flatten(ours.parameters()))
    assert set(params) == set(hf.state_dict())
    for key in ("norm_mlstm.bias", "norm_ffn.bias", "mlstm_layer.multihead_norm.bias"):
        np.testing.assert_array_equal(np.array(params[f"backbone.blocks.1.{key}"]),
                                      hf.state_dict()[f"backbone.blocks.1.{key}"].numpy())
    assert rel_err(np.array(ours(x)[0]), ref) <= 1e-4

    ours.fuse_projections()  # the inference fast paths: fused prefill, the fused decode step
    last, state = ours.prefill(x[:, :36])
    assert rel_err(np.array(last), ref[:, 35]) <= 1e-4
    for t in range(36, 40):
        logits, state = ours(x[:, t : t + 1], state)
        assert rel_err(np.array(logits[:, 0]), ref[:, t]) <= 1e-4

    save_model(ours, tmp_path / "ours")
    assert set(read_weights(tmp_path / "ours")) == set(hf.state_dict())
    with torch.no_grad():
        again = xLSTMForCausalLM.from_pretrained(tmp_path / "ours").eval()(torch.tensor(ids)).logits.numpy()
    assert rel_err(again, ref) <= 1e-6
    view = Model(ModelArgs.from_dict(json.loads((tmp_path / "ours" / "config.json").read_text())))
    view.load_weights(list(view.sanitize(read_weights(tmp_path / "ours")).items()), strict=True)
    assert rel_err(np.array(view(x)), ref) <= 1e-4


def test_fast_paths_run_biased_norms_as_their_modules(monkeypatch):
    """The fused kernels have no norm bias: with them claimed on (a launch fails on a CPU), the
    add + RMSNorm, the output norm + gate, the decode chain's norm stages and the training
    step's residual norm all leave a biased norm to its module, and the values keep the bias."""
    import mlx.nn as nn

    from xlstm_metal.blocks import xlstm_large as blocks
    from xlstm_metal.cells.norms import BiasedMultiHeadLayerNorm, BiasedRMSNorm
    from xlstm_metal.kernels.fast import decode
    from xlstm_metal.kernels.fast import decode_chain as chain
    from xlstm_metal.kernels.fast.skinny import uses_norm_gate_product

    from conftest import tiny_model

    monkeypatch.setattr(decode, "_kernels_on", lambda: True)
    monkeypatch.setattr(chain, "_kernels_on", lambda: True)
    rng = np.random.default_rng(6)

    def rand(*shape, dtype=mx.bfloat16):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    norm = BiasedRMSNorm(256)
    norm.weight, norm.bias = rand(256), rand(256)
    x, y = rand(2, 1, 256), rand(2, 1, 256)
    s, xn = decode.add_rms_norm(x, y, norm)
    assert mx.array_equal(s, x + y) and mx.array_equal(xn, norm(x + y))
    assert not mx.array_equal(xn, mx.fast.rms_norm(x + y, norm.weight, norm.eps))  # the bias is in
    mh = BiasedMultiHeadLayerNorm(2, 64)
    mh.weight, mh.bias = rand(128), rand(128)
    h, o = rand(2, 2, 1, 64), rand(2, 1, 128)
    assert mx.array_equal(decode.output_norm_gate(h, o, mh), mx.sigmoid(o) * mh(h.transpose(0, 2, 1, 3)))
    layer = nn.QuantizedLinear(256, 128, bias=False, group_size=64, bits=4)
    layer.scales, layer.biases = layer.scales.astype(mx.bfloat16), layer.biases.astype(mx.bfloat16)
    arrays = chain.quantized_arrays(layer, 2)
    assert arrays is not None and not chain.norm_chain_supported(x, y, norm, arrays)
    out = rand(256, 128)
    assert not chain.gate_chain_supported(h, o, 0, mh, x, (out, *arrays[1:]))
    assert not uses_norm_gate_product(h, o, mh, out)

    # The training step's residual norm (CUDA, XLSTM_METAL_TRAIN_NORM_RESIDUAL=1) has no bias either.
    block = tiny_model(use_bias=True).backbone.blocks[0]
    for name in ("norm_mlstm", "norm_ffn"):
        block[name].bias = rand(64, dtype=mx.float32)
    xs = rand(1, 5, 64, dtype=mx.float32)
    expected, _ = block(xs)
    monkeypatch.setattr(blocks, "traced_fusion_active", lambda: True)
    monkeypatch.setattr(blocks, "residual_norm_supported", lambda *_: True)
    got, _ = block(xs)
    assert mx.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_saved_dtype_is_the_weights_dtype(tmp_path):
    """transformers loads in config.json's dtype, mlx-lm's convert casts to its torch_dtype: a
    bf16 checkpoint loaded here as float32 and changed (trained) kept the source's
    "bfloat16", and transformers rounded every weight to bf16 (logits off by ~2e-2). The saved
    config names the weights' dtype: transformers and mlx-lm keep the float32 weights."""
    from mlx.utils import tree_map

    from conftest import tiny_model
    from xlstm_metal.loading import read_weights

    source = tiny_model(5, embedding_dim=128)
    source.set_dtype(mx.bfloat16)
    save_model(source, tmp_path / "ours_bf16")
    xLSTMForCausalLM.from_pretrained(tmp_path / "ours_bf16").save_pretrained(tmp_path / "hf_bf16")
    config_path = tmp_path / "hf_bf16" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["dtype"] == "bfloat16"
    config_path.write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))  # as transformers 4 wrote it

    model = load_model(tmp_path / "hf_bf16", dtype="float32")
    model.update(tree_map(lambda v: v * 1.001, model.parameters()))  # a float32 training step's change
    save_model(model, tmp_path / "f32")
    saved = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert saved["dtype"] == saved["torch_dtype"] == "float32"
    ids = np.random.default_rng(6).integers(0, 97, size=(1, 16))
    expected = np.array(model(mx.array(ids.astype(np.int32)))[0])
    with torch.no_grad():
        hf = xLSTMForCausalLM.from_pretrained(tmp_path / "f32").eval()
        assert hf.dtype == torch.float32 and rel_err(hf(torch.tensor(ids)).logits.numpy(), expected) <= 1e-4
    pytest.importorskip("mlx_lm")
    from mlx_lm.convert import convert

    convert(str(tmp_path / "f32"), mlx_path=str(tmp_path / "mlx"), trust_remote_code=True)
    assert {v.dtype for v in read_weights(tmp_path / "mlx").values()} == {mx.float32}
    assert json.loads((tmp_path / "ours_bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_out_norm_is_the_one_the_checkpoint_holds(tmp_path):
    """transformers' xLSTMModel applies an out norm whatever add_out_norm says (and never gives
    it a bias); NX-AI's native model follows add_out_norm and use_bias (a biased out norm). The
    loaders (load_model, mlx-lm's sanitize) build the out norm the weights hold: transformers'
    add_out_norm=false checkpoint and NX-AI's use_bias one (both refused as unexpected tensors)
    give their own logits; saving either kind, which transformers cannot run as it is, warns."""
    import warnings

    from test_parity_nxai import official_model, save_native

    from xlstm_metal.loading import read_weights
    from xlstm_metal.mlx_lm_model import Model, ModelArgs

    config = HFxLSTMConfig(vocab_size=101, hidden_size=128, num_hidden_layers=2, num_heads=2, chunk_size=16,
                           autocast_kernel_dtype="float32", add_out_norm=False)
    torch.manual_seed(0)
    hf = xLSTMForCausalLM(config).eval()
    with torch.no_grad():
        hf.backbone.out_norm.weight.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["add_out_norm"] is False
    native, native_config = official_model(seed=2, use_bias=True)
    save_native(native, native_config, tmp_path / "native")
    assert "backbone.out_norm.bias" in read_weights(tmp_path / "native")

    for name, reference, vocab in (("hf", lambda ids: hf(ids).logits, 101), ("native", lambda ids: native(ids)[0], 97)):
        ids = np.random.default_rng(7).integers(0, vocab, size=(2, 21))
        with torch.no_grad():
            ref = reference(torch.tensor(ids)).numpy()
        x = mx.array(ids.astype(np.int32))
        ours = load_model(tmp_path / name)
        assert ours.config.add_out_norm and ("bias" in ours.backbone.out_norm) == (name == "native")
        assert rel_err(np.array(ours(x)[0]), ref) <= 1e-4
        path = tmp_path / name
        view = Model(ModelArgs.from_dict(json.loads((path / "config.json").read_text())))
        view.load_weights(list(view.sanitize(read_weights(path)).items()), strict=True)
        assert rel_err(np.array(view(x)), ref) <= 1e-4
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            save_model(ours, tmp_path / f"{name}_ours")
        assert any("out_norm.bias" in str(w.message) for w in warned) == (name == "native")
        assert rel_err(np.array(load_model(tmp_path / f"{name}_ours")(x)[0]), ref) <= 1e-4

    from conftest import tiny_model

    with pytest.warns(UserWarning, match="no out norm .* transformers' xLSTMForCausalLM applies one"):
        save_model(tiny_model(add_out_norm=False), tmp_path / "no_out_norm")


def test_nxai_fused_layout_saves_as_the_single_layout(tmp_path):
    """NX-AI's weight_mode='fused' tensors (qkv_opreact, ifgate_preact, proj_up_gate_z) are split
    as they load, and save_model writes them split: its config.json says weight_mode 'single'
    (it kept 'fused', and transformers built fused layers for split tensors: a traceback in its
    weight init, or random layers), so transformers gives NX-AI's logits."""
    from test_parity_nxai import official_model, save_native

    native, config = official_model(seed=3, weight_mode="fused", embedding_dim=128)
    ours = load_model(save_native(native, config, tmp_path / "native"))
    save_model(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["weight_mode"] == "single"
    ids = np.random.default_rng(8).integers(0, 97, size=(1, 19))
    with torch.no_grad():
        ref = native(torch.tensor(ids))[0].numpy()
        hf = xLSTMForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert rel_err(hf(torch.tensor(ids)).logits.numpy(), ref) <= 1e-4
    assert rel_err(np.array(load_model(tmp_path / "ours")(mx.array(ids.astype(np.int32)))[0]), ref) <= 1e-4
