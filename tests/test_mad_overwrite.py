"""`mad --overwrite` with another --plot-format: the replaced run's accuracy.png stayed beside the
new results.json and accuracy.svg (a plot of another architecture and task read as this run's)."""

from __future__ import annotations

import json

from xlstm_metal.cli import main


def test_overwrite_in_another_plot_format_removes_the_replaced_plot(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["mad", "--tasks", "memorization", "--epochs", "1", "--out", str(out)]
    assert main(base + ["--arch", "mlstm", "--json"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "results.json"]
    assert main(base + ["--arch", "attention", "--plot-format", "svg", "--overwrite", "--json"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.svg", "results.json"]
    assert json.loads((out / "results.json").read_text())["arch"] == "attention"
    assert b"MAD attention" in (out / "accuracy.svg").read_bytes()
    # without --overwrite nothing of the folder is touched: a plot not made by a run stays
    other = tmp_path / "o"
    other.mkdir()
    (other / "accuracy.svg").write_text("mine")
    assert main(["mad", "--tasks", "memorization", "--epochs", "1", "--out", str(other), "--arch", "mlstm"]) == 0
    assert (other / "accuracy.svg").read_text() == "mine"
    capsys.readouterr()
