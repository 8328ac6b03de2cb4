"""`xlstm-metal tune`: seeded repeats, best.json, resume, tolerance rejection, GA vs random,
the Ray backend, the train objective."""

import csv
import json
import math
import re
import subprocess

import numpy as np
import pytest

from xlstm_metal.assets import DEFAULT_MODEL_DIR
from xlstm_metal.cli import main
from xlstm_metal.profiles import apply_profile, load_profile
from xlstm_metal.tuning import FunctionObjective, SweepSettings, run_sweep, search
from xlstm_metal.tuning.sweep import best_record

pytest.importorskip("optuna")


@pytest.fixture(autouse=True)
def _profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))


def _records(path):
    return [json.loads(line) for line in (path / "trials.jsonl").read_text().splitlines()]


def _strip(records):
    return [(r["number"], r["status"], r["value"], r["params"]) for r in records]


def test_seeded_sweep_repeats_exactly_and_best_is_best_of_trials(tmp_path):
    settings = dict(mode="ga", population=3, generations=3, seed=7, progress=False)
    a = run_sweep(FunctionObjective("rastrigin", 3), tmp_path / "a", SweepSettings(**settings))
    b = run_sweep(FunctionObjective("rastrigin", 3), tmp_path / "b", SweepSettings(**settings))
    assert len(a.trials) == 9 and _strip(a.trials) == _strip(b.trials)
    assert _strip(_records(tmp_path / "a")) == _strip(a.trials)
    c = run_sweep(FunctionObjective("rastrigin", 3), tmp_path / "c", SweepSettings(**{**settings, "seed": 8}))
    assert _strip(c.trials) != _strip(a.trials)
    # best.json is the minimum of trials.jsonl, recomputed here from the parameters.
    best = json.loads((tmp_path / "a" / "best.json").read_text())
    values = []
    for r in _records(tmp_path / "a"):
        xs = np.array([r["params"][f"x{i}"] for i in range(3)])
        f = 10 * 3 + float(np.sum(xs**2 - 10 * np.cos(2 * np.pi * xs)))
        assert math.isclose(r["value"], f, rel_tol=1e-12)
        values.append((f, r["number"]))
    assert (best["value"], best["number"]) == min(values)
    rows = list(csv.DictReader((tmp_path / "a" / "summary.csv").open()))
    assert [int(r["number"]) for r in rows] == list(range(9)) and float(rows[3]["value"]) == a.trials[3]["value"]
    meta = json.loads((tmp_path / "a" / "run_meta.json").read_text())
    assert meta["sampler"] == "NSGAIISampler" and meta["budget"] == 9 and meta["trials"] == 9


def test_resume_continues_the_same_sweep(tmp_path):
    full = run_sweep(FunctionObjective("sphere", 2), tmp_path / "full", SweepSettings(trials=6, seed=3, progress=False))
    run_sweep(FunctionObjective("sphere", 2), tmp_path / "part", SweepSettings(trials=3, seed=3, progress=False))
    resumed = run_sweep(FunctionObjective("sphere", 2), tmp_path / "part", SweepSettings(trials=6, seed=3, progress=False),
                        resume=True)
    assert _strip(resumed.trials) == _strip(full.trials)
    assert len(json.loads((tmp_path / "part" / "run_meta.json").read_text())["resumed"]) == 1


