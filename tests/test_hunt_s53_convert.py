"""Quantization, convert and mlx-lm corners (session 53 hunt). Tiny seeded models."""

import xlstm_metal  # noqa: F401,I001  (first: preloads the BLAS before mlx is imported)

import argparse
import json

import mlx.core as mx
import pytest
from cli_helpers import assert_rejected
from conftest import tiny_model
from test_tokenizer import train_tiny_tokenizer

from xlstm_metal import load_model, save_model
from xlstm_metal.cli import convert, main
from xlstm_metal.errors import CheckpointError
from xlstm_metal.quantization import make_recipe, quantization_config, quantize_model

IDS = mx.array([[5, 17, 33, 2, 90, 41, 8, 64, 3, 77, 12]])


def big():  # finite in float32, past float16's range
    model = tiny_model(3, vocab_size=128)
    model.backbone.blocks[0].ffn.proj_down.weight *= 1e6
    return model


@pytest.fixture
def ckpt(tmp_path):
    hf = train_tiny_tokenizer()
    return save_model(tiny_model(3, vocab_size=hf.get_vocab_size()), tmp_path / "src", tokenizer=hf)


def test_float_format_entry_may_leave_out_bits_with_a_layer_set_true(tmp_path):
    # {"mode": "mxfp4", layer: true} passed the checks, then a KeyError traceback
    model = tiny_model(3, vocab_size=128)
    quantize_model(model, mode="mxfp4")
    path = save_model(model, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        entry = config[key]
        del entry["bits"], entry["group_size"]
        entry["backbone.blocks.0.mlstm_layer.q"] = True
    (path / "config.json").write_text(json.dumps(config))
    back = load_model(path)
    assert back.backbone.blocks[0].mlstm_layer.q.mode == "mxfp4"
    assert mx.array_equal(back(IDS)[0], model(IDS)[0]).item()


def test_a_pattern_quantizes_the_float_gates_only_by_their_name(tmp_path):
    # {"backbone.blocks.1.*": 8} quantized block 1's i/f gates, which stay in float by default
    gate = "backbone.blocks.{}.mlstm_layer.igate_preact"
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"backbone.blocks.1.*": 8}))
    config = quantize_model(tiny_model(3, vocab_size=128), recipe=str(recipe))
    assert config[gate.format(1)] is False and config["backbone.blocks.1.ffn.proj_down"]["bits"] == 8
    recipe.write_text(json.dumps({"backbone.blocks.*.mlstm_layer.igate_preact": 8}))
    config = quantize_model(tiny_model(3, vocab_size=128), recipe=make_recipe(str(recipe)))
    assert config[gate.format(0)] == config[gate.format(1)] == {"group_size": 64, "bits": 8, "mode": "affine"}


def test_float16_overflow_is_named_as_the_dtype_not_a_damaged_checkpoint(tmp_path):
    path = save_model(big(), tmp_path / "m")
    load_model(path, dtype="bfloat16")
    with pytest.raises(CheckpointError, match="past float16's range") as err:
        load_model(path, dtype="float16")
    assert "backbone.blocks.0.ffn.proj_down.weight" in str(err.value) and "NaN" not in str(err.value)
    weights = mx.load(str(path / "model.safetensors"))
    weights["backbone.out_norm.weight"] = weights["backbone.out_norm.weight"] * mx.nan
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        load_model(path, dtype="float16")


def test_check_encodes_only_the_text_its_tokens_need(ckpt, tmp_path, monkeypatch):
    # it read and encoded the whole file (37 MB: 81 s, 7.4 GB)
    text = tmp_path / "t.txt"
    text.write_bytes(("the cat sat on the mat, caf\u00e9 \U0001f600\r\n" * 20000).encode())
    tokenizer = convert.read_tokenizer(ckpt, "")
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, s):
            seen.append(len(s))
            return tokenizer.encode(s)

    monkeypatch.setattr(convert, "read_tokenizer", lambda *a, **k: Spy())
    args = argparse.Namespace(check=str(text), check_tokens=300, check_greedy=1, check_dtype=None)
    ids = convert._read_check_ids(args, ckpt, 320)
    assert ids == tokenizer.encode(text.read_text(encoding="utf-8"))[:300]
    assert max(seen) < 20_000 < len(text.read_text())


def test_mlx_lm_convert_into_its_own_source_is_refused(ckpt, capsys):
    out = ckpt / "sub"
    assert_rejected(["mlx-lm", "convert", "--hf-path", ckpt, "--mlx-path", out], capsys, "inside", "--hf-path")
    assert not out.exists()


