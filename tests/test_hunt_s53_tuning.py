"""Session 53's hunt in tune, profile, plot and judge: each test fails on the code before its fix."""

import json
import warnings

import pytest
from cli_helpers import assert_rejected

from xlstm_metal.cli import main
from xlstm_metal.profiles import PACKAGE_DIR, ProfileError, load_profile, profile_from_dict
from xlstm_metal.tuning import (FunctionObjective, ObjectiveError, SpeedObjective, SweepError, SweepSettings,
                                 TrainObjective, run_sweep)

EXACT = json.loads((PACKAGE_DIR / "exact-fp32.json").read_text())
TINY = {"embedding_dim": 64, "num_heads": 2, "num_blocks": 1, "vocab_size": 128}


@pytest.fixture(autouse=True)
def _profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("edit", ["profile", "shape"])
def test_resume_with_the_base_profile_or_shape_changed_is_refused(tmp_path, capsys, edit):
    """Edited before --resume: new trials ran in bfloat16 (on another model); a float32 winner saved as bfloat16."""
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    (tmp_path / "my.json").write_text(json.dumps({**EXACT, "name": "my"}))
    assert main(["tune", "--objective", "speed", "--shape", "tiny.json", "--metric", "prefill", "--prefill-length",
                 "32", "--repeats", "1", "--out", "s", "--trials", "1", "--profile", "my.json", "--profile-name", "w",
                 "--no-progress"]) == 0
    if edit == "shape":
        (tmp_path / "tiny.json").write_text(json.dumps({**TINY, "num_blocks": 2}))
    else:
        (tmp_path / "my.json").write_text(json.dumps({**EXACT, "name": "my", "dtype": "bfloat16"}))
    assert_rejected(["tune", "--out", "s", "--resume", "--trials", "2", "--no-progress"], capsys, "cannot resume",
                    "config.num_blocks 1 -> 2" if edit == "shape" else "base_settings.dtype 'float32' -> 'bfloat16'")
    assert len((tmp_path / "s" / "trials.jsonl").read_text().splitlines()) == 1
    assert load_profile("w").dtype == "float32"


@pytest.mark.parametrize("line", ['{"text": "a", "m": {"x": NaN}}', '{"text": "a", "x": Infinity}'])
def test_judge_refuses_a_record_json_cannot_write_back(tmp_path, capsys, line):
    """Nested, a ValueError traceback after every text was judged (an empty --out left); on top, nulled."""
    (tmp_path / "t.jsonl").write_text(line + "\n")
    assert_rejected(["judge", "--outputs", "t.jsonl", "--out", "r"], capsys, "t.jsonl:1", "NaN or Infinity")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind, name", [("chunkwise", "step"), ("chunkwise", "step_fused"), ("sequence", "triton")])
def test_a_one_token_kernel_for_prompts_is_refused_when_read(tmp_path, capsys, kind, name):
    """It loaded; each prompt then failed inside the model ("mlstm_step takes one time step")."""
    data = {**EXACT, "name": "k", "kernels": {kind: name}}
    with pytest.raises(ProfileError, match=f"kernels.{kind}: {name} runs one token at a time"):
        profile_from_dict(data)
    (tmp_path / "k.json").write_text(json.dumps(data))
    assert_rejected(["profile", "show", "k.json"], capsys, f"kernels.{kind}")
    assert profile_from_dict({**data, "kernels": {"step": "chunkwise"}}).kernels["step"] == "chunkwise"  # it runs


def test_judge_rates_a_text_past_the_float_range_of_perplexity(tmp_path, capsys):
    """A mean log-probability below -709.8 (no logit soft cap, huge logits) was an OverflowError."""
    from conftest import tiny_model
    from test_tokenizer import train_tiny_tokenizer

    from xlstm_metal.loading import save_model

    hf = train_tiny_tokenizer()
    model = tiny_model(4, vocab_size=hf.get_vocab_size(), output_logit_soft_cap=None)
    model.lm_head.weight = model.lm_head.weight * 1e5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (transformers cannot run this shape)
        save_model(model, tmp_path / "hot")
    hf.save(str(tmp_path / "hot" / "tokenizer.json"))
    (tmp_path / "t.jsonl").write_text('{"text": "the quick brown fox"}\n')
    assert main(["judge", "--model", "hot", "--outputs", "t.jsonl", "--out", "r", "--no-progress"]) == 0
    row = json.loads((tmp_path / "r" / "ratings.jsonl").read_text())
    assert row["mean_logprob"] < -709.8 and row["perplexity"] is None and row["scored_tokens"] > 0
    assert "perplexity inf over" in capsys.readouterr().err


@pytest.mark.parametrize("metrics", [None, {"prefill_tok_s": 3.0}])
def test_plot_tune_draws_prefill_against_decode_of_the_trials_that_have_both(tmp_path, metrics):
    """A trial without both rates beside one with them was a KeyError traceback."""
    from xlstm_metal.plotting import plot_tune

    trials = [{"number": 0, "status": "complete", "value": 1.0, "params": {"a": 1},
               "metrics": {"prefill_tok_s": 4.0, "decode_tok_s": 5.0}},
              {"number": 1, "status": "complete", "value": 2.0, "params": {"a": 2}, **({"metrics": metrics} if metrics else {})}]
    (tmp_path / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))
    fig = plot_tune(tmp_path)
    panel = next(ax for ax in fig.axes if ax.get_title() == "prefill vs decode")
    assert panel.collections[0].get_offsets().tolist() == [[4.0, 5.0]]