def test_resume_with_another_objective_or_sampler_is_refused(tmp_path, monkeypatch):
    """Resuming with another metric / function (values not comparable with the earlier trials')
    or another seed / mode was accepted: the best was then ranked across both."""
    from xlstm_metal.tuning.sweep import SweepError

    out = tmp_path / "s"
    first = run_sweep(FunctionObjective("sphere", 2), out, SweepSettings(trials=3, seed=3, progress=False))
    before = (out / "trials.jsonl").read_text()
    with pytest.raises(SweepError, match=r"function 'sphere' -> 'rastrigin'"):
        run_sweep(FunctionObjective("rastrigin", 2), out, SweepSettings(trials=5, seed=3, progress=False), resume=True)
    monkeypatch.chdir(out)  # resumed from inside OUT: a changed word is not taken for a file in OUT
    with pytest.raises(SweepError, match=r"function 'sphere' -> 'rastrigin'"):
        run_sweep(FunctionObjective("rastrigin", 2), ".", SweepSettings(trials=5, seed=3, progress=False), resume=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SweepError, match=r"dims 2 -> 3"):
        run_sweep(FunctionObjective("sphere", 3), out, SweepSettings(trials=5, seed=3, progress=False), resume=True)
    with pytest.raises(SweepError, match=r"seed 3 -> 4"):
        run_sweep(FunctionObjective("sphere", 2), out, SweepSettings(trials=5, seed=4, progress=False), resume=True)
    with pytest.raises(SweepError, match=r"mode 'random' -> 'ga'"):
        run_sweep(FunctionObjective("sphere", 2), out, SweepSettings(mode="ga", population=2, trials=5, seed=3,
                                                                     progress=False), resume=True)
    assert (out / "trials.jsonl").read_text() == before
    resumed = run_sweep(FunctionObjective("sphere", 2), out, SweepSettings(trials=5, seed=3, progress=False),
                        resume=True)  # only the budget changed
    assert _strip(resumed.trials[:3]) == _strip(first.trials) and len(resumed.trials) == 5
    # Random search ignores the population: a budget given as population x generations, then as
    # --trials, is the same sweep (it was refused: 'population 3 -> 10').
    run_sweep(FunctionObjective("sphere", 2), tmp_path / "p", SweepSettings(population=3, generations=2, seed=3,
                                                                            progress=False))
    again = run_sweep(FunctionObjective("sphere", 2), tmp_path / "p", SweepSettings(trials=8, seed=3, progress=False),
                      resume=True)
    assert _strip(again.trials[:5]) == _strip(resumed.trials) and len(again.trials) == 8


class _StopsAtTrial(FunctionObjective):
    """Stops the sweep (as Ctrl-C or a kill would) while trial ``stop_at`` runs."""

    stop_at = None

    def evaluate(self, params, prompts=None, max_new_tokens=32):
        if params["_trial"] == self.stop_at:
            raise KeyboardInterrupt
        return super().evaluate(params, prompts, max_new_tokens)


@pytest.mark.parametrize("mode", ["random", "ga"])
def test_resume_after_an_interrupted_trial_draws_its_point_again(tmp_path, mode):
    """A trial running when the sweep stopped is marked interrupted and does not use up the
    budget: the resumed sweep evaluates the same points as an uninterrupted one (it ran one
    point fewer, and lost the interrupted one, before)."""
    settings = dict(mode=mode, trials=6, population=2, seed=5, progress=False)
    full = run_sweep(FunctionObjective("sphere", 2), tmp_path / "full", SweepSettings(**settings))
    stopping = _StopsAtTrial("sphere", 2)
    stopping.stop_at = 2
    with pytest.raises(KeyboardInterrupt):
        run_sweep(stopping, tmp_path / "part", SweepSettings(**settings))
    resumed = run_sweep(FunctionObjective("sphere", 2), tmp_path / "part", SweepSettings(**settings), resume=True)
    statuses = [r["status"] for r in resumed.trials]
    assert statuses == ["complete", "complete", "interrupted"] + ["complete"] * 4
    assert resumed.trials[2]["params"] == full.trials[2]["params"]  # the point it was evaluating
    done = [(r["value"], r["params"]) for r in resumed.trials if r["status"] == "complete"]
    assert done == [(r["value"], r["params"]) for r in full.trials]
    assert resumed.best["value"] == full.best["value"] and resumed.best["params"] == full.best["params"]


def test_genetic_search_beats_random_at_equal_budget():
    ga, rnd = [], []
    for seed in range(5):
        for mode, out in (("ga", ga), ("random", rnd)):
            records = search(FunctionObjective("sphere", 4), SweepSettings(mode=mode, population=8, generations=5,
                                                                             seed=seed))
            assert len(records) == 40
            out.append(best_record(records, "minimize")["value"])
    assert np.mean(ga) < 0.6 * np.mean(rnd)
    assert sum(g < r for g, r in zip(ga, rnd)) >= 4


def _ray_processes() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()[1:]
            if any(name in line for name in ("raylet", "gcs_server", "ray::", "default_worker.py"))}


@pytest.mark.slow
def test_ray_backend_runs_trials_at_once_and_leaves_nothing(tmp_path):
    pytest.importorskip("ray")
    before = _ray_processes()
    objective = FunctionObjective("sphere", 2, rendezvous=str(tmp_path / "meet"), peers=2, rendezvous_timeout=90)
    result = run_sweep(objective, tmp_path / "out", SweepSettings(trials=2, backend="ray", workers=2,
                                                                   cpus_per_trial=1, progress=False))
    assert [r["status"] for r in result.trials] == ["complete", "complete"]
    assert all(r["metrics"]["met_peers"] for r in result.trials)  # each waited for the other: concurrent
    assert len({r["worker"]["pid"] for r in result.trials}) == 2
    a, b = result.trials
    assert a["started"] < b["finished"] and b["started"] < a["finished"]
    assert _ray_processes() - before == set()


