"""Checkpoint interoperability corners (session 51): round trips between xlstm-metal, NX-AI's
models, transformers and mlx-lm that the main-path tests leave out. Tiny seeded models; nothing
downloads."""

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS before mlx is imported)

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from xlstm_metal import load_model, save_model
from xlstm_metal.loading import read_weights

torch = pytest.importorskip("torch")
pytest.importorskip("xlstm")


def _nxai_2024_from(config_path, config_type):
    """NX-AI's xLSTMLMModel built from our 2024 config.json (as test_xlstm_2024 builds it)."""
    from test_xlstm_2024 import (TFeedForwardConfig, TmLSTMBlockConfig, TmLSTMLayerConfig, TsLSTMBlockConfig,
                                 TsLSTMLayerConfig, TxLSTMLMModel)

    d = json.loads(config_path.read_text())
    d["context_length"] = 64  # NX-AI's mLSTM cell sizes a mask buffer from it (-1 fails there)
    cfg = config_type(
        mlstm_block=TmLSTMBlockConfig(mlstm=TmLSTMLayerConfig(**d["mlstm_block"]["mlstm"])),
        slstm_block=TsLSTMBlockConfig(slstm=TsLSTMLayerConfig(**d["slstm_block"]["slstm"]),
                                      feedforward=TFeedForwardConfig(**d["slstm_block"]["feedforward"])),
        **{k: v for k, v in d.items() if k not in ("mlstm_block", "slstm_block", "model_file")},
    )
    return TxLSTMLMModel(cfg).eval()


def test_tied_2024_checkpoint_loads_strictly_in_nxai_and_back(tmp_path):
    """NX-AI's tied xLSTMLMModel lists the tied tensor as token_embedding.weight and
    lm_head.weight; our tied 2024 checkpoints held only the first, so NX-AI's strict
    load_state_dict refused them ("Missing key(s) in state_dict: lm_head.weight"). save_model
    and mlx-lm's save (convert, fuse) now store the head too; every loader still reads them."""
    import mlx_lm
    from safetensors.torch import load_file
    from test_xlstm_2024 import TxLSTMLMModelConfig, ids_for, official, rel_err, save_official, torch_logits

    from xlstm_metal.mlx_lm_model import from_xlstm_metal

    native, cfg = official(slstm_at=(0,), num_blocks=2, tie=True, seed=5)
    ids = ids_for(seed=5)
    reference = torch_logits(native, ids)
    ours = load_model(save_official(native, cfg, tmp_path / "native"))
    assert "lm_head" not in ours
    out = save_model(ours, tmp_path / "ours")
    stored = read_weights(out)
    assert mx.array_equal(stored["lm_head.weight"], stored["token_embedding.weight"])

    nx = _nxai_2024_from(out / "config.json", TxLSTMLMModelConfig)
    nx.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert rel_err(torch_logits(nx, ids), reference) <= 1e-4

    again = load_model(out)
    assert "lm_head" not in again
    assert rel_err(np.array(again(mx.array(ids))[0]), reference) <= 1e-4
    from mlx_lm.utils import load_model as mlx_lm_load_model

    theirs, _ = mlx_lm_load_model(out, trust_remote_code=True)
    assert rel_err(np.array(theirs(mx.array(ids))), reference) <= 1e-4

    # mlx-lm's own save (behind convert and fuse) stores the head as well, and leaves the tree.
    view = from_xlstm_metal(ours)
    mlx_lm.utils.save_model(tmp_path / "direct", view)
    assert "lm_head" not in view and "lm_head" not in ours
    direct = read_weights(tmp_path / "direct")
    assert mx.array_equal(direct["lm_head.weight"], direct["token_embedding.weight"])
    nx = _nxai_2024_from(out / "config.json", TxLSTMLMModelConfig)
    nx.load_state_dict(load_file(str(tmp_path / "direct" / "model.safetensors")), strict=True)
    assert rel_err(torch_logits(nx, ids), reference) <= 1e-4

    # An untied model stores no extra tensor.
    untied = load_model(save_official(*official(slstm_at=(0,), num_blocks=2, seed=6), tmp_path / "untied_native"))
    stored = read_weights(save_model(untied, tmp_path / "untied"))
    assert set(stored) == {k for k, _ in tree_flatten(untied.parameters())}


