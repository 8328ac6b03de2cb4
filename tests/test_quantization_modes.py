"""MLX's microscaling float formats (mxfp4, mxfp8, nvfp4: fixed bits and group size, uint8 scales,
no biases) beside affine quantization: quantize_model, every kernel path, save and load (ours and
mlx-lm's checkpoints, mixed modes), dequantization, recipes and ``convert --q-mode``."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_model
from test_convert import tok_ckpt  # noqa: F401  (a fixture: a tiny checkpoint with a tokenizer)
from test_module_tree import IDS, _close, _decode, _dequantized_twin, _large, _np, _xlstm_2024

from xlstm_metal import benchmark as bm
from xlstm_metal.cli import main
from xlstm_metal.generation import xLSTMRunner
from xlstm_metal.loading import load, load_model, save_model
from xlstm_metal.quantization import (MODES, QuantizationError, config_quantization, dequantize_model, make_recipe,
                                      quantization_config, quantize_model)

FORMATS = [m for m in MODES if m != "affine"]


@pytest.mark.parametrize("make", [_large, _xlstm_2024], ids=["large", "2024"])
@pytest.mark.parametrize("mode", FORMATS)
def test_float_formats_run_in_every_path_as_the_dequantized_float_model(make, mode):
    model = make()
    float_logits = model(IDS)[0]
    config = quantize_model(model, mode=mode)
    bits, group = MODES[mode]
    assert (config["mode"], config["bits"], config["group_size"]) == (mode, bits, group)
    layers = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert layers and all(m.mode == mode and m.scales.dtype == mx.uint8 and "biases" not in m for m in layers)
    reference = _dequantized_twin(make, model)
    expected, _ = reference(IDS)
    logits, _ = model(IDS)
    assert logits.dtype == mx.float32  # a float32 model stays float32 (MLX looks the rows up in bf16)
    _close(logits, expected)
    assert np.abs(_np(logits) - _np(float_logits)).max() > 1e-3  # the quantization is visible
    _close(_decode(model, IDS)[0], expected)                            # step
    if hasattr(model, "prefill"):  # xLSTM-Large's
        _close(model.prefill(IDS, chunk_size=5)[0], expected[:, -1])     # prefill pieces
    compiled = mx.compile(lambda ids: model(ids)[0], inputs=model.state)
    _close(compiled(IDS), expected)                                      # compiled
    if hasattr(model, "fuse_projections"):
        model.fuse_projections()                                         # fused: the same products
        _close(model(IDS)[0], logits, 1e-5)  # (bit-equal on the CPU; GPUs sum fused rows otherwise)
        _close(_decode(model, IDS)[0], expected)
        next_tokens, _ = bm.make_decode_step(model)(IDS[:, :1], model.make_state(1))
        assert int(next_tokens[0, 0]) == int(mx.argmax(expected[0, 0]))


@pytest.mark.parametrize("make", [_large, _xlstm_2024], ids=["large", "2024"])
@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
def test_a_bf16_model_of_a_float_format_computes_in_bf16(make, mode):
    """A float-format table's rows come in the model's float dtype: a bf16 model's activations,
    logits and conv windows stay bf16 (float32 rows made its residual stream float32: off the
    bf16 fast paths on GPUs, and not the bf16 model mlx-lm runs)."""
    model = make()
    model.set_dtype(mx.bfloat16)
    quantize_model(model, mode=mode)
    embedding = model.backbone.embeddings if hasattr(model, "backbone") else model.token_embedding
    assert embedding.scales.dtype == mx.uint8 and embedding(IDS).dtype == mx.float32  # alone: exact float32
    logits, state = model(IDS)
    assert logits.dtype == mx.bfloat16
    if hasattr(model, "prefill"):
        assert model.prefill(IDS, chunk_size=5)[0].dtype == mx.bfloat16
    else:  # the 2024 model's conv windows hold activations: bf16, not the scales' uint8
        assert all(a.dtype in (mx.bfloat16, mx.float32) for layer in model.make_state(1) for a in layer
                   if isinstance(a, mx.array)) and any(
            a.dtype == mx.bfloat16 for layer in model.make_state(1) for a in layer if isinstance(a, mx.array))
    # the same numbers as the bf16 model holding the dequantized weights (exact in bf16), to bf16 round-off
    reference = _dequantized_twin(make, model)
    reference.set_dtype(mx.bfloat16)
    expected = _np(reference(IDS)[0].astype(mx.float32))
    errors = np.abs(_np(logits.astype(mx.float32)) - expected).max(axis=-1) / np.abs(expected).max(axis=-1)
    assert np.median(errors) < 0.05


@pytest.mark.parametrize("mode", FORMATS)
def test_save_and_load_keep_the_format_and_its_uint8_scales(tmp_path, mode):
    model = tiny_model(4)
    config = quantize_model(model, mode=mode)
    save_model(model, tmp_path / "q")
    written = json.loads((tmp_path / "q" / "config.json").read_text())
    assert written["quantization"] == config and written["quantization"]["mode"] == mode
    stored = mx.load(str(tmp_path / "q" / "model.safetensors"))
    assert not any(k.endswith(".biases") for k in stored)
    assert all(v.dtype == mx.uint8 for k, v in stored.items() if k.endswith(".scales"))
    logits = model(IDS)[0]
    loaded = load_model(tmp_path / "q")
    np.testing.assert_array_equal(_np(loaded(IDS)[0]), _np(logits))
    # bf16: the float weights cast, the scales stay uint8 (a cast would make them garbage)
    half = load_model(tmp_path / "q", dtype="bfloat16")
    assert half.backbone.embeddings.scales.dtype == mx.uint8
    assert half.backbone.blocks[0].norm_mlstm.weight.dtype == mx.bfloat16
    # bf16 round-off, which this tiny random model amplifies at a few positions (to 0.45 at one):
    # the median position's error; scales cast to bf16 and back would be ~1 everywhere
    got, want = _np(half(IDS)[0])[0], _np(logits)[0]
    errors = np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)
    assert np.median(errors) < 0.05
    # dequantized: float layers in the model's float dtype, the same logits to round-off
    dequantize_model(loaded)
    assert quantization_config(loaded) is None and loaded.backbone.embeddings.weight.dtype == mx.float32
    _close(loaded(IDS)[0], logits)
    dequantize_model(half)
    assert half.backbone.embeddings.weight.dtype == mx.bfloat16


def test_a_checkpoint_of_mixed_modes_loads_layer_by_layer(tmp_path):
    """mlx-lm's per-layer entries: a layer's own mode (absent: affine, as mlx-lm reads it), and
    layers not listed take the top-level one; a layer the config leaves out is found from its
    tensors' shapes and scale dtype."""
    model = tiny_model(5)

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or path.endswith(("igate_preact", "fgate_preact")):
            return False
        if path == "backbone.embeddings":
            return {"bits": 8, "group_size": 64, "mode": "affine"}
        return {"mode": "nvfp4", "bits": 4, "group_size": 16} if "ffn" in path else {"mode": "mxfp4"}

    nn.quantize(model, class_predicate=predicate)
    config = quantization_config(model)
    assert config["mode"] == "mxfp4" and config["backbone.embeddings"]["mode"] == "affine"
    assert config["backbone.blocks.0.ffn.proj_down"] == {"group_size": 16, "bits": 4, "mode": "nvfp4"}
    logits = model(IDS)[0]
    save_model(model, tmp_path / "mixed")
    np.testing.assert_array_equal(_np(load_model(tmp_path / "mixed")(IDS)[0]), _np(logits))

    # As mlx-lm may write it: the affine entry without "mode", the nvfp4 layers not listed at all.
    path = tmp_path / "mixed" / "config.json"
    written = json.loads(path.read_text())
    for key in ("quantization", "quantization_config"):
        entry = written[key]
        entry["backbone.embeddings"] = {"group_size": 64, "bits": 8}
        for name in [k for k in entry if ".ffn." in k]:
            del entry[name]
    path.write_text(json.dumps(written))
    loaded = load_model(tmp_path / "mixed")
    assert loaded.backbone.blocks[1].ffn.proj_up.mode == "nvfp4" and loaded.backbone.embeddings.mode == "affine"
    np.testing.assert_array_equal(_np(loaded(IDS)[0]), _np(logits))