def test_speed_cli_checks_tolerance_saves_outputs_and_profile(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n\nimport os\n")
    out = tmp_path / "speed"
    argv = ["tune", "--objective", "speed", "--model", str(DEFAULT_MODEL_DIR), "--out", str(out), "--trials", "3",
            "--seed", "1", "--prefill-length", "64", "--decode-tokens", "4", "--repeats", "1", "--save-outputs",
            "--prompt-file", str(prompts), "--max-new-tokens", "6", "--profile-name", "mine", "--no-progress"]
    assert main(argv) == 0
    records = _records(out)
    assert len(records) == 3
    for r in records:
        assert r["status"] == "complete"
        assert r["metrics"]["max_rel_error"] <= 1e-4  # exact-fp32's contract on the CPU
        assert r["value"] == pytest.approx(math.sqrt(r["metrics"]["prefill_tok_s"] * r["metrics"]["decode_tok_s"]))
        lines = (out / "outputs" / f"trial-{r['number']:04d}.jsonl").read_text().splitlines()
        assert [json.loads(x)["prompt"] for x in lines] == ["def add(a, b):", "import os"]
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == max(r["value"] for r in records)
    # Greedy outputs do not depend on the (numerically equivalent) settings.
    texts = {tuple((x["prompt"], x["text"]) for x in map(
                 json.loads, (out / "outputs" / f"trial-{r['number']:04d}.jsonl").read_text().splitlines()))
             for r in records}
    assert len(texts) == 1
    saved = load_profile("mine")
    assert saved.kernels["chunkwise"] == best["params"]["kernel"] and saved.chunk_size == best["params"]["chunk_size"]
    assert json.loads((out / "profile.json").read_text())["name"] == "mine"
    # The same command again: the output directory and the saved profile are refused.
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err


def test_trials_outside_the_tolerance_are_rejected_not_ranked(tmp_path, capsys):
    strict = load_profile("exact-fp32").replace(name="strict", tolerance={"max_rel_error": 1e-15})
    (tmp_path / "strict.json").write_text(json.dumps(strict.to_dict()))
    out = tmp_path / "rej"
    code = main(["tune", "--objective", "speed", "--shape", str(DEFAULT_MODEL_DIR / "config.json"), "--out", str(out),
                 "--trials", "2", "--profile", str(tmp_path / "strict.json"), "--prefill-length", "32",
                 "--decode-tokens", "2", "--repeats", "1", "--no-progress"])
    assert code == 1 and "no trial completed" in capsys.readouterr().err
    records = _records(out)
    assert [r["status"] for r in records] == ["rejected", "rejected"]
    assert all(r["value"] is None and r["metrics"]["max_rel_error"] > 1e-15 for r in records)
    assert not (out / "best.json").exists()


def test_cli_bad_input(tmp_path, capsys):
    base = ["tune", "--objective", "speed", "--shape", "125m", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "x"), "--save-outputs"]) == 2
    assert "--prompt-file" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x"), "--mode", "ga", "--population", "1"]) == 2
    assert main(["tune", "--objective", "train", "--out", str(tmp_path / "y")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x"), "--profile", "nope"]) == 2


@pytest.mark.slow
def test_train_objective_is_seeded_and_respects_the_parameter_budget(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "self", "print", "(", ")", ":"]
    text = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(300))
    (tmp_path / "data.txt").write_text(text)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["tune", "--objective", "train", "--data", str(tmp_path / "data.txt"), "--out", str(out),
                     "--trials", "2", "--seed", "4", "--token-budget", "1500", "--seq-len", "16", "--vocab-size", "300",
                     "--param-budget", "60000", "--max-depth", "2", "--no-progress"]) == 0
        runs.append(_records(out))
    assert _strip(runs[0]) == _strip(runs[1])  # same parameters and the same validation losses
    for r in runs[0]:
        if r["status"] == "complete":
            assert r["metrics"]["params"] <= 60000 and 0 < r["value"] < 10
            assert (tmp_path / "a" / "trials" / f"trial-{r['number']:04d}" / "metrics.jsonl").is_file()
        else:
            assert r["status"] == "rejected" and "budget" in r["reason"]
    # Seed 4 draws a 32-wide model (trained) and a 256-wide one (over the budget).
    assert [r["status"] for r in runs[0]] == ["complete", "rejected"]


