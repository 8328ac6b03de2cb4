"""`evolve --overwrite` replaces the search in --out whole: a new search stopped early left the
old search's best-N.yaml, summary.json and evolution.png beside its own history.jsonl, and one
that failed before scoring anything deleted the old search's search.json and history.jsonl but
left the rest. Scores are a cheap deterministic function of the wiring (as in test_lab_cli)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from xlstm_metal.cli import main


def _fake_scores(monkeypatch):
    import xlstm_metal.lab.evolve as lab_evolve

    calls = {"n": 0, "stop_at": None}

    def fake_run_task(arch, task, preset, *, seed=0, epochs=None, progress=False, safe_point=None):
        calls["n"] += 1
        if calls["stop_at"] is not None and calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt
        text = json.dumps(arch["blocks"], sort_keys=True)
        return SimpleNamespace(accuracy=(sum(map(ord, text)) * (seed + 7)) % 997 / 997)

    monkeypatch.setattr(lab_evolve, "run_task", fake_run_task)
    return calls


ARGV = ["evolve", "--budget", "3000000", "--population", "4", "--generations", "2", "--tasks", "memorization",
        "--top", "3"]


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_an_interrupted_overwrite_leaves_no_result_of_the_replaced_search(tmp_path, monkeypatch, capsys):
    calls = _fake_scores(monkeypatch)
    out = tmp_path / "ev"
    assert main(ARGV + ["--seed", "5", "--out", str(out)]) == 0
    assert {"best-1.yaml", "best-2.yaml", "best-3.yaml", "summary.json", "evolution.png"} <= set(_files(out))

    calls.update(n=0, stop_at=2)  # Ctrl-C while training the new search's 2nd candidate
    assert main(ARGV + ["--seed", "6", "--out", str(out), "--overwrite"]) == 130
    assert sorted(_files(out)) == ["history.jsonl", "search.json"]  # the new search's, and only them
    assert json.loads((out / "search.json").read_text())["seed"] == 6
    assert len((out / "history.jsonl").read_text().splitlines()) == 1

    calls.update(n=0, stop_at=None)  # ... which --resume finishes as the uninterrupted search
    assert main(ARGV + ["--seed", "6", "--out", str(out), "--resume"]) == 0
    reference = tmp_path / "ref"
    assert main(ARGV + ["--seed", "6", "--out", str(reference)]) == 0
    assert (out / "history.jsonl").read_text() == (reference / "history.jsonl").read_text()
    assert (out / "best-1.yaml").read_text() == (reference / "best-1.yaml").read_text()
    capsys.readouterr()


def test_an_overwrite_that_fails_before_scoring_leaves_the_search_as_it_was(tmp_path, monkeypatch, capsys):
    calls = _fake_scores(monkeypatch)
    out = tmp_path / "ev"
    assert main(ARGV + ["--seed", "5", "--out", str(out)]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["evolve", "--budget", "100", "--tasks", "memorization", "--out", str(out), "--overwrite"]) == 2
    assert "no architecture fits the parameter budget of 100" in capsys.readouterr().err
    assert _files(out) == before  # search.json and history.jsonl were deleted, the rest left

    calls.update(n=0, stop_at=1)  # stopped while training the first candidate: nothing replaced yet
    assert main(ARGV + ["--seed", "6", "--out", str(out), "--overwrite"]) == 130
    assert _files(out) == before
    calls.update(n=0, stop_at=1)
    fresh = tmp_path / "fresh"  # a fresh search stopped so leaves no folder behind
    assert main(ARGV + ["--out", str(fresh)]) == 130
    assert not fresh.exists()
