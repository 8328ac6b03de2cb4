"""Bad input to `generate`, `chat`, `serve`, `convert`, `bench` and `mlx-lm` (a sweep beyond
test_cli_robustness.py): each case is refused with exit code 2 and one line naming the problem,
without a traceback, before any work that would be lost."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import assert_rejected, run_main
from conftest import repo_env

from xlstm_metal.cli import main

REPO = Path(__file__).resolve().parent.parent


def with_packaged_tokenizer(directory: Path) -> Path:
    from xlstm_metal.assets import DEFAULT_MODEL_DIR

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, directory / name)
    return directory


@pytest.fixture
def model_dir(tmp_path):
    """A tiny random checkpoint (vocabulary 4096) with the packaged model's tokenizer (4096 tokens)."""
    from conftest import tiny_model

    from xlstm_metal.loading import save_model

    path = tmp_path / "tiny4096"
    with pytest.warns(UserWarning, match="qk_dim"):
        save_model(tiny_model(vocab_size=4096), path)
    return with_packaged_tokenizer(path)


@pytest.fixture
def small_vocab_model(tiny_model_dir):
    """The tiny checkpoint of conftest (vocabulary 97) with the packaged model's tokenizer (4096 tokens)."""
    return with_packaged_tokenizer(tiny_model_dir)


# ---------------------------------------------------------------------- mlx-lm: corrupt weight files
#: Weight files mlx-lm's mx.load failed on with a RuntimeError that was not "[load...]": an empty
#: file ("[read] Unable to read 8 bytes from file.") and a header that is not JSON
#: ("[json.exception.parse_error.101] ...").
CUT_OFF = {"empty": b"", "header-not-json": (5).to_bytes(8, "little") + b"nope!"}


@pytest.mark.parametrize("content", CUT_OFF.values(), ids=CUT_OFF.keys())
def test_mlx_lm_generate_with_cut_off_weights_is_a_usage_error(content, model_dir, capsys):
    pytest.importorskip("mlx_lm")
    (model_dir / "model.safetensors").write_bytes(content)
    assert_rejected(["mlx-lm", "generate", "--model", model_dir, "--prompt", "hi", "--max-tokens", "2"], capsys,
                    "mlx-lm generate: cannot read weight file", "model.safetensors", "corrupted or truncated")


def test_mlx_lm_server_with_corrupt_weights_exits_instead_of_listening(model_dir):
    # mlx-lm's server loads the model in its generation thread: the error was logged with a
    # traceback from a dead thread while the server went on listening (and answering nothing).
    pytest.importorskip("mlx_lm")
    (model_dir / "model.safetensors").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "xlstm_metal", "mlx-lm", "server", "--model", str(model_dir),
                           "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, cwd=REPO,
                          env=repo_env())
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "mlx-lm server: cannot read weight file" in err, err


def mlx_lm_server(model_dir, *extra, port="0"):
    return subprocess.Popen([sys.executable, "-m", "xlstm_metal", "mlx-lm", "server", "--model", str(model_dir),
                             "--port", port, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env=repo_env())


def test_mlx_lm_server_with_unloadable_model_exits(model_dir):
    # A config that does not match the weights: mlx-lm's generation thread died with a traceback
    # and the server went on listening (no exit at all).
    pytest.importorskip("mlx_lm")
    import json

    config = json.loads((model_dir / "config.json").read_text())
    config["embedding_dim"] = config["hidden_size"] = 128
    (model_dir / "config.json").write_text(json.dumps(config))
    proc = mlx_lm_server(model_dir)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "mlx-lm server: Expected shape" in err, err


def test_mlx_lm_server_still_serves_a_good_model(model_dir):
    # The model is now loaded before the server listens, outside mlx-lm's generation thread.
    pytest.importorskip("mlx_lm")
    import json
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = mlx_lm_server(model_dir, port=str(port))
    try:
        body = json.dumps({"prompt": "hello", "max_tokens": 3, "temperature": 0}).encode()
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    reply = json.loads(response.read())
                break
            except urllib.error.HTTPError:
                raise
            except OSError:  # not listening yet
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.3)
        assert reply["usage"]["completion_tokens"] == 3 and reply["choices"][0]["text"]
    finally:
        proc.kill()
        proc.wait()
    assert b"Traceback" not in proc.stderr.read()


