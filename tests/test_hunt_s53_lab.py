"""Session 53's hunt in the architecture lab."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import xlstm_metal
from xlstm_metal.lab import WiredBlock, WiringError, build_model, wired_equivalent
from xlstm_metal.lab.spec import parse_text


@pytest.mark.parametrize("option", ['tie_word_embeddings: "no"', "norm_eps: 0", "norm_eps: abc",
                                    "output_logit_soft_cap: -5"])
def test_arch_model_options(tmp_path, capsys, option):
    # "no" tied the head, eps 0 became 1e-6, cap -5 flipped the logits, "abc" was a traceback in MLX
    from xlstm_metal.cli import main

    (tmp_path / "a.yaml").write_text(f"blocks: [swiglu, swiglu]\n{option}\n")
    assert main(["mad", "--arch", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert f"{option.split(':')[0]} must be" in capsys.readouterr().err


L4 = {"type": "linear_projection", "dim": 4}
TWO = [{"from": "in.x", "to": "a"}, {"from": "in.x", "to": "b"}, {"from": "a", "to": "out"}, {"from": "b", "to": "out"}]


@pytest.mark.parametrize("spec, named", [
    ({"params": [1], "cells": {"a": L4}}, "'params' must be a mapping"),  # tracebacks
    ({"derived": [1], "cells": {"a": L4}}, "'derived' must be a mapping"),
    # 0 / -1 shared every row beside an own weight nothing read
    *[({"cells": {"a": L4, "b": {**L4, "share": {"cell": "a", "features": n}}}, "connections": TWO},
       "share features") for n in (0, -1, 2.5)],
    # 10**10**10 hung; overflow or division by zero in a call, complex numbers, repeated strings
    *[({"params": {"d": f"${e}"}, "cells": {"a": L4}}, "params.d")
      for e in ("7 ** 10 ** 6", "10.0 ** 400", "int(1e400)", "round_up(5, 0)", "(-8) ** 0.5", "'ab' * 3")]])
def test_bad_spec(spec, named):
    with pytest.raises(WiringError, match=re.escape(named)):
        WiredBlock(spec)


def test_wired_xlstm_large_with_biases():
    # use_bias gives the hand-written norms a bias, the wiring's had none: a CheckpointError
    from mlx.utils import tree_flatten, tree_unflatten

    from xlstm_metal.config import xLSTMConfig
    from xlstm_metal.models.xlstm_large import xLSTMLarge

    mx.random.seed(5)
    model = xLSTMLarge(xLSTMConfig(embedding_dim=64, num_heads=4, num_blocks=2, vocab_size=97, use_bias=True))
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.2) for k, v in tree_flatten(model.parameters())]))
    ids = mx.random.randint(0, 97, (2, 20))
    np.testing.assert_allclose(wired_equivalent(model)(ids)[0], model(ids)[0], rtol=1e-5, atol=1e-5)


def test_quantized_slstm_lab_model_round_trip(tmp_path):
    # load_model refused the headwise gates' scales/biases
    model = build_model("slstm", vocab_size=64, embedding_dim=128, seed=2)
    nn.quantize(model, 32, 4, class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    ids = mx.random.randint(0, 64, (2, 7))
    xlstm_metal.save_model(model, tmp_path / "m")
    assert np.array_equal(xlstm_metal.load_model(tmp_path / "m")(ids)[0], model(ids)[0])


def test_evolve_with_a_huge_top(tmp_path):
    # It listed best-N.yaml for N up to --top first: a MemoryError after ~50 s
    code = ("import resource as r, sys; r.setrlimit(r.RLIMIT_AS, (3 << 30,) * 2); "
            "from xlstm_metal.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "evolve", "--budget", "3000000", "--top", str(2**31 - 1),
                           "--resume", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "holds no search" in done.stderr


def test_stopped_mad_keeps_its_scores(tmp_path, monkeypatch):
    # results.json was written after the last task: an interrupt lost every score
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
    assert main(argv) == 130 and (out / "accuracy.svg").exists()  # kept without --overwrite
    saved = json.loads((out / "results.json").read_text())
    assert [t["task"] for t in saved["tasks"]] == ["compression"] and saved["unscored"] == ["memorization"]
    assert saved["aggregate"] == 0.75
    assert main(argv + ["--overwrite"]) == 130 and not (out / "accuracy.svg").exists()


def test_dollar_in_a_name(tmp_path):
    # matplotlib read "$\foo{$" as mathtext: a ParseFatalException traceback
    from xlstm_metal.lab.mad import TaskResult, plot_results
    from xlstm_metal.lab.render import render_wiring

    render_wiring(WiredBlock({"name": r"$\foo{$", "cells": {"a": L4}}), tmp_path / "w.png")
    plot_results([TaskResult("compression", 0.5, 1.0, 0.1, 1, 1.0, 1, {})], tmp_path / "a.svg", r"$\foo{$")
    assert rb"\foo{" in (tmp_path / "a.svg").read_bytes()


def test_wired_block_state_of_another_batch():
    from xlstm_metal.lab import build_block

    block = build_block("mlstm", {"dim": 8, "num_heads": 2})  # a batch-1 input gave a batch-2 output
    with pytest.raises(ValueError, match="batch of 1"):
        block(mx.zeros((1, 3, 8)), block.make_state(2))


@pytest.mark.parametrize("text", ["a: &r [*r]", "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n"
                                                        for i in range(1, 9)).replace("*a0", "1")])
def test_yaml_alias_bomb(text):
    with pytest.raises(WiringError, match="aliases"):
        parse_text(text, "b.yaml")


@pytest.mark.parametrize("cell_when, conn_when, named", [
    ('"no"', "true", "cell 'b': when must be true or false"), ('"$dim"', "true", "got 4"),  # "no" kept the cell
    ("true", "1", "connection 3 (b -> out): when must be true or false")])
def test_when_takes_a_boolean(cell_when, conn_when, named):
    text = ('{"params": {"dim": 4}, "cells": {"a": {"type": "linear_projection", "dim": 4}, "b": '
            f'{{"type": "linear_projection", "dim": 4, "when": {cell_when}}}}}, "connections": [{{"from": "in.x", '
            '"to": "a"}, {"from": "in.x", "to": "b"}, {"from": "a", "to": "out"}, '
            f'{{"from": "b", "to": "out", "when": {conn_when}}}]}}')
    with pytest.raises(WiringError, match=re.escape(named)):
        WiredBlock(parse_text(text, "s.json"))


def test_compression_at_an_odd_width():
    # one column short: the auto-encoder's broadcast failed (a hand-made Preset's dim 9)
    from xlstm_metal.lab.mad import AutoEncoder, sincos_positions

    even, odd = np.array(sincos_positions(6, 8)), np.array(sincos_positions(6, 9))
    angles = np.arange(6)[:, None] * 10000.0 ** -(np.arange(4) / 3)
    np.testing.assert_allclose(even, np.concatenate([np.sin(angles), np.cos(angles)], 1), atol=1e-6)
    assert odd.shape == (6, 9) and np.array_equal(odd[:, :8], even) and not odd[:, 8].any()
    net = AutoEncoder(build_model("swiglu-only", vocab_size=16, embedding_dim=9), 6)
    assert net(mx.zeros((2, 6), dtype=mx.int32)).shape == (2, 6, 16)


def test_lab_config_of_spec_objects_saves(tmp_path):
    # config.json could not hold a WiringSpec: save_model's ConfigError
    from xlstm_metal.lab.model import LabConfig
    from xlstm_metal.lab.spec import WiringSpec

    spec = WiringSpec.from_file(xlstm_metal.lab.__path__[0] + "/specs/swiglu.yaml")
    model = build_model(LabConfig(vocab_size=32, embedding_dim=16, blocks=[{"spec": spec}] * 2), seed=3)
    xlstm_metal.save_model(model, tmp_path / "m")
    loaded, ids = xlstm_metal.load_model(tmp_path / "m"), mx.random.randint(0, 32, (2, 5))
    assert np.array_equal(loaded(ids)[0], model(ids)[0]) and loaded.blocks[1].resolved.name == "swiglu"


def test_diverged_mad_loss_is_valid_json(tmp_path, monkeypatch, capsys):
    # NaN / Infinity in results.json: strict JSON readers refused it
    import xlstm_metal.lab.mad as lab_mad
    from xlstm_metal.cli import main

    losses = {"compression": float("nan"), "memorization": float("inf"), "selective_copying": 0.5}
    monkeypatch.setattr(lab_mad, "run_task", lambda arch, name, *a, **k: lab_mad.TaskResult(
        name, 0.25, losses[name], 0.1, 3, 1.0, 10, {}))
    argv = ["mad", "--arch", "mlstm", "--tasks", ",".join(losses), "--out", str(tmp_path), "--json"]
    assert main(argv) == 0

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))

    out = capsys.readouterr()
    for tasks in (strict((tmp_path / "results.json").read_text())["tasks"], strict(out.out)):
        assert [(t["loss"], t.get("diverged")) for t in tasks] == [(None, True), (None, True), (0.5, None)]
    assert out.err.count("the training diverged") == 2
