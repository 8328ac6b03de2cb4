"""Bad input to `generate`, `chat`, `serve`, `convert`, `bench` and `mlx-lm` (a sweep beyond
test_cli_robustness.py): each case is refused with exit code 2 and one line naming the problem,
without a traceback, before any work that would be lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xlstm_metal.cli import main

REPO = Path(__file__).resolve().parent.parent


def run_main(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_rejected(argv, capsys, *words):
    code, err = run_main(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("xlstm-metal: error: "), err
    for word in words:
        assert word in err, err


@pytest.fixture
def model_dir(tiny_model_dir):
    """The tiny random checkpoint with the packaged model's tokenizer."""
    from xlstm_metal.assets import DEFAULT_MODEL_DIR

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, tiny_model_dir / name)
    return tiny_model_dir


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
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "mlx-lm server: cannot read weight file" in err, err