def test_train_sweep_resumes_from_a_moved_or_differently_named_out(tmp_path, monkeypatch):
    """The tokenizer a train sweep trains into OUT is the run's own: resuming through another
    spelling of OUT (absolute / relative) or after moving it must not count as changed settings."""
    (tmp_path / "data.txt").write_text("\n".join(f"alpha beta {i % 7} gamma delta" for i in range(200)))
    args = ["tune", "--objective", "train", "--data", str(tmp_path / "data.txt"), "--seed", "4",
            "--token-budget", "1100", "--seq-len", "16", "--vocab-size", "300", "--param-budget", "60000",
            "--max-depth", "1", "--no-progress"]
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--out", "a", "--trials", "1"]) == 0
    first = _records(tmp_path / "a")
    assert main([*args, "--out", str(tmp_path / "a"), "--trials", "2", "--resume"]) == 0
    (tmp_path / "a").rename(tmp_path / "moved")
    assert main([*args, "--out", "moved", "--trials", "3", "--resume"]) == 0
    records = _records(tmp_path / "moved")
    assert len(records) == 3 and _strip(records[:1]) == _strip(first)
    changed = [("1200" if a == "1100" else a) for a in args]  # --token-budget 1200 (an option is given once)
    assert main([*changed, "--out", "moved", "--trials", "4", "--resume"]) == 2


def test_speed_sweep_resumes_with_the_shape_file_spelt_another_way(tmp_path, monkeypatch):
    """--shape config.json given relative, then absolute: the same file, not a changed setting."""
    (tmp_path / "tiny.json").write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 1,
                                                    "vocab_size": 128}))
    monkeypatch.chdir(tmp_path)
    args = ["tune", "--objective", "speed", "--out", "s", "--seed", "2", "--prefill-length", "32",
            "--decode-tokens", "4", "--repeats", "1", "--profile-name", "t", "--no-progress"]
    assert main([*args, "--shape", "tiny.json", "--trials", "1"]) == 0
    assert main([*args, "--shape", str(tmp_path / "tiny.json"), "--trials", "2", "--resume"]) == 0
    assert len(_records(tmp_path / "s")) == 2
    (tmp_path / "other.json").write_text((tmp_path / "tiny.json").read_text())
    assert main([*args, "--shape", "other.json", "--trials", "3", "--resume"]) == 2  # another file


def test_train_sweep_refuses_a_vocabulary_below_the_byte_alphabet(tmp_path, capsys):
    """--vocab-size 10 was a DataError traceback from the tokenizer training, after --out was made."""
    (tmp_path / "data.txt").write_text("alpha beta gamma\n" * 50)
    out = tmp_path / "out"
    assert main(["tune", "--objective", "train", "--data", str(tmp_path / "data.txt"), "--out", str(out),
                 "--trials", "1", "--vocab-size", "10", "--no-progress"]) == 2
    assert "--vocab-size must be >= 259" in capsys.readouterr().err and not out.exists()


