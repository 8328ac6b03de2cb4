"""`generate` / `chat` on hostile input and output: a reader that goes away, bytes that are not
UTF-8, and --stop escapes. Subprocesses run the packaged model, as a user's shell would."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xlstm_metal.cli import main

REPO = Path(__file__).resolve().parent.parent
#: Bytes like the start of an executable: not UTF-8 (0x80.. 0xff alone never are).
BINARY = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8


def xlstm_metal(*argv, stdin=None, env=None, stdout=subprocess.PIPE, timeout=120):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "xlstm_metal", *argv], input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, env=full_env, timeout=timeout, cwd=REPO)


def assert_clean_usage_error(proc, *words):
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("xlstm-metal: error: "), err
    for word in words:
        assert word in err, err


def test_closed_stdout_ends_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first token: every write hits EPIPE
    try:
        proc = xlstm_metal("generate", "-p", "The Python", "-n", "40", "--temp", "0", stdout=write_end)
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


#: stdin decoded strictly (UnicodeDecodeError on read) or with surrogateescape (bad bytes kept).
DECODING = ["utf-8:strict", "utf-8:surrogateescape"]


@pytest.mark.parametrize("encoding", DECODING)
def test_binary_stdin_prompt_is_a_usage_error(encoding):
    env = {"PYTHONIOENCODING": encoding}
    proc = xlstm_metal("generate", "-p", "-", "-n", "3", stdin=BINARY, env=env)
    assert_clean_usage_error(proc, "stdin", "not UTF-8", "0x80")
    assert proc.stdout == b""


@pytest.mark.parametrize("encoding", DECODING)
def test_binary_chat_input_is_a_usage_error(encoding):
    env = {"PYTHONIOENCODING": encoding}
    proc = xlstm_metal("chat", "-n", "3", stdin=BINARY, env=env)
    assert_clean_usage_error(proc, "not UTF-8")


def test_non_utf8_prompt_argument_is_a_usage_error():
    # bash's -p $'caf\xe9': Python keeps the byte as a lone surrogate in sys.argv.
    proc = xlstm_metal("generate", "-p", b"caf\xe9", "-n", "3")
    assert_clean_usage_error(proc, "--prompt", "not UTF-8", "0xe9")


def test_surrogate_text_is_a_value_error_in_the_api():
    from xlstm_metal.generation import DEFAULT_MODEL_DIR, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)
    with pytest.raises(ValueError, match="not valid Unicode"):
        tokenizer.encode("caf\udce9")
    assert tokenizer.encode("café") == tokenizer.encode("café")  # real text still encodes


def test_stop_escapes():
    from xlstm_metal.cli.generate import unescape_stop

    assert unescape_stop(r"\n\n") == "\n\n"
    assert unescape_stop(r"a\tb\r\n") == "a\tb\r\n"
    assert unescape_stop(r"C:\\dir") == "C:\\dir"
    assert unescape_stop(r"\\n") == "\\n"  # an escaped backslash, then a plain n
    assert unescape_stop(r"\d+") == r"\d+"  # other escapes stay as typed
    assert unescape_stop("plain") == "plain"


def test_readme_stop_newlines_stops_at_the_first_blank_line(capsys, monkeypatch):
    # The packaged model, greedy, writes paragraphs: without the escape the literal backslashes
    # never appear and all 120 tokens come out.
    monkeypatch.setattr(sys, "stdin", io.StringIO("def read_file(path):"))
    assert main(["generate", "--prompt", "-", "--temp", "0", "-n", "120"]) == 0
    full = capsys.readouterr().out
    assert "\n\n" in full.rstrip("\n"), full
    monkeypatch.setattr(sys, "stdin", io.StringIO("def read_file(path):"))
    assert main(["generate", "--prompt", "-", "--temp", "0", "-n", "120", "--stop", r"\n\n"]) == 0
    out = capsys.readouterr().out
    assert out == full[: full.index("\n\n")] + "\n"
