"""`xlstm-metal plot`: the plotted data of tune sweeps, training runs and benchmarks."""

import json
import math

import matplotlib
import numpy as np
import pytest

from xlstm_metal.cli import main
from xlstm_metal.plotting import PlotError, plot_bench, plot_inputs, plot_training, plot_tune


@pytest.fixture(autouse=True)
def close_figures():
    """The figures these tests draw and read are closed after each (pyplot keeps them: past 20
    open, every later figure in the run warned)."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _axis(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_tune_plot_data(tmp_path):
    d = tmp_path / "tune"
    d.mkdir()
    (d / "run_meta.json").write_text(json.dumps({"objective": {"objective": "speed", "metric": "both",
                                                               "direction": "maximize"}}))
    trials = [
        {"number": 0, "status": "complete", "value": 10.0, "params": {"chunk_size": 16, "kernel": "chunkwise"},
         "metrics": {"prefill_tok_s": 100.0, "decode_tok_s": 1.0}},
        {"number": 1, "status": "rejected", "value": None, "params": {"chunk_size": 64, "kernel": "parallel"},
         "metrics": {}},
        {"number": 2, "status": "complete", "value": 30.0, "params": {"chunk_size": 32, "kernel": "parallel"},
         "metrics": {"prefill_tok_s": 300.0, "decode_tok_s": 3.0}},
        {"number": 3, "status": "complete", "value": 20.0, "params": {"chunk_size": 64, "kernel": "chunkwise"},
         "metrics": {"prefill_tok_s": 200.0, "decode_tok_s": 2.0}},
    ]
    _write_jsonl(d / "trials.jsonl", trials)
    fig = plot_tune(d)
    best = _axis(fig, "best so far")
    assert list(best.lines[0].get_xdata()) == [0, 2, 3] and list(best.lines[0].get_ydata()) == [10, 30, 30]
    assert list(best.lines[2].get_xdata()) == [1]  # the rejected trial, marked, not ranked
    assert best.get_ylabel() == "sqrt(prefill x decode) tok/s"  # what --metric both maximizes, not "both"
    scatter = _axis(fig, "prefill vs decode").collections[0].get_offsets()
    assert np.array_equal(np.asarray(scatter), [[100, 1], [300, 3], [200, 2]])
    chunk = np.asarray(_axis(fig, "chunk_size").collections[0].get_offsets())
    assert np.array_equal(chunk, [[16, 10], [32, 30], [64, 20]])
    kernel_ax = _axis(fig, "kernel")
    assert [t.get_text() for t in kernel_ax.get_xticklabels()] == ["chunkwise", "parallel"]
    assert np.array_equal(np.asarray(kernel_ax.collections[0].get_offsets()), [[0, 10], [1, 30], [0, 20]])


def test_tune_plot_bad_meta_is_named_and_best_json_gives_the_direction(tmp_path, capsys):
    """A corrupt run_meta.json was a traceback; without run_meta.json a minimising (train)
    sweep's "best so far" tracked the largest loss."""
    d = tmp_path / "tune"
    d.mkdir()
    _write_jsonl(d / "trials.jsonl", [
        {"number": 0, "status": "complete", "value": 3.0, "params": {"lr": 0.01}, "metrics": {}},
        {"number": 1, "status": "complete", "value": 2.0, "params": {"lr": 0.02}, "metrics": {}},
        {"number": 2, "status": "complete", "value": 2.5, "params": {"lr": 0.03}, "metrics": {}},
    ])
    (d / "best.json").write_text(json.dumps({"objective": "train", "metric": "val_loss", "direction": "minimize",
                                             "number": 1, "value": 2.0}))
    best = _axis(plot_tune(d), "best so far")
    assert list(best.lines[0].get_ydata()) == [3.0, 2.0, 2.0] and best.get_ylabel() == "val_loss"
    for bad in ("{", "[1, 2]"):
        (d / "run_meta.json").write_text(bad)
        assert main(["plot", str(d), "--out", str(tmp_path / "t.png")]) == 2
        assert "run_meta.json" in capsys.readouterr().err and not (tmp_path / "t.png").exists()