# ---------------------------------------------------------------------- a tokenizer larger than the model
def test_serve_refuses_a_tokenizer_larger_than_the_vocabulary(small_vocab_model, capsys, monkeypatch):
    # generate and chat refused it at load; serve listened, and every request whose prompt held
    # an id >= 97 failed with a 500 and a logged traceback (on a GPU: embeddings read out of bounds).
    pytest.importorskip("mlx_lm")
    from xlstm_metal import serve

    monkeypatch.setattr(serve.Server, "serve_forever", serve.Server.close)  # (before the fix: exit 0 here)
    assert_rejected(["serve", "--model", small_vocab_model, "--port", "0", "--no-mem-watchdog"], capsys,
                    "tokenizer.json has 4096 tokens but the model's vocabulary is 97")


def test_convert_check_refuses_a_tokenizer_larger_than_the_vocabulary(small_vocab_model, tmp_path, capsys):
    # The check ran on ids beyond the embedding: a lossless float32 copy reported perplexity -14%,
    # KL 0.14 and top-1 agreement 21% (exit 0). Refused before anything is written.
    text = tmp_path / "check.txt"
    text.write_text("some text to check with, a few words here and there.\n")
    out = tmp_path / "out"
    assert_rejected(["convert", small_vocab_model, out, "--check", text], capsys,
                    "--check: ", "tokenizer.json has 4096 tokens but the model's vocabulary is 97")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["check.txt", "tiny"]


