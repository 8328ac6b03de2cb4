"""Leftovers of the s52 reviews: judge's count and empty files, the watchdog's derived soft limit,
train --overwrite and a user's directory, plot's colours past 10 runs, --parallel's help, and the
serve fallback chat template's tool calls."""

import argparse
import json

import pytest
from cli_helpers import assert_rejected
from matplotlib.colors import to_rgba
from test_cli_generate import ckpt, run_cli  # noqa: F401  (fixture)

from xlstm_metal.cli import UsageError
from xlstm_metal.cli.judge import read_records
from xlstm_metal.monitor.watchdog import WatchdogConfig
from xlstm_metal.plotting import plot_training


def test_judge_counts_one_text_in_the_singular(ckpt, tmp_path, capsys):  # noqa: F811
    records = tmp_path / "one.jsonl"
    records.write_text(json.dumps({"text": "the quick fox"}) + "\n")
    code, _, err = run_cli(capsys, "judge", "-m", str(ckpt), "--outputs", str(records), "--out",
                           str(tmp_path / "r"), "--no-progress")
    assert code == 0 and "judged 1 text with" in err, err


def test_judge_names_an_empty_file_among_several(tmp_path, capsys):
    full, empty = tmp_path / "full.jsonl", tmp_path / "empty.jsonl"
    full.write_text(json.dumps({"text": "the quick fox"}) + "\n")
    empty.write_text("\n")
    assert [r["text"] for r in read_records([str(full), str(empty)])] == ["the quick fox"]
    err = capsys.readouterr().err
    assert "warning" in err and str(empty) in err and str(full) not in err, err
    with pytest.raises(UsageError, match="no records in --outputs .*empty.jsonl"):  # alone: refused, as before
        read_records([str(empty)])


def test_watchdog_soft_limit_derived_from_a_tiny_hard_limit_is_never_0_bytes():
    with pytest.raises(ValueError, match="--mem-hard 1b.*at least 1 byte"):  # the soft limit was 0 bytes
        WatchdogConfig.from_sources(hard="1b", env={}, total=10**10)
    config = WatchdogConfig.from_sources(hard="2b", env={}, total=10**10)
    assert (config.soft, config.hard) == (1, 2)


@pytest.mark.parametrize("name", ["metrics.jsonl", "loss.png", "summary.json"])
def test_train_overwrite_keeps_a_users_directory_of_a_run_file_name(name, tmp_path, text_data, capsys):
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    (out / name / "mine.txt").write_text("keep me")
    assert_rejected(["train", text_data, "--out", out, "--overwrite", "--steps", "1", "--seq-len", "8",
                     "--batch-size", "2", "--vocab-size", "300", "--no-progress"], capsys, str(out / name))
    assert (out / name / "mine.txt").read_text() == "keep me"


def test_plot_training_gives_more_than_10_runs_distinct_colours(tmp_path):
    runs = []
    for n in range(12):
        run = tmp_path / f"r{n:02d}"
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 5.0 + n, "lr": 1e-3}) + "\n")
        runs.append(run)
    fig = plot_training(runs)
    lr = next(ax for ax in fig.axes if ax.get_title() == "learning rate")
    colours = [to_rgba(line.get_color()) for line in lr.lines]
    assert len(colours) == 12 and len(set(colours)) == 12  # runs 11 and 12 had runs 1 and 2's colours
    loss = next(ax for ax in fig.axes if ax.get_title() == "loss")
    assert [to_rgba(line.get_color()) for line in loss.lines] == colours  # one colour a run in every panel


def test_parallel_help_says_every_process_gets_the_same_inputs():
    from xlstm_metal.distributed import add_parallel_argument

    parser = argparse.ArgumentParser()
    add_parallel_argument(parser)
    text = " ".join(parser.format_help().split())
    assert "same model, prompt and settings" in text and "exit with code 2" in text, text


def test_serve_fallback_chat_template_keeps_an_assistants_tool_calls(tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_lm.server import process_message_content
    from test_serve import write_checkpoint

    from xlstm_metal.serve import load_for_serving

    _, tokenizer = load_for_serving(write_checkpoint(tmp_path / "ckpt"), dtype="float32")
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "user", "content": "So?"}]
    process_message_content(messages)  # as the server does: the arguments parsed as JSON
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    eos = tokenizer.eos_token or ""
    assert ('User: Weather?\nAssistant: Tool call: get_weather {"city": "Paris"}\nTool call: get_time {}'
            f'{eos}\nTool: sunny\nUser: So?\nAssistant:') in text, text
    # The reply to a tool's result gets its cue (the prompt ended "Tool: sunny\n"); two results in a row, one cue.
    for results, tail in ((["sunny"], "Tool: sunny\nAssistant:"), (["sunny", "9:00"], "Tool: sunny\nTool: 9:00\nAssistant:")):
        turn = messages[:2] + [{"role": "tool", "tool_call_id": "c1", "content": r} for r in results]
        text = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        assert text.endswith(tail), text
    turn = messages[:3] + [{"role": "assistant", "content": "Sunny."}]
    assert f"Tool: sunny\nAssistant:Sunny.{eos}" in tokenizer.apply_chat_template(turn, tokenize=False)
