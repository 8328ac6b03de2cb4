"""nn.quantize on lab models: the wiring's linear projections are quantized too (they were left in
float, silently: only the embedding, the LM head and SwiGLU's nn.Linear were), and the quantized
model computes what a float model holding the quantize -> dequantize'd weights computes."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import xlstm_metal  # noqa: F401
from xlstm_metal.lab import LabConfig, LabModel, load_arch
from xlstm_metal.lab.cells import LinearProjection, QuantizedLinearProjection

IDS = mx.array([[1, 5, 9, 3, 7, 2, 8, 4, 11, 6]])
GROUP = 32


def _quantizable(_, module) -> bool:
    return hasattr(module, "to_quantized") and "weight" in module and module.weight.shape[-1] % GROUP == 0


def _pair(arch: str, **defaults) -> tuple[LabModel, LabModel]:
    """A model and a float copy of it (the same weights)."""
    mx.random.seed(0)
    config = LabConfig.from_arch(load_arch(arch), vocab_size=64, embedding_dim=128,
                                 block_defaults={"num_heads": 4, **defaults})
    model, reference = LabModel(config), LabModel(config)
    reference.update(model.parameters())
    return model, reference


def _dequantized_into(model: LabModel, reference: LabModel) -> None:
    """The reference takes each quantized module's weight, quantized and dequantized."""
    modules = dict(reference.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinearProjection, nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                              bits=module.bits, mode=module.mode)
            modules[name].weight = w.reshape(modules[name].weight.shape)


def _relative(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


@pytest.mark.parametrize("arch", ["mlstm", "attention", "linear-attention", "slstm", "hybrid"])
def test_quantized_lab_model_equals_the_float_model_of_its_dequantized_weights(arch):
    model, reference = _pair(arch)
    float_logits, _ = reference(IDS)
    projections = [n for n, m in model.named_modules() if isinstance(m, LinearProjection)]
    assert projections
    nn.quantize(model, group_size=GROUP, bits=4, class_predicate=_quantizable)
    kinds = dict(model.named_modules())
    assert all(isinstance(kinds[n], QuantizedLinearProjection) for n in projections), arch
    assert any(kinds[n].heads > 1 for n in projections) == (arch == "slstm")  # headwise: head by head
    _dequantized_into(model, reference)
    logits, _ = model(IDS)
    want, _ = reference(IDS)
    assert _relative(logits, want) < 1e-4
    assert _relative(logits, float_logits) > 1e-3  # 4 bits: the quantized weights are what ran
    # the recurrent path (a step at a time, carrying the state) runs the quantized cells too
    state, steps = None, []
    for t in range(IDS.shape[1]):
        out, state = model(IDS[:, t:t + 1], state)
        steps.append(out)
    assert _relative(mx.concatenate(steps, axis=1), want) < 1e-4


def test_a_shared_featurizer_is_quantized_once_and_read_by_the_projection_sharing_it():
    """k shares q's weight (share_qk): q is quantized, k stays a float projection that reads q's
    dequantized weight, so both compute with the same quantized featurizer."""
    model, reference = _pair("mlstm", share_qk=True)
    nn.quantize(model, group_size=GROUP, bits=4, class_predicate=_quantizable)
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in model.named_modules() if ".blocks.0." in n}
    assert kinds["q"] is QuantizedLinearProjection and kinds["k"] is LinearProjection
    assert "weight" not in dict(model.named_modules())["backbone.blocks.0.k"]
    _dequantized_into(model, reference)
    logits, _ = model(IDS)
    want, _ = reference(IDS)
    assert _relative(logits, want) < 1e-4


def test_quantized_projections_keep_their_keys_and_refuse_input_quantization():
    model, _ = _pair("attention")
    keys = {k for k, _ in tree_flatten(model.parameters())}
    nn.quantize(model, group_size=GROUP, bits=8, class_predicate=_quantizable)
    quantized = dict(tree_flatten(model.parameters()))
    assert keys <= set(quantized)  # the float keys stay (weight packed), scales and biases beside them
    assert all(f"{k[:-len('.weight')]}.scales" in quantized for k in keys if k.endswith(".q.weight"))
    assert not any(k.endswith(".q.weight") for k, _ in tree_flatten(model.trainable_parameters()))
    with pytest.raises(ValueError, match="quantize_input"):
        nn.quantize(LabModel(LabConfig.from_arch(load_arch("mlstm"), vocab_size=64, embedding_dim=128,
                                                  block_defaults={"num_heads": 4})),
                    mode="nvfp4", quantize_input=True,
                    class_predicate=lambda _, m: isinstance(m, LinearProjection))


def test_a_quantized_lab_model_saves_and_loads_as_a_checkpoint(tmp_path):
    """save_model writes the quantization entry (mlx-lm's format, the layers left in float named);
    load_model rebuilds the wiring, quantizes the same layers and gives the same logits."""
    from xlstm_metal.loading import load_model, save_model

    model, _ = _pair("mlstm")
    nn.quantize(model, group_size=GROUP, bits=4, class_predicate=_quantizable)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert isinstance(dict(loaded.named_modules())["backbone.blocks.0.q"], QuantizedLinearProjection)
    assert mx.array_equal(loaded(IDS)[0], model(IDS)[0])

