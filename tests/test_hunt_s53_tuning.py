"""Session 53's hunt in tune, profile, plot and judge: each test fails on the code before its fix."""

import json
import warnings

import pytest
from cli_helpers import assert_rejected

from xlstm_metal.cli import main
from xlstm_metal.profiles import PACKAGE_DIR, ProfileError, load_profile, profile_from_dict

EXACT = json.loads((PACKAGE_DIR / "exact-fp32.json").read_text())
TINY = {"embedding_dim": 64, "num_heads": 2, "num_blocks": 1, "vocab_size": 128}


@pytest.fixture(autouse=True)
def _profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("edit", ["profile", "shape"])
def test_resume_with_the_base_profile_or_shape_changed_is_refused(tmp_path, capsys, edit):
    """--profile my.json (--shape tiny.json) edited between the run and its --resume: the resumed
    trials ran in bfloat16 (on another model) beside the first ones, and the winner, a float32
    trial, was saved as a bfloat16 profile that no trial had measured."""
    pytest.importorskip("optuna")
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


@pytest.mark.parametrize("line", ['{"text": "a b", "meta": {"score": NaN}}', '{"text": "a b", "score": Infinity}'])
def test_judge_refuses_a_record_json_cannot_write_back(tmp_path, capsys, line):
    """A record's own NaN / Infinity (Python's JSON reads them): nested, a ValueError traceback
    after every text was judged, leaving an empty --out; at the top level, nulled without a word."""
    (tmp_path / "texts.jsonl").write_text(line + "\n")
    assert_rejected(["judge", "--outputs", "texts.jsonl", "--out", "r", "--no-progress"], capsys,
                    "texts.jsonl:1", "NaN or Infinity")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind, name", [("chunkwise", "step"), ("chunkwise", "step_fused"), ("sequence", "triton")])
def test_a_one_token_kernel_for_prompts_is_refused_when_read(tmp_path, capsys, kind, name):
    """kernels.chunkwise / sequence of a one-token step kernel loaded as valid; each prompt then
    failed deep inside the model ("mlstm_step takes one time step, got S=3"), not naming the profile."""
    data = {**EXACT, "name": "k", "kernels": {**EXACT["kernels"], kind: name}}
    with pytest.raises(ProfileError, match=f"kernels.{kind}: {name} runs one token at a time"):
        profile_from_dict(data)
    (tmp_path / "k.json").write_text(json.dumps(data))
    assert_rejected(["profile", "show", "k.json"], capsys, f"kernels.{kind}")
    # A prompt kernel as the step kernel runs (one token is a sequence of one).
    assert profile_from_dict({**EXACT, "name": "k", "kernels": {"step": "chunkwise"}}).kernels["step"] == "chunkwise"


def test_judge_rates_a_text_past_the_float_range_of_perplexity(tmp_path, capsys):
    """A text the judge finds nearly impossible (mean log-probability below -709.8: an untrained
    or broken checkpoint without a logit soft cap) was an OverflowError traceback after the
    scoring; its perplexity (past the float range) is now null, the summary's inf."""
    from conftest import tiny_model
    from test_tokenizer import train_tiny_tokenizer

    from xlstm_metal.loading import save_model

    hf = train_tiny_tokenizer()
    model = tiny_model(4, vocab_size=hf.get_vocab_size(), output_logit_soft_cap=None)
    model.lm_head.weight = model.lm_head.weight * 1e5  # logits ~1e5 apart
    with warnings.catch_warnings():  # (it warns that transformers cannot run this shape)
        warnings.simplefilter("ignore")
        save_model(model, tmp_path / "hot")
    hf.save(str(tmp_path / "hot" / "tokenizer.json"))
    (tmp_path / "texts.jsonl").write_text('{"text": "the quick brown fox jumps over the lazy dog"}\n')
    assert main(["judge", "--model", "hot", "--outputs", "texts.jsonl", "--out", "r", "--no-progress"]) == 0
    row = json.loads((tmp_path / "r" / "ratings.jsonl").read_text())
    assert row["mean_logprob"] < -709.8 and row["perplexity"] is None and row["scored_tokens"] > 0
    assert "perplexity inf over" in capsys.readouterr().err


@pytest.mark.parametrize("second", ['{"number": 1, "status": "complete", "value": 2.0, "params": {"a": 2}}',
                                    '{"number": 1, "status": "complete", "value": 2.0, "params": {"a": 2}, '
                                    '"metrics": {"prefill_tok_s": 3.0}}'])
def test_plot_tune_draws_prefill_against_decode_of_the_trials_that_have_both(tmp_path, second):
    """One speed trial with both rates and one without metrics (or a rate) was a KeyError traceback."""
    from xlstm_metal.plotting import plot_tune

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "trials.jsonl").write_text(
        '{"number": 0, "status": "complete", "value": 1.0, "params": {"a": 1}, '
        '"metrics": {"prefill_tok_s": 4.0, "decode_tok_s": 5.0}}\n' + second + "\n")
    fig = plot_tune(tmp_path / "t")
    panel = next(ax for ax in fig.axes if ax.get_title() == "prefill vs decode")
    assert panel.collections[0].get_offsets().tolist() == [[4.0, 5.0]]


@pytest.mark.parametrize("space, words", [(dict(chunk_sizes=()), "chunk_size: no choices"),
                                          (dict(chunk_sizes=(64, 0)), "chunk_size must be a positive"),
                                          (dict(kernels=("nope",)), "unknown mLSTM kernel 'nope'")])
def test_a_speed_space_with_a_bad_choice_is_refused_before_any_trial(tmp_path, space, words):
    """Every trial drawing a bad choice failed (an empty one raised mid-sweep, leaving a trial running)."""
    from xlstm_metal.tuning import SpeedObjective

    with pytest.raises(ValueError, match=words):
        SpeedObjective(shape="125m", metric="prefill", **space)