@pytest.mark.parametrize("space, words", [(dict(chunk_sizes=()), "chunk_size: no choices"),
                                          (dict(chunk_sizes=(64, 0)), "chunk_size must be a positive"),
                                          (dict(kernels=("nope",)), "unknown mLSTM kernel 'nope'")])
def test_a_speed_space_with_a_bad_choice_is_refused_before_any_trial(space, words):
    """Every trial drawing it failed (an empty one raised mid-sweep)."""
    with pytest.raises(ValueError, match=words):
        SpeedObjective(shape="125m", metric="prefill", **space)


def test_an_overwrite_refused_before_its_first_trial_keeps_the_last_sweep(tmp_path):
    """--overwrite deleted the last sweep, then refused the new one: both were gone."""
    class Refused(FunctionObjective):
        def prepare(self, out_dir):
            raise ObjectiveError("too little data")

    run_sweep(FunctionObjective(), "s", SweepSettings(trials=2, progress=False))
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    with pytest.raises(SweepError, match="too little data"):
        run_sweep(Refused(), "s", SweepSettings(trials=2, progress=False), overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before
    assert len(before["trials.jsonl"].splitlines()) == 2


@pytest.mark.parametrize("name, where", [("b.jsonl", "b.jsonl:2"), ("b.json", "b.json record 2")])
def test_plot_refuses_a_bench_length_or_batch_that_is_no_whole_number(tmp_path, capsys, name, where):
    """int() drew a length of 1.5 at 1 without a word."""
    recs = [{"kind": "prefill", "length": 2.0, "tok_s": 5.0}, {"kind": "prefill", "length": 1.5, "tok_s": 3.0}]
    (tmp_path / name).write_text("\n".join(map(json.dumps, recs)) if name.endswith("l") else json.dumps(recs))
    assert_rejected(["plot", name, "--out", "o.png"], capsys, where, "'length' must be a whole number", "1.5")
    (tmp_path / name).write_text(json.dumps(recs[0] if name.endswith("l") else recs[:1]))
    assert main(["plot", name, "--out", "o.png"]) == 0  # 2.0 is 2


@pytest.mark.parametrize("make, words", [
    (lambda: FunctionObjective("rosenbrock"), "function must be sphere or rastrigin, got 'rosenbrock'"),
    (lambda: FunctionObjective("sphere", 0), "dims must be an integer >= 1, got 0"),
    (lambda: TrainObjective(widths=()), r"widths must be a non-empty list of integers >= 1, got \(\)"),
    (lambda: TrainObjective(batches=(4, 0)), r"batches must be an integer >= 1, got 0 in \(4, 0\)"),
    (lambda: TrainObjective(widths=(30, 34), heads=(4,)), r"no width \(30, 34\) splits into heads \(4,\)"),
])
def test_function_and_train_objectives_refuse_a_bad_setting_when_made(make, words):
    """Every trial failed (an unknown function, a batch of 0, no width a head count splits), or dims 0 "found" 0."""
    with pytest.raises(ValueError, match=words):
        make()
    assert TrainObjective(widths=(30, 32), heads=(4,)).widths == (30, 32)  # one that splits is enough


def test_a_profile_chunk_size_past_the_bound_is_refused_when_read(tmp_path, capsys):
    """`profile check` ran 2 x chunk_size + 7 tokens: 8192 took 270 s and 13 GB, 100000 was killed."""
    assert profile_from_dict({**EXACT, "chunk_size": 4096}).chunk_size == 4096
    (tmp_path / "big.json").write_text(json.dumps({**EXACT, "name": "big", "chunk_size": 4097}))
    assert_rejected(["profile", "check", "big.json"], capsys, "big.json: chunk_size must be at most 4096, got 4097")


def test_a_sweep_keeps_the_base_profile_it_started_with(tmp_path, monkeypatch):
    """Each trial re-read the base profile: an edit made during a sweep changed its later trials."""
    import xlstm_metal.profiles as profiles
    from xlstm_metal.config import xLSTMConfig

    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    (tmp_path / "my.json").write_text(json.dumps({**EXACT, "name": "my"}))
    applied, apply = [], profiles.apply_profile

    def spy(target, profile):  # records each trial's settings and edits the file
        if profile.name == "trial" and not isinstance(target, xLSTMConfig):
            applied.append((profile.dtype, profile.chunk_size))
        (tmp_path / "my.json").write_text(json.dumps({**EXACT, "name": "my", "dtype": "bfloat16", "chunk_size": 16}))
        return apply(target, profile)

    monkeypatch.setattr(profiles, "apply_profile", spy)
    objective = SpeedObjective(shape=str(tmp_path / "tiny.json"), base_profile="my.json", metric="decode",
                               decode_tokens=2, repeats=1)
    run_sweep(objective, "s", SweepSettings(trials=2, progress=False))
    assert applied == [("float32", 64)] * 2 and objective.profile_for({}).dtype == "float32"  # (the winner's)
