"""``mlx_lm.convert --quant-predicate mixed_*`` on our checkpoints (xLSTM-Large and the 2024
xLSTM): every recipe mlx-lm offers converts them, the result loads and generates in mlx-lm, its
config.json gives the layers the recipe's bit widths, and xlstm-metal's loader reads it with
mlx-lm's logits. mlx-lm's recipes look for Llama's layer names (``down_proj``) and refused our
models ("Model does not have expected keys for mixed quant."). Tiny random models with 8
blocks, written to temp dirs; nothing downloads."""

import importlib
import json
import re
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_model
from test_tokenizer import train_tiny_tokenizer

import xlstm_metal
from xlstm_metal import load_model, save_model
from xlstm_metal.generation.tokenizer import Tokenizer

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm import stream_generate  # noqa: E402

from xlstm_metal.mlx_lm_model import FLOAT_GATES, recipe_name  # noqa: E402

#: mlx-lm's recipes (mlx_lm.convert is also the name of its function: the module by its full name).
RECIPES = importlib.import_module("mlx_lm.convert").QUANT_RECIPES
#: The blocks of 8 that get the high bit width (llama.cpp's Q4_K_M choice, as mlx-lm's recipes
#: make it): the first and last eighth, and every third block between.
HIGH_BLOCKS = {0, 3, 6, 7}
PROMPT = "the cat sat on the mat"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


@pytest.fixture(scope="module", params=["large", "2024"])
def ckpt(request, tmp_path_factory):
    hf = train_tiny_tokenizer()
    if request.param == "large":
        model, tok = tiny_model(2, vocab_size=hf.get_vocab_size(), num_blocks=8), hf
    else:  # mLSTM blocks (their down projection: xlstm.proj_down) and sLSTM blocks (ffn.proj_down), alternating
        model = xlstm_metal.create_xlstm_model(vocab_size=hf.get_vocab_size(), num_layers=8, signature=(1, 1),
                                               inp_dim=64, head_dim=16, head_num=4, seed=1)
        tok = Tokenizer(hf, bos_token_id=0, eos_token_ids=[2])
    return save_model(model, tmp_path_factory.mktemp(request.param) / "ckpt", tokenizer=tok)


def recipe_bits(recipe: str) -> tuple[int, int]:
    low, high = re.fullmatch(r"mixed_(\d)_(\d)", recipe).groups()
    return int(low), int(high)


def intended_bits(path: str, low: int, high: int) -> int:
    """The recipe's bits for a layer: high for the LM head, and for the down projections and
    xLSTM-Large's value projection (Llama's down_proj and v_proj) of the high blocks."""
    block = re.search(r"\bblocks\.(\d+)\.", path)
    if path == "lm_head" or (block and int(block[1]) in HIGH_BLOCKS
                             and re.search(r"(\.proj_down|\.mlstm_layer\.v)$", path)):
        return high
    return low


@pytest.fixture(scope="module")
def layers(ckpt) -> list[str]:
    """The quantizable layers of the float model (as mlx-lm loads it)."""
    model = mlx_lm.load(str(ckpt), trust_remote_code=True)[0]
    return [path for path, module in model.named_modules() if path and hasattr(module, "to_quantized")]


def test_recipe_names():
    """Our layers under the Llama names the recipes read; the others keep theirs."""
    assert recipe_name("backbone.blocks.3.ffn.proj_down") == "backbone.blocks.3.ffn.down_proj"
    assert recipe_name("xlstm_block_stack.blocks.0.xlstm.proj_down") == "xlstm_block_stack.blocks.0.xlstm.down_proj"
    assert recipe_name("backbone.blocks.3.mlstm_layer.v") == "backbone.blocks.3.mlstm_layer.v_proj"
    for kept in ("lm_head", "backbone.embeddings", "backbone.blocks.3.mlstm_layer.k",
                 "backbone.blocks.3.ffn.proj_up", "xlstm_block_stack.blocks.0.xlstm.mlstm_cell.v_proj"):
        assert recipe_name(kept) == kept


@pytest.mark.parametrize("recipe", RECIPES)
def test_mixed_recipe_converts_loads_and_generates(ckpt, layers, tmp_path, recipe):
    from mlx_lm.convert import convert

    out = tmp_path / recipe
    # No group size, as the command line's default: mlx-lm's (64) is written into each layer's entry.
    convert(str(ckpt), mlx_path=str(out), quantize=True, quant_predicate=recipe, trust_remote_code=True)
    low, high = recipe_bits(recipe)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    stored = mx.load(str(out / "model.safetensors"))
    model, tokenizer = mlx_lm.load(str(out), trust_remote_code=True)
    modules = dict(model.named_modules())
    gates = [p for p in layers if p.rsplit(".", 1)[-1] in FLOAT_GATES]
    assert gates and len(gates) < len(layers)
    for path in layers:
        module = modules[path]
        if path in gates:  # kept in float, as by convert -q
            assert path not in quantization and f"{path}.scales" not in stored
            assert not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
            continue
        bits = intended_bits(path, low, high)
        assert quantization[path] == {"group_size": 64, "bits": bits, "mode": "affine"}, path
        assert (module.bits, module.group_size) == (bits, 64), path
    high_layers = [p for p in layers if p not in gates and intended_bits(p, low, high) == high]
    assert "lm_head" in high_layers and len(high_layers) >= 5 and len(high_layers) < len(layers) - len(gates)

    # mlx-lm generates from it (EOS barred: the random model may pick it first).
    eos = mx.array(sorted(tokenizer.eos_token_ids))

    def no_eos(tokens, logits):
        logits[:, eos] = -mx.inf
        return logits

    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=4, logits_processors=[no_eos]))
    assert len(responses) == 4 and responses[-1].finish_reason == "length"

    # xlstm-metal's loader reads the per-layer entries: the same layers, the same logits.
    ours = load_model(out)
    for path, module in ours.named_modules():
        if path in quantization:
            assert (module.bits, module.group_size) == (quantization[path]["bits"], 64), path
    ids = mx.array([tokenizer.encode(PROMPT)])
    expected = np.array(model(ids))
    assert rel_err(np.array(ours(ids)[0]), expected) <= 1e-5
    assert rel_err(np.array(load_model(ckpt)(ids)[0]), expected) > 1e-3  # the quantization is visible


@pytest.mark.slow
@pytest.mark.parametrize("command", [["-m", "mlx_lm", "convert", "--trust-remote-code"],
                                     ["-m", "mlx_lm.convert", "--trust-remote-code"],
                                     ["-m", "xlstm_metal", "mlx-lm", "convert"]],
                         ids=["mlx_lm_convert", "deprecated_module_run", "xlstm_metal_mlx_lm_convert"])
def test_mixed_recipe_from_the_command_line(ckpt, tmp_path, command):
    """mlx-lm's own command, in a process that imports our model code only when convert loads
    the checkpoint (its model file): the recipe is built after that; run as ``python -m
    mlx_lm.convert`` convert looks the builder up in ``__main__``. And `xlstm-metal mlx-lm
    convert` (which trusts our model file itself)."""
    out = tmp_path / "q"
    result = subprocess.run(
        [sys.executable, *command, "--hf-path", str(ckpt), "--mlx-path", str(out), "--quantize",
         "--quant-predicate", "mixed_3_6"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["lm_head"] == {"group_size": 64, "bits": 6, "mode": "affine"}
    model, tokenizer = mlx_lm.load(str(out), trust_remote_code=True)
    ids = mx.array([tokenizer.encode(PROMPT)])
    assert rel_err(np.array(load_model(out)(ids)[0]), np.array(model(ids))) <= 1e-5
