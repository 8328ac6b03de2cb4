"""Session 53's hunt in `train` (each test failed before its fix)."""

import json
import shutil

import numpy as np
import pytest
from cli_helpers import assert_rejected
from test_training import fresh_model, pattern_stream, small_cfg

from xlstm_metal.training.checkpoint import checkpoint_dirs
from xlstm_metal.training.data import train_bpe_tokenizer
from xlstm_metal.training.trainer import Trainer, TrainingConfig, make_schedule

TRAIN = ["--seq-len", "16", "--batch-size", "2", "--val-fraction", "0.2", "--no-progress", "--steps", "2"]


def test_a_tokenizer_id_beyond_the_models_vocabulary_is_refused(text_data, tmp_path, capsys):
    # A tokenizer.json whose ids skip (294 entries, one of them id 9000) sized the model by its
    # entry count (vocab 320): the id fell outside the embedding, and the run "diverged" at step 1
    # (exit 1, advice to lower --lr).
    fields = json.loads(train_bpe_tokenizer([text_data.read_text()], 300, show_progress=False).to_str())
    vocab = fields["model"]["vocab"]
    vocab[next(k for k, v in vocab.items() if v == max(vocab.values()))] = 9000
    (tmp_path / "tok.json").write_text(json.dumps(fields))
    assert_rejected(["train", text_data, "--out", tmp_path / "run", "--tokenizer", tmp_path / "tok.json", *TRAIN],
                    capsys, "token id 9000", "vocab_size (320)")
    assert not (tmp_path / "run").exists()


def test_resuming_with_steps_inside_the_old_warmup_starts_at_the_new_lr(tmp_path):
    # Stopped at step 10 of a 20-step warmup, resumed with --steps 11 --lr 0.01: the new total ends
    # the warmup at step 10, yet its one step ran at the old ramp's 5.25e-4 (--lr ignored).
    trainer = Trainer(fresh_model(), pattern_stream(2000), pattern_stream(300), small_cfg(steps=40, warmup=20),
                      tmp_path / "r", tmp_path, progress=False)
    trainer.step = 10
    trainer._reschedule(11, 0.01)
    assert float(make_schedule(trainer.cfg, 11)(10)) == pytest.approx(0.01, rel=1e-6)


def test_a_warmup_longer_than_a_one_step_run_is_refused():
    # --steps 1 --warmup 5 ran its step at lr / 5 ("warmup must be in [0, steps)" held for steps > 1 only).
    with pytest.raises(ValueError, match=r"warmup \(5\)"):
        TrainingConfig(steps=1, warmup=5).validate()
    TrainingConfig(steps=1, warmup=1).validate()  # its one step at the peak, as warmup 0


def test_resume_refuses_a_changed_validation_split(tmp_path):
    # Only the training stream was fingerprinted: a run resumed on data whose validation documents
    # had changed went on, its best validation loss (and --export's pick) from two different splits.
    stream, cfg = pattern_stream(3000), dict(steps=2, warmup=1, eval_every=2)
    Trainer(fresh_model(), stream[:2500], stream[2500:], small_cfg(**cfg), tmp_path / "r", tmp_path,
            progress=False).train()
    other = Trainer(fresh_model(), stream[:2500], stream[2400:2900], small_cfg(**cfg), tmp_path / "r", tmp_path,
                    progress=False)
    with pytest.raises(ValueError, match="different data"):
        other.resume_from(checkpoint_dirs(tmp_path / "r")[-1])


def test_a_resumed_run_keeps_its_kernel(text_data, tmp_path, capsys):
    # --resume without --kernel took the default (chunkwise), not the run's --kernel parallel: the
    # resumed steps' losses differed from the uninterrupted run's.
    from cli_helpers import run_main

    from xlstm_metal.loading import load_model

    out = tmp_path / "run"
    args = ["train", text_data, "--out", out, "--kernel", "parallel", "--vocab-size", "300", "--save-every", "1"]
    assert run_main([*args, *TRAIN, "--keep", "0"], capsys)[0] == 0
    shutil.rmtree(out / "checkpoint-0000002")
    assert run_main(["train", "--out", out, "--resume", "--no-progress"], capsys)[0] == 0
    assert load_model(out / "checkpoint-0000002").config.chunkwise_kernel == "parallel"


def test_ctrl_c_says_the_export_was_not_written(text_data, tmp_path, capsys, monkeypatch):
    # Ctrl-C exited 130 with a resume hint that dropped --export: the export asked for was skipped
    # without a word, and the hinted resume would not write it either.
    from cli_helpers import run_main

    from xlstm_metal.training.trainer import TrainingInterrupted

    def stop(self):
        raise TrainingInterrupted(1, self.out_dir / "checkpoint-0000001")

    monkeypatch.setattr(Trainer, "train", stop)
    out, export = tmp_path / "run", tmp_path / "exp"
    code, err = run_main(["train", text_data, "--out", out, "--export", export, "--vocab-size", "300", *TRAIN], capsys)
    assert code == 130 and f"--resume --export {export}`; --export {export} was not written" in err, err
    assert not export.exists()


def test_a_validation_loss_beyond_exps_range_ends_the_run_normally(text_data, tmp_path, capsys):
    # A finite validation loss over 709 nats (no logit soft cap, a huge --lr) ended the run in an
    # OverflowError traceback (loss.png's and the summary's perplexity: math.exp).
    from cli_helpers import run_main

    (tmp_path / "c.json").write_text('{"embedding_dim": 64, "num_heads": 2, "num_blocks": 2, "chunk_size": 16, '
                                     '"output_logit_soft_cap": null}')
    out = tmp_path / "run"
    code, err = run_main(["train", text_data, "--out", out, "--config", tmp_path / "c.json", "--lr", "30",
                          "--grad-clip", "0", "--vocab-size", "300", *TRAIN], capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and summary["best_val_loss"] > 709 and summary["best_val_ppl"] == pytest.approx(np.exp(50)), err
    assert (out / "loss.png").stat().st_size > 0
