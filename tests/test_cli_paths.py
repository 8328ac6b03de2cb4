"""Paths the system refuses, as a user may give them: a name over 255 bytes (Python's Path.exists
raises for it instead of saying False: a traceback in every command that took one) and a
directory that os.access calls writable but is not (root on /proc: training ran, then failed
writing its first log line)."""

from __future__ import annotations

import errno
import os

import pytest

from cli_helpers import assert_rejected

from xlstm_metal.cli import main

LONG = "a" * 300


@pytest.mark.parametrize("argv", [
    ["train", "{data}", "--out", "{long}", "--steps", "1"],
    ["mad", "--arch", "mlstm", "--out", "{long}"],
    ["plot", "{data}", "--out", "{long}.png"],
])
def test_an_output_name_over_255_bytes_is_a_usage_error(argv, text_data, tmp_path, capsys):
    long = tmp_path / LONG
    err = assert_rejected([a.format(data=text_data, long=long) for a in argv], capsys, "File name too long")
    assert "--out" in err and "..." in err  # the name shortened in the message
    assert os.listdir(tmp_path) == ["data.txt"]


@pytest.mark.parametrize("argv", [
    ["train", "{long}", "--out", "{tmp}/run", "--steps", "1"],
    ["profile", "show", "{long}.json"],
    ["mad", "--arch", "{long}.yaml", "--show-wiring"],
])
def test_an_input_name_over_255_bytes_is_a_usage_error(argv, tmp_path, capsys):
    assert_rejected([a.format(long=tmp_path / LONG, tmp=tmp_path) for a in argv], capsys, "File name too long")
    assert os.listdir(tmp_path) == []


def test_other_os_errors_keep_their_traceback(monkeypatch):
    """Only errors a given path causes are the user's; a full disk is not."""
    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("xlstm_metal.cli.bench.run", full)
    with pytest.raises(OSError, match="No space left"):
        main(["bench", "--shape", "125m"])


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_under_proc_is_refused_before_any_work(text_data, tmp_path, capsys):
    """As root, os.access('/proc', W_OK) is true; mkdir there fails. train used to train its
    tokenizer and run its steps first, then fail writing its log (a FileNotFoundError traceback)."""
    before = sorted(os.listdir(tmp_path))
    assert_rejected(["train", text_data, "--out", "/proc/xlstm-metal-run", "--steps", "1"], capsys,
                    "--out /proc/xlstm-metal-run cannot be created")
    assert_rejected(["mad", "--arch", "mlstm", "--show-wiring", "--mem-log", "/proc/x.csv"], capsys,
                    "--mem-log: directory /proc is not writable")
    assert sorted(os.listdir(tmp_path)) == before


def test_the_probe_leaves_nothing_behind(text_data, tmp_path, capsys, monkeypatch):
    """The writability probe's file is removed: a refused run leaves the directory as it was."""
    from xlstm_metal.cli import check_output_path

    assert check_output_path(tmp_path / "new" / "deeper", "--out", directory=True) == tmp_path / "new" / "deeper"
    assert check_output_path(tmp_path / "f.png", "--out", directory=False) == tmp_path / "f.png"
    assert sorted(os.listdir(tmp_path)) == ["data.txt"]
