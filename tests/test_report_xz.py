"""benchmarks/report.py finds and reads a results file stored xz-compressed (NAME.xz) as NAME."""

from __future__ import annotations

import importlib.util
import json
import lzma
from pathlib import Path

import pytest


@pytest.fixture
def report(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("report", Path(__file__).parent.parent / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


def _xz(path: Path, text: str) -> None:
    path.with_name(path.name + ".xz").write_bytes(lzma.compress(text.encode(), preset=9))


def test_a_jsonl_stored_only_as_xz_is_found_and_read(report, tmp_path):
    record = {"kind": "decode", "q_bits": 4, "batch": 1, "setting": "fused decode kernels"}
    (tmp_path / "h200_qdecode_s1r1.jsonl").write_text(json.dumps({**record, "tok_s": 1.0}) + "\n")
    _xz(tmp_path / "h200_qdecode_s2r1.jsonl", json.dumps({"kind": "meta"}) + "\n\n"
        + json.dumps({**record, "tok_s": 2.0}) + "\n")
    assert report._qdecode_records(4, 1) == [{**record, "tok_s": 2.0}]  # the newest run: the .xz one


def test_globbed_names_are_the_logical_ones_sorted_each_once(report, tmp_path):
    (tmp_path / "xlstm71_350m_b.json").write_text(json.dumps({"date": "1", "ratios": {"train": {"ratio": 1.0}}}))
    _xz(tmp_path / "xlstm71_350m_a.json", json.dumps({"date": "2", "ratios": {"train": {"ratio": 2.0}}}))
    _xz(tmp_path / "xlstm71_350m_c.json", json.dumps({"date": "0"}))
    (tmp_path / "xlstm71_350m_c.json").write_text(json.dumps({"date": "3"}))  # beside its .xz: the plain one
    name, data = report._newest("xlstm71_350m*.json", lambda d: (d.get("ratios") or {}).get("train"))
    assert (name, data["ratios"]["train"]["ratio"]) == ("xlstm71_350m_a.json", 2.0)
    assert [p.name for p in report._results("xlstm71_350m*.json")] == [
        "xlstm71_350m_a.json", "xlstm71_350m_b.json", "xlstm71_350m_c.json"]
    assert report._read_json(tmp_path / "xlstm71_350m_c.json") == {"date": "3"}
    assert report._read_json(tmp_path / "missing.json") is None and report._read_jsonl(tmp_path / "no.jsonl") == []


def test_side_by_side_append_adds_rounds_to_a_run_stored_as_xz(tmp_path, monkeypatch):
    """`side_by_side.py --append` on a preset whose earlier rounds are stored as NAME.jsonl.xz
    (the repository's archived runs): the new result holds those rounds and the new one (it
    started from nothing: the earlier rounds vanished from the figures)."""
    spec = importlib.util.spec_from_file_location("sbs", Path(__file__).parent.parent / "benchmarks" / "side_by_side.py")
    sbs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sbs)
    old = {"side": "ours", "kind": "decode", "batch": 1, "length": 8, "tok_s": 1.0}
    _xz(tmp_path / "cpu.jsonl", json.dumps(old) + "\n")
    new = {**old, "tok_s": 2.0}
    monkeypatch.setattr(sbs, "_run_worker", lambda *a: [new])
    monkeypatch.setattr("sys.argv", ["side_by_side.py", "--append", "--sides", "ours", "--rounds", "1",
                                     "--out", str(tmp_path / "cpu.json")])
    assert sbs.main() == 0
    assert json.loads((tmp_path / "cpu.json").read_text())["records"] == [old, new]
