"""save_model / load_model argument and content checks: bad arguments refused before anything is
written, a failed save leaving the old checkpoint (bytes and logits) as it was, non-float weights
and dtypes refused at load."""

import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model

from xlstm_metal import load_model, save_model
from xlstm_metal.errors import CheckpointError, ConfigError

IDS = mx.array(np.random.default_rng(0).integers(0, 97, size=(1, 9)).astype(np.int32))


def logits_of(model):
    return np.array(model(IDS)[0].astype(mx.float32))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file (hidden ones too) of ``directory`` and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def saved(tmp_path):
    """(checkpoint directory of tiny_model(), its logits, its files)."""
    path = tmp_path / "ckpt"
    save_model(tiny_model(), path)
    return path, logits_of(tiny_model()), snapshot(path)


def assert_unchanged(saved):
    path, logits, files = saved
    assert snapshot(path) == files
    np.testing.assert_array_equal(logits_of(load_model(path)), logits)


# ------------------------------------------------------------------------------ arguments
def test_overwrite_must_be_a_bool(saved):
    with pytest.raises(TypeError, match="overwrite"):
        save_model(tiny_model(seed=1), saved[0], overwrite="no")
    assert_unchanged(saved)


@pytest.mark.parametrize("model", ["notamodel", None, mx.zeros(3)], ids=["str", "None", "array"])
def test_bad_model_creates_nothing(tmp_path, model):
    with pytest.raises(TypeError, match="model"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size, error", [("big", TypeError), (1.5, TypeError), (True, TypeError),
                                         (0, ValueError), (-1, ValueError)])
def test_bad_max_shard_bytes_creates_nothing(tmp_path, size, error):
    with pytest.raises(error, match="max_shard_bytes"):
        save_model(tiny_model(), tmp_path / "out", max_shard_bytes=size)
    assert not (tmp_path / "out").exists()


def test_max_shard_bytes_none_writes_one_file(tmp_path):
    save_model(tiny_model(), tmp_path / "out", max_shard_bytes=None)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    np.testing.assert_array_equal(logits_of(load_model(tmp_path / "out")), logits_of(tiny_model()))


