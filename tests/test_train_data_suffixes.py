"""JSON Lines data under its other usual names (.ndjson, upper case) is read record by record,
not as plain text (its JSON syntax was trained on)."""

import json

import pytest

import xlstm_metal  # noqa: F401  (BLAS preload before mlx use)
from xlstm_metal.training.data import holds_jsonl, iter_documents


@pytest.mark.parametrize("name", ["a.jsonl", "a.JSONL", "a.ndjson", "a.NDJson"])
def test_json_lines_files_are_read_by_record(tmp_path, name):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(["first doc", "second"])))
    assert [d.text for d in iter_documents([path])] == ["first doc", "second"]
    assert holds_jsonl([tmp_path]) and holds_jsonl([path])


def test_other_files_stay_text(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text('{"text": "not a record"}\n')
    assert [d.text for d in iter_documents([path])] == ['{"text": "not a record"}\n']
    assert not holds_jsonl([path])