def test_training_runs_overlaid(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        run = tmp_path / name
        run.mkdir()
        _write_jsonl(run / "metrics.jsonl", [
            {"kind": "train", "step": 10, "loss": 5.0 * scale, "lr": 1e-3, "tokens": 1000},
            {"kind": "train", "step": 20, "loss": 4.0 * scale, "lr": 5e-4, "tokens": 2000},
            {"kind": "eval", "step": 20, "val_loss": 4.5 * scale},
        ])
    fig = plot_training([tmp_path / "a", tmp_path / "b"])
    loss = _axis(fig, "loss")
    assert [line.get_label() for line in loss.lines] == ["a train", "a validation", "b train", "b validation"]
    assert list(loss.lines[2].get_ydata()) == [10.0, 8.0]
    ppl = _axis(fig, "validation perplexity")
    assert list(ppl.lines[1].get_xdata()) == [2000] and math.isclose(ppl.lines[1].get_ydata()[0], math.exp(9.0))
    assert list(_axis(fig, "learning rate").lines[0].get_ydata()) == [1e-3, 5e-4]
    assert list(_axis(fig, "training loss by tokens").lines[0].get_xdata()) == [1000, 2000]


def test_an_input_given_twice_is_refused(tmp_path, capsys):
    """A run given twice (as itself, or as its directory and its metrics.jsonl) or a bench file
    twice was drawn twice, without a word."""
    run = tmp_path / "a"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [{"kind": "train", "step": 10, "loss": 5.0, "lr": 1e-3, "tokens": 1000}])
    for inputs in ([run, run], [run, run / "metrics.jsonl"]):
        with pytest.raises(PlotError, match="again .both read .*metrics.jsonl.: give each input once"):
            plot_inputs(inputs)
    bench = tmp_path / "b.jsonl"
    _write_jsonl(bench, [{"kind": "decode", "batch": 1, "length": 8, "tok_s": 10.0}])
    assert main(["plot", str(bench), str(tmp_path / "." / "b.jsonl"), "--out", str(tmp_path / "p.png")]) == 2
    assert "give each input once" in capsys.readouterr().err and not (tmp_path / "p.png").exists()
    assert len(plot_training([run]).axes) > 0  # once is fine


def test_training_runs_of_one_name_are_told_apart(tmp_path):
    """runs/lr1/m and runs/lr2/m were both labelled "m": the legend could not say which line was
    which run."""
    for name, loss in (("lr1", 5.0), ("lr2", 3.0)):
        run = tmp_path / name / "m"
        run.mkdir(parents=True)
        _write_jsonl(run / "metrics.jsonl", [{"kind": "train", "step": 10, "loss": loss, "lr": 1e-3, "tokens": 100},
                                             {"kind": "eval", "step": 10, "val_loss": loss + 0.5}])
    (tmp_path / "solo").mkdir()
    _write_jsonl(tmp_path / "solo" / "metrics.jsonl", [{"kind": "train", "step": 10, "loss": 4.0}])
    fig = plot_training([tmp_path / "lr1" / "m", tmp_path / "lr2" / "m" / "metrics.jsonl", tmp_path / "solo"])
    lines = {line.get_label(): list(line.get_ydata()) for line in _axis(fig, "loss").lines}
    assert lines == {"lr1/m train": [5.0], "lr1/m validation": [5.5], "lr2/m train": [3.0],
                     "lr2/m validation": [3.5], "solo train": [4.0]}
    assert [line.get_label() for line in _axis(fig, "validation perplexity").lines] == ["lr1/m", "lr2/m"]


def test_bench_plot_medians_per_side(tmp_path):
    _write_jsonl(tmp_path / "bench.jsonl", [
        {"kind": "prefill", "batch": 1, "length": 512, "tok_s": 100.0},
        {"kind": "prefill", "batch": 1, "length": 2048, "tok_s": 150.0},
        {"kind": "decode", "batch": 1, "length": 32, "tok_s": 10.0},
        {"kind": "decode", "batch": 8, "length": 32, "tok_s": 60.0},
    ])
    (tmp_path / "side.json").write_text(json.dumps({"records": [
        {"side": "ours", "kind": "decode", "batch": 1, "tok_s": 20.0},
        {"side": "ours", "kind": "decode", "batch": 1, "tok_s": 24.0},
        {"side": "ours", "kind": "decode", "batch": 1, "tok_s": 100.0},
        {"side": "official", "kind": "decode", "batch": 1, "tok_s": 15.0},
        {"side": "ours", "kind": "env", "device": "cpu"},
    ]}))
    fig = plot_bench([tmp_path / "bench.jsonl"])
    pre = _axis(fig, "prefill")
    assert list(pre.lines[0].get_xdata()) == [512, 2048] and list(pre.lines[0].get_ydata()) == [100, 150]
    dec = _axis(fig, "decode")
    assert list(dec.lines[0].get_xdata()) == [1, 8]
    fig = plot_bench([tmp_path / "side.json"])
    lines = {line.get_label(): list(line.get_ydata()) for line in _axis(fig, "decode").lines}
    assert lines == {"official": [15.0], "ours": [24.0]}  # the median of three rounds


def test_bench_plot_series_keep_one_colour_across_panels(tmp_path):
    """Each panel cycled its own colours: "b: ours" was C1 in decode and C0 in prefill, where
    C0 was "a" in decode, so the colours paired different series across the panels."""
    _write_jsonl(tmp_path / "a.jsonl", [{"kind": "decode", "batch": 1, "length": 8, "tok_s": 5.0},
                                        {"kind": "decode", "batch": 4, "length": 8, "tok_s": 12.0}])
    (tmp_path / "b.json").write_text(json.dumps({"records": [
        {"side": "ours", "kind": "decode", "batch": 1, "tok_s": 20.0},
        {"side": "ours", "kind": "prefill", "batch": 1, "length": 64, "tok_s": 300.0},
        {"side": "official", "kind": "prefill", "batch": 1, "length": 64, "tok_s": 200.0},
    ]}))
    fig = plot_bench([tmp_path / "a.jsonl", tmp_path / "b.json"])
    colours = {}
    for ax in (_axis(fig, "prefill"), _axis(fig, "decode")):
        for line in ax.lines:
            style = (matplotlib.colors.to_hex(line.get_color()), line.get_marker())
            assert colours.setdefault(line.get_label(), style) == style
    assert set(colours) == {"a", "b: ours", "b: official"} and len(set(colours.values())) == 3
    fig.savefig(tmp_path / "b.png")


