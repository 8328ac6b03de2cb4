"""`xlstm-metal judge` on a tiny checkpoint: where each rating comes from, and its help."""

import json

import pytest
from conftest import tiny_model
from test_tokenizer import train_tiny_tokenizer

from xlstm_metal.cli import main
from xlstm_metal.generation import load_tokenizer
from xlstm_metal.judge import judge_record
from xlstm_metal.loading import load_model, save_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("judge-ckpt")
    hf = train_tiny_tokenizer()
    save_model(tiny_model(4, vocab_size=hf.get_vocab_size()), path)
    hf.save(str(path / "tokenizer.json"))
    return path


def test_files_of_one_name_keep_their_folders_in_source(tmp_path, ckpt):
    """Two tune sweeps' outputs (a/outputs/trial-0000.jsonl, b/outputs/trial-0000.jsonl) were both
    rated as source "trial-0000.jsonl": a rating could not be traced to its sweep."""
    texts = {"a": "the quick brown fox", "b": "the the the the"}
    for sweep, text in texts.items():
        (tmp_path / sweep / "outputs").mkdir(parents=True)
        (tmp_path / sweep / "outputs" / "trial-0000.jsonl").write_text(
            json.dumps({"trial": 0, "prompt": "the", "text": text}) + "\n")
    (tmp_path / "a" / "outputs" / "trial-0001.jsonl").write_text(json.dumps({"trial": 1, "text": "fox"}) + "\n")
    out = tmp_path / "ratings"
    assert main(["judge", "-m", str(ckpt), "--outputs", str(tmp_path / "a" / "outputs"),
                 str(tmp_path / "b" / "outputs"), "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "ratings.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["a/outputs/trial-0000.jsonl", "trial-0001.jsonl",
                                           "b/outputs/trial-0000.jsonl"]
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    for row, sweep in ((rows[0], "a"), (rows[2], "b")):
        want = judge_record(model, tok, {"prompt": "the", "text": texts[sweep]})
        assert row["mean_logprob"] == pytest.approx(want["mean_logprob"], rel=1e-5)
        assert row["distinct_1"] == want["distinct_1"]


def test_every_option_is_explained_in_help(capsys):
    """--no-progress was listed in `judge --help` with no word on what it does."""
    with pytest.raises(SystemExit):
        main(["judge", "--help"])
    text = capsys.readouterr().out
    assert "--no-progress  " in text and "no progress bar" in text


def test_summary_gives_the_perplexity_over_all_scored_tokens(tmp_path, ckpt, capsys):
    """The closing line's perplexity pools the texts' tokens (a long text counts for its tokens),
    beside the plain mean of the texts' own perplexities (a 2-token text counts as much as a long one)."""
    import math

    texts = ["the fox", "the quick brown fox jumps over the lazy dog and the cat sleeps by the door of the house"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "ratings"
    assert main(["judge", "-m", str(ckpt), "--outputs", str(tmp_path / "in.jsonl"), "--out", str(out),
                 "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "ratings.jsonl").read_text().splitlines()]
    n = [r["scored_tokens"] for r in rows]
    assert n[1] > 3 * n[0]
    pooled = math.exp(-(rows[0]["mean_logprob"] * n[0] + rows[1]["mean_logprob"] * n[1]) / sum(n))
    mean = (rows[0]["perplexity"] + rows[1]["perplexity"]) / 2
    assert abs(pooled - mean) > 0.01  # the two figures differ here, so the line shows which is which
    err = capsys.readouterr().err
    assert f"perplexity {pooled:.2f} over {sum(n):,} scored tokens (mean of the texts' own: {mean:.2f})" in err
