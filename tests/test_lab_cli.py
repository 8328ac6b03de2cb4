"""`xlstm-metal mad`, `evolve` and `train --arch` end to end (tiny settings), and bad input."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import yaml

import xlstm_metal
from xlstm_metal.cli import main
from xlstm_metal.lab import LabModel


def test_show_wiring_text_and_graphs(tmp_path, capsys):
    assert main(["mad", "--arch", "hybrid", "--show-wiring", str(tmp_path / "g.png")]) == 0
    text = capsys.readouterr().out
    assert "LabModel hybrid: 4 blocks" in text and "matrix_memory" in text and "softmax_attention" in text
    # one graph per distinct block wiring (mlstm, swiglu, attention)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g-block1.png", "g-block2.png", "g.png"]
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["mad", "--arch", "slstm_2024_block", "--show-wiring", str(tmp_path / "s.svg")]) == 0
    assert "<svg" in (tmp_path / "s.svg").read_text()[:400]
    assert main(["mad", "--arch", "hybrid", "--show-wiring", str(tmp_path / "g.png")]) == 2  # no overwrite


@pytest.mark.parametrize("spec, message", [
    ({"cells": {"a": {"type": "warp_drive", "dim": 4}}}, "unknown cell type 'warp_drive'"),
    ({"cells": {"a": {"type": "linear_projection", "dim": 4}, "b": {"type": "linear_projection", "dim": 8}},
      "connections": [{"from": "a", "to": "b"}]}, "port size mismatch"),
    ({"cells": {"a": {"type": "linear_projection", "dim": 4}, "g": {"type": "sigmoid_gate", "dim": 4}},
      "connections": [{"from": "a", "to": "g.x"}]}, "input port 'gate' is not connected"),
    ({"inputs": {"x": 64}, "outputs": {"y": 64},
      "cells": {"a": {"type": "sum", "dim": 64}, "b": {"type": "linear_projection", "dim": 64}},
      "connections": [{"from": "in.x", "to": "a"}, {"from": "a", "to": "b"}, {"from": "b", "to": "a"},
                      {"from": "b", "to": "out.y"}]}, "cycle"),
])
def test_bad_specs_exit_2_naming_the_problem(tmp_path, capsys, spec, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["mad", "--arch", str(path), "--show-wiring"]) == 2
    assert message in capsys.readouterr().err


def test_mad_bad_input(tmp_path, capsys):
    assert main(["mad", "--arch", "mlstm", "--tasks", "telepathy"]) == 2
    assert "unknown MAD task" in capsys.readouterr().err
    assert main(["mad", "--arch", "no_such_arch"]) == 2
    assert "no architecture 'no_such_arch'" in capsys.readouterr().err


def test_mad_run_json_results_and_plot(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["mad", "--arch", "mlstm", "--tasks", "memorization", "--epochs", "2", "--seed", "1", "--out", str(out),
            "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in rows] == ["memorization"] and 0.0 <= rows[0]["accuracy"] <= 1.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["aggregate"] == rows[0]["accuracy"] and saved["tasks"][0]["steps"] == 8
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert main(args) == 2  # results exist: no overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_evolve_cli(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evolve", "--budget", "100", "--out", str(out), "--tasks", "memorization"]) == 2
    assert "budget" in capsys.readouterr().err
    assert not out.exists()  # nothing fit: the fresh search left no folder behind
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["evolve", "--budget", "100", "--out", str(out), "--tasks", "memorization"]) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # a folder that was there stays, with its files
    capsys.readouterr()
    assert main(["evolve", "--budget", "2000000", "--population", "2", "--generations", "2", "--tasks",
                 "memorization", "--epochs", "1", "--start", str(two_blocks(tmp_path)), "--min-blocks", "2", "--max-blocks", "2",
                 "--out", str(out), "--top", "2"]) == 0
    assert "best fitness" in capsys.readouterr().out
    assert {"best-1.yaml", "best-2.yaml", "history.jsonl", "summary.json", "evolution.png"} <= {
        p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] >= 2 and summary["best"][0]["parameters"] <= 2_000_000
    # what re-scoring the winner needs: the training epochs the fitness was measured with
    assert summary["epochs"] == 1 and summary["preset"] == "tiny" and summary["seed"] == 0
    # The winner is an architecture `mad --arch` reads.
    assert main(["mad", "--arch", str(out / "best-1.yaml"), "--show-wiring"]) == 0


def test_train_arch_and_load_model(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about recurrent cells and gates." for i in range(200)))
    arch = tmp_path / "a.yaml"
    arch.write_text(yaml.safe_dump({"name": "tiny-hybrid", "embedding_dim": 32,
                                    "blocks": ["mlstm", {"spec": "attention", "params": {"num_heads": 2}}]}))
    out = tmp_path / "run"
    assert main(["train", str(corpus), "--out", str(out), "--arch", str(arch), "--vocab-size", "300", "--seq-len",
                 "16", "--batch-size", "2", "--steps", "4", "--warmup", "1", "--eval-every", "4", "--save-every",
                 "4", "--no-progress", "--export", str(tmp_path / "export")]) == 0
    model = xlstm_metal.load_model(tmp_path / "export")
    assert isinstance(model, LabModel) and model.config.name == "tiny-hybrid"
    assert [b.resolved.name for b in model.blocks] == ["mlstm", "attention"]
    logits, _ = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, model.config.vocab_size) and np.isfinite(np.array(logits)).all()
    assert main(["train", str(corpus), "--out", str(tmp_path / "r2"), "--arch", str(arch), "--config", "tiny"]) == 2


def test_evolve_resume_after_interruption_gives_the_uninterrupted_search(tmp_path, monkeypatch, capsys):
    # An interrupted search lost everything (history.jsonl was written only at the end) and there
    # was no way to continue it. Scores here are a cheap deterministic function of the wiring.
    from types import SimpleNamespace

    import xlstm_metal.lab.evolve as lab_evolve

    calls = {"n": 0, "stop_at": None}

    def fake_run_task(arch, task, preset, *, seed=0, epochs=None, progress=False, safe_point=None):
        calls["n"] += 1
        if calls["stop_at"] is not None and calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt
        text = json.dumps(arch["blocks"], sort_keys=True)
        return SimpleNamespace(accuracy=(sum(map(ord, text)) * (seed + 7)) % 997 / 997)

    monkeypatch.setattr(lab_evolve, "run_task", fake_run_task)
    argv = ["evolve", "--budget", "3000000", "--population", "4", "--generations", "3", "--seed", "5",
            "--tasks", "memorization", "--top", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(argv + ["--out", str(full)]) == 0
    total = calls["n"]
    reference = (full / "history.jsonl").read_text().splitlines()
    assert total == len(reference) >= 6

    calls.update(n=0, stop_at=4)
    assert main(argv + ["--out", str(cut)]) == 130  # Ctrl-C at the 4th candidate
    assert len((cut / "history.jsonl").read_text().splitlines()) == 3  # kept what it had scored
    capsys.readouterr()
    assert main(argv + ["--out", str(cut)]) == 2  # no silent restart over it
    assert "--resume" in capsys.readouterr().err
    assert main([("6" if a == "5" else a) for a in argv] + ["--out", str(cut), "--resume"]) == 2  # --seed 6
    assert "seed 5 (now 6)" in capsys.readouterr().err

    calls.update(n=0, stop_at=None)
    assert main(argv + ["--out", str(cut), "--resume"]) == 0
    assert calls["n"] == total - 3  # only the candidates not scored before
    assert (cut / "history.jsonl").read_text().splitlines() == reference
    assert json.loads((cut / "summary.json").read_text())["best"] == json.loads((full / "summary.json").read_text())["best"]
    assert (cut / "best-1.yaml").read_text() == (full / "best-1.yaml").read_text()


def two_blocks(tmp_path):
    """mlstm's first mixer and SwiGLU: a 2-block start for a quick search (evolve refuses a start
    outside --min-blocks..--max-blocks rather than cutting it)."""
    path = tmp_path / "mlstm-2.yaml"
    path.write_text("name: mlstm-2\nblocks: [mlstm, swiglu]\n")
    return path
