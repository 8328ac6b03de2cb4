"""`xlstm-metal mlx-lm ...` refuses what mlx-lm would silently ignore or lose (exit 2, one line
naming the problem, nothing written): convert's --q-* options without -q or outside MLX's
quantization, lora's --adapter-path holding earlier adapters (or naming a file), generate's
and the server's KV-cache options for an xLSTM, chat-template options without a template, an empty prompt and a
local model path that does not exist, fuse's --gguf-path without --export-gguf and --export-gguf
of an xLSTM. The valid forms still run. Tiny random checkpoints; nothing downloads."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from cli_helpers import assert_rejected

pytest.importorskip("mlx_lm")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random xLSTM-Large checkpoint (seed 0) with the packaged tokenizer (no chat template)."""
    from conftest import tiny_model

    from xlstm_metal.assets import DEFAULT_MODEL_DIR
    from xlstm_metal.loading import save_model

    path = tmp_path_factory.mktemp("mlxlm") / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # save_model: the width-64 model's qk_dim note
        save_model(tiny_model(0, vocab_size=4096), path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, path / name)
    assert "chat_template" not in json.loads((path / "tokenizer_config.json").read_text())
    return path


@pytest.fixture(scope="module")
def lora_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("lora_data")
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(
            "".join(f'{{"text": "the quick brown fox jumps over the lazy dog {i}"}}\n' for i in range(4)))
    return data


def lora_args(ckpt: Path, data: Path, *extra) -> list:
    return ["mlx-lm", "lora", "--model", ckpt, "--train", "--data", data, "--iters", "1", "--batch-size", "1",
            "--num-layers", "1", "--val-batches", "1", "--steps-per-eval", "1", "--seed", "0", *extra]


@pytest.fixture(scope="module")
def adapters(ckpt, lora_data, tmp_path_factory) -> Path:
    """LoRA adapters of ``ckpt`` trained one step into a new --adapter-path (that still works)."""
    from xlstm_metal.cli import main

    path = tmp_path_factory.mktemp("lora") / "adapters"
    assert main([str(a) for a in lora_args(ckpt, lora_data, "--adapter-path", path)]) == 0
    assert {"adapters.safetensors", "adapter_config.json"} <= set(tree(path))
    return path


# ---------------------------------------------------------------------- convert: -q's options
@pytest.mark.parametrize("flags, words", [
    (["--q-bits", "3"], ["--q-bits only applies with -q/--quantize", "written unquantized"]),
    (["--q-mode=mxfp4", "--q-group-size", "32"], ["--q-group-size, --q-mode only apply with -q/--quantize"]),
    (["--quant-predicate", "mixed_3_6"], ["--quant-predicate only applies with -q"]),
    (["-q", "--q-bits", "0"], ["--q-bits must be one of 2, 3, 4, 5, 6, 8", "got 0"]),
    (["-q", "--q-bits=7"], ["--q-bits must be one of 2, 3, 4, 5, 6, 8", "got 7"]),
    (["-q", "--q-group-size", "0"], ["--q-group-size must be one of 32, 64, 128", "got 0"]),
    (["--quantize", "--q-group-size", "7"], ["--q-group-size must be one of 32, 64, 128", "got 7"]),
    (["-q", "--q-mode", "nvfp4", "--q-group-size", "32"], ["--q-mode nvfp4 has --q-group-size 16, got 32"]),
    (["-q", "--q-mode", "mxfp8", "--q-bits", "4"], ["--q-mode mxfp8 has --q-bits 8, got 4"]),
    (["-q", "--quant-predicate", "mixed_3_6", "--q-bits", "4"],
     ["sets every layer's bits", "--q-bits would be ignored"]),
], ids=["bits-without-q", "mode-without-q", "recipe-without-q", "bits-0", "bits-7", "group-0", "group-7",
        "nvfp4-group", "mxfp8-bits", "recipe-and-bits"])
def test_convert_quantization_options_that_would_not_take_effect(ckpt, tmp_path, capsys, flags, words):
    # mlx-lm wrote a float model for --q-bits without -q, took 0 as its default (the config said
    # 4/64), quantized nothing with group size 7 yet recorded it (our loader refuses that).
    out = tmp_path / "out"
    assert_rejected(["mlx-lm", "convert", "--hf-path", ckpt, "--mlx-path", out, *flags], capsys,
                    "mlx-lm convert: ", *words)
    assert not out.exists()


def test_convert_valid_quantization_still_converts(ckpt, tmp_path, capsys):
    from xlstm_metal.cli import main

    assert_rejected(["mlx-lm", "convert", "--hf-path", ckpt, "--mlx-path", tmp_path / "bad", "-q", "--q-bits", "8",
                     "--q-group-size", "7"], capsys, "--q-group-size must be one of")
    out = tmp_path / "q8"
    assert main(["mlx-lm", "convert", "--hf-path", str(ckpt), "--mlx-path", str(out), "-q", "--q-bits", "8",
                 "--q-group-size", "32"]) == 0
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert (quantization["bits"], quantization["group_size"], quantization["mode"]) == (8, 32, "affine")
    assert not (tmp_path / "bad").exists()


