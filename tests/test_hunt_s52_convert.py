"""convert, generate, chat and mlx-lm corners (session 52 hunt). Tiny seeded models; nothing
downloads."""

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS before mlx is imported)

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from test_convert_roundtrips import _native_2024, _native_large, hf_dir  # noqa: F401  (fixture)

from xlstm_metal import load
from xlstm_metal.checkpoint_files import MLX_LM_SHIM, SHIM_SOURCE
from xlstm_metal.cli import main

mlx_lm = pytest.importorskip("mlx_lm")


@pytest.mark.parametrize("source", ["transformers", "native_large", "native_2024"])
def test_mlx_lm_convert_of_a_foreign_source_opens_in_plain_mlx_lm_load(source, hf_dir, tmp_path, capsys,
                                                                      monkeypatch):
    """`xlstm-metal mlx-lm convert` and `fuse` of a checkpoint without our model
    file wrote config.json with model type xlstm and no model file: mlx_lm.load outside our CLI
    refused it ("Model type xlstm not supported"). It now carries the file, as ours do."""
    if source == "transformers":
        src = hf_dir
    else:
        src = tmp_path / "src"
        (_native_large if source == "native_large" else _native_2024)(src)
    out = tmp_path / "mlx"
    if source == "transformers":  # fuse: LoRA adapters (one step) folded into the weights
        data = tmp_path / "data"
        data.mkdir()
        for split in ("train", "valid"):
            (data / f"{split}.jsonl").write_text('{"text": "the cat sat on the mat"}\n' * 2)
        assert main(["mlx-lm", "lora", "--model", str(src), "--train", "--data", str(data), "--iters", "1",
                     "--batch-size", "1", "--val-batches", "1", "--adapter-path", str(tmp_path / "ad")]) == 0
        assert main(["mlx-lm", "fuse", "--model", str(src), "--adapter-path", str(tmp_path / "ad"),
                     "--save-path", str(out)]) == 0
    else:
        assert main(["mlx-lm", "convert", "--hf-path", str(src), "--mlx-path", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["model_file"] == MLX_LM_SHIM
    assert (out / MLX_LM_SHIM).read_text() == SHIM_SOURCE
    monkeypatch.delitem(sys.modules, "mlx_lm.models.xlstm", raising=False)  # what our CLI registered
    model, _ = mlx_lm.load(str(out), trust_remote_code=True)
    ids = mx.array([[1, 2, 3, 4, 5]])
    ours, _ = load(out, dtype="float32")
    assert np.allclose(np.array(model(ids)), np.array(ours(ids)[0]), atol=1e-4)


def test_convert_q_names_the_layers_its_group_size_leaves_in_float(tmp_path, capsys):
    """A 2024 model 32 wide at the default group 64: -q kept its embedding, LM head and up
    projections in float (26.6 bits per weight) without a word. It now names them; the i/f
    gates the recipe keeps in float are not named, and group 32 quantizes them all."""
    src = tmp_path / "src"
    _native_2024(src)
    assert main(["convert", str(src), str(tmp_path / "q64"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: 5 layers stay in float (input width not a multiple of the group size" in err
    assert "lm_head, token_embedding" in err and "igate" not in err
    assert main(["convert", str(src), str(tmp_path / "q32"), "-q", "--q-group-size", "32"]) == 0
    assert "stay in float" not in capsys.readouterr().err


@pytest.mark.parametrize("value", ["no", 0, "false"])
def test_generation_configs_do_sample_must_be_a_boolean(tmp_path, value):
    # `"do_sample": "no"` was read as true: sampling switched on, against the file's word.
    from xlstm_metal.cli import UsageError
    from xlstm_metal.cli.generate import read_generation_config

    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": value, "temperature": 0.5}))
    with pytest.raises(UsageError, match=r"do_sample must be true or false, got .* \(from "):
        read_generation_config(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.5}))
    assert read_generation_config(tmp_path) == ({}, None)
