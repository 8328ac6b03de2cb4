"""`xlstm-metal tune --out X --resume`: the saved flags of run_meta.json are taken where left
out; a flag given with another value is a usage error naming it; only the budget, the winner's
name and the backend may change."""

import argparse
import json

import pytest

from xlstm_metal.cli import build_parser, main
from xlstm_metal.cli import tune as tune_cli

pytest.importorskip("optuna")


@pytest.fixture(autouse=True)
def _profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    monkeypatch.chdir(tmp_path)
    # A one-block model: a speed trial takes well under a second.
    (tmp_path / "tiny.json").write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 1,
                                                    "vocab_size": 128}))


def _records(out):
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def _meta(out):
    return json.loads((out / "run_meta.json").read_text())


#: A speed sweep whose settings all differ from the defaults a resume would otherwise fall back to.
SWEEP = ["tune", "--objective", "speed", "--shape", "tiny.json", "--seed", "2", "--metric", "prefill",
         "--prefill-length", "32", "--repeats", "1", "--no-progress"]
SPEED = [*SWEEP, "--profile-name", "t"]


class _Stop(Exception):
    pass


def test_resume_with_only_out_continues_an_interrupted_sweep_with_its_saved_settings(tmp_path, monkeypatch, capsys):
    from xlstm_metal.tuning import SpeedObjective

    assert main([*SWEEP, "--profile-name", "f", "--out", "full", "--trials", "4"]) == 0  # never interrupted
    full = _records(tmp_path / "full")
    evaluate = SpeedObjective.evaluate

    def stops_at_trial_1(self, params, prompts=None, max_new_tokens=32):
        if params["_trial"] == 1:
            raise KeyboardInterrupt  # as Ctrl-C would, while trial 1 runs
        return evaluate(self, params, prompts, max_new_tokens)

    monkeypatch.setattr(SpeedObjective, "evaluate", stops_at_trial_1)
    assert main([*SPEED, "--out", "s", "--trials", "2"]) == 130
    monkeypatch.setattr(SpeedObjective, "evaluate", evaluate)
    assert len(_records(tmp_path / "s")) == 1
    capsys.readouterr()

    # No --objective, shape, seed, metric, lengths: all from run_meta.json; the budget is the saved 2.
    assert main(["tune", "--out", "s", "--resume", "--no-progress"]) == 0
    records = _records(tmp_path / "s")
    assert [r["status"] for r in records] == ["complete", "interrupted", "complete"]
    done = [r for r in records if r["status"] == "complete"]
    assert [r["params"] for r in done] == [r["params"] for r in full[:2]]  # --seed 2's draws, in order
    # A larger budget: still with the saved settings.
    assert main(["tune", "--out", str(tmp_path / "s"), "--resume", "--trials", "4", "--no-progress"]) == 0
    records = _records(tmp_path / "s")
    done = [r for r in records if r["status"] == "complete"]
    assert len(records) == 5 and [r["params"] for r in done] == [r["params"] for r in full]
    for r in done:  # --metric prefill (not the default both) at --prefill-length 32, --repeats 1
        assert r["value"] == r["metrics"]["prefill_tok_s"] and "decode_tok_s" not in r["metrics"]
    meta = _meta(tmp_path / "s")
    objective = meta["objective"]
    assert (objective["metric"], objective["prefill_length"], objective["repeats"]) == ("prefill", 32, 1)
    assert meta["cli"]["given"]["shape"] == str(tmp_path / "tiny.json")  # saved absolute (given relative)
    assert meta["settings"]["seed"] == 2 and meta["settings"]["trials"] == 4 and meta["budget"] == 4
    assert meta["cli"]["used"]["profile_name"] == "t" and len(meta["resumed"]) == 2
    assert "saved the winner as profile 't'" in capsys.readouterr().err
    # Resumed again with nothing more to do: the saved budget is now 4.
    assert main(["tune", "--out", "s", "--resume", "--no-progress"]) == 0
    assert len(_records(tmp_path / "s")) == 5