def test_stale_shards_removed_only_when_overwriting(tmp_path):
    """A folder that is no checkpoint but holds a file named like a shard: refused, file kept;
    a sharded checkpoint overwritten with overwrite=True loses its old shards."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError, match="model-00001-of-00002.safetensors"):
        save_model(tiny_model(), folder)
    assert snapshot(folder) == {"model-00001-of-00002.safetensors": b"the user's own file"}

    path = tmp_path / "ckpt"
    save_model(tiny_model(), path, max_shard_bytes=60_000)
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    save_model(tiny_model(seed=1), path, overwrite=True)
    assert not list(path.glob("model-*-of-*.safetensors"))
    assert not (path / "model.safetensors.index.json").exists()
    assert not [p for p in path.iterdir() if p.name.startswith(".")]
    np.testing.assert_array_equal(logits_of(load_model(path)), logits_of(tiny_model(seed=1)))


# ------------------------------------------------------------------------------ failed saves
def unserialisable(seed: int = 1):
    model = tiny_model(seed=seed)
    model.config.extra["note"] = {1, 2}  # a set: json.dumps fails on it
    return model


def test_failed_overwrite_leaves_the_old_checkpoint(saved):
    with pytest.raises(ConfigError, match="config"):
        save_model(unserialisable(), saved[0], overwrite=True)
    assert_unchanged(saved)


def test_failed_save_to_new_folder_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError):
        save_model(unserialisable(), tmp_path / "a" / "b", max_shard_bytes=60_000)
    assert list(tmp_path.iterdir()) == []


def test_failed_weight_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    """A write error on the second shard (disk full ...): the old sharded checkpoint stays whole."""
    path = tmp_path / "ckpt"
    save_model(tiny_model(), path, max_shard_bytes=60_000)
    before = snapshot(path)
    real, calls = mx.save_safetensors, []

    def failing(file, arrays, **kwargs):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real(file, arrays, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", failing)
    with pytest.raises(OSError, match="No space"):
        save_model(tiny_model(seed=1), path, max_shard_bytes=60_000, overwrite=True)
    monkeypatch.undo()
    assert snapshot(path) == before
    np.testing.assert_array_equal(logits_of(load_model(path)), logits_of(tiny_model()))


def test_numpy_config_value_saves(tmp_path):
    model = tiny_model()
    model.config.norm_eps = np.float32(1e-6)
    save_model(model, tmp_path / "out")
    loaded = load_model(tmp_path / "out")
    assert loaded.config.norm_eps == pytest.approx(1e-6)
    np.testing.assert_allclose(logits_of(loaded), logits_of(model), rtol=1e-6, atol=1e-6)


def test_each_save_writes_its_weights_in_a_folder_of_its_own(tmp_path, monkeypatch):
    """Two saves into one folder at once must not write the same file: each writes into a unique
    temporary folder, never into the checkpoint folder itself."""
    real, folders = mx.save_safetensors, []

    def recording(file, arrays, **kwargs):
        folders.append(Path(file).parent)
        real(file, arrays, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", recording)
    save_model(tiny_model(), tmp_path / "one")
    save_model(tiny_model(), tmp_path / "one", overwrite=True)
    assert len(folders) == 2 and folders[0] != folders[1]
    assert tmp_path / "one" not in folders and not any(folder.exists() for folder in folders)


# ------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.bool_], ids=["int32", "uint8", "bool"])
def test_load_refuses_non_float_dtype(saved, dtype):
    with pytest.raises(ValueError, match="dtype must be"):
        load_model(saved[0], dtype=dtype)


@pytest.mark.parametrize("path", [None, 5])
def test_load_names_a_bad_path_argument(path):
    with pytest.raises(TypeError, match="model path must be"):
        load_model(path)


def retype(path: Path, key: str, dtype: mx.Dtype) -> None:
    """Store tensor ``key`` of checkpoint ``path`` (one weight file) as ``dtype``."""
    weights = mx.load(str(path / "model.safetensors"))
    weights[key] = weights[key].astype(dtype)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [mx.int32, mx.bool_], ids=["int32", "bool"])
def test_non_float_tensor_in_checkpoint_is_refused(saved, dtype):
    key = "backbone.blocks.0.mlstm_layer.q.weight"
    retype(saved[0], key, dtype)
    name = str(dtype).removeprefix("mlx.core.")
    with pytest.raises(CheckpointError, match=rf"{key}: checkpoint {name}, model float32"):
        load_model(saved[0])


@pytest.mark.parametrize("mode", ["affine", "mxfp4"])
def test_only_quantized_layers_hold_integer_tensors(tmp_path, mode):
    """A quantized checkpoint's packed uint32 weights (and mxfp4's uint8 scales) load; an int
    tensor where the model has a float one does not."""
    from xlstm_metal.quantization import quantize_model

    model = tiny_model()
    quantize_model(model, group_size=32 if mode == "mxfp4" else 64, mode=mode)
    save_model(model, tmp_path / "q")
    np.testing.assert_array_equal(logits_of(load_model(tmp_path / "q")), logits_of(model))
    key = "backbone.blocks.0.norm_mlstm.weight"
    retype(tmp_path / "q", key, mx.int32)
    with pytest.raises(CheckpointError, match=rf"{key}: checkpoint int32"):
        load_model(tmp_path / "q")


# ------------------------------------------------------------------------------ transformers
@pytest.mark.parametrize("field", ["gate_soft_cap", "output_logit_soft_cap"])
def test_null_soft_cap_warns_for_transformers(tmp_path, field):
    with pytest.warns(UserWarning, match=rf"{field} null .*transformers"):
        save_model(tiny_model(**{field: None}), tmp_path / "out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_model(tiny_model(), tmp_path / "capped")  # both caps set: no such warning
    assert not [w for w in caught if "null (no cap)" in str(w.message)]
