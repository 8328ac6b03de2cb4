"""Session 53's hunt in `train` (each test failed before its fix)."""

import json
import shlex
import shutil

import numpy as np
import pytest
from cli_helpers import assert_rejected, run_main
from mlx.utils import tree_flatten
from test_training import fresh_model, pattern_stream, small_cfg

from xlstm_metal.loading import load_model
from xlstm_metal.training.data import holds_jsonl, iter_documents, train_bpe_tokenizer
from xlstm_metal.training.trainer import (
    StopOnCtrlC, Trainer, TrainingConfig, TrainingInterrupted, make_schedule,
)

ARGS = ["--seq-len", "16", "--batch-size", "2", "--val-fraction", "0.2", "--no-progress", "--steps", "2"]
BPE = ["--vocab-size", "300", *ARGS]


def train(data, tmp_path, *args):
    return ["train", data, "--out", tmp_path / "r", *args, *BPE]


def test_a_tokenizer_id_beyond_the_models_vocab_is_refused(text_data, tmp_path, capsys):
    # (ids that skip: vocab 320, and a "divergence")
    fields = json.loads(train_bpe_tokenizer([text_data.read_text()], 300, show_progress=False).to_str())
    vocab = fields["model"]["vocab"]
    vocab[max(vocab, key=vocab.get)] = 9000
    (tmp_path / "t.json").write_text(json.dumps(fields))
    assert_rejected(["train", text_data, "--out", tmp_path / "r", "--tokenizer", tmp_path / "t.json", *ARGS],
                    capsys, "token id 9000", "vocab_size (320)")


def test_resume_with_steps_that_end_the_old_warmup_starts_at_the_new_lr(tmp_path):
    # (it ran at the old ramp's lr)
    trainer = Trainer(fresh_model(), pattern_stream(2000), pattern_stream(300), small_cfg(warmup=20), tmp_path,
                      tmp_path, progress=False)
    trainer.step = 10
    trainer._reschedule(11, 0.01)
    assert float(make_schedule(trainer.cfg, 11)(10)) == pytest.approx(0.01, rel=1e-6)
    with pytest.raises(ValueError, match=r"warmup \(5\)"):  # (--steps 1 --warmup 5: lr / 5)
        TrainingConfig(steps=1, warmup=5).validate()


def test_resume_checks_the_validation_split_and_keeps_the_schedule_of_the_same_steps(tmp_path):
    s, cfg, ckpt = pattern_stream(3000), dict(steps=8, warmup=1, save_every=2, keep=0), tmp_path / "checkpoint-0000002"
    full = Trainer(fresh_model(), s[:2500], s[2500:], small_cfg(**cfg), tmp_path, tmp_path, progress=False).train()
    with pytest.raises(ValueError, match="different data"):
        Trainer(fresh_model(), s[:2500], s[2400:], small_cfg(**cfg), tmp_path, tmp_path).resume_from(ckpt)
    again = Trainer(load_model(ckpt), s[:2500], s[2500:], small_cfg(**cfg), tmp_path, tmp_path, progress=False)
    again.resume_from(ckpt, steps=8)  # (it restarted the cosine)
    assert again.train().losses == full.losses[2:]


def test_a_resumed_run_keeps_its_kernel(text_data, tmp_path, capsys):
    # (it took the default, chunkwise: other losses)
    out = tmp_path / "r"
    assert run_main(train(text_data, tmp_path, "--kernel", "parallel", "--save-every", "1", "--keep", "0"), capsys)[0] == 0
    shutil.rmtree(out / "checkpoint-0000002")
    assert run_main(["train", "--out", out, "--resume", "--no-progress"], capsys)[0] == 0
    assert load_model(out / "checkpoint-0000002").config.chunkwise_kernel == "parallel"


def test_ctrl_c_says_the_export_was_not_written(text_data, tmp_path, capsys, monkeypatch):
    def stop(self):
        raise TrainingInterrupted(1, self.out_dir / "checkpoint-0000001")

    monkeypatch.setattr(Trainer, "train", stop)
    export = tmp_path / "e"
    code, err = run_main(train(text_data, tmp_path, "--export", export), capsys)
    assert code == 130 and f"--resume --export {export}`; --export {export} was not written" in err, err


