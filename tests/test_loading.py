"""Checkpoint loading/saving: round trips, dtypes, sharding, and every loading error."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model

from xlstm_metal import load, load_model, save_model
from xlstm_metal.loading import CheckpointError

IDS = mx.array(np.random.default_rng(0).integers(0, 97, size=(2, 19)).astype(np.int32))


def logits_of(model):
    return np.array(model(IDS)[0].astype(mx.float32))


def test_round_trip_single_file(tiny_model_dir):
    model = load_model(tiny_model_dir)
    np.testing.assert_array_equal(logits_of(model), logits_of(tiny_model()))
    assert not (tiny_model_dir / "model.safetensors.index.json").exists()
    assert (tiny_model_dir / "config.json").stat().st_mode & 0o777 == 0o644


def test_round_trip_sharded(tmp_path):
    source = tiny_model()
    save_model(source, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    np.testing.assert_array_equal(logits_of(load_model(tmp_path / "sharded")), logits_of(source))


def test_dtype_kept_unless_given(tmp_path):
    model = tiny_model()
    model.set_dtype(mx.bfloat16)
    save_model(model, tmp_path / "bf16")
    loaded = load_model(tmp_path / "bf16")
    assert loaded.backbone.blocks[0].mlstm_layer.q.weight.dtype == mx.bfloat16
    as_f32 = load_model(tmp_path / "bf16", dtype="float32")
    assert as_f32.lm_head.weight.dtype == mx.float32
    logits, state = as_f32(IDS)
    assert state[0][0].dtype == mx.float32  # the state dtype follows inference_state_dtype
    with pytest.raises(ValueError, match="dtype must be"):
        load_model(tmp_path / "bf16", dtype="int8")


def test_load_returns_model_and_tokenizer_slot(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    assert tokenizer is None  # no tokenizer.json in this checkpoint
    assert model.config.vocab_size == 97


def test_save_refuses_to_overwrite(tiny_model_dir):
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        save_model(tiny_model(), tiny_model_dir)
    save_model(tiny_model(seed=5), tiny_model_dir, overwrite=True)
    np.testing.assert_array_equal(logits_of(load_model(tiny_model_dir)), logits_of(tiny_model(seed=5)))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_model(tmp_path / "nope")


def test_missing_config(tiny_model_dir):
    (tiny_model_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tiny_model_dir)


def test_invalid_config_json(tiny_model_dir):
    (tiny_model_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(tiny_model_dir)


def test_config_missing_field_and_bad_heads(tiny_model_dir):
    path = tiny_model_dir / "config.json"
    config = json.loads(path.read_text())
    del config["vocab_size"]
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing required field.*vocab_size"):
        load_model(tiny_model_dir)
    config["vocab_size"] = 97
    config["num_heads"] = 3
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not divisible by num_heads = 3"):
        load_model(tiny_model_dir)


def test_missing_weights_file(tiny_model_dir):
    (tiny_model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tiny_model_dir)


def test_truncated_weights_file(tiny_model_dir):
    path = tiny_model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read weight file .*model.safetensors"):
        load_model(tiny_model_dir)


def test_missing_shard(tmp_path):
    save_model(tiny_model(), tmp_path / "s", max_shard_bytes=60_000)
    second = sorted((tmp_path / "s").glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(CheckpointError, match=f"weight file missing: .*{second.name}"):
        load_model(tmp_path / "s")


def test_missing_unexpected_misshaped_listed_together(tiny_model_dir):
    path = tiny_model_dir / "model.safetensors"
    weights = mx.load(str(path))
    del weights["backbone.blocks.0.mlstm_layer.q.weight"]
    weights["backbone.blocks.0.extra.weight"] = mx.zeros((2,))
    weights["lm_head.weight"] = mx.zeros((5, 64))
    mx.save_safetensors(str(path), weights)
    with pytest.raises(CheckpointError) as info:
        load_model(tiny_model_dir)
    message = str(info.value)
    assert "1 missing tensor(s)" in message and "backbone.blocks.0.mlstm_layer.q.weight" in message
    assert "1 unexpected tensor(s)" in message and "backbone.blocks.0.extra.weight" in message
    assert "1 mis-shaped tensor(s)" in message and "lm_head.weight: checkpoint (5, 64), model (97, 64)" in message
