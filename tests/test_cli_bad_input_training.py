"""Bad input to `train`, `tune`, `judge`, `plot`, `mad` and `evolve` found by a bad-input sweep:
each is refused with one line naming the problem (exit code 2), never a traceback, before any
work or output. In-process through ``main()``, seeded and small."""

from __future__ import annotations

import json

import pytest

from cli_helpers import assert_rejected, run_main

from xlstm_metal.cli import main


# ---------------------------------------------------------------------------------------- train
@pytest.fixture
def finished_run(tmp_path, text_data, capsys):
    """A two-step tiny training run (checkpoint-0000002 in it)."""
    out = tmp_path / "run"
    assert main(["train", str(text_data), "--out", str(out), "--steps", "2", "--seq-len", "8", "--batch-size", "2",
                 "--vocab-size", "300", "--no-progress"]) == 0
    capsys.readouterr()
    return out


@pytest.mark.parametrize("field,value,words", [
    # best_val_loss was compared with the first new validation loss: a TypeError traceback.
    ("best_val_loss", "low", ["'best_val_loss' must be a number or null", "'low'"]),
    ("best_step", "x", ["'best_step' must be an integer >= 0 or null"]),
    # val_fraction: a TypeError traceback ('<=' between int and str); 5 was blamed on --val-fraction.
    ("val_fraction", "x", ["'val_fraction' must be a number in [0, 1)"]),
    ("val_fraction", 5, ["'val_fraction' must be a number in [0, 1)"]),
    # text_field: silently trained on (a number names no JSON Lines field).
    ("text_field", 3, ["'text_field' must be a non-empty string"]),
])
def test_train_resume_with_corrupt_trainer_state_fields(field, value, words, finished_run, capsys):
    state_path = finished_run / "checkpoint-0000002" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state[field] = value
    state_path.write_text(json.dumps(state))
    assert_rejected(["train", "--out", finished_run, "--resume", "--steps", "4", "--no-progress"], capsys,
                    "trainer_state.json", *words)
    assert not (finished_run / "checkpoint-0000004").exists()


# ----------------------------------------------------------------------------------------- tune
SHAPE = {"embedding_dim": 64, "num_heads": 2, "num_blocks": 2, "vocab_size": 97, "ffn_proj_factor": 2.0,
         "chunk_size": 16}


@pytest.fixture
def speed_sweep(tmp_path, capsys, monkeypatch):
    """(the argv of a one-trial speed sweep of a tiny random shape, its --out, already run)."""
    pytest.importorskip("optuna")
    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps(SHAPE))
    out = tmp_path / "sweep"
    argv = ["tune", "--objective", "speed", "--shape", str(shape), "--prefill-length", "8", "--decode-tokens", "1",
            "--repeats", "1", "--no-progress", "--profile-name", "swept", "--out", str(out)]
    assert main([*argv, "--trials", "1"]) == 0
    capsys.readouterr()
    # The study's connection is closed: no -wal / -shm left to change under the tests' snapshots.
    assert sorted(p.name for p in out.glob("study.db*")) == ["study.db"]
    return argv, out


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("name,content,words", [
    # sqlalchemy's DatabaseError came out as a traceback (exit 1).
    ("study.db", b"not a database\n", ["study.db cannot be read as an Optuna study", "file is not a database"]),
    # json.loads' JSONDecodeError / AttributeError ('list' object has no attribute 'get') tracebacks.
    ("run_meta.json", b"{", ["run_meta.json is not valid JSON"]),
    ("run_meta.json", b"[]", ["run_meta.json must hold a JSON object"]),
    ("run_meta.json", b'{"objective": 5}', ["run_meta.json: 'objective' must be an object"]),
], ids=["study-db", "meta-not-json", "meta-list", "meta-objective"])
def test_tune_resume_with_corrupt_sweep_files(name, content, words, speed_sweep, capsys):
    argv, out = speed_sweep
    (out / name).write_bytes(content)
    before = _snapshot(out)
    assert_rejected([*argv, "--trials", "2", "--resume"], capsys, *words)
    assert _snapshot(out) == before  # nothing rewritten


def test_tune_resume_of_another_objective_writes_nothing_first(speed_sweep, tmp_path, capsys):
    # `--objective train --resume` into a speed sweep trained a BPE tokenizer into its --out (OUT/tokenizer/)
    # before it said that the sweep there is a speed sweep.
    _, out = speed_sweep
    data = tmp_path / "corpus.txt"
    data.write_text("".join(f"line {i}: the quick brown fox number {i * 7} jumps.\n" for i in range(3000)))
    before = sorted(p.name for p in out.iterdir())
    assert_rejected(["tune", "--objective", "train", "--data", data, "--trials", "2", "--no-progress", "--out", out,
                     "--resume"], capsys, "holds a speed sweep, not train")
    assert sorted(p.name for p in out.iterdir()) == before