def test_recipes_take_a_mode_and_refuse_what_it_cannot_be():
    recipe = make_recipe(None, mode="nvfp4")
    assert (recipe.mode, recipe.bits, recipe.group_size) == ("nvfp4", 4, 16)
    assert (make_recipe(None, 8, None, "mxfp8").bits, make_recipe(None, None, 32, "mxfp4").group_size) == (8, 32)
    with pytest.raises(QuantizationError, match="mode mxfp4 has bits 4, got 8"):
        make_recipe(None, 8, None, "mxfp4")
    with pytest.raises(QuantizationError, match="mode nvfp4 has group_size 16, got 64"):
        make_recipe(None, None, 64, "nvfp4")
    with pytest.raises(QuantizationError, match="mode must be one of affine, mxfp4, mxfp8, nvfp4, got 'fp4'"):
        make_recipe(None, mode="fp4")
    with pytest.raises(QuantizationError, match="recipe mixed-4-6 is affine"):
        make_recipe("mixed-4-6", mode="mxfp4")
    for bad, message in (({"bits": 4, "group_size": 64, "mode": "mxfp4"}, "mode mxfp4 has group_size 32, got 64"),
                         ({"bits": 4, "group_size": 32, "mode": "int4"}, "mode must be one of"),
                         ({"bits": 4, "group_size": 32, "mode": "mxfp4", "lm_head": {"mode": "nvfp4", "bits": 8}},
                          "layer 'lm_head': mode nvfp4 has bits 4, got 8")):
        with pytest.raises(QuantizationError, match=message):
            config_quantization({"quantization": bad})