@pytest.mark.parametrize("quantize", [[], ["-q"]])
def test_convert_refuses_a_result_past_its_dtype(tmp_path, capsys, quantize):
    # an OUT no loader takes was written (exit 0)
    model = big()
    quantize_model(model, bits=8)
    src = save_model(model, tmp_path / "q8")
    assert_rejected(["convert", src, tmp_path / "out", "--dtype", "float16", *quantize], capsys,
                    "backbone.blocks.0.ffn.proj_down.", "--dtype float16 cannot hold them")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]


def test_to_mlx_takes_a_lazy_conjugate_or_negative_view_as_its_values():
    torch = pytest.importorskip("torch")
    from xlstm_metal.connectors import to_mlx

    x = torch.tensor([1 + 2j, -3 - 0.5j])
    assert to_mlx(x.conj()).tolist() == [1 - 2j, -3 + 0.5j]
    assert to_mlx(torch._neg_view(x)).tolist() == [-1 - 2j, 3 + 0.5j]


def test_mlx_lm_full_fine_tuning_of_a_quantized_model_is_refused_up_front(tmp_path, capsys):
    model = tiny_model(3, vocab_size=320)
    quantize_model(model, bits=8)
    ckpt = save_model(model, tmp_path / "q8", tokenizer=train_tiny_tokenizer())
    data = tmp_path
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text('{"text": "the cat sat on the mat"}\n' * 2)
    assert_rejected(["mlx-lm", "lora", "--model", ckpt, "--train", "--data", data, "--iters", "2", "--batch-size", "1",
                     "--val-batches", "1", "--fine-tune-type", "full", "--adapter-path", tmp_path / "ad"], capsys,
                    "full cannot train a quantized model's packed weights")
    assert not (tmp_path / "ad").exists()


def test_nxai_state_dict_of_a_tied_2024_model_loads_strictly_in_nxai():
    pytest.importorskip("xlstm")
    from test_xlstm_2024 import ids_for, official, ours_from, rel_err, torch_logits

    from xlstm_metal.connectors import nxai_state_dict

    native, cfg = official(slstm_at=(0,), num_blocks=2, tie=True, seed=5)
    other, _ = official(slstm_at=(0,), num_blocks=2, tie=True, seed=6)
    other.load_state_dict(nxai_state_dict(ours_from(native, cfg)), strict=True)  # "Missing key(s): lm_head.weight"
    assert rel_err(torch_logits(other, ids_for()), torch_logits(native, ids_for())) == 0


def test_mlx_lm_convert_refuses_a_result_past_its_dtype(tmp_path, capsys):
    # mlx-lm saves piece by piece: OUT full of inf was written (exit 0)
    model = big()
    src = save_model(model, tmp_path / "src", tokenizer=train_tiny_tokenizer())
    assert_rejected(["mlx-lm", "convert", "--hf-path", src, "--mlx-path", tmp_path / "out", "--dtype", "float16"],
                    capsys, "backbone.blocks.0.ffn.proj_down.weight", "float16 cannot hold them")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert main(["mlx-lm", "convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "bf"),
                 "--dtype", "bfloat16"]) == 0
    down = mx.load(str(tmp_path / "bf" / "model.safetensors"))["backbone.blocks.0.ffn.proj_down.weight"]
    assert mx.array_equal(down, model.backbone.blocks[0].ffn.proj_down.weight.astype(mx.bfloat16)).item()


def test_quantize_model_checks_progress_before_changing_the_model():
    # it raised "'int' object is not callable" after the first layer, the model half quantized
    model = tiny_model(3, vocab_size=128)
    before = model(IDS)[0]
    with pytest.raises(TypeError, match="progress must be a callable"):
        quantize_model(model, bits=8, progress=5)
    assert quantization_config(model) is None and mx.array_equal(model(IDS)[0], before).item()


@pytest.mark.parametrize("files", [["pytorch_model.bin"],
                                   ["pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]])
def test_pytorch_bin_weights_are_named_with_the_way_to_convert_them(tiny_model_dir, tmp_path, capsys, files):
    # "no model.safetensors or model.safetensors.index.json in checkpoint directory"
    (tiny_model_dir / "model.safetensors").unlink()
    for name in files:
        (tiny_model_dir / name).write_bytes(b"{}")
    words = ("holds PyTorch .bin weights", files[0], "save_pretrained(OUT, safe_serialization=True)")
    with pytest.raises(CheckpointError) as err:
        load_model(tiny_model_dir)
    assert all(word in str(err.value) for word in words)
    assert_rejected(["generate", "-m", tiny_model_dir, "--prompt", "hi"], capsys, *words)
    assert_rejected(["convert", tiny_model_dir, tmp_path / "out"], capsys, *words)
    assert not (tmp_path / "out").exists()