# ------------------------------------------------------------- JSON strings that are not Unicode
#: A JSON Lines record whose "\ud800" escape decodes to a lone surrogate: valid JSON, not text.
SURROGATE = '{"text": "hello \\ud800 world", "prompt": "hi"}\n'


def test_train_jsonl_with_a_lone_surrogate_is_a_usage_error(tmp_path, capsys):
    # The BPE trainer raised UnicodeEncodeError (a traceback, exit 1).
    data = tmp_path / "records.jsonl"
    data.write_text(SURROGATE + '{"text": "the quick brown fox jumps over the lazy dog"}\n' * 30)
    out = tmp_path / "run"
    assert_rejected(["train", data, "--out", out, "--steps", "1", "--seq-len", "8", "--batch-size", "2",
                     "--vocab-size", "300", "--no-progress"], capsys,
                    "records.jsonl:1: field 'text' is not valid Unicode", "surrogates not allowed")
    assert not out.exists()


def test_judge_record_with_a_lone_surrogate_is_a_usage_error(tiny_model_dir, tmp_path, capsys):
    # The tokenizer's ValueError came out as a traceback after the judge model was loaded.
    records = tmp_path / "texts.jsonl"
    records.write_text('{"text": "fine"}\n' + SURROGATE)
    out = tmp_path / "ratings"
    assert_rejected(["judge", "--model", tiny_model_dir, "--outputs", records, "--out", out, "--no-progress"], capsys,
                    "texts.jsonl:2: 'text' is not valid Unicode")
    assert not out.exists()


def test_tune_prompt_with_a_lone_surrogate_is_a_usage_error(tmp_path, capsys, monkeypatch):
    # Every trial failed on it: "no trial completed", exit 1.
    pytest.importorskip("optuna")
    from xlstm_metal.assets import DEFAULT_MODEL_DIR  # a model with a tokenizer, as --save-outputs needs

    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi \\udc80"}\n')
    out = tmp_path / "t"
    assert_rejected(["tune", "--objective", "speed", "--model", DEFAULT_MODEL_DIR, "--trials", "1", "--prefill-length",
                     "8", "--decode-tokens", "1", "--no-progress", "--save-outputs", "--prompt-file", prompts,
                     "--out", out], capsys, "prompts.jsonl:1: the prompt is not valid Unicode")
    assert not out.exists()


# ----------------------------------------------------------------------------------------- plot
TRAIN_OK = '{"kind": "train", "step": 1, "loss": 5.0, "lr": 0.001, "tokens": 32}\n'
TRIAL_OK = '{"number": 0, "status": "complete", "value": 1.0, "params": {"a": 1}, "metrics": {}}\n'


@pytest.mark.parametrize("name,lines,words", [
    # KeyError / TypeError / ValueError / OverflowError tracebacks, or strings plotted as categories.
    ("run/metrics.jsonl", '{"kind": "train", "loss": 1.0}\n', ["'step' must be a number in every train record"]),
    ("run/metrics.jsonl", TRAIN_OK + '{"kind": "eval", "step": 1, "val_loss": "low"}\n',
     ["'val_loss' must be a number in every eval record, got 'low'"]),
    ("run/metrics.jsonl", '{"kind": "train", "step": 1, "loss": 1.0, "lr": "1e-3"}\n', ["'lr' must be a number"]),
    ("tune/trials.jsonl", '{"status": "complete", "value": 1.0, "params": {}}\n', ["'number' must be a number"]),
    ("tune/trials.jsonl", '{"number": 0, "status": "complete", "value": 1.0, "params": [1, 2]}\n',
     ["trial 0's 'params' must be an object"]),
    ("tune/trials.jsonl", TRIAL_OK + '{"number": 1, "status": "complete", "value": "fast", "params": {}}\n',
     ["'value' must be a number in every record, got 'fast'"]),
    ("bench.jsonl", '{"kind": "prefill", "tok_s": 5, "length": "long"}\n',
     ["'length' must be a number in every prefill record, got 'long'"]),
    ("bench.jsonl", '{"kind": "decode", "tok_s": 5, "batch": [1]}\n', ["'batch' must be a number"]),
    ("bench.json", '{"records": 5}', ["holds no prefill/decode records"]),
], ids=["no-step", "val-loss-text", "lr-text", "no-number", "params-list", "value-text", "length-text", "batch-list",
        "records-not-a-list"])
