"""xlstm_metal.quantization: recipes, mlx-lm's config format, loading quantized checkpoints,
dequantizing."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import tiny_model

import xlstm_metal
from xlstm_metal.loading import CheckpointError, load_model, save_model
from xlstm_metal.quantization import (
    QuantizationError, Recipe, bits_per_weight, dequantize_model, make_recipe, parameter_count, quantization_config,
    quantize_model,
)

IDS = mx.array([[0, 5, 17, 33, 2, 90, 41, 8, 64, 3, 77, 12]])
GATES = [f"backbone.blocks.{i}.mlstm_layer.{g}" for i in range(2) for g in ("fgate_preact", "igate_preact")]


def kinds(model):
    """Each layer's MLX class (ours, e.g. FastQuantizedLinear, are subclasses of MLX's)."""
    found = {}
    for path, module in model.named_modules():
        for cls in (nn.QuantizedLinear, nn.QuantizedEmbedding, nn.Linear, nn.Embedding):
            if isinstance(module, cls):
                found[path] = cls.__name__
                break
    return found


def test_default_recipe_keeps_gates_float_and_writes_mlx_lm_format():
    model = tiny_model()
    config = quantize_model(model, bits=8, group_size=32)
    assert config == {"group_size": 32, "bits": 8, "mode": "affine", **{g: False for g in GATES}}
    found = kinds(model)
    assert {found[g] for g in GATES} == {"Linear"}
    assert found["backbone.blocks.0.mlstm_layer.q"] == "QuantizedLinear"
    assert found["backbone.embeddings"] == "QuantizedEmbedding"
    layer = model.backbone.blocks[1].ffn.proj_down
    assert (layer.bits, layer.group_size, layer.weight.dtype) == (8, 32, mx.uint32)
    assert quantization_config(model) == config


def test_mixed_recipe_raises_embeddings_and_head():
    model = tiny_model(tie_word_embeddings=False)
    config = quantize_model(model, recipe="mixed-4-6")
    high = {"group_size": 64, "bits": 6, "mode": "affine"}
    assert config["bits"] == 4 and config["backbone.embeddings"] == high and config["lm_head"] == high
    assert model.lm_head.bits == 6 and model.backbone.blocks[0].mlstm_layer.v.bits == 4
    assert make_recipe("mixed_3_6").bits == 3  # mlx-lm's spelling


def test_json_recipe_globs_flags_and_typos(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"bits": 8, "backbone.blocks.*.ffn.proj_down": 4, "lm_head": {"bits": 6},
                                "backbone.embeddings": False, "backbone.blocks.0.mlstm_layer.igate_preact": True}))
    model = tiny_model(tie_word_embeddings=False)
    config = quantize_model(model, recipe=make_recipe(str(path), group_size=32))
    assert (config["bits"], config["group_size"]) == (8, 32)
    assert config["backbone.blocks.1.ffn.proj_down"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["backbone.embeddings"] is False and config["lm_head"]["bits"] == 6
    assert kinds(model)["backbone.blocks.0.mlstm_layer.igate_preact"] == "QuantizedLinear"
    assert config["backbone.blocks.1.mlstm_layer.igate_preact"] is False
    assert make_recipe(str(path), bits=3).bits == 3  # the flag wins over the file

    path.write_text(json.dumps({"backbone.blocks.*.ffn.proj_dwn": 4}))
    with pytest.raises(QuantizationError, match="proj_dwn.*no quantizable layer"):
        quantize_model(tiny_model(), recipe=str(path))
    for bad, message in (({"lm_head": 7}, "bits must be one of"), ({"lm_head": {"bitz": 4}}, "unknown key"),
                         ({"group_size": 48}, "group_size must be one of"), ({"lm_head": "x"}, "expected false")):
        path.write_text(json.dumps(bad))
        with pytest.raises(QuantizationError, match=message):
            make_recipe(str(path))
    with pytest.raises(QuantizationError, match="recipe mixed-4-7.*bits must be one of"):
        make_recipe("mixed-4-7")
    with pytest.raises(QuantizationError, match="unknown recipe"):
        make_recipe("mixed-4")
    with pytest.raises(QuantizationError, match="neither a named recipe"):
        make_recipe(str(tmp_path / "missing.json"))


def test_group_size_that_divides_no_layer_is_an_error():
    with pytest.raises(QuantizationError, match="no layer could be quantized"):
        quantize_model(tiny_model(embedding_dim=96, num_heads=2), group_size=128, bits=4)
    model = tiny_model(embedding_dim=96, num_heads=2)
    with pytest.raises(QuantizationError, match="input width 96 is not a multiple of group size 64"):
        quantize_model(model, recipe=Recipe(4, 32, {"lm_head": {"group_size": 64}}))


def test_saved_quantized_checkpoint_loads_with_equal_logits(tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    config = quantize_model(model, recipe="mixed-4-8")
    expected, _ = model(IDS)
    save_model(model, tmp_path / "q")
    written = json.loads((tmp_path / "q" / "config.json").read_text())
    assert written["quantization"] == written["quantization_config"] == config
    weights = mx.load(str(tmp_path / "q" / "model.safetensors"))
    assert weights["lm_head.weight"].dtype == mx.uint32 and "lm_head.scales" in weights and "lm_head.biases" in weights
    assert "backbone.blocks.0.mlstm_layer.igate_preact.scales" not in weights

    loaded, _ = xlstm_metal.load(tmp_path / "q")
    assert kinds(loaded) == kinds(model) and quantization_config(loaded) == config
    assert mx.array_equal(loaded(IDS)[0], expected)
    save_model(loaded, tmp_path / "again")  # the loaded tree writes the same config back
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization"] == config


def test_quantized_forward_follows_the_quantized_weights():
    """The quantized tree is what runs: equal to a float model holding the dequantized weights,
    and different from the float original."""
    model = tiny_model()
    reference, _ = model(IDS)
    quantize_model(model, bits=2, group_size=32)
    quantized, _ = model(IDS)
    assert not mx.allclose(quantized, reference, atol=1e-3)
    dequantize_model(model)
    assert quantization_config(model) is None
    assert all(t in ("Linear", "Embedding") for t in kinds(model).values())
    assert mx.allclose(model(IDS)[0], quantized, rtol=1e-4, atol=1e-4)


def test_bits_per_weight_and_parameter_count():
    model = tiny_model()
    count = parameter_count(model)
    assert bits_per_weight(model) == 32.0
    quantize_model(model, recipe=Recipe(4, 64, float_gates=False))
    assert parameter_count(model) == count  # packed weights count as the weights they hold
    quantized = sum(m.weight.size * 8 for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear))
    quantized += model.backbone.embeddings.weight.size * 8
    rest = count - quantized
    # 4 bits + a float32 scale and bias per 64 weights = 5 bits; norms stay float32.
    assert bits_per_weight(model) == pytest.approx((5 * quantized + 32 * rest) / count)


def test_quantizing_twice_is_refused():
    model = tiny_model()
    quantize_model(model)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(model)


@pytest.mark.parametrize("entry, message", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "method 'gptq' is not supported"),
    ({"quant_method": "bitsandbytes"}, "not supported"),
    ({"group_size": 64, "bits": 4, "mode": "mxfp4"}, "mode mxfp4 has group_size 32, got 64"),
    ({"group_size": 64, "bits": 4, "mode": "int4"}, "mode must be one of affine, mxfp4, mxfp8, nvfp4, got 'int4'"),
    ({"group_size": 64, "bits": 9}, "bits must be one of"),
    ({"group_size": 64, "bits": 4, "lm_head": 3}, "expected an object or false"),
    ([4], "must be an object"),
])
def test_unsupported_quantization_entries_are_checkpoint_errors(tmp_path, entry, message):
    save_model(tiny_model(), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = entry
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "m")


def test_scales_missing_from_weights_are_listed(tmp_path):
    model = tiny_model()
    quantize_model(model, bits=8)
    save_model(model, tmp_path / "q")
    weights = mx.load(str(tmp_path / "q" / "model.safetensors"))
    del weights["backbone.blocks.0.ffn.proj_down.scales"]
    mx.save_safetensors(str(tmp_path / "q" / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match=r"missing tensor.*\n.*proj_down\.scales"):
        load_model(tmp_path / "q")


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_dequantize_rounds_once_to_the_scales_dtype(dtype):
    """Half-precision scales: each weight is scale * q + bias exactly, rounded once (MLX's
    dequantize in bf16 rounded the product and the sum: 1-ulp errors in ~half the weights; it is
    what `convert SRC OUT --dtype bfloat16` of a quantized SRC writes)."""
    model = tiny_model(4)
    model.set_dtype(dtype)
    quantize_model(model, bits=4, group_size=32)
    layer = model.backbone.blocks[0].ffn.proj_down
    embeddings = model.backbone.embeddings
    expected = {}
    for name, module in (("proj_down", layer), ("embeddings", embeddings)):
        w = mx.dequantize(module.weight, module.scales.astype(mx.float32), module.biases.astype(mx.float32),
                          module.group_size, module.bits)
        expected[name] = w.astype(dtype)
    dequantize_model(model)
    for name, module in (("proj_down", model.backbone.blocks[0].ffn.proj_down), ("embeddings", model.backbone.embeddings)):
        assert module.weight.dtype == dtype
        assert mx.array_equal(module.weight, expected[name]).item(), name


def test_true_layer_entry_takes_the_top_level_settings(tmp_path):
    """mlx-lm reads a per-layer `true` as "quantized with the top-level bits and group size"
    (nn.quantize with the config's settings); it built a 4-bit, group 64 layer here, and the
    strict load failed on 8-bit weights."""
    import mlx_lm

    model = tiny_model(6)
    quantize_model(model, bits=8, group_size=32)
    expected, _ = model(IDS)
    save_model(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config[key]["backbone.blocks.0.mlstm_layer.q"] = True
        config[key]["backbone.blocks.1.ffn.proj_down"] = True
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path / "q")
    layer = loaded.backbone.blocks[0].mlstm_layer.q
    assert (layer.bits, layer.group_size) == (8, 32)
    assert mx.array_equal(loaded(IDS)[0], expected)
    theirs, _ = mlx_lm.utils.load_model(tmp_path / "q", trust_remote_code=True)
    assert mx.array_equal(theirs(IDS), expected)


def test_a_mixed_recipe_is_described_with_its_layers():
    """generate --info's quantization line: the packaged model's mixed recipe read as "4-bit,
    group 64" alone (its 6-bit embedding and float gate projections unsaid)."""
    from xlstm_metal.generation import DEFAULT_MODEL_DIR, xLSTMRunner
    from xlstm_metal.generation.runner import model_info
    from xlstm_metal.quantization import describe_layers

    entry = {"group_size": 64, "bits": 4, "mode": "affine", "a": {"group_size": 64, "bits": 6, "mode": "affine"},
             "b": False, "c": False, "d": {"bits": 8}}
    assert describe_layers(entry) == "2 layers in float; 1 layer 6-bit, group 64; 1 layer 8-bit, group 64"
    assert describe_layers({"group_size": 32, "bits": 4}) == ""
    line = model_info(xLSTMRunner(DEFAULT_MODEL_DIR).model)["quantization"]
    assert line.startswith("4-bit, group 64, ") and "bits per weight (as loaded); 8 layers in float; " \
        "1 layer 6-bit, group 64" in line