def test_convert_group_size_that_reaches_no_layer(ckpt, tmp_path, capsys):
    """Groups of 128 divide no input width of the 64-wide model: mlx-lm quantized no layer and
    wrote a float model whose config said "quantization": {"group_size": 128, ...}."""
    out = tmp_path / "q128"
    assert_rejected(["mlx-lm", "convert", "--hf-path", ckpt, "--mlx-path", out, "-q", "--q-group-size", "128"],
                    capsys, "quantization with groups of 128 reached no layer", "smaller --q-group-size")
    assert not out.exists()


def test_convert_names_layers_the_width_keeps_in_float(capsys):
    """A layer whose input width no group divides stays in float: named in a warning; one kept
    in float on purpose (a gate the model's predicate leaves out) is not."""
    import types

    import mlx.nn as nn

    from xlstm_metal.cli.mlxlm import convert_quantizes_what_it_says

    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(48, 8), nn.Linear(64, 8))

    def quantize_model(model, config, group_size, bits, **kwargs):
        model.layers[0] = model.layers[0].to_quantized(group_size=group_size, bits=bits)
        return model, {**config, "quantization": {"group_size": group_size, "bits": bits}}

    convert = types.SimpleNamespace(quantize_model=quantize_model)
    with convert_quantizes_what_it_says(convert):
        convert.quantize_model(model, {}, 32, 4)
    assert convert.quantize_model is quantize_model
    assert capsys.readouterr().err == ("warning: 1 layer stays in float (input width not a multiple of 32): "
                                       "layers.1\n")


# ---------------------------------------------------------------------- lora: --adapter-path
def test_lora_never_writes_over_earlier_adapters(ckpt, lora_data, adapters, tmp_path, capsys):
    # A second run to the same (default) --adapter-path replaced the first one's adapters silently.
    earlier = tmp_path / "earlier"
    shutil.copytree(adapters, earlier)
    before = tree(earlier)
    assert_rejected(lora_args(ckpt, lora_data, "--adapter-path", earlier, "--learning-rate", "1"), capsys,
                    f"mlx-lm lora: --adapter-path {earlier} already holds adapters",
                    "adapter_config.json, adapters.safetensors", "choose another --adapter-path",
                    "--resume-adapter-file")
    # Set in --config (lora's YAML), and a directory holding only a step checkpoint: the same.
    config = tmp_path / "lora.yaml"
    config.write_text(f"adapter_path: {earlier}\n")
    assert_rejected(lora_args(ckpt, lora_data, "--config", config), capsys, "already holds adapters")
    steps = tmp_path / "steps"
    steps.mkdir()
    (steps / "0000100_adapters.safetensors").write_bytes(b"step 100")
    assert_rejected(lora_args(ckpt, lora_data, f"--adapter-path={steps}"), capsys, "0000100_adapters.safetensors")
    assert tree(earlier) == before and tree(steps) == {"0000100_adapters.safetensors": b"step 100"}


def test_lora_adapter_path_that_is_a_file(ckpt, lora_data, tmp_path, capsys):
    # mlx-lm's mkdir ended in a FileExistsError traceback.
    file = tmp_path / "adapters"
    file.write_bytes(b"mine")
    assert_rejected(lora_args(ckpt, lora_data, "--adapter-path", file), capsys,
                    f"mlx-lm lora: --adapter-path {file} is a file, not a directory")
    assert_rejected(lora_args(ckpt, lora_data, "--adapter-path", file / "sub"), capsys,
                    f"{file} is not a writable directory")
    assert file.read_bytes() == b"mine"


# ---------------------------------------------------------------------- generate
@pytest.mark.parametrize("flags", [["--max-kv-size", "2"], ["--kv-bits", "4"], ["--kv-bits=8"],
                                   ["--kv-group-size", "32"], ["--quantized-kv-start", "0"]],
                         ids=["max-kv-size", "kv-bits", "kv-bits=", "kv-group-size", "quantized-kv-start"])
def test_generate_kv_cache_options_for_an_xlstm(ckpt, capsys, flags):
    # They set an attention model's KV cache: for an xLSTM they changed nothing, without a word.
    err = assert_rejected(["mlx-lm", "generate", "--model", ckpt, "--prompt", "x", "--max-tokens", "2", *flags],
                          capsys, f"mlx-lm generate: {flags[0].split('=')[0]} sets an attention model's KV cache",
                          "xLSTM keeps a fixed-size recurrent state, no KV cache")
    assert "Generation:" not in err


