"""Options of `tune`, `train`, `evolve`, `top` and `mad` that had no effect without a word, and
inputs read twice: each is refused (exit code 2, one line naming it) before any work or output,
or, where a documented default is involved, named in a warning; the neighbouring valid forms
still run. In-process through ``main()``, seeded and small."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from cli_helpers import assert_rejected, run_main

from xlstm_metal.cli import main

#: A tiny BPE run's flags (two steps of 2 x 8 tokens: about a second on a CPU).
TINY = ["--steps", "2", "--seq-len", "8", "--batch-size", "2", "--vocab-size", "300", "--no-progress"]


# ----------------------------------------------------------------------------- tune --metric
@pytest.fixture
def shape(tmp_path, monkeypatch):
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    path = tmp_path / "tiny.json"  # one block: a speed trial takes well under a second
    path.write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 1, "vocab_size": 128}))
    return path


@pytest.mark.parametrize("metric,flags,named", [
    ("prefill", ["--decode-tokens", "8", "--decode-batch", "2"], "--decode-batch, --decode-tokens set the decode"),
    ("prefill", ["--decode-tokens", "8"], "--decode-tokens sets the decode measurement"),
    ("decode", ["--repeats", "5", "--prefill-length", "16"], "--prefill-length, --repeats set the prefill"),
])
def test_tune_refuses_options_of_the_measurement_the_metric_leaves_out(metric, flags, named, shape, tmp_path, capsys):
    out = tmp_path / "D"
    err = assert_rejected(["tune", "--objective", "speed", "--shape", shape, "--trials", "1", "--metric", metric,
                           *flags, "--out", out], capsys, named, f"--metric {metric} measures {metric} alone")
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "profiles").exists()


def test_tune_takes_the_options_of_the_measured_metric(shape, tmp_path, capsys):
    pytest.importorskip("optuna")
    out = tmp_path / "D"
    argv = ["tune", "--objective", "speed", "--shape", str(shape), "--trials", "1", "--metric", "decode",
            "--decode-tokens", "2", "--decode-batch", "1", "--profile-name", "t", "--no-progress", "--out", str(out)]
    assert_rejected([*argv, "--repeats", "1"], capsys, "--repeats sets the prefill measurement")
    assert main(argv) == 0
    [record] = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert "decode_tok_s" in record["metrics"] and "prefill_tok_s" not in record["metrics"]


# ------------------------------------------------------------------------ train --head-loss
def test_train_refuses_the_fused_head_with_recompute(text_data, tmp_path, capsys):
    out = tmp_path / "R"
    assert_rejected(["train", text_data, "--out", out, *TINY, "--head-loss", "fused", "--recompute", "blocks"],
                    capsys, "--head-loss fused", "--recompute blocks", "plain head")
    assert not out.exists()


def test_train_resume_refuses_the_fused_head_on_a_recomputing_run(text_data, tmp_path, capsys):
    out = tmp_path / "R"
    assert main(["train", str(text_data), "--out", str(out), *TINY, "--recompute", "blocks",
                 "--head-loss", "plain"]) == 0
    capsys.readouterr()
    assert_rejected(["train", "--out", out, "--resume", "--steps", "4", "--head-loss", "fused", "--no-progress"],
                    capsys, "--head-loss fused", "--recompute blocks")
    assert not (out / "checkpoint-0000004").exists()


# ------------------------------------------------------------------------------- data paths
@pytest.mark.parametrize("form", ["same file", "file in directory", "directory twice", "link"])
def test_train_refuses_a_data_file_given_twice(form, text_data, tmp_path, capsys):
    folder = tmp_path / "dd"
    folder.mkdir()
    inside = folder / "data.txt"
    inside.write_text(text_data.read_text())
    if form == "link":
        (tmp_path / "alias.txt").symlink_to(text_data)
    data = {"same file": [text_data, text_data], "file in directory": [folder, inside],
            "directory twice": [folder, tmp_path / "." / "dd"], "link": [text_data, tmp_path / "alias.txt"]}[form]
    out = tmp_path / "R"
    named = text_data if form in ("same file", "link") else inside
    assert_rejected(["train", *data, "--out", out, *TINY], capsys, f"data file {named} is given twice", "give it once")
    assert not out.exists()


def test_tune_refuses_a_data_file_given_twice(text_data, tmp_path, capsys):
    pytest.importorskip("optuna")  # (checked first)
    out = tmp_path / "T"
    assert_rejected(["tune", "--objective", "train", "--data", text_data, text_data, "--trials", "1", "--out", out],
                    capsys, f"data file {text_data} is given twice")
    assert not out.exists()
    # Distinct files, one of them in a directory, are all read.
    from xlstm_metal.training.data import load_documents

    folder = tmp_path / "dd"
    folder.mkdir()
    (folder / "other.txt").write_text("another document\n")
    docs = load_documents([text_data, folder])
    assert [d.source for d in docs] == [str(text_data), str(folder / "other.txt")]


# --------------------------------------------------------------- train --eval-batches, --config
def test_train_warns_when_the_validation_split_holds_fewer_eval_batches(text_data, tmp_path, capsys):
    # The config's vocab_size (320) holds the --vocab-size 300 BPE: the neighbour of the refusals below.
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 2, "vocab_size": 320,
                                  "chunk_size": 16}))
    code, err = run_main(["train", text_data, "--out", tmp_path / "R", *TINY, "--config", config,
                          "--eval-batches", "1000"], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "--eval-batches 1000" in line]
    assert len(warnings) == 1 and "1 batch of --batch-size 2" in warnings[0], err
    # Left at its default, it is not named.
    code, err = run_main(["train", text_data, "--out", tmp_path / "R2", *TINY], capsys)
    assert code == 0 and "--eval-batches" not in err, err


@pytest.mark.parametrize("vocab,named", [(10, "vocab_size (10) is smaller than the tokenizer's vocabulary (--vocab-size 300"),
                                         (280, "give a --vocab-size of at most 280")])
def test_train_refuses_a_config_vocab_below_the_bpe_before_training_it(vocab, named, text_data, tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 2, "vocab_size": vocab,
                                  "chunk_size": 16}))
    out = tmp_path / "R"
    err = assert_rejected(["train", text_data, "--out", out, *TINY, "--config", config], capsys, f"--config {config}",
                          named)
    assert "training a byte-level BPE" not in err and not out.exists()


def test_train_refuses_a_config_vocab_below_any_bpe(text_data, tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 2, "vocab_size": 97,
                                  "chunk_size": 16}))
    out = tmp_path / "R"
    err = assert_rejected(["train", text_data, "--out", out, "--steps", "2", "--no-progress", "--config", config],
                          capsys, "vocab_size (97) is smaller than any BPE tokenizer trained here")
    assert "training a byte-level BPE" not in err and not out.exists()


# ---------------------------------------------------------------------------- evolve --start
@pytest.fixture
def cheap_scores(monkeypatch):
    """MAD scores as a cheap deterministic function of the wiring (no training)."""
    from types import SimpleNamespace

    import xlstm_metal.lab.evolve as lab_evolve

    def fake_run_task(arch, task, preset, *, seed=0, epochs=None, progress=False, safe_point=None):
        text = json.dumps(arch["blocks"], sort_keys=True)
        return SimpleNamespace(accuracy=sum(map(ord, text)) % 997 / 997)

    monkeypatch.setattr(lab_evolve, "run_task", fake_run_task)


EVOLVE = ["evolve", "--generations", "1", "--tasks", "memorization", "--epochs", "1"]


@pytest.mark.parametrize("flags,words", [
    (["--budget", "200000", "--start", "mlstm,attention,hybrid", "--population", "2"],
     ["--start names 3 architectures and --population 2", "hybrid would never be scored"]),
    (["--budget", "200000", "--start", "mlstm", "--max-blocks", "2"],
     ["--start mlstm has 4 blocks, outside --min-blocks 2 .. --max-blocks 2", "cut it"]),
    (["--budget", "200000", "--start", "mlstm", "--min-blocks", "5"],
     ["--start mlstm has 4 blocks, outside --min-blocks 5 .. --max-blocks 6", "fill it up"]),
    (["--budget", "1000", "--start", "mlstm"], ["--start mlstm has", "parameters", "over --budget 1,000"]),
], ids=["population", "max-blocks", "min-blocks", "budget"])
def test_evolve_refuses_start_architectures_it_would_not_take_as_given(flags, words, cheap_scores, tmp_path, capsys):
    out = tmp_path / "E"
    assert_rejected([*EVOLVE, *flags, "--out", out], capsys, *words)
    assert not out.exists()


def test_evolve_takes_fitting_start_architectures_and_warns_of_the_default(cheap_scores, tmp_path, capsys):
    from xlstm_metal.lab.genome import genome_of
    from xlstm_metal.lab.library import load_arch

    code, err = run_main([*EVOLVE, "--budget", "2000000", "--population", "2", "--start", "mlstm,attention",
                          "--min-blocks", "4", "--max-blocks", "4", "--out", tmp_path / "E"], capsys)
    assert code == 0 and "warning" not in err, err
    history = [json.loads(line) for line in (tmp_path / "E" / "history.jsonl").read_text().splitlines()]
    expected = [[list(gene) for gene in genome_of(load_arch(name))] for name in ("mlstm", "attention")]
    assert [h["genome"] for h in history] == expected  # both scored as they are
    # The default start (3 architectures) with --population 2: documented, so a warning, not a refusal.
    code, err = run_main([*EVOLVE, "--budget", "2000000", "--population", "2", "--out", tmp_path / "E2"], capsys)
    assert code == 0 and "warning: the default start" in err and "hybrid would never be scored" in err, err


# -------------------------------------------------------------------------- top --clear-cache
def test_top_clear_cache_of_a_dead_job_is_refused(tmp_path, capsys, monkeypatch):
    runtime = tmp_path / "rt"
    runtime.mkdir()
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(runtime))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # as a job killed with SIGKILL: its record stays
    (runtime / f"{dead.pid}.json").write_text(json.dumps({"pid": dead.pid, "command": "train"}))
    assert_rejected(["top", "--clear-cache", dead.pid], capsys, f"no running xlstm-metal job with pid {dead.pid}")
    assert not (runtime / f"{dead.pid}.cmd").exists()
    # A live job (this process, with its record) is asked.
    me = os.getpid()
    (runtime / f"{me}.json").write_text(json.dumps({"pid": me, "process_started": psutil.Process().create_time()}))
    code, err = run_main(["top", "--clear-cache", me], capsys)
    assert code == 0 and f"asked {me} to clear its MLX cache" in err, err
    assert json.loads((runtime / f"{me}.cmd").read_text())["command"] == "clear_cache"


# ---------------------------------------------------------------------------- mad --show-wiring
def test_mad_show_wiring_refuses_seed_and_overwrite_without_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flags, named in ((["--seed", "7"], "--seed would be ignored"), (["--overwrite"], "--overwrite would be ignored")):
        assert_rejected(["mad", "--arch", "mlstm", "--show-wiring", *flags], capsys, "--show-wiring", named)
        assert list(tmp_path.iterdir()) == []
    assert main(["mad", "--arch", "mlstm", "--show-wiring"]) == 0
    assert capsys.readouterr().out.startswith("LabModel mlstm: 4 blocks")
    # With FILE, --overwrite replaces the drawing.
    target = tmp_path / "w.svg"
    target.write_text("old")
    assert main(["mad", "--arch", "mlstm", "--show-wiring", str(target), "--overwrite"]) == 0
    assert target.read_text() != "old"
    # Scoring without --seed still seeds at 0: its default folder is ...-seed0.
    results = tmp_path / "mad-runs" / "mlstm-tiny-seed0" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text("{}")
    capsys.readouterr()
    assert_rejected(["mad", "--arch", "mlstm", "--tasks", "memorization"], capsys,
                    "mad-runs/mlstm-tiny-seed0/results.json exists")


def test_train_refuses_the_fused_head_for_a_model_without_one(text_data, tmp_path, capsys):
    """A 2024 xLSTM's head is not one plain product: the step took the plain head without a word."""
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"embedding_dim": 32, "num_blocks": 1, "context_length": 16,
                                  "mlstm_block": {"mlstm": {"num_heads": 2}}}))
    out = tmp_path / "R"
    assert_rejected(["train", text_data, "--out", out, *TINY, "--config", config, "--head-loss", "fused"],
                    capsys, "--head-loss fused needs the LM head as one plain product", "a 2024 xLSTM")
    assert not out.exists()