def test_mlx_lm_wires_a_native_2024_checkpoint_from_its_weights(tmp_path):
    """load_model takes a 2024 checkpoint's block kinds from the weight names and the sLSTM
    layout from the recurrent kernel's shape; mlx-lm's model (xlstm-metal mlx-lm on NX-AI's
    directories) built the blocks from config.json alone, so a slstm_at or a backend the weights
    contradict failed its strict load ("Received 21 parameters not in model", "Expected shape
    (2, 64, 16) but received shape (2, 16, 64)"). Now both give NX-AI's logits."""
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from safetensors.torch import save_file
    from test_xlstm_2024 import ids_for, official, rel_err, state_dict, torch_logits

    from xlstm_metal.cli.mlxlm import register_model_type, tolerate_missing_model_file

    register_model_type()  # what `xlstm-metal mlx-lm` does for NX-AI's configs (no model_type)
    tolerate_missing_model_file()

    def write(name, config, tensors):
        path = tmp_path / name
        path.mkdir()
        save_file(tensors, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(config))
        return path

    # sLSTM at block 2, config.json says block 0
    model, cfg = official(seed=9, slstm_at=(2,), num_blocks=3)
    config = dataclasses.asdict(cfg)
    config["slstm_at"], config["_block_map"] = [0], "1,0,0"
    path = write("wiring", config, state_dict(model))
    # the CUDA layout of the sLSTM weights, config.json says vanilla
    cuda, cuda_cfg = official(seed=10)
    tensors = state_dict(cuda)
    cell = cuda.xlstm_block_stack.blocks[1].xlstm.slstm_cell
    tensors["xlstm_block_stack.blocks.1.xlstm.slstm_cell._recurrent_kernel_"] = (
        cell._recurrent_kernel_int2ext(cell._recurrent_kernel_).reshape(2, 16, 64).detach().contiguous())
    tensors["xlstm_block_stack.blocks.1.xlstm.slstm_cell._bias_"] = (
        cell._bias_int2ext(cell._bias_).reshape(-1).detach().contiguous())
    config = dataclasses.asdict(cuda_cfg)
    assert config["slstm_block"]["slstm"]["backend"] == "vanilla"
    layout = write("layout", config, tensors)

    for directory, native, seed in ((path, model, 9), (layout, cuda, 10)):
        ids = ids_for(seed=seed)
        reference = torch_logits(native, ids)
        assert rel_err(np.array(load_model(directory)(mx.array(ids))[0]), reference) <= 1e-4
        theirs, _ = mlx_lm_load_model(directory)
        assert rel_err(np.array(theirs(mx.array(ids))), reference) <= 1e-4
    assert [type(b).__name__ for b in mlx_lm_load_model(path)[0].blocks] == \
        ["mLSTMBlock2024", "mLSTMBlock2024", "sLSTMBlock"]


def test_quantized_head_trained_apart_of_a_tied_config_loads_here_and_in_mlx_lm(tmp_path):
    """transformers writes a tied config's LM head apart from the embeddings (it never ties);
    mlx-lm's convert -q of such a checkpoint keeps the head (untied by sanitize) and quantizes it,
    but config.json still says tied. Both loaders then took the config's word, dropped
    lm_head.weight and failed on "unexpected lm_head.scales, lm_head.biases"; a quantized head is
    now read as the head of its own it is."""
    from mlx_lm.convert import convert
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from test_tokenizer import train_tiny_tokenizer
    from transformers import xLSTMConfig as HFxLSTMConfig
    from transformers import xLSTMForCausalLM

    from xlstm_metal.cli.mlxlm import register_model_type

    register_model_type()  # as our mlx-lm commands do (an HF source carries no model file); alone, nothing had
    tokenizer = train_tiny_tokenizer()
    vocab = tokenizer.get_vocab_size()
    config = HFxLSTMConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_heads=2, chunk_size=16,
                           autocast_kernel_dtype="float32", tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = xLSTMForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in hf.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    convert(str(tmp_path / "hf"), mlx_path=str(tmp_path / "q8"), quantize=True, q_bits=8, q_group_size=64)
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.scales" in read_weights(tmp_path / "q8")

    ids = np.random.default_rng(3).integers(0, vocab, size=(1, 24))
    with torch.no_grad():
        reference = hf(torch.tensor(ids)).logits.numpy()
    ours = load_model(tmp_path / "q8")
    theirs, _ = mlx_lm_load_model(tmp_path / "q8")
    assert "lm_head" in ours and "lm_head" in theirs
    x = mx.array(ids.astype(np.int32))
    logits = np.array(ours(x)[0])
    np.testing.assert_allclose(np.array(theirs(x)), logits, rtol=1e-5, atol=1e-5)
    rel = float(np.max(np.abs(logits - reference)) / np.max(np.abs(reference)))
    assert rel <= 0.1  # 8-bit weights: transformers' logits to quantization noise


def test_mlx_lm_convert_of_an_nxai_native_checkpoint_opens_in_transformers(tmp_path, capsys):
    """`xlstm-metal mlx-lm convert` of NX-AI's native xLSTMLarge directory wrote its config.json
    as read (no hidden_size, weight_mode "fused" beside the split tensors sanitize made), so
    transformers built a 4096-wide model and refused the weights. The config is now read in the
    form save_model writes: transformers, mlx-lm and load_model give NX-AI's logits."""
    from test_parity_nxai import official_model, save_native
    from test_tokenizer import train_tiny_tokenizer
    from transformers import xLSTMForCausalLM

    from xlstm_metal.cli import main

    native, config = official_model(seed=3, weight_mode="fused", embedding_dim=128, vocab_size=320)
    source = save_native(native, config, tmp_path / "native")
    train_tiny_tokenizer().save(str(source / "tokenizer.json"))
    out = tmp_path / "out"
    assert main(["mlx-lm", "convert", "--hf-path", str(source), "--mlx-path", str(out)]) == 0
    capsys.readouterr()
    written = json.loads((out / "config.json").read_text())
    assert written["weight_mode"] == "single" and written["hidden_size"] == 128
    ids = np.random.default_rng(8).integers(0, 320, size=(1, 19))
    with torch.no_grad():
        reference = native(torch.tensor(ids))[0].numpy()
        hf = xLSTMForCausalLM.from_pretrained(out).eval()
        logits = hf(torch.tensor(ids)).logits.numpy()
    scale = np.max(np.abs(reference))
    assert np.max(np.abs(logits - reference)) / scale <= 1e-4
    assert np.max(np.abs(np.array(load_model(out)(mx.array(ids.astype(np.int32)))[0]) - reference)) / scale <= 1e-4