@pytest.mark.parametrize("flags", [["--kv-bits", "4"], ["--kv-group-size", "32"], ["--quantized-kv-start", "0"]],
                         ids=["kv-bits", "kv-group-size", "quantized-kv-start"])
def test_server_kv_cache_options_for_an_xlstm(ckpt, capsys, monkeypatch, flags):
    """The server's KV-cache options are refused once its model is loaded, before it listens."""
    import mlx_lm.server

    served = []
    monkeypatch.setattr(mlx_lm.server, "run", lambda *a, **k: served.append(a))  # (instead of listening)
    assert_rejected(["mlx-lm", "server", "--model", ckpt, "--port", "0", *flags], capsys,
                    f"mlx-lm server: {flags[0]} sets an attention model's KV cache")
    assert served == []
    from xlstm_metal.cli import main

    assert main(["mlx-lm", "server", "--model", str(ckpt), "--port", "0"]) == 0 and len(served) == 1


def test_generate_system_prompt_needs_a_chat_template(ckpt, tmp_path, capsys):
    from xlstm_metal.cli import main

    # mlx-lm dropped --system-prompt without a word where the tokenizer has no chat template.
    base = ["mlx-lm", "generate", "--prompt", "hello", "--max-tokens", "1", "--temp", "0"]
    assert_rejected([*base, "--model", ckpt, "--system-prompt", "be brief"], capsys,
                    "mlx-lm generate: --system-prompt only goes into the chat template",
                    "the model's tokenizer has no chat template", "it would be dropped")
    templated = tmp_path / "templated"
    shutil.copytree(ckpt, templated)
    tokenizer_config = json.loads((templated / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (templated / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert_rejected([*base, "--model", templated, "--ignore-chat-template", "--system-prompt", "be brief"], capsys,
                    "--ignore-chat-template is given")

    counts = []
    for extra in ([], ["--system-prompt", "be brief and kind"]):
        capsys.readouterr()
        assert main([str(a) for a in [*base, "--model", templated, *extra]]) == 0
        counts.append(int(re.search(r"Prompt: (\d+) tokens", capsys.readouterr().out).group(1)))
    assert counts[1] > counts[0]  # with a template, the system prompt is in the prompt


def test_generate_empty_prompt_is_refused(ckpt, capsys, monkeypatch):
    # `--prompt -` with nothing on stdin generated from an empty prompt without a word.
    from xlstm_metal.cli import main

    base = ["mlx-lm", "generate", "--model", ckpt, "--max-tokens", "2", "--temp", "0"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert_rejected([*base, "--prompt", "-"], capsys, "mlx-lm generate: --prompt - read nothing from stdin",
                    "the prompt is empty")
    assert_rejected([*base, "-p", ""], capsys, "mlx-lm generate: -p is empty")
    stdin = io.StringIO("the cat sat")
    monkeypatch.setattr(sys, "stdin", stdin)
    capsys.readouterr()
    assert main([str(a) for a in [*base, "--prompt=-"]]) == 0
    assert re.search(r"Prompt: [1-9]\d* tokens", capsys.readouterr().out)
    assert sys.stdin is stdin  # put back after mlx-lm read it


@pytest.mark.parametrize("command", ["generate", "convert", "lora", "fuse"])
def test_a_local_model_path_that_does_not_exist(tmp_path, capsys, monkeypatch, command):
    # mlx-lm looked it up on the Hugging Face Hub: "Repo id must be in the form ...".
    monkeypatch.chdir(tmp_path)
    option = "--hf-path" if command == "convert" else "--model"
    for missing in (str(tmp_path / "no" / "such"), "./missing", "a/b/c"):
        err = assert_rejected(["mlx-lm", command, option, missing], capsys,
                              f"mlx-lm {command}: model path {missing} does not exist")
        assert "Repo id" not in err
    assert sorted(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- fuse: GGUF
def test_fuse_gguf_path_without_export_gguf(ckpt, adapters, tmp_path, capsys):
    # No GGUF was written, and no word said so.
    out = tmp_path / "fused"
    assert_rejected(["mlx-lm", "fuse", "--model", ckpt, "--adapter-path", adapters, "--save-path", out,
                     "--gguf-path", "x.gguf"], capsys,
                    "mlx-lm fuse: --gguf-path names the file --export-gguf writes", "no GGUF is written")
    assert not out.exists()


def test_fuse_export_gguf_of_an_xlstm_writes_nothing(ckpt, adapters, tmp_path, capsys):
    # mlx-lm refused the model type only after writing the fused model into --save-path.
    out = tmp_path / "fused"
    before = tree(ckpt)
    assert_rejected(["mlx-lm", "fuse", "--model", ckpt, "--adapter-path", adapters, f"--save-path={out}",
                     "--export-gguf"], capsys, "mlx-lm fuse: --export-gguf",
                    "GGUF for Llama, Mistral and Mixtral models only, not xLSTM")
    assert not out.exists() and tree(ckpt) == before
