"""Session 51's hunt in tune, profile, plot and judge: each test fails on the code before its fix."""

import dataclasses
import json
import shutil

import pytest

from xlstm_metal.cli import main

pytest.importorskip("optuna")

from test_tune import _profiles, _records  # noqa: E402,F401  (the autouse fixture: profiles in tmp_path)


def test_resume_from_another_directory_with_relative_model_shape_and_profile(tmp_path, monkeypatch, tiny_model_dir):
    """--model ckpt, --shape tiny.json and --profile my.json were kept relative in run_meta.json's
    objective, so `tune --out ../sweep --resume` from another directory was refused: "cannot resume
    ... with other settings (model 'ckpt' -> '/abs/ckpt')"."""
    from xlstm_metal.profiles import PACKAGE_DIR

    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny.json").write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 1,
                                                "vocab_size": 128}))
    profile = json.loads((PACKAGE_DIR / "exact-fp32.json").read_text())
    (work / "my.json").write_text(json.dumps({**profile, "name": "my"}))
    shutil.copytree(tiny_model_dir, work / "ckpt")
    (tmp_path / "elsewhere").mkdir()
    common = ["--trials", "1", "--metric", "prefill", "--prefill-length", "32", "--repeats", "1", "--no-progress"]
    for name, source in (("shape", ["--shape", "tiny.json", "--profile", "my.json"]), ("model", ["--model", "ckpt"])):
        monkeypatch.chdir(work)
        assert main(["tune", "--objective", "speed", *source, "--out", f"../{name}", "--profile-name", name,
                     *common]) == 0
        monkeypatch.chdir(tmp_path / "elsewhere")
        assert main(["tune", "--out", f"../{name}", "--resume", "--trials", "2", "--no-progress"]) == 0
        assert [r["status"] for r in _records(tmp_path / name)] == ["complete", "complete"]


@pytest.mark.parametrize("metric, unsearched", [("decode", ("kernel", "chunk_size", "prefill_chunk")),
                                                ("prefill", ("step_kernel",))])
def test_a_sweep_searches_only_the_settings_its_metric_times(tmp_path, monkeypatch, metric, unsearched):
    """--metric decode drew the prompt's kernel, chunk size and piece length at random (a decode
    step runs none of them) and saved the winner's draws in its profile, e.g. the quadratic
    `parallel` kernel over 4096-token pieces, never timed; --metric prefill did so for the step
    kernel. Those now stay at the base profile's values and are not searched."""
    from xlstm_metal.profiles import load_profile

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.json").write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 1,
                                                    "vocab_size": 128}))
    timing = ["--prefill-length", "32", "--repeats", "1"] if metric == "prefill" else ["--decode-tokens", "4"]
    assert main(["tune", "--objective", "speed", "--shape", "tiny.json", "--metric", metric, *timing, "--out", "s",
                 "--trials", "4", "--profile-name", "w", "--no-progress"]) == 0
    records = _records(tmp_path / "s")
    assert len(records) == 4 and all(not set(unsearched) & set(r["params"]) for r in records)
    assert "state_dtype" in records[0]["params"]
    space = json.loads((tmp_path / "s" / "run_meta.json").read_text())["objective"]["space"]
    assert not set(unsearched) & set(space)
    base, winner = load_profile("exact-fp32"), load_profile("w")
    fields = {"kernel": lambda p: p.kernels["chunkwise"], "step_kernel": lambda p: p.kernels["step"],
              "chunk_size": lambda p: p.chunk_size, "prefill_chunk": lambda p: p.prefill_chunk}
    for name in unsearched:
        assert fields[name](winner) == fields[name](base), name


def test_a_prefill_sweep_of_the_older_space_resumes_with_it(tmp_path, monkeypatch):
    """A --metric prefill sweep an older version ran searched the step kernel too: resuming it
    goes on with that space (a changed space is refused as other settings)."""
    from xlstm_metal.tuning import SpeedObjective

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.json").write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 1,
                                                    "vocab_size": 128}))
    flags = ["--shape", "tiny.json", "--metric", "prefill", "--prefill-length", "32", "--repeats", "1"]
    everything = ("kernel", "chunk_size", "prefill_chunk", "step_kernel", "state_dtype", "fuse")
    space = SpeedObjective._space
    with monkeypatch.context() as patch:  # as the older version searched
        patch.setattr(SpeedObjective, "_space", lambda self: space(dataclasses.replace(self, searched=everything)))
        assert main(["tune", "--objective", "speed", *flags, "--out", "s", "--trials", "1", "--profile-name", "w",
                     "--no-progress"]) == 0
    assert main(["tune", "--out", "s", "--resume", "--trials", "2", "--no-progress"]) == 0
    records = _records(tmp_path / "s")
    assert [r["status"] for r in records] == ["complete", "complete"]
    assert all("step_kernel" in r["params"] for r in records)


def test_a_resumed_sweep_draws_the_interrupted_slot_not_a_finished_one(tmp_path):
    """With trials at once (Ray), trial 2 can finish while trial 1 is still running when the sweep
    stops. The resumed sweep's seed slot was the count of counted trials (2): trial 2's point ran
    again and trial 1's never; the points of an uninterrupted sweep are now evaluated, each once."""
    import optuna

    from xlstm_metal.tuning import FunctionObjective, SweepSettings, run_sweep
    from xlstm_metal.tuning.sweep import STUDY_NAME, _ask, sqlite_storage

    objective, settings = FunctionObjective("sphere", 2), dict(seed=5, progress=False)
    full = run_sweep(objective, tmp_path / "full", SweepSettings(trials=4, **settings))
    run_sweep(objective, tmp_path / "cut", SweepSettings(trials=1, **settings))
    storage = sqlite_storage(tmp_path / "cut" / "study.db")
    try:  # two trials at once, as the Ray backend asks them: the second finishes, the first is cut
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        _ask(study, objective, SweepSettings(trials=4, **settings))
        second, params = _ask(study, objective, SweepSettings(trials=4, **settings))
        record = objective.evaluate(params)
        second.set_user_attr("record", record)
        study.tell(second, record["value"])
    finally:
        storage.engine.dispose()
    resumed = run_sweep(objective, tmp_path / "cut", SweepSettings(trials=4, **settings), resume=True)
    points = sorted(tuple(r["params"].values()) for r in resumed.trials if r["status"] == "complete")
    assert [r["status"] for r in resumed.trials].count("interrupted") == 1
    assert points == sorted(tuple(r["params"].values()) for r in full.trials)


def test_a_profile_directory_that_cannot_be_written_is_refused_before_the_sweep(tmp_path, monkeypatch, capsys):
    """The winner's profile was first written after the last trial: a profile directory under a
    file (or unwritable) ran the whole sweep, then failed."""
    from cli_helpers import assert_rejected

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.json").write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 1,
                                                    "vocab_size": 128}))
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "tiny.json" / "profiles"))
    assert_rejected(["tune", "--objective", "speed", "--shape", "tiny.json", "--metric", "prefill", "--prefill-length",
                     "32", "--repeats", "1", "--out", "s", "--trials", "1", "--no-progress"], capsys,
                    "the winner's profile", "is not a writable directory")
    assert not (tmp_path / "s").exists()