def test_train_sweep_on_too_little_data_stops_before_any_trial(tmp_path, capsys):
    """Too little data failed every trial one by one ("error" records, exit 1); now the sweep
    stops up front, exit 2, with the tokens needed and given, and leaves no --out behind."""
    from xlstm_metal.training.data import (
        BOS_TOKEN, EOS_TOKEN, load_documents, save_tokenizer, split_stream, tokenize_documents, tokenizer_config_dict,
        train_bpe_tokenizer,
    )

    data = tmp_path / "data.txt"
    data.write_text("alpha beta gamma delta\n" * 20)
    docs = load_documents([str(data)], "text")
    tokenizer = train_bpe_tokenizer((d.text for d in docs), 300, show_progress=False)
    save_tokenizer(tokenizer, tmp_path / "tok", tokenizer_config_dict(tokenizer))
    doc_tokens = tokenize_documents(tokenizer, docs, tokenizer.token_to_id(BOS_TOKEN),
                                    tokenizer.token_to_id(EOS_TOKEN))
    train, val = split_stream(doc_tokens, 0.1, 0)
    assert len(train) >= 5 * 16 and len(val) < 17  # enough to train on, too little to validate on
    base = ["tune", "--objective", "train", "--data", str(data), "--trials", "3", "--seq-len", "16",
            "--no-progress"]
    out = tmp_path / "out"
    for extra in (["--tokenizer", str(tmp_path / "tok" / "tokenizer.json")], ["--vocab-size", "300"]):
        assert main([*base, *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and not out.exists()
        usage = (f"too little data for --objective train: it needs 80 training tokens (the smallest batch searched, "
                 f"4 x 17) and 17 validation tokens (one window); the data gives {len(train)} training and "
                 f"{len(val)} validation tokens (--val-fraction 0.1 of {len(train) + len(val)}); give more data, "
                 "or lower --seq-len or raise --val-fraction")
        assert f"xlstm-metal: error: {usage}\n" == err


def test_batch_sizes_the_data_cannot_fill_leave_the_search(monkeypatch, capsys):
    """A batch size too large for the data failed every trial that drew it; now it leaves the
    search space up front (said on stderr), and the space recorded is what is searched."""
    from xlstm_metal.tuning import TrainObjective

    objective = TrainObjective(seq_len=16, batches=(4, 8, 16, 32))
    train, val = np.arange(9 * 16, dtype=np.int32), np.arange(17, dtype=np.int32)  # fits 4 and 8
    monkeypatch.setattr(objective, "_data", lambda: (None, train, val))
    objective.check_data()
    assert objective.batches == (4, 8) and objective.meta()["space"]["batch_size"] == [4, 8]
    err = capsys.readouterr().err
    assert "batch size(s) 16, 32 left out of the search: the data gives 144 training tokens" in err
    objective.check_data()  # nothing more to leave out: nothing said
    assert objective.batches == (4, 8) and capsys.readouterr().err == ""


def test_train_data_check_is_the_trainers_own_bound(monkeypatch):
    """check_data's bound is exactly where PackedBatches / validation_windows start to accept."""
    from xlstm_metal.training.data import DataError, PackedBatches, validation_windows
    from xlstm_metal.tuning import ObjectiveError, TrainObjective

    objective = TrainObjective(seq_len=16, batches=(8, 4, 16))
    for n_train, n_val, ok in ((80, 17, True), (79, 17, False), (80, 16, False)):
        train, val = np.arange(n_train, dtype=np.int32), np.arange(n_val, dtype=np.int32)
        monkeypatch.setattr(objective, "_data", lambda t=train, v=val: (None, t, v))
        try:
            PackedBatches(train, 16, 4, 0)
            validation_windows(val, 16)
            trainer_ok = True
        except DataError:
            trainer_ok = False
        assert trainer_ok == ok
        if ok:
            objective.check_data()
        else:
            with pytest.raises(ObjectiveError, match=f"gives {n_train} training and {n_val} validation tokens"):
                objective.check_data()


def test_profile_init_sets_gates_for_training_from_scratch():
    from conftest import tiny_model

    from xlstm_metal.profiles import init_gates

    model = tiny_model()
    init_gates(model, {"igate_bias": -3.0, "fgate_bias": [1.0, 2.0], "gate_weight_std": 0.0})
    layer = model.blocks[0].mlstm_layer
    assert np.allclose(np.array(layer.igate_preact.bias), -3.0)
    assert np.allclose(np.array(layer.fgate_preact.bias), [1.0, 2.0]) and not np.array(layer.fgate_preact.weight).any()
    apply_profile(model, "exact-fp32")


def test_a_parameter_budget_below_the_smallest_model_stops_before_any_trial(tmp_path, capsys):
    """--param-budget 10 had every trial rejected, then exit 1; now the sweep stops up front, exit
    2, naming the smallest model searched, and leaves no --out behind."""
    (tmp_path / "data.txt").write_text("alpha beta gamma delta epsilon\n" * 200)
    out = tmp_path / "out"
    assert main(["tune", "--objective", "train", "--data", str(tmp_path / "data.txt"), "--out", str(out),
                 "--trials", "2", "--param-budget", "10", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not out.exists()
    assert re.search(r"--param-budget 10 is below the smallest model searched \(([\d,]+) parameters: width 32, one "
                     r"block, a vocabulary of \d+\); every trial would be rejected", err), err
    from xlstm_metal.tuning import TrainObjective

    objective = TrainObjective(data=(str(tmp_path / "data.txt"),), param_budget=10**9)
    objective.prepare(tmp_path / "fits")
    objective.check_budget()  # a budget the smallest model fits: nothing said