def test_bench_plot_keeps_configurations_apart(tmp_path):
    """`bench --shape A --json >> b.jsonl; bench --shape B --json >> b.jsonl` drew one line, the
    median of the two shapes' tokens/s (a speed neither reached); so were 4-bit, 8-bit and float
    decode runs in one file. Records differing in what they measured are separate lines."""
    def rec(kind, shape, x, tok_s, **extra):
        axis = {"length": x, "batch": 1} if kind == "prefill" else {"batch": x, "length": 8}
        return {"kind": kind, "shape": shape, "dtype": "float32", "profile": None, "q_bits": None, "tok_s": tok_s,
                **axis, **extra}

    _write_jsonl(tmp_path / "b.jsonl", [
        rec("prefill", "125m", 64, 1000.0), rec("prefill", "125m", 256, 1200.0),
        rec("decode", "125m", 1, 50.0), rec("decode", "125m", 4, 150.0),
        rec("prefill", "1.3b", 64, 100.0), rec("prefill", "1.3b", 256, 120.0),
        rec("decode", "1.3b", 1, 5.0), rec("decode", "1.3b", 4, 15.0),
        rec("decode", "1.3b", 1, 9.0, q_bits=4), rec("decode", "1.3b", 1, 11.0, q_bits=4),
        rec("decode", "1.3b", 1, 10.0, q_bits=4),  # three repeats: one point, their median
    ])
    fig = plot_bench([tmp_path / "b.jsonl"])
    pre = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in _axis(fig, "prefill").lines}
    assert pre == {"b (shape=125m)": ([64, 256], [1000.0, 1200.0]), "b (shape=1.3b)": ([64, 256], [100.0, 120.0])}
    dec = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in _axis(fig, "decode").lines}
    assert dec == {"b (shape=125m, q_bits=None)": ([1, 4], [50.0, 150.0]),
                   "b (shape=1.3b, q_bits=None)": ([1, 4], [5.0, 15.0]),
                   "b (shape=1.3b, q_bits=4)": ([1], [10.0])}
    # A series of one configuration keeps its plain label; a prefill's batch splits prefill lines.
    _write_jsonl(tmp_path / "c.jsonl", [rec("prefill", "125m", 64, 1000.0), rec("prefill", "125m", 64, 3000.0, batch=4),
                                        rec("decode", "125m", 1, 50.0)])
    fig = plot_bench([tmp_path / "c.jsonl"])
    assert sorted(line.get_label() for line in _axis(fig, "prefill").lines) == ["c (batch=1)", "c (batch=4)"]
    assert [line.get_label() for line in _axis(fig, "decode").lines] == ["c"]


def test_bench_files_of_one_name_are_told_apart(tmp_path):
    """mac/bench.jsonl and linux/bench.jsonl were both "bench", drawn in one colour."""
    for name, tok_s in (("mac", 50.0), ("linux", 20.0)):
        (tmp_path / name).mkdir()
        _write_jsonl(tmp_path / name / "bench.jsonl", [{"kind": "decode", "batch": 1, "length": 8, "tok_s": tok_s}])
    _write_jsonl(tmp_path / "mac" / "cpu.jsonl", [{"kind": "decode", "batch": 1, "length": 8, "tok_s": 7.0}])
    (tmp_path / "mac" / "cpu.json").write_text(json.dumps({"records": [{"kind": "decode", "batch": 1, "tok_s": 9.0}]}))
    fig = plot_bench([tmp_path / "mac" / "bench.jsonl", tmp_path / "linux" / "bench.jsonl",
                      tmp_path / "mac" / "cpu.jsonl", tmp_path / "mac" / "cpu.json"])
    dec = _axis(fig, "decode")
    lines = {line.get_label(): list(line.get_ydata()) for line in dec.lines}
    assert lines == {"mac/bench": [50.0], "linux/bench": [20.0], "cpu.jsonl": [7.0], "cpu.json": [9.0]}
    assert len({matplotlib.colors.to_hex(line.get_color()) for line in dec.lines}) == 4


def test_plot_cli(tmp_path, capsys):
    _write_jsonl(tmp_path / "b.jsonl", [{"kind": "decode", "batch": 1, "tok_s": 3.0}])
    assert main(["plot", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "o.svg")]) == 0
    assert (tmp_path / "o.svg").read_text().lstrip().startswith("<?xml")
    assert main(["plot", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "o.svg")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "o.gif")]) == 2
    assert main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "p.png")]) == 2
    with pytest.raises(PlotError, match="mix kinds"):
        run = tmp_path / "r"
        run.mkdir()
        _write_jsonl(run / "metrics.jsonl", [{"kind": "train", "step": 1, "loss": 1.0}])
        plot_inputs([run, tmp_path / "b.jsonl"])
