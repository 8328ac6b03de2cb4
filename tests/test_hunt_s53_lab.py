"""Session 53's hunt in the architecture lab: arch options and spec expressions that were misread,
tracebacks or hangs; wired equivalence with biases; quantized headwise lab models saved and loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import xlstm_metal
from xlstm_metal.lab import WiredBlock, WiringError, build_model, wired_equivalent
from xlstm_metal.lab.spec import evaluate


def _rel(a, b) -> float:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("key, value", [("tie_word_embeddings", "no"), ("tie_word_embeddings", 1), ("norm_eps", 0),
                                        ("norm_eps", -1.0), ("norm_eps", "abc"), ("output_logit_soft_cap", 0),
                                        ("output_logit_soft_cap", -5), ("output_logit_soft_cap", float("nan"))])
def test_an_archs_model_options_are_checked(key, value):
    # "no" tied the head to the embedding, eps -1 gave NaN logits, eps 0 became 1e-6, cap 0 zero
    # logits, a string failed inside MLX at the first forward (a traceback from `mad`)
    with pytest.raises(WiringError, match=key):
        build_model({"blocks": ["swiglu", "swiglu"], key: value}, vocab_size=16, embedding_dim=16)


def test_a_bad_arch_option_is_a_usage_error_of_mad_before_training(tmp_path, capsys):
    from xlstm_metal.cli import main

    (tmp_path / "a.yaml").write_text("blocks: [swiglu, swiglu]\nnorm_eps: abc\n")
    assert main(["mad", "--arch", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "norm_eps must be" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("key", ["params", "derived"])
def test_a_specs_params_and_derived_must_be_mappings(key):
    with pytest.raises(WiringError, match=f"'{key}' must be a mapping"):  # TypeError / AttributeError before
        WiredBlock({key: [1], "cells": {"a": {"type": "linear_projection", "dim": 4}}})


@pytest.mark.parametrize("expr", ["7 ** 10 ** 6", "10.0 ** 400", "int(1e400)", "round_up(5, 0)", "(-8) ** 0.5",
                                  "'ab' * 3"])
def test_an_expression_too_large_undefined_or_not_a_number_is_a_wiring_error(expr):
    # 10**10**10 hung the CLI; overflow and division by zero in a call were tracebacks; a complex
    # number or a repeated string passed on
    with pytest.raises(WiringError, match="params.d"):
        evaluate(expr, {}, "params.d")
    assert evaluate("round_up(2 ** 10 * 1.5, 64) // 3", {}, "x") == 512


@pytest.mark.parametrize("share, named", [({"cell": "a", "features": 0}, "features"),
                                          ({"cell": "a", "features": -1}, "features"),
                                          ({"cell": "a", "features": 2.5}, "features")])
def test_a_partial_share_takes_a_positive_count(share, named):
    # features 0 (or -1) shared every row and kept an own weight that nothing read
    spec = {"cells": {"a": {"type": "linear_projection", "dim": 4}, "b": {"type": "linear_projection", "dim": 4,
                                                                           "share": share}},
            "connections": [{"from": "in.x", "to": "a"}, {"from": "in.x", "to": "b"}, {"from": "a", "to": "out.y"},
                            {"from": "b", "to": "out.y"}]}
    with pytest.raises(WiringError, match=named):
        WiredBlock(spec)


def test_a_when_that_is_not_true_or_false_is_refused():
    spec = {"cells": {"a": {"type": "linear_projection", "dim": 4}, "b": {"type": "rmsnorm", "dim": 4, "when": "no"}}}
    with pytest.raises(WiringError, match="when"):  # "no" was true: the cell was kept
        WiredBlock(spec)


def test_the_wired_xlstm_large_with_biases_equals_the_hand_written_model():
    # use_bias gives the hand-written norms a bias: the wiring's norms had none (a CheckpointError)
    from mlx.utils import tree_flatten, tree_unflatten

    from xlstm_metal.config import xLSTMConfig
    from xlstm_metal.models.xlstm_large import xLSTMLarge

    mx.random.seed(5)
    model = xLSTMLarge(xLSTMConfig(embedding_dim=64, num_heads=4, num_blocks=2, vocab_size=97, chunk_size=16,
                                   use_bias=True))
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.2) for k, v in tree_flatten(model.parameters())]))
    wired = wired_equivalent(model)
    ids = mx.random.randint(0, 97, (2, 20))
    (a, sa), (b, sb) = model(ids), wired(ids)
    assert _rel(b, a) < 1e-5 and _rel(wired(ids[:, :1], sb)[0], model(ids[:, :1], sa)[0]) < 1e-5


def test_a_quantized_slstm_lab_model_saves_and_loads(tmp_path):
    # Its headwise gate projections were quantized but load_model refused their scales/biases
    model = build_model("slstm", vocab_size=64, embedding_dim=128, seed=2)
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    ids = mx.random.randint(0, 64, (2, 7))
    xlstm_metal.save_model(model, tmp_path / "m")
    loaded = xlstm_metal.load_model(tmp_path / "m")
    assert np.array_equal(np.array(loaded(ids)[0]), np.array(model(ids)[0]))


def test_mads_decoder_positions_take_an_odd_width():
    from xlstm_metal.lab.mad import sincos_positions

    p = np.array(sincos_positions(6, 7))  # MAD pads a zero column (the width was one short)
    assert p.shape == (6, 7) and not p[:, 6].any() and np.allclose(p[:, :6], np.array(sincos_positions(6, 6)))


def test_evolve_with_a_huge_top_checks_its_outputs_at_once(tmp_path):
    # It listed every best-N.yaml up to --top first: 2**31 - 1 paths (a MemoryError after ~50 s)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from xlstm_metal.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "evolve", "--budget", "3000000", "--top", str(2**31 - 1),
                           "--resume", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "holds no search" in done.stderr


def test_mad_stopped_after_a_task_keeps_the_tasks_it_scored(tmp_path, monkeypatch, capsys):
    # results.json was written after the last task only: an interrupt lost every score
    import xlstm_metal.lab.mad as lab_mad
    from xlstm_metal.cli import main

    def one_task(arch, name, *args, **kwargs):
        if name == "memorization":
            raise KeyboardInterrupt
        return lab_mad.TaskResult(name, 0.75, 0.5, 0.1, 3, 1.0, 10, {})

    monkeypatch.setattr(lab_mad, "run_task", one_task)
    out = tmp_path / "M"
    out.mkdir()
    (out / "accuracy.svg").write_text("old run")
    argv = ["mad", "--arch", "mlstm", "--tasks", "compression,memorization", "--out", str(out)]
    assert main(argv) == 130 and (out / "accuracy.svg").read_text() == "old run"  # kept without --overwrite
    saved = json.loads((out / "results.json").read_text())
    assert [t["task"] for t in saved["tasks"]] == ["compression"] and saved["unscored"] == ["memorization"]
    assert saved["aggregate"] == 0.75 and saved["tasks"][0]["accuracy"] == 0.75
    assert main(argv + ["--overwrite"]) == 130 and not (out / "accuracy.svg").exists()  # the replaced run's plot


def test_a_dollar_in_a_name_is_drawn_as_text(tmp_path):
    # matplotlib read "$\foo{$" as mathtext: a ParseFatalException traceback from --show-wiring / mad's plot
    from xlstm_metal.lab.mad import TaskResult, plot_results
    from xlstm_metal.lab.render import render_wiring

    block = WiredBlock({"name": r"x $\foo{$ y", "cells": {"a": {"type": "linear_projection", "dim": 4}}})
    assert render_wiring(block, tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"
    plot_results([TaskResult("compression", 0.5, 1.0, 0.1, 1, 1.0, 1, {})], tmp_path / "a.svg", r"MAD $\foo{$")
    assert rb"\foo{" in (tmp_path / "a.svg").read_bytes()