def test_resume_takes_the_genetic_search_and_grows_its_budget_by_generations(tmp_path):
    assert main([*SPEED, "--out", "ga", "--mode", "ga", "--population", "2", "--generations", "1"]) == 0
    assert main(["tune", "--out", "ga", "--resume", "--generations", "2", "--no-progress"]) == 0
    meta = _meta(tmp_path / "ga")
    assert meta["sampler"] == "NSGAIISampler" and meta["budget"] == 4 and len(_records(tmp_path / "ga")) == 4
    assert (meta["settings"]["mode"], meta["settings"]["population"], meta["settings"]["seed"]) == ("ga", 2, 2)
    # The genetic search's generation size is fixed: another --population is refused, even at its default.
    assert main(["tune", "--out", "ga", "--resume", "--population", "10", "--trials", "6"]) == 2


@pytest.mark.parametrize("flags,named", [
    (["--seed", "0"], "--seed 0 (saved: 2)"),  # the parser's default, not the sweep's
    (["--metric", "both"], "--metric both (saved: prefill)"),  # the default again
    (["--prefill-length", "64"], "--prefill-length 64 (saved: 32)"),
    (["--mode", "random", "--decode-batch", "2"], "--decode-batch 2 (saved: 1)"),  # a default, never given
    (["--objective", "train", "--data", "tiny.json"], "--objective train (saved: speed): s holds a speed sweep, not "
                                                      "train; leave out --objective (the saved one is taken)"),
    (["--shape", "other.json"], "--shape {tmp}/other.json (saved: {tmp}/tiny.json)"),  # the same text, another file
    (["--model", "ckpt"], "--model ckpt (saved: (not given))"),
    (["--save-outputs", "--prompt-file", "p.txt"], "--save-outputs on (saved: off)"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_a_flag_given_on_resume_with_another_value_is_a_usage_error(flags, named, tmp_path, capsys):
    (tmp_path / "other.json").write_text((tmp_path / "tiny.json").read_text())
    (tmp_path / "p.txt").write_text("hi\n")
    assert main([*SPEED, "--out", "s", "--trials", "1"]) == 0
    before = (tmp_path / "s" / "trials.jsonl").read_text(), (tmp_path / "s" / "run_meta.json").read_text()
    capsys.readouterr()
    assert main(["tune", "--out", "s", "--resume", "--trials", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and named.format(tmp=tmp_path) in err, err
    assert "taken) or start a new --out" in err
    assert ((tmp_path / "s" / "trials.jsonl").read_text(), (tmp_path / "s" / "run_meta.json").read_text()) == before


def test_flags_given_on_resume_with_the_saved_values_are_accepted(tmp_path, capsys):
    assert main([*SPEED, "--out", "s", "--trials", "1"]) == 0
    # The first run's flags again (the old way), the shape spelt absolute: the same sweep.
    again = [str(tmp_path / "tiny.json") if a == "tiny.json" else a for a in SPEED]
    assert main([*again, "--out", "s", "--trials", "2", "--resume", "--mode", "random", "--backend", "local"]) == 0
    assert len(_records(tmp_path / "s")) == 2
    # Two differing flags: both named.
    assert main(["tune", "--out", "s", "--resume", "--seed", "3", "--repeats", "2"]) == 2
    assert "these flags differ: --seed 3 (saved: 2); --repeats 2 (saved: 1). Leave them out" in capsys.readouterr().err


def test_resume_on_ray_keeps_or_replaces_the_backend_flags(tmp_path, capsys):
    """The backend may change: left out, the saved one's flags are taken; --backend given brings its own."""
    assert main([*SPEED, "--out", "s", "--trials", "1"]) == 0
    meta = json.loads((tmp_path / "s" / "run_meta.json").read_text())
    meta["cli"]["given"].update(backend="ray", workers=3)  # as a Ray sweep would have saved them
    (tmp_path / "s" / "run_meta.json").write_text(json.dumps(meta))
    args = build_parser().parse_args(["tune", "--out", "s", "--resume"])
    tune_cli._take_saved_flags(args, meta["cli"], tmp_path / "s")
    assert (args.backend, args.workers, args.seed, args.objective) == ("ray", 3, 2, "speed")
    args = build_parser().parse_args(["tune", "--out", "s", "--resume", "--backend", "local"])
    tune_cli._take_saved_flags(args, meta["cli"], tmp_path / "s")
    assert (args.backend, args.workers) == ("local", None)
    # --workers without Ray (the saved backend is local): applies only with --backend ray.
    meta["cli"]["given"].pop("backend")
    (tmp_path / "s" / "run_meta.json").write_text(json.dumps(meta))
    assert main(["tune", "--out", "s", "--resume", "--trials", "2"]) == 2
    assert "--workers applies only with --backend ray" in capsys.readouterr().err


def test_objective_is_required_without_resume_and_resume_needs_a_sweep(tmp_path, capsys):
    assert main(["tune", "--shape", "tiny.json", "--out", "x", "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert "--objective is required (speed or train), unless --resume continues a sweep" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()
    assert main(["tune", "--out", "x", "--resume"]) == 2  # nothing there
    assert "nothing to resume: x/study.db does not exist" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "study.db").write_text("")
    assert main(["tune", "--out", "x", "--resume"]) == 2
    assert "nothing to resume: x/run_meta.json does not exist" in capsys.readouterr().err


def test_run_meta_of_an_older_version_needs_the_flags_again(tmp_path, capsys):
    assert main([*SPEED, "--out", "s", "--trials", "1"]) == 0
    meta = _meta(tmp_path / "s")
    del meta["cli"]  # as versions that saved no flags wrote it
    (tmp_path / "s" / "run_meta.json").write_text(json.dumps(meta))
    assert main(["tune", "--out", "s", "--resume", "--trials", "2"]) == 2
    assert "holds no saved flags (an older xlstm-metal wrote it): give the first run's flags again" in \
        capsys.readouterr().err
    assert main([*SPEED, "--out", "s", "--resume", "--trials", "2"]) == 0  # ... which then saves them
    assert main(["tune", "--out", "s", "--resume", "--trials", "3", "--no-progress"]) == 0
    assert len(_records(tmp_path / "s")) == 3 and _meta(tmp_path / "s")["objective"]["metric"] == "prefill"
    meta = _meta(tmp_path / "s")
    meta["cli"] = ["not", "an", "object"]
    (tmp_path / "s" / "run_meta.json").write_text(json.dumps(meta))
    assert main(["tune", "--out", "s", "--resume"]) == 2
    assert "'cli' must be an object" in capsys.readouterr().err


def test_resume_takes_a_train_sweeps_flags(tmp_path):
    """The train objective's flags (data, budgets, vocabulary, sequence length) come back too,
    and a saved --vocab-size passes the check it passed in the first run."""
    (tmp_path / "data.txt").write_text("\n".join(f"alpha beta {i % 7} gamma delta" for i in range(200)))
    assert main(["tune", "--objective", "train", "--data", "data.txt", "--out", "t", "--seed", "4", "--trials", "1",
                 "--token-budget", "1100", "--seq-len", "16", "--vocab-size", "300", "--param-budget", "60000",
                 "--max-depth", "1", "--no-progress"]) == 0
    assert main(["tune", "--out", "t", "--resume", "--trials", "2", "--no-progress"]) == 0
    records = _records(tmp_path / "t")
    assert len(records) == 2 and records[1]["params"]["num_blocks"] == 1  # --max-depth 1
    assert records[1]["status"] == "rejected" and "> budget 60,000" in records[1]["reason"]  # --param-budget
    meta = _meta(tmp_path / "t")["objective"]
    assert (meta["token_budget"], meta["seq_len"], meta["data"]) == (1100, 16, [str(tmp_path / "data.txt")])
    cli = _meta(tmp_path / "t")["cli"]
    assert cli["given"]["vocab_size"] == cli["used"]["vocab_size"] == 300 and cli["used"]["text_field"] == "text"
    assert main(["tune", "--out", "t", "--resume", "--trials", "3", "--token-budget", "100000"]) == 2


def test_every_tune_flag_is_saved_or_of_one_run():
    """A new tune flag must be classified: saved (taken on resume) or of one run."""
    from xlstm_metal.monitor import add_job_arguments

    tune = build_parser()._subparsers._group_actions[0].choices["tune"]
    job = argparse.ArgumentParser()
    add_job_arguments(job)
    job_dests = {a.dest for a in job._actions}
    dests = {a.dest for a in tune._actions if a.option_strings and a.dest not in job_dests}
    assert dests == set(tune_cli.SAVED_FLAGS) | set(tune_cli.RUN_FLAGS)
    assert not set(tune_cli.SAVED_FLAGS) & set(tune_cli.RUN_FLAGS)
    for action in tune._actions:  # None: "not given", so --resume can tell a flag given at its default
        if action.dest in tune_cli.SAVED_FLAGS:
            assert action.default is None, action.dest