def test_plot_malformed_records_are_usage_errors(name, lines, words, tmp_path, capsys):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(lines)
    target = path.parent if name.endswith(("metrics.jsonl", "trials.jsonl")) else path
    out = tmp_path / "figure.png"
    assert_rejected(["plot", target, "--out", out], capsys, *words)
    assert not out.exists()


def test_plot_accepts_diverged_and_odd_but_valid_records(tmp_path, capsys):
    # A validation loss past ~709 overflowed math.exp (traceback); NaN stays NaN; a numeric 'side'
    # label was a TypeError in str.join.
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(TRAIN_OK + '{"kind": "eval", "step": 1, "val_loss": 1e6, "tokens": 32}\n'
                                       '{"kind": "eval", "step": 2, "val_loss": NaN, "tokens": 64}\n')
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"kind": "prefill", "tok_s": 5, "length": 16, "side": 5}\n')
    for source, out in ((run, tmp_path / "loss.png"), (bench, tmp_path / "speed.png")):
        code, err = run_main(["plot", source, "--out", out], capsys)
        assert code == 0 and "Traceback" not in err and out.is_file(), err


# --------------------------------------------------------------------------------------- evolve
@pytest.mark.parametrize("content", ["[]", "5", "null"])
def test_evolve_resume_with_search_json_not_an_object(content, tmp_path, capsys):
    # `before.get(...)` on a list / int / None: an AttributeError traceback.
    out = tmp_path / "ev"
    out.mkdir()
    (out / "search.json").write_text(content)
    assert_rejected(["evolve", "--budget", "200000", "--out", out, "--resume", "--tasks", "in_context_recall"], capsys,
                    "--resume: cannot read the search in", "search.json must hold a JSON object")
    assert sorted(p.name for p in out.iterdir()) == ["search.json"]


# ------------------------------------------------------------------------------ mad / train --arch
@pytest.mark.parametrize("block,words", [
    # A setting beside `spec:` instead of under `params:` was dropped: the block kept num_heads 4.
    ("{spec: mlstm, num_heads: 2}", ["block 0 has unknown key(s) num_heads", "{spec: ..., params: {...}}"]),
    # A misspelt parameter changed nothing.
    ("{spec: mlstm, params: {num_head: 2}}", ["block 0 (mlstm): unknown param(s) num_head", "num_heads"]),
], ids=["key-beside-spec", "misspelt-param"])
def test_arch_block_settings_that_would_be_ignored(block, words, tmp_path, capsys):
    arch = tmp_path / "arch.yaml"
    arch.write_text(f"name: mine\nblocks: [{block}, swiglu]\n")
    assert_rejected(["mad", "--arch", arch, "--show-wiring"], capsys, "--arch", *words)
    out = tmp_path / "run"
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog.\n" * 50)
    err = assert_rejected(["train", data, "--out", out, "--arch", arch, "--steps", "1", "--no-progress"], capsys, *words)
    assert "training a byte-level BPE" not in err and not out.exists()


def test_arch_block_params_of_the_spec_still_apply(tmp_path, capsys):
    arch = tmp_path / "arch.yaml"
    arch.write_text("name: mine\nblocks: [{spec: mlstm, params: {num_heads: 2, qk_dim: 32}}, swiglu]\n")
    assert main(["mad", "--arch", str(arch), "--show-wiring"]) == 0
    assert "(y[2])" in capsys.readouterr().out  # two heads' gates


# ------------------------------------------------------------------------------- train --config
@pytest.mark.parametrize("config,words", [
    ({"embedding_dim": 64, "num_heads": 2, "num_blocks": 1, "bogus_key": 1}, ["unknown config field(s): 'bogus_key'"]),
    ({"embedding_dim": 64, "num_heads": 3, "num_blocks": 1}, ["is not divisible by num_heads = 3"]),
    ({"embedding_dim": 64, "num_heads": 2, "num_blocks": 0}, ["'num_blocks' must be a positive integer"]),
], ids=["unknown-field", "heads", "no-blocks"])
def test_train_bad_config_fields_fail_before_the_tokenizer_is_trained(config, words, text_data, tmp_path, capsys):
    # They failed only once the data was read and a BPE tokenizer trained on it (minutes on a corpus).
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    err = assert_rejected(["train", text_data, "--out", out, "--config", path, "--steps", "1", "--no-progress"], capsys,
                          f"--config {path}: bad model config", *words)
    assert "training a byte-level BPE" not in err and not out.exists()


