"""Damaged and unusual checkpoints (s52 hunt): each ends in the loader's own error naming the
problem (exit 2 from `generate -m`), never in MLX's OverflowError, a hang or silently other weights."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import pytest
from cli_helpers import assert_rejected
from test_loader_fuzz import alarm, pristine, work  # noqa: F401  (fixtures)

from xlstm_metal import load, load_model, save_model
from xlstm_metal.errors import CheckpointError

INDEX = "model.safetensors.index.json"
EMB = "backbone.embeddings.weight"


def generate_refused(checkpoint, capsys, *words):
    return assert_rejected(["generate", "-m", checkpoint, "-p", "the quick", "-n", "1", "--temp", "0"], capsys, *words)


def edit_json(path, edit):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data) or data))


def test_a_tensor_the_index_maps_twice_is_refused(work, capsys):  # noqa: F811
    d = work("sharded")
    text = (d / INDEX).read_text()  # JSON keeps the last of a key given twice: it loaded from there
    (d / INDEX).write_text(text.replace('"weight_map": {', f'"weight_map": {{"{EMB}": "model-00005-of-00011.safetensors", ', 1))
    generate_refused(d, capsys, "more than one shard", EMB)


def test_a_tensor_in_two_shards_loads_from_the_shard_the_index_names(work):  # noqa: F811
    d = work("sharded")
    shard = json.loads((d / INDEX).read_text())["weight_map"][EMB]
    other = d / "model-00011-of-00011.safetensors"
    assert shard != other.name
    tensors = mx.load(str(other))
    mx.save_safetensors(str(other), {**tensors, EMB: mx.full(mx.load(str(d / shard))[EMB].shape, 5.0)})
    model = load_model(d)
    assert mx.array_equal(model.backbone.embeddings.weight, mx.load(str(d / shard))[EMB]).item()


def test_a_single_weight_file_beside_shards_is_refused(work, pristine, capsys):  # noqa: F811
    d = work("sharded")
    (d / "model.safetensors").write_bytes((pristine / "single" / "model.safetensors").read_bytes())
    generate_refused(d, capsys, "both model.safetensors and shards")


def test_an_index_listing_the_single_file_still_loads(work):  # noqa: F811
    d = work("single")  # mlx-lm writes an index beside its one model.safetensors
    keys = mx.load(str(d / "model.safetensors"))
    (d / INDEX).write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in keys}}))
    load(d)


@pytest.mark.parametrize("model_type", ["llama", 5])
def test_an_unknown_model_type_is_refused(work, capsys, model_type):  # noqa: F811
    d = work("single")
    edit_json(d / "config.json", lambda c: c.update(model_type=model_type))
    generate_refused(d, capsys, "model_type", repr(model_type))


@pytest.mark.parametrize("field, value", [("vocab_size", 3 * 10**9), ("embedding_dim", 10**9),
                                          ("ffn_proj_factor", 1e300), ("qk_dim_factor", 1e30)])
def test_sizes_past_mlx_dimensions_are_refused(work, capsys, field, value):  # noqa: F811
    d = work("single")  # an OverflowError / TypeError from MLX as the model was built
    # (with transformers' alias too: differing aliases are refused first since session 53)
    edit_json(d / "config.json", lambda c: c.update({field: value, **({"hidden_size": value} if "hidden_size" in c
                                                                       and field == "embedding_dim" else {})}))
    generate_refused(d, capsys, "MLX's array dimensions stop at 2147483647")


@pytest.mark.parametrize("num_blocks", [3, 10**12])
def test_more_blocks_than_the_weights_hold_is_refused_first(work, capsys, num_blocks):  # noqa: F811
    d = work("single")  # 10**12 built blocks for hours
    edit_json(d / "config.json", lambda c: c.update(num_blocks=num_blocks, **(
        {"num_hidden_layers": num_blocks} if "num_hidden_layers" in c else {})))  # (the alias alike)
    with alarm(60):
        generate_refused(d, capsys, f"num_blocks is {num_blocks} but the weights hold 2 block(s)")


@pytest.mark.parametrize("field, value, words", [("num_blocks", 10**12, "num_blocks=1000000000000"),
                                                 ("vocab_size", 3 * 10**9, "MLX's array dimensions")])
def test_2024_config_sizes_are_refused(tmp_path, field, value, words):
    from xlstm_metal.models.xlstm_2024 import create_xlstm_model

    d = tmp_path / "m"
    save_model(create_xlstm_model(97, 2, signature=(1, 1), inp_dim=64, head_dim=16), d)
    edit_json(d / "config.json", lambda c: c.update({field: value}))  # a MemoryError / OverflowError
    with alarm(60), pytest.raises(CheckpointError, match=words):
        load_model(d)


@pytest.mark.parametrize("kind", ["directory", "broken symlink"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", INDEX, "model-00003-of-00011.safetensors",
                                  "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_a_folder_or_broken_link_in_place_of_a_file_is_named(work, capsys, name, kind):  # noqa: F811
    d = work("sharded" if name.startswith("model-") else "single")  # each read as absent, some passed over
    path = d / name
    if path.exists():
        path.unlink()
    if kind == "directory":
        path.mkdir()
    else:
        os.symlink(d / "nowhere", path)
    generate_refused(d, capsys, str(path), kind)
