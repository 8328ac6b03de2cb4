"""Hunt s52, `xlstm-metal train`'s data: files read whole and byte-exact (a NUL past 8 KiB, the byte a
BOM file's bad UTF-8 is at, a lone CR in JSON Lines), a data directory's links and odd entries, and a
validation fraction that rounds to no token."""

import os

import numpy as np
import pytest

import xlstm_metal  # noqa: F401  (BLAS preload before mlx use)
from cli_helpers import assert_rejected
from test_train_cli import BASE, make_corpus
from xlstm_metal.training.data import DataError, load_documents, split_stream


@pytest.mark.parametrize("name, raw, expected", [
    # A NUL byte was looked for in the first 8 KiB only: one further on was trained on.
    ("late_nul.txt", b"a" * 9000 + b"\x00b", "late_nul.txt looks binary (it contains NUL bytes)"),
    # The byte named in a BOM file was counted after the BOM: 3 short.
    ("bom.txt", b"\xef\xbb\xbfab\xff", "bom.txt is not UTF-8 text (invalid start byte at byte 5)"),
])
def test_files_are_checked_whole_and_errors_name_the_byte(tmp_path, name, raw, expected):
    (tmp_path / name).write_bytes(raw)
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_documents([tmp_path / name])


def test_json_lines_records_split_at_newlines_only(tmp_path):
    """A lone CR is JSON whitespace; text mode split the record there ("not valid JSON")."""
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "first",\r "id": 1}\r\n{"text": "second"}')
    (tmp_path / "b.txt").write_bytes(b"one\r\ntwo\rthree")  # plain text: newlines as before
    assert [d.text for d in load_documents([tmp_path])] == ["first", "second", "one\ntwo\nthree"]


def test_linked_directories_in_data_are_read(tmp_path):
    """Files under a link to a directory were skipped without a word (links to files were read); a
    link back up the tree is no loop."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.txt").write_text("linked")
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("plain")
    os.symlink(tmp_path / "other", data / "more")
    os.symlink(data, data / "again")  # a cycle
    assert [d.text for d in load_documents([data])] == ["plain", "linked"]


def test_unlistable_subdirectory_is_an_error(tmp_path, monkeypatch):
    """os.walk skipped a subdirectory it could not list without a word."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("hidden from us")
    (tmp_path / "b.txt").write_text("seen")
    listdir = os.listdir

    def refusing(path):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied")
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refusing)
    with pytest.raises(DataError, match=r"cannot list data directory .*sub: Permission denied"):
        load_documents([tmp_path])


@pytest.mark.parametrize("case", ["broken_link", "fifo"])
def test_odd_data_entries_exit_2(case, tmp_path, capsys):
    """A broken link in a data directory ended in a FileNotFoundError traceback; a FIFO given as data
    was "not found"."""
    corpus = make_corpus(tmp_path / "corpus")
    if case == "broken_link":
        os.symlink(tmp_path / "gone.txt", corpus / "dangling.txt")
        data, words = corpus, ("dangling.txt in data directory", "is a broken link")
    else:
        data = tmp_path / "pipe"
        os.mkfifo(data)
        data, words = data, ("pipe is not a regular file or directory",)
    assert_rejected(["train", data, "--out", tmp_path / "out", *BASE, "--steps", "4"], capsys, *words)
    assert not (tmp_path / "out").exists()


def test_validation_fraction_that_rounds_to_no_token_is_refused(tmp_path, capsys):
    """--val-fraction 1e-6 of a small corpus held out 0 tokens: the run trained without validation,
    noting '--val-fraction 0'."""
    _, val = split_stream([np.arange(50, dtype=np.int32)], 0.001, seed=0)
    assert len(val) == 1
    assert len(split_stream([np.arange(50, dtype=np.int32)], 0.0, seed=0)[1]) == 0
    corpus = make_corpus(tmp_path / "corpus")
    args = ["train", corpus, "--out", tmp_path / "out", *BASE, "--steps", "4"]
    args[args.index("--val-fraction") + 1] = "1e-6"
    assert_rejected(args, capsys, "validation split has 1 tokens: too few for one window of 33",
                    "raise --val-fraction")