# ------------------------------------------------------------------------------------------ top
@pytest.mark.parametrize("extra", [["--once"], ["--once", "--json"]], ids=["text", "json"])
def test_top_once_with_interval_is_a_usage_error(extra, capsys):
    # --once prints one snapshot: --interval timed nothing (it only reappeared in the JSON's "interval").
    assert_rejected(["top", *extra, "--interval", "2"], capsys, "--interval 2", "--once prints one snapshot")


# ------------------------------------------------------------------------ train --val-fraction 0
def test_train_eval_flags_without_a_validation_split_are_named(text_data, tmp_path, capsys):
    # --val-fraction 0 runs no validation pass: --eval-every / --eval-batches were dropped without a word.
    out = tmp_path / "run"
    base = ["train", text_data, "--out", out, "--seq-len", "8", "--batch-size", "2", "--vocab-size", "300",
            "--val-fraction", "0", "--no-progress"]
    code, err = run_main([*base, "--steps", "2", "--eval-every", "1", "--eval-batches", "4"], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert ("warning: --eval-every and --eval-batches have no effect: --val-fraction 0 leaves no validation split"
            in err), err
    code, err = run_main(["train", "--out", out, "--resume", "--steps", "3", "--eval-every", "1", "--no-progress"],
                         capsys)
    assert code == 0 and f"warning: --eval-every has no effect: the run in {out} (--val-fraction 0)" in err, err
    code, err = run_main(["train", "--out", out, "--resume", "--steps", "4", "--no-progress"], capsys)
    assert code == 0 and "warning" not in err.replace("UserWarning", ""), err


def test_mad_names_the_arch_width_it_does_not_use(tmp_path, capsys):
    # `train --arch` builds at the arch's embedding_dim; mad at the preset's: it was replaced without a word.
    arch = tmp_path / "wide.yaml"
    arch.write_text("name: wide\nembedding_dim: 256\nblocks: [mlstm, swiglu]\n")
    assert main(["mad", "--arch", str(arch), "--show-wiring"]) == 0
    captured = capsys.readouterr()
    assert "E=64" in captured.out
    assert f"warning: --arch {arch}: embedding_dim 256 not used: MAD models take the --preset's width (64)" \
        in captured.err, captured.err
    assert main(["mad", "--arch", "hybrid", "--show-wiring"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_train_arch_with_profile_fails_before_the_tokenizer_is_trained(text_data, tmp_path, capsys):
    # A lab model takes no profile: it failed only after the data was read and a BPE tokenizer trained.
    out = tmp_path / "run"
    err = assert_rejected(["train", text_data, "--out", out, "--arch", "hybrid", "--profile", "exact-fp32", "--steps",
                           "1", "--no-progress"], capsys, "--profile", "--arch hybrid", "takes no profile")
    assert "training a byte-level BPE" not in err and not out.exists()


@pytest.mark.parametrize("flag,inside", [("--init-from", "checkpoint-0000002"),
                                         ("--tokenizer", "checkpoint-0000002/tokenizer.json")])
def test_train_overwrite_keeps_the_run_it_starts_from(flag, inside, finished_run, text_data, capsys):
    # `--init-from OUT/checkpoint-N --out OUT --overwrite` deleted the checkpoint being fine-tuned (the
    # new run's checkpoints replaced it); the tokenizer file likewise.
    before = sorted(p.name for p in finished_run.iterdir())
    weights = (finished_run / "checkpoint-0000002" / "model.safetensors").read_bytes()
    assert_rejected(["train", text_data, "--out", finished_run, flag, finished_run / inside, "--overwrite", "--steps",
                     "1", "--seq-len", "8", "--batch-size", "2", "--no-progress"], capsys,
                    f"{flag} {finished_run / inside} is in the run directory --out", "--overwrite deletes")
    assert sorted(p.name for p in finished_run.iterdir()) == before
    assert (finished_run / "checkpoint-0000002" / "model.safetensors").read_bytes() == weights


def test_train_overwrite_may_start_from_a_folder_of_its_own_in_out(finished_run, text_data, capsys):
    import shutil

    mine = finished_run / "mine"  # not a file the run writes: --overwrite leaves it alone
    shutil.copytree(finished_run / "checkpoint-0000002", mine)
    code, err = run_main(["train", text_data, "--out", finished_run, "--init-from", mine, "--overwrite", "--steps",
                          "1", "--seq-len", "8", "--batch-size", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert (mine / "model.safetensors").is_file() and not (finished_run / "checkpoint-0000002").exists()


def test_tune_overwrite_keeps_the_inputs_it_would_delete(tmp_path, text_data, capsys, monkeypatch):
    # `--overwrite --tokenizer OUT/tokenizer/tokenizer.json` (the one the last sweep trained) deleted it with
    # the rest of OUT, then died with a DataError traceback: the old sweep gone, no new one.
    import shutil

    pytest.importorskip("optuna")
    from xlstm_metal.assets import DEFAULT_MODEL_DIR

    monkeypatch.setenv("XLSTM_METAL_PROFILES", str(tmp_path / "profiles"))
    out = tmp_path / "sweep"
    (out / "tokenizer").mkdir(parents=True)
    shutil.copy(DEFAULT_MODEL_DIR / "tokenizer.json", out / "tokenizer" / "tokenizer.json")
    (out / "trials.jsonl").write_text("{}\n")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert_rejected(["tune", "--objective", "train", "--data", text_data, "--tokenizer", out / "tokenizer" / "tokenizer.json",
                     "--seq-len", "8", "--token-budget", "1000", "--trials", "1", "--no-progress", "--out", out,
                     "--overwrite"], capsys, "--tokenizer", "whose tokenizer --overwrite deletes")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    shutil.copytree(DEFAULT_MODEL_DIR, out / "trials" / "model")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert_rejected(["tune", "--objective", "speed", "--model", out / "trials" / "model", "--trials", "1",
                     "--prefill-length", "8", "--decode-tokens", "1", "--no-progress", "--out", out, "--overwrite"],
                    capsys, "--model", "whose trials --overwrite deletes")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


# ------------------------------------------------------------------------------------ divergence
@pytest.mark.parametrize("flags,kept,words", [
    # Seen at a log point (the gradient norm of step 4 is NaN), after checkpoint-0000002 was written.
    (["--log-every", "1", "--eval-every", "2", "--save-every", "2"], ["checkpoint-0000002"],
     ["training diverged at step 4", "the gradient norm is nan", "checkpoint-0000002"]),
    # No log point or evaluation before the save of step 4: the weights are checked there.
    (["--log-every", "100", "--eval-every", "100", "--save-every", "4"], [],
     ["training diverged at step 4", "the weights hold NaN or infinite values", "no checkpoint was written"]),
    # No validation split: the training loss of the last log point.
    (["--log-every", "100", "--save-every", "100", "--val-fraction", "0"], [],
     ["training diverged at step", "the training loss is nan"]),
], ids=["log-point", "save", "no-validation"])
def test_train_that_diverges_stops_with_exit_1_and_saves_no_nan(flags, kept, words, text_data, tmp_path, capsys):
    # --lr 1e3 ran to the end with NaN losses and exit 0: "best validation loss nan", checkpoints that
    # --resume refused ("holds NaN"), a NaN model exported.
    out, export = tmp_path / "run", tmp_path / "exported"
    code, err = run_main(["train", text_data, "--out", out, "--steps", "6", "--seq-len", "8", "--batch-size", "2",
                          "--vocab-size", "300", "--lr", "1e3", "--no-progress", "--export", export, *flags], capsys)
    assert code == 1, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("xlstm-metal: error: "), err
    for word in [*words, "--lr, 1000 in this run", "--grad-clip"]:
        assert word in err, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == kept
    assert not (out / "summary.json").exists() and not export.exists()
    if out.exists():
        assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")] == []
        assert "NaN" not in (out / "metrics.jsonl").read_text()
    if kept:  # the checkpoint written before the divergence resumes
        capsys.readouterr()
        code, err = run_main(["train", "--out", out, "--resume", "--steps", "3", "--lr", "1e-3", "--no-progress"],
                             capsys)
        assert code == 0, err


def test_tune_train_trial_that_diverges_is_a_failed_trial(text_data, tmp_path, capsys, monkeypatch):
    # A diverged trial was recorded "complete" with a NaN value (Optuna failed it behind the record's back).
    pytest.importorskip("optuna")
    from xlstm_metal.tuning import TrainObjective

    point = {"lr": 1e8, "warmup_fraction": 0.0, "weight_decay": 0.0, "batch_size": 4, "embedding_dim": 32,
             "num_heads": 1, "num_blocks": 1}
    monkeypatch.setattr(TrainObjective, "suggest", lambda self, trial: dict(point))
    out = tmp_path / "sweep"
    code, err = run_main(["tune", "--objective", "train", "--data", text_data, "--seq-len", "8", "--vocab-size", "300",
                          "--token-budget", "600", "--trials", "2", "--no-progress", "--out", out], capsys)
    assert code == 1 and "Traceback" not in err, err
    assert "no trial completed (2 diverged)" in err, err
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["diverged", "diverged"]
    assert all(r["value"] is None and "training diverged at step" in r["reason"] for r in records)
    assert not (out / "best.json").exists()


def test_tune_resume_keeps_a_profile_another_sweep_saved(speed_sweep, tmp_path, capsys):
    # --resume skipped the "profile exists" check: resuming with --profile-name of another sweep's (or
    # a hand-edited) profile replaced it without a word.
    argv, out = speed_sweep
    profiles = tmp_path / "profiles"
    theirs = json.loads((profiles / "swept.json").read_text())
    theirs["description"] = "tuned by hand"
    (profiles / "other.json").write_text(json.dumps(theirs))
    other = [("other" if a == "swept" else a) for a in argv]
    before = _snapshot(out)
    assert_rejected([*other, "--trials", "2", "--resume"], capsys, f"profile {profiles / 'other.json'} exists",
                    f"not saved by the sweep in {out}", "--profile-name")
    assert json.loads((profiles / "other.json").read_text()) == theirs and _snapshot(out) == before
    # The sweep's own profile, edited since: kept as well.
    mine = (profiles / "swept.json").read_text()
    (profiles / "swept.json").write_text(mine.replace('"description": "', '"description": "edited; '))
    edited = (profiles / "swept.json").read_text()
    assert_rejected([*argv, "--trials", "2", "--resume"], capsys, "swept.json exists")
    assert (profiles / "swept.json").read_text() == edited
    # As the sweep saved it: resuming replaces it with the resumed sweep's winner.
    (profiles / "swept.json").write_text(mine)
    code, err = run_main([*argv, "--trials", "2", "--resume"], capsys)
    assert code == 0, err
    assert json.loads((profiles / "swept.json").read_text()) == json.loads((out / "profile.json").read_text())


def test_plot_drops_a_cut_short_last_line_as_the_trainer_does(tmp_path, capsys):
    # A live or crashed run's metrics.jsonl ends in a line cut short: plot refused it ("not JSON"),
    # while resuming the run drops that line.
    run = tmp_path / "run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text(TRAIN_OK + '{"kind": "eval", "step": 1, "val_loss": 4.0, "tokens": 32}\n{"kind": "tra')
    out = tmp_path / "loss.png"
    code, err = run_main(["plot", run, "--out", out], capsys)
    assert code == 0 and out.is_file(), err
    assert f"warning: dropping the incomplete last line of {metrics}" in err and "Traceback" not in err, err
    # A bad line in the middle (or a bad last line that ends in a newline) stays an error naming it.
    for text in (TRAIN_OK + '{"kind": "tra\n' + TRAIN_OK, TRAIN_OK + '{"kind": "tra\n'):
        metrics.write_text(text)
        assert_rejected(["plot", run, "--out", tmp_path / "other.png"], capsys, f"{metrics} line 2 is not a metrics record")
        assert not (tmp_path / "other.png").exists()


def test_train_shape_warning_is_said_once_naming_real_paths(text_data, tmp_path, capsys):
    # Each checkpoint save warned "run/.checkpoint-0000002.xxxx: qk_dim 32 ... is not a multiple of 64",
    # naming the temporary folder (gone afterwards) at every save; --export named its own temporary folder.
    import warnings

    out, export = tmp_path / "run", tmp_path / "exported"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run_main(["train", text_data, "--out", out, "--steps", "6", "--save-every", "2", "--keep", "0",
                              "--seq-len", "8", "--batch-size", "2", "--vocab-size", "300", "--no-progress",
                              "--export", export], capsys)
    assert code == 0, err
    assert len(list(out.glob("checkpoint-*"))) == 3
    shape = [str(w.message) for w in caught if "not a multiple of 64" in str(w.message)]
    assert len(shape) == 2, shape  # the run's checkpoints once, the export once
    assert shape[0].startswith(f"the checkpoints in {out} ") and "qk_dim 32" in shape[0], shape
    assert shape[1].startswith(f"{export}: qk_dim 32"), shape
    assert not any(".checkpoint-" in m or f".{export.name}." in m for m in shape), shape