def test_a_json_recipe_mixes_modes(tmp_path):
    spec = tmp_path / "recipe.json"
    spec.write_text(json.dumps({"mode": "mxfp4", "backbone.embeddings": {"mode": "affine", "bits": 8},
                                "lm_head": {"mode": "mxfp8"}}))
    model = tiny_model(6, tie_word_embeddings=False)
    config = quantize_model(model, recipe=str(spec))
    assert config["mode"] == "mxfp4"
    assert config["backbone.embeddings"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert config["lm_head"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    # the flag's mode wins over the file's, whose bits were for its own mode
    assert make_recipe(str(spec), mode="affine").mode == "affine"
    # bits a layer's format does not have: named, before anything is quantized
    spec.write_text(json.dumps({"mode": "mxfp4", "lm_head": {"bits": 8}}))
    with pytest.raises(QuantizationError, match="layer 'lm_head': mode mxfp4 has bits 4, got 8"):
        quantize_model(tiny_model(6, tie_word_embeddings=False), recipe=str(spec))


@pytest.mark.parametrize("mode", FORMATS)
def test_convert_q_mode_writes_a_checkpoint_that_generates(tok_ckpt, tmp_path, mode, capsys):
    out = tmp_path / mode
    assert main(["convert", str(tok_ckpt), str(out), "-q", "--q-mode", mode]) == 0
    printed = capsys.readouterr().out
    bits, group = MODES[mode]
    assert f"{mode}, {bits}-bit, group {group}" in printed
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert (config["mode"], config["bits"], config["group_size"]) == (mode, bits, group)
    assert config["backbone.blocks.0.mlstm_layer.igate_preact"] is False  # the gates stay in float
    # float32 on both sides and fused as the CLI runs it (a GPU's bf16 default and this tiny random
    # model's near-tied logits would part the texts at round-off)
    model, tokenizer = load(out, dtype="float32")
    model.fuse_projections()
    expected = tokenizer.decode(xLSTMRunner(model, tokenizer).generate("the model", max_tokens=8, temperature=0))
    assert main(["generate", "-m", str(out), "--prompt", "the model", "-n", "8", "--temp", "0",
                 "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip().endswith(expected.strip())
    assert main(["generate", "-m", str(out), "--info"]) == 0
    assert f"{mode}, {bits}-bit, group {group}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["-q", "--q-mode", "mxfp4", "--q-bits", "8"], "mode mxfp4 has bits 4, got 8"),
    (["-q", "--q-mode", "nvfp4", "--q-group-size", "32"], "mode nvfp4 has group_size 16, got 32"),
    (["-q", "--q-mode", "mxfp8", "--q-recipe", "mixed-4-8"], "recipe mixed-4-8 is affine"),
    (["--q-mode", "mxfp4"], "--q-mode only apply with -q/--quantize"),
])
def test_convert_refuses_a_mode_it_cannot_write(tok_ckpt, tmp_path, argv, message, capsys):
    try:
        code = main(["convert", str(tok_ckpt), str(tmp_path / "out"), *argv])
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