# ---------------------------------------------------------------------- sampling options at temperature 0
@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("extra,words", [
    (["--top-k", "40"], ["--top-k would be ignored", "no --temperature given", "has no generation_config.json"]),
    (["--seed", "3"], ["--seed would be ignored", "the temperature is 0"]),
    (["--temp", "0", "--top-p", "0.9", "--min-p", "0.1"],
     ["--top-p, --min-p would be ignored: --temperature 0 decodes greedily", "leave them out"]),
], ids=["top-k-on-a-greedy-model", "seed-on-a-greedy-model", "filters-with-temp-0"])
def test_sampling_options_at_temperature_0_are_refused(command, extra, words, model_dir, capsys, monkeypatch):
    # Greedy decoding takes the most likely token: the filters and the seed changed nothing and
    # were dropped without a word (`--top-k 40` alone on a model whose generation_config.json does
    # not sample looked like sampling and was greedy).
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    argv = [command, "-m", model_dir, "-n", "2", *extra] + (["-p", "hello"] if command == "generate" else [])
    code, err = run_main(argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().startswith("xlstm-metal: error: ") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_sampling_options_at_temperature_0_from_a_generation_config(model_dir, capsys):
    (model_dir / "generation_config.json").write_text('{"do_sample": false, "max_new_tokens": 4}')
    assert_rejected(["generate", "-m", model_dir, "-p", "hello", "--top-p", "0.5"], capsys,
                    "--top-p would be ignored", "generation_config.json does not set do_sample")
    # What changes nothing, or samples, still generates: the filters at their off values, a
    # temperature > 0 (a tiny one is greedy in effect, but asked for sampling).
    for extra in (["--temp", "0", "--top-k", "0", "--top-p", "1", "--min-p", "0"], ["--temp", "0.7", "--seed", "1"],
                  ["--temp", "1e-45", "--seed", "1", "--top-k", "5"], ["--repetition-penalty", "1.3"]):
        code, err = run_main(["generate", "-m", model_dir, "-p", "hello", "-n", "2", *extra], capsys)
        assert code == 0, (extra, err)


# ---------------------------------------------------------------------- mlx-lm fuse: where it writes
@pytest.fixture
def lora_adapter(model_dir, tmp_path):
    """LoRA adapters for ``model_dir``, trained one step by `xlstm-metal mlx-lm lora`."""
    pytest.importorskip("mlx_lm")
    data = tmp_path / "lora_data"
    data.mkdir()
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(
            "".join(f'{{"text": "the quick brown fox jumps over the lazy dog {i}"}}\n' for i in range(4)))
    adapters = tmp_path / "adapters"
    assert main(["mlx-lm", "lora", "--model", str(model_dir), "--train", "--data", str(data), "--iters", "1",
                 "--batch-size", "1", "--num-layers", "1", "--val-batches", "1", "--steps-per-eval", "1",
                 "--seed", "0", "--adapter-path", str(adapters)]) == 0
    return adapters


def test_mlx_lm_fuse_never_writes_over_the_model_or_an_earlier_result(model_dir, lora_adapter, tmp_path, capsys,
                                                                       monkeypatch):
    # --save-path MODEL replaced the base model's weights, config and tokenizer with the fused
    # ones, then died on a SameFileError traceback (exit 1); a second fuse to the same (default)
    # --save-path replaced the first result without a word.
    monkeypatch.chdir(tmp_path)
    base = tree(model_dir)
    fuse = ["mlx-lm", "fuse", "--model", model_dir, "--adapter-path", lora_adapter]
    assert_rejected([*fuse, "--save-path", model_dir], capsys,
                    f"mlx-lm fuse: --save-path {model_dir} is the --model checkpoint {model_dir}; write it elsewhere")
    assert_rejected([*fuse, f"--save-path={model_dir / 'fused'}"], capsys,
                    "is inside the --model checkpoint directory")
    assert tree(model_dir) == base
    capsys.readouterr()
    assert main([str(a) for a in fuse]) == 0  # into ./fused_model, mlx-lm's default
    first = tree(tmp_path / "fused_model")
    assert "model.safetensors" in first
    assert_rejected(fuse, capsys, "mlx-lm fuse: --save-path fused_model already exists and is not empty",
                    "choose another --save-path")
    assert tree(tmp_path / "fused_model") == first
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert main([str(a) for a in fuse] + ["--save-path", "empty"]) == 0


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- token ids and flags of the tokenizer files
@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize("file,content,words", [
    ("generation_config.json", '{"eos_token_id": "two"}',
     ["eos_token_id in ", "generation_config.json must be an integer or a list of integers, got 'two'"]),
    ("generation_config.json", '{"pad_token_id": true}', ["pad_token_id in ", "generation_config.json", "got True"]),
    ("tokenizer_config.json", '{"add_bos_token": "false"}',
     ["add_bos_token in ", "tokenizer_config.json must be true or false, got 'false'"]),
], ids=["eos-string", "pad-bool", "add-bos-string"])
def test_bad_token_settings_name_their_field_and_file(command, file, content, words, model_dir, capsys, monkeypatch):
    # The message was "token id must be an integer or a list of integers, got 'two'" (which
    # field, which file?), and add_bos_token "false" read as true: BOS inserted anyway.
    import json

    config = json.loads((model_dir / "config.json").read_text())
    config.pop("force_bos_token_insert", None)  # (it decides over add_bos_token)
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / file).write_text(content)
    if command == "serve":
        pytest.importorskip("mlx_lm")
        from xlstm_metal import serve

        monkeypatch.setattr(serve.Server, "serve_forever", serve.Server.close)
    argv = ["generate", "-m", model_dir, "-p", "hi", "-n", "2"] if command == "generate" else \
        ["serve", "-m", model_dir, "--port", "0", "--no-mem-watchdog"]
    assert_rejected(argv, capsys, *words)
