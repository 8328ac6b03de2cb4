"""Session 51's hunt in the architecture lab: wirings that did not compute what their spec says,
MAD data and scores, evolution and its outputs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import yaml

import xlstm_metal  # noqa: F401  (BLAS preload before mlx work)
from xlstm_metal.lab import WiredBlock


# ------------------------------------------------------------------------------ wiring
def test_a_spec_connecting_out_itself_gets_no_second_implicit_output_connection():
    # Without declared outputs the last cell's output went to out.y a second time (y = 2 * b).
    spec = {"cells": {"a": {"type": "linear_projection", "dim": 4}, "b": {"type": "sum", "dim": 4}},
            "connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "out"}]}
    mx.random.seed(0)
    block = WiredBlock(spec)
    x = mx.random.normal((1, 3, 4))
    y, _ = block(x)
    want = block.cell("a")({"x": x})[0]["y"]
    assert len(block.synapses) == 3  # in.x -> a, a -> b, b -> out.y
    assert np.allclose(np.array(y), np.array(want), atol=1e-6)


def test_an_arch_files_relative_block_spec_path_is_read_beside_it(tmp_path, monkeypatch):
    # It was read from the working directory: not found there, or another file of that name.
    from xlstm_metal.lab import load_arch

    block = {"name": "mine", "params": {"dim": 8}, "cells": {"a": {"type": "linear_projection", "dim": "$dim"}}}
    decoy = {"name": "decoy", "params": {"dim": 8}, "cells": {"b": {"type": "rmsnorm", "dim": "$dim"}}}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "block.yaml").write_text(yaml.safe_dump(block))
    (tmp_path / "runs" / "arch.yaml").write_text(yaml.safe_dump({"name": "a", "blocks": ["block.yaml", "mlstm"]}))
    monkeypatch.chdir(tmp_path)
    arch = load_arch("runs/arch.yaml")
    assert arch["blocks"][0]["spec"]["name"] == "mine" and arch["blocks"][1]["spec"]["name"] == "mlstm"
    (tmp_path / "block.yaml").write_text(yaml.safe_dump(decoy))  # one of that name in the working directory
    assert load_arch("runs/arch.yaml")["blocks"][0]["spec"]["name"] == "mine"
    assert load_arch(str(tmp_path / "runs" / "arch.yaml"))["blocks"][0]["spec"]["name"] == "mine"


# ------------------------------------------------------------------------------ MAD tasks
def _preset(**overrides):
    from xlstm_metal.lab.mad import Preset

    return Preset("t", dim=32, num_heads=2, batch_size=16, epochs=1, lr=3e-3, task_overrides=overrides)


def test_memorization_with_noise_maps_no_key_or_value_into_the_noise_vocabulary():
    # generate() built the fixed map over vocab_size - 1 tokens: noise tokens were keys and values
    # (half the scored values here were noise), unlike the generator's own map (MAD-Lab's).
    from xlstm_metal.lab.mad import chance_accuracy, generate

    task = _preset(memorization=dict(vocab_size=32, noise_vocab_size=8, frac_noise=0.3)).task("memorization")
    x, y = generate(task, 64, 1, True)
    values = y[y != -100]
    keys = x[:, 0::2][y[:, 1::2] != -100]  # the key of each scored (non-noise) pair
    noise = np.arange(23, 31)
    assert values.size and not np.isin(values, noise).any() and not np.isin(keys, noise).any()
    assert set(values.tolist()) <= set(range(11, 23)) and set(keys.tolist()) <= set(range(11))
    assert chance_accuracy(task) == pytest.approx(1 / 12)


def test_memorization_takes_kv_map_seed_when_given():
    # a setting the task accepted (it is a generator parameter) and ignored
    from xlstm_metal.lab.mad import generate

    plain = generate(_preset(memorization=dict(vocab_size=32)).task("memorization"), 16, 1, True)
    seeded = [generate(_preset(memorization=dict(vocab_size=32, kv_map_seed=5)).task("memorization"), 16, s, True)
              for s in (1, 2)]

    def mapping(pair):
        x, y = pair
        return {int(k): int(v) for k, v in zip(x[:, 0::2].ravel(), y[:, 1::2].ravel())}

    assert mapping(seeded[0]) != mapping(plain)
    a, b = mapping(seeded[0]), mapping(seeded[1])  # one map for any data seed
    assert all(a[k] == b[k] for k in set(a) & set(b))


def test_fuzzy_recall_chance_leaves_out_the_noise_vocabulary():
    from xlstm_metal.lab.mad import chance_accuracy, generate

    task = _preset(fuzzy_in_context_recall=dict(seq_len=48, noise_vocab_size=4, frac_noise=0.2)) \
        .task("fuzzy_in_context_recall")
    _, y = generate(task, 32, 0, False)
    assert set(y[y != -100].tolist()) == set(range(5, 11))  # 6 values
    assert chance_accuracy(task) == pytest.approx(1 / 6)


# ------------------------------------------------------------------------------ evolve
def test_evolve_resume_with_fewer_generations_keeps_the_scored_history(tmp_path, monkeypatch, capsys):
    # The replay stopped early and rewrote history.jsonl: 4 scored candidates of 10 were lost.
    import json
    from types import SimpleNamespace

    import xlstm_metal.lab.evolve as lab_evolve
    from xlstm_metal.cli import main

    def fake_run_task(arch, task, preset, *, seed=0, epochs=None, progress=False, safe_point=None):
        return SimpleNamespace(accuracy=sum(map(ord, json.dumps(arch["blocks"], sort_keys=True))) % 997 / 997)

    monkeypatch.setattr(lab_evolve, "run_task", fake_run_task)
    argv = ["evolve", "--budget", "3000000", "--population", "4", "--seed", "5", "--tasks", "memorization",
            "--out", str(tmp_path / "E")]
    assert main(argv + ["--generations", "3"]) == 0
    history = (tmp_path / "E" / "history.jsonl").read_text()
    assert len(history.splitlines()) == 8
    capsys.readouterr()
    assert main(argv + ["--generations", "2", "--resume"]) == 2
    assert "ran with --generations 3" in capsys.readouterr().err
    assert (tmp_path / "E" / "history.jsonl").read_text() == history
    assert main(argv + ["--generations", "3", "--resume"]) == 0  # the same or more: resumes
    assert (tmp_path / "E" / "history.jsonl").read_text() == history


def test_build_model_refuses_sizes_a_labconfig_would_ignore():
    from xlstm_metal.lab import LabConfig, build_model

    config = LabConfig.from_arch("swiglu-only", vocab_size=16, embedding_dim=16)
    with pytest.raises(ValueError, match=r"vocab_size=64 would be ignored"):
        build_model(config, vocab_size=64)
    assert build_model(config, vocab_size=16, embedding_dim=16).config.vocab_size == 16  # its own: fine
    model = build_model(config.to_arch(), vocab_size=64, embedding_dim=32)
    assert (model.config.vocab_size, model.config.embedding_dim) == (64, 32)


def test_run_task_builds_a_labconfig_at_the_tasks_vocabulary():
    # The LabConfig's own vocabulary (16) was kept for a task of 64 tokens: NaN loss, accuracy 0,
    # and cross entropy read past the logits (heap corruption at exit).
    from xlstm_metal.lab import LabConfig
    from xlstm_metal.lab.mad import run_task

    preset = _preset(memorization=dict(vocab_size=64, num_train=32, num_test=16))
    config = LabConfig.from_arch("swiglu-only", vocab_size=16, embedding_dim=16)
    got = run_task(config, "memorization", preset, seed=1)
    want = run_task("swiglu-only", "memorization", preset, seed=1)
    assert np.isfinite(got.loss) and (got.accuracy, got.loss) == (want.accuracy, want.loss)


@pytest.mark.parametrize("name", ["best-1.yaml", "history.jsonl"])
def test_evolve_refuses_a_directory_where_it_writes_a_file_before_any_training(name, tmp_path, monkeypatch, capsys):
    # With --overwrite the search ran (best-N.yaml: all of it) and then failed on the directory.
    import xlstm_metal.lab.evolve as lab_evolve
    from xlstm_metal.cli import main

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the output was checked")

    monkeypatch.setattr(lab_evolve, "run_task", no_training)
    (tmp_path / "E" / name).mkdir(parents=True)
    argv = ["evolve", "--budget", "3000000", "--population", "2", "--generations", "1", "--tasks", "memorization",
            "--start", "", "--out", str(tmp_path / "E")]
    for extra in ([], ["--overwrite"]):
        assert main(argv + extra) == 2
        assert f"{name} is a directory" in capsys.readouterr().err
    assert (tmp_path / "E" / name).is_dir()


def test_mad_refuses_a_directory_named_results_json_before_training(tmp_path, monkeypatch, capsys):
    import xlstm_metal.lab.mad as lab_mad
    from xlstm_metal.cli import main

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the output was checked")

    monkeypatch.setattr(lab_mad, "run_task", no_training)
    (tmp_path / "M" / "results.json").mkdir(parents=True)
    assert main(["mad", "--arch", "swiglu-only", "--tasks", "compression", "--out", str(tmp_path / "M"),
                 "--overwrite"]) == 2
    assert "results.json is a directory" in capsys.readouterr().err


def test_evolve_with_a_population_of_the_elite_still_breeds_in_later_generations():
    # With population 2 (= the elite) every later generation kept both and bred no child:
    # --generations past the first did nothing.
    from xlstm_metal.lab.evolve import evolve, planned_candidates

    def score(arch):
        return {"t": sum(g[0] * 7 + g[4] for g in arch["genome"]) % 11 / 11}

    result = evolve(score, budget=10**9, population=2, generations=3, seed=0, dim=16, vocab_size=16, start=[],
                    min_blocks=1, max_blocks=2)
    assert planned_candidates(2, 3) == 4
    assert len(result.history) == 4 and sorted({h["generation"] for h in result.history}) == [0, 1, 2]
    assert planned_candidates(6, 3) == 14  # a population above the elite: as before


def test_a_connection_with_both_a_mask_and_a_density_is_refused():
    # The mask was taken and the density ignored, without a word.
    from xlstm_metal.lab import WiringError, WiringSpec

    spec = {"inputs": {"x": 2}, "outputs": {"y": 2}, "cells": {"a": {"type": "linear_projection", "dim": 2}},
            "connections": [{"from": "in", "to": "a"}, {"from": "a", "to": "out", "mask": [[1, 0], [0, 1]],
                                                        "density": 0.5}]}
    with pytest.raises(WiringError, match=r"connection 1 \(a -> out\): give a density .* or a mask, not both"):
        WiringSpec(spec).resolve()
    del spec["connections"][1]["density"]
    assert WiringSpec(spec).resolve().connections[1].mask == [[1, 0], [0, 1]]