def test_a_validation_loss_beyond_exps_range_and_an_export_to_a_link(text_data, tmp_path, capsys):
    # No logit soft cap, --lr 30: an OverflowError traceback (perplexity); rmtree refused the link.
    (tmp_path / "e").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "e")
    (tmp_path / "c.json").write_text('{"embedding_dim": 64, "num_heads": 2, "num_blocks": 2, "output_logit_soft_cap": null}')
    out = tmp_path / "r"
    code, err = run_main(train(text_data, tmp_path, "--config", tmp_path / "c.json", "--lr", "30", "--grad-clip", "0",
                               "--export", tmp_path / "link"), capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and summary["best_val_loss"] > 709 and summary["best_val_ppl"] == pytest.approx(np.exp(50)), err
    assert (out / "loss.png").is_file() and (tmp_path / "e" / "model.safetensors").is_file()


def test_a_json_file_of_records_given_as_data_is_read_by_record(tmp_path):
    # (datasets' to_json writes JSON Lines to .json); in a directory (code) it stays text
    path = tmp_path / "a.json"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert [d.text for d in iter_documents([path])] == ["one", "two"] and holds_jsonl([path])
    assert len(list(iter_documents([tmp_path]))) == 1


def test_step_flags_that_would_do_nothing_are_named(text_data, tmp_path, capsys, monkeypatch):
    # --fuse-projections on a 2024 xLSTM, bf16 products without CUDA kernels: silent no-ops.
    (tmp_path / "c.json").write_text('{"embedding_dim": 32, "num_blocks": 1, "mlstm_block": {"mlstm": {"num_heads": 2}}}')
    assert_rejected(train(text_data, tmp_path, "--fuse-projections", "--config", tmp_path / "c.json"), capsys,
                    "--fuse-projections", "leave it out")
    monkeypatch.setattr("xlstm_metal.kernels.fast.step.cuda_available", lambda: False)
    code, err = run_main(train(text_data, tmp_path, "--mlstm-products", "bf16"), capsys)
    assert code == 0 and "bf16 has no effect: no CUDA" in err



def test_a_time_limit_inside_the_warmup_is_named(text_data, tmp_path, capsys):
    # (it stopped at step 22 without a word)
    cfg = small_cfg(steps=None, max_time=1.0, warmup=300)
    trainer = Trainer(fresh_model(), pattern_stream(2000), pattern_stream(300), cfg, tmp_path, tmp_path, progress=False)
    assert trainer._size_from_time(0.01, 22, 0.5) == 301 and "fewer than the warmup (300)" in capsys.readouterr().err
    code, err = run_main(train(text_data, tmp_path, "--max-time", "0.5", "--warmup", "3000")[:-2], capsys)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert code == 0 and "ended the run inside its warmup (step" in err and summary["ended_in_warmup"], err


def test_the_ctrl_c_hint_runs_as_printed(text_data, tmp_path, capsys, monkeypatch):
    # (a non-empty --export: no --overwrite in it, refused)
    (e := tmp_path / "my e").mkdir()
    (e / "x").touch()
    monkeypatch.setattr(StopOnCtrlC, "__init__", lambda self, note: vars(self).update(requested=1, finishing=0))
    code, err = run_main(train(text_data, tmp_path, "--export", e, "--overwrite"), capsys)
    monkeypatch.undo()
    hint = shlex.split(err.split("continue with `")[1].split("`")[0])
    assert code == 130 and hint[0] == "xlstm-metal" and run_main(hint[1:], capsys)[0] == 0, err
    assert (e / "model.safetensors").is_file()


def test_init_from_a_run_directory_and_a_finished_runs_export(text_data, tmp_path, capsys):
    # (it named no checkpoint; refused)
    out, export = tmp_path / "r", tmp_path / "e"
    assert run_main(train(text_data, tmp_path, "--save-every", "1", "--keep", "0", "--lr", "0.5"), capsys)[0] == 0
    assert_rejected(["train", text_data, "--out", tmp_path / "o", "--init-from", out, *ARGS], capsys,
                    "is a run directory", f"--init-from {out / 'checkpoint-0000002'}")
    state = out / "checkpoint-0000002" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "best_step": 1}))
    before = sorted(out.iterdir())
    assert_rejected(["train", "--out", out, "--resume", "--export", export, "--lr", "1"], capsys, "--lr would do")
    code, err = run_main(["train", "--out", out, "--resume", "--export", export], capsys)
    assert code == 0 and "best-validation model (step 1)" in err and sorted(out.iterdir()) == before, err
    got, best, last = (tree_flatten(load_model(p).parameters()) for p in (export, *before[:2]))
    assert [np.array_equal(a, b) for (_, a), (_, b), (_, c) in zip(got, best, last) for b in (b, c)] == [1, 0] * len(got)
