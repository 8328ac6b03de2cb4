"""What the loader refuses, and how it says so: config fields of the wrong type or unknown,
weights holding NaN/inf, broken safetensors headers and shard indexes, a tokenizer larger than
the model. Each is a CheckpointError naming the file / field / tensors, exit 2 on the CLI."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import pytest
from conftest import tiny_model
from test_tokenizer import train_tiny_tokenizer

from xlstm_metal import load, load_model, save_model
from xlstm_metal.cli import main
from xlstm_metal.config import PASSTHROUGH_FIELDS, ConfigError, xLSTMConfig
from xlstm_metal.loading import CheckpointError, non_finite_tensors

BASE = dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97)


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("field, value, message", [
    ("use_bias", "false", "'use_bias' must be a boolean (true/false), got 'false' (a string)"),
    ("num_heads", 2.0, "'num_heads' must be an integer, got 2.0 (a number)"),
    ("norm_eps", "1e-6", "'norm_eps' must be a number, got '1e-6' (a string)"),
    ("gate_soft_cap", [15], "'gate_soft_cap' must be a number or null, got [15] (a list)"),
    ("eos_token_id", [2, "x"], "'eos_token_id' must be an integer or a list of integers or null"),
    ("chunkwise_kernel", 3, "'chunkwise_kernel' must be a string, got 3 (an integer)"),
    ("tie_word_embeddings", 1, "'tie_word_embeddings' must be a boolean"),
    ("norm_eps", -1.0, "'norm_eps' must be a finite number > 0"),
])
def test_wrong_type_names_the_field(tiny_model_dir, capsys, field, value, message):
    edit_config(tiny_model_dir, **{field: value})
    with pytest.raises(CheckpointError) as info:
        load_model(tiny_model_dir)
    assert message in str(info.value) and "config.json" in str(info.value)
    assert "missing tensor" not in str(info.value)
    assert main(["generate", "-m", str(tiny_model_dir), "--info"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_field_suggests_the_closest_name(tiny_model_dir, capsys):
    edit_config(tiny_model_dir, num_hedas=4, zzz_unrelated=1)
    with pytest.raises(CheckpointError, match=r"'num_hedas' \(did you mean 'num_heads'\?\), 'zzz_unrelated'$"):
        load_model(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"'embeding_dim' \(did you mean 'embedding_dim'\?\)"):
        xLSTMConfig.from_dict({**BASE, "embeding_dim": 3})
    assert main(["generate", "-m", str(tiny_model_dir), "--info"]) == 2
    assert "did you mean 'num_heads'" in capsys.readouterr().err


def test_standard_hugging_face_fields_pass_quietly(tiny_model_dir):
    standard = {"architectures": ["xLSTMForCausalLM"], "model_type": "xlstm", "torch_dtype": "float32",
                "dtype": "float32", "transformers_version": "4.57.0", "bos_token_id": 0, "eos_token_id": [2, 3],
                "pad_token_id": 1, "model_file": "model.safetensors", "auto_map": {"AutoConfig": "x.Config"}, "use_cache": True,
                "_name_or_path": "NX-AI/xLSTM-7b", "_commit_hash": "abc"}
    assert set(standard) - {"bos_token_id", "eos_token_id", "pad_token_id"} - {k for k in standard if k[0] == "_"} \
        <= PASSTHROUGH_FIELDS
    assert {"quantization", "quantization_config"} <= PASSTHROUGH_FIELDS  # read by the quantized loader
    edit_config(tiny_model_dir, **standard)
    model = load_model(tiny_model_dir)
    assert model.config.eos_token_id == [2, 3] and model.config.extra["auto_map"] == standard["auto_map"]
    assert model.config.to_dict()["model_file"] == "model.safetensors"


def test_non_finite_weights_are_named(tiny_model_dir, capsys):
    path = tiny_model_dir / "model.safetensors"
    weights = mx.load(str(path))
    nan_key, inf_key = "backbone.blocks.0.mlstm_layer.q.weight", "lm_head.weight"
    weights[nan_key] = mx.where(mx.arange(weights[nan_key].size).reshape(weights[nan_key].shape) == 7,
                                mx.array(float("nan")), weights[nan_key])
    weights[inf_key] = mx.concatenate([weights[inf_key][:-1], mx.full((1, 64), -float("inf"))])
    mx.save_safetensors(str(path), weights)
    assert sorted(non_finite_tensors(weights)) == sorted([nan_key, inf_key])
    with pytest.raises(CheckpointError, match="NaN or infinite values in 2 tensor") as info:
        load_model(tiny_model_dir)
    assert nan_key in str(info.value) and inf_key in str(info.value)
    assert load_model(tiny_model_dir, check_finite_weights=False) is not None  # opt-out loads
    assert main(["generate", "-m", str(tiny_model_dir), "--info"]) == 2
    err = capsys.readouterr().err
    assert nan_key in err and "Traceback" not in err


def test_non_finite_check_ignores_integer_tensors():
    arrays = {"ids": mx.array([1, 2, 3]), "ok": mx.ones((3,)), "bad": mx.array([0.0, float("inf")]).astype(mx.bfloat16)}
    assert non_finite_tensors(arrays) == ["bad"]
    assert non_finite_tensors({}) == []


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_negative_shape_in_safetensors_header(tiny_model_dir):
    # mx.load alone accepts this header and returns an array of shape (-64, -97).
    def edit(header):
        header["lm_head.weight"]["shape"] = [-a for a in header["lm_head.weight"]["shape"]]

    _rewrite_header(tiny_model_dir / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match="cannot read weight file .*model.safetensors"):
        load_model(tiny_model_dir)


@pytest.mark.parametrize("index, message", [
    ({"weight_map": []}, "'weight_map' must be a non-empty object"),
    ({"metadata": {}}, "'weight_map' must be a non-empty object"),
    ({"weight_map": {"lm_head.weight": "../model.safetensors"}}, "not a file name in the checkpoint"),
    ({"weight_map": {"lm_head.weight": 3}}, "not a file name in the checkpoint"),
    ([1, 2], "must hold a JSON object"),
])
def test_bad_shard_index(tmp_path, index, message):
    save_model(tiny_model(), tmp_path / "s", max_shard_bytes=60_000)
    (tmp_path / "s" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "s")
    (tmp_path / "s" / "model.safetensors.index.json").write_bytes(b'{"weight_map": "\xff"}')
    with pytest.raises(CheckpointError, match="index.json is not valid JSON"):
        load_model(tmp_path / "s")


def test_tokenizer_larger_than_the_model(tmp_path):
    save_model(tiny_model(), tmp_path / "m")  # vocab 97
    train_tiny_tokenizer().save(str(tmp_path / "m" / "tokenizer.json"))  # 320 tokens
    with pytest.raises(CheckpointError, match="tokenizer.json has 320 tokens but the model's vocabulary is 97"):
        load(tmp_path / "m")
