"""`xlstm-metal train` on damaged run directories, output paths, --resume with new --steps/--lr,
run-length-scaled warmup, and what it draws and prints (issue 13)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from test_train_cli import make_corpus
from test_training import fresh_model, pattern_stream, small_cfg

from xlstm_metal.cli import main
from xlstm_metal.loading import load_model
from xlstm_metal.training import Trainer, TrainingConfig
from xlstm_metal.training.trainer import make_schedule, plot_metrics

RUN = ["--config", "tiny", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--log-every", "1",
       "--lr", "3e-3", "--val-fraction", "0.1", "--eval-every", "4", "--eval-batches", "2", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 4-step run (checkpoint at step 4), default warmup."""
    tmp = tmp_path_factory.mktemp("rel")
    corpus = make_corpus(tmp / "corpus")
    out = tmp / "run"
    assert main(["train", str(corpus), "--out", str(out), *RUN, "--steps", "4"]) == 0
    return tmp, corpus, out


def copy_run(run_dir, tmp_path):
    _, corpus, out = run_dir
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return corpus, copy


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def usage_error(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "xlstm-metal: error: " in err, err
    for word in words:
        assert word in err, err
    return err


# ------------------------------------------------------------------------------ damaged run directories
def _truncate(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _garbage_line(path):
    records = path.read_text().splitlines()
    path.write_text("\n".join([records[0], '{"kind": "tra', *records[1:]]) + "\n")


@pytest.mark.parametrize("name, damage", [
    ("config.json", _truncate),
    ("model.safetensors", _truncate),
    ("tokenizer.json", _truncate),
    ("tokenizer_config.json", _truncate),
    ("optimizer.safetensors", _truncate),
    ("trainer_state.json", _truncate),
    ("metrics.jsonl", _garbage_line),
])
def test_each_damaged_file_of_a_run_is_named(run_dir, tmp_path, capsys, name, damage):
    corpus, run = copy_run(run_dir, tmp_path)
    (checkpoint,) = sorted(run.glob("checkpoint-*"))
    path = run / name if name == "metrics.jsonl" else checkpoint / name
    damage(path)
    before = sorted(p.name for p in run.iterdir())
    usage_error(capsys, ["train", "--out", str(run), "--resume", "--steps", "6"], name)
    assert sorted(p.name for p in run.iterdir()) == before  # nothing new was written


@pytest.mark.parametrize("field, value", [("step", "4"), ("data_position", {"epoch": 0}),
                                          ("training_config", {"seq_len": 32, "bogus": 1}), ("elapsed", -1)])
def test_trainer_state_fields_are_checked(run_dir, tmp_path, capsys, field, value):
    _, run = copy_run(run_dir, tmp_path)
    (checkpoint,) = sorted(run.glob("checkpoint-*"))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state[field] = value
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    usage_error(capsys, ["train", "--out", str(run), "--resume", "--steps", "6"], "trainer_state.json", field)


def test_optimizer_state_that_does_not_fit_the_model(run_dir, tmp_path, capsys):
    _, run = copy_run(run_dir, tmp_path)
    (checkpoint,) = sorted(run.glob("checkpoint-*"))
    arrays = mx.load(str(checkpoint / "optimizer.safetensors"))
    key = next(k for k in arrays if k.endswith(".m"))
    arrays[key] = mx.zeros((3,))
    mx.save_safetensors(str(checkpoint / "optimizer.safetensors"), arrays)
    usage_error(capsys, ["train", "--out", str(run), "--resume", "--steps", "6"], "optimizer.safetensors",
                "mis-shaped", key)


def test_interrupted_last_metrics_line_is_dropped(run_dir, tmp_path, capsys):
    _, run = copy_run(run_dir, tmp_path)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "st')  # a crash mid-append: no newline
    assert main(["train", "--out", str(run), "--resume", "--steps", "5"]) == 0
    assert "incomplete last line" in capsys.readouterr().err
    assert [r["step"] for r in lines(run / "metrics.jsonl")] == [1, 2, 3, 4, 4, 5, 5]


# ------------------------------------------------------------------------------ output paths
def test_output_paths_are_checked_before_training(run_dir, tmp_path, capsys):
    _, corpus, _ = run_dir
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    out = tmp_path / "new"
    usage_error(capsys, ["train", str(corpus), "--out", str(out), *RUN, "--steps", "2", "--export", str(busy)],
                "--export directory", "not empty")
    assert not out.exists() and (busy / "keep.txt").read_text() == "mine"
    usage_error(capsys, ["train", str(corpus), "--out", str(busy / "keep.txt"), *RUN, "--steps", "2"], "is a file")
    usage_error(capsys, ["train", str(corpus), "--out", str(out), *RUN, "--steps", "2", "--export", str(out),
                         "--overwrite"], "would replace the run directory")
    _, run = copy_run(run_dir, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    usage_error(capsys, ["train", "--out", str(run), "--resume", "--steps", "6", "--export", str(busy)],
                "--export directory", "not empty")
    assert sorted(p.name for p in run.iterdir()) == before


# ------------------------------------------------------------------------------ --resume
def test_resume_rejects_settings_it_cannot_change_by_name(run_dir, tmp_path, capsys):
    _, run = copy_run(run_dir, tmp_path)
    usage_error(capsys, ["train", "--out", str(run), "--resume", "--steps", "6", "--batch-size", "8", "--seed", "1"],
                "--batch-size, --seed cannot change")


def test_resuming_a_finished_run_changes_nothing(run_dir, tmp_path, capsys):
    _, run = copy_run(run_dir, tmp_path)
    metrics = (run / "metrics.jsonl").read_text()
    usage_error(capsys, ["train", "--out", str(run), "--resume"], "is finished (step 4 of 4)", "--steps")
    assert (run / "metrics.jsonl").read_text() == metrics  # no duplicate eval line
    usage_error(capsys, ["train", "--out", str(run), "--resume", "--steps", "4"], "--steps 4 must be greater")


def test_resume_extends_the_run_with_steps_and_lr(run_dir, tmp_path, capsys):
    _, run = copy_run(run_dir, tmp_path)
    assert main(["train", "--out", str(run), "--resume", "--steps", "8", "--eval-every", "100"]) == 0
    err = capsys.readouterr().err
    assert "done: 4 steps (to step 8), 512 tokens" in err  # this session's tokens, not the whole run's
    train = [r for r in lines(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    floor = 3e-3 * 0.1
    # The 4-step run ended at the floor; --steps alone continues from the rate it reached.
    assert train[3]["lr"] == pytest.approx(floor, rel=1e-5)
    assert [r["lr"] for r in train[4:]] == pytest.approx([floor] * 4, rel=1e-5)
    state = json.loads((run / "checkpoint-0000008" / "trainer_state.json").read_text())
    assert state["total_steps"] == 8 and state["training_config"]["steps"] == 8
    # --lr restarts the cosine at the checkpoint's step from the new rate, down to its floor.
    assert main(["train", "--out", str(run), "--resume", "--steps", "12", "--lr", "1e-2"]) == 0
    train = [r for r in lines(run / "metrics.jsonl") if r["kind"] == "train"]
    lrs = [r["lr"] for r in train[8:]]
    assert [r["step"] for r in train[8:]] == [9, 10, 11, 12]
    cosine = [1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + np.cos(np.pi * k / 3)) for k in range(4)]
    assert lrs == pytest.approx(cosine, rel=1e-4)


def test_reschedule_is_saved_so_a_second_resume_continues_it(tmp_path):
    stream = pattern_stream(3000)
    cfg = small_cfg(steps=6, warmup=2, eval_every=100, save_every=3, keep=5)
    trainer = Trainer(fresh_model(), stream[:2500], stream[2500:], cfg, tmp_path / "r", tmp_path, progress=False)
    trainer.train()
    resumed = Trainer(fresh_model(), stream[:2500], stream[2500:], TrainingConfig(**vars(cfg)), tmp_path / "r",
                      tmp_path, progress=False)
    resumed.resume_from(tmp_path / "r" / "checkpoint-0000006", steps=12, lr=1e-2)
    assert (resumed.cfg.reschedule_step, resumed.cfg.reschedule_lr) == (6, 1e-2)
    schedule = make_schedule(resumed.cfg, 12)
    assert float(schedule(6)) == pytest.approx(1e-2) and float(schedule(11)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match=r"steps \(5\) must be greater than the checkpoint's step \(6\)"):
        Trainer(fresh_model(), stream[:2500], stream[2500:], TrainingConfig(**vars(cfg)), tmp_path / "r", tmp_path,
                progress=False).resume_from(tmp_path / "r" / "checkpoint-0000006", steps=5)


# ------------------------------------------------------------------------------ run-length defaults
def test_warmup_scales_with_the_run():
    cfg = TrainingConfig()
    assert [cfg.warmup_for(n) for n in (5, 30, 300, 1000, 50_000)] == [0, 3, 30, 100, 100]
    assert TrainingConfig(warmup=7).warmup_for(5000) == 7
    TrainingConfig(steps=5).validate()  # the old fixed warmup of 100 refused this
    lrs = [float(make_schedule(TrainingConfig(steps=300, lr=1.0), 300)(s)) for s in range(300)]
    assert lrs[30] == pytest.approx(1.0) and lrs[29] < 1.0 and lrs[0] == pytest.approx(1 / 30) and lrs[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("weight_decay", float("nan")),
                                         ("grad_clip", float("nan")), ("max_time", float("nan")),
                                         ("min_lr_ratio", float("nan"))])
def test_non_finite_settings_are_refused(field, value):
    # NaN passes every comparison (a NaN weight decay trained to NaN losses): named, not run.
    with pytest.raises(ValueError, match=f"{field} must be a finite number, got {value}"):
        TrainingConfig(**{"steps": 10, field: value}).validate()


def test_short_cli_run_with_default_warmup_reaches_its_data_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = usage_error(capsys, ["train", str(empty), "--out", str(tmp_path / "o"), "--steps", "5"])
    assert "warmup" not in err and str(empty) in err


def test_time_budget_run_leaves_warmup_and_shows_a_total(tmp_path, capsys):
    stream = pattern_stream(4000)
    cfg = small_cfg(steps=None, max_time=1.0, warmup=None, probe_steps=8, eval_every=10_000, log_every=1)
    trainer = Trainer(fresh_model(), stream[:3500], stream[3500:], cfg, tmp_path / "t", tmp_path, progress=True)
    ticks = iter(range(10**6))
    trainer.clock = lambda: next(ticks) * 0.01
    result = trainer.train()
    total = trainer.total_steps
    warmup = cfg.warmup_for(total)
    # Sized at step 10 (2 + 8 probe steps) to ~45 steps: a tenth of that would end inside the
    # probe, so the ramp keeps the probe's rate (twice the probe: 20 steps) to the peak.
    assert 40 <= total <= 50 and warmup == 20 and result.step == total
    lrs = [r["lr"] for r in lines(tmp_path / "t" / "metrics.jsonl") if r["kind"] == "train"]
    assert lrs[0] == pytest.approx(cfg.lr / 20, rel=1e-5)
    assert lrs[warmup] == pytest.approx(cfg.lr, rel=1e-5) == max(lrs)  # the peak is reached ...
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1]))  # ... rising without a jump
    steps_up = [b - a for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1])]
    assert max(steps_up) == pytest.approx(min(steps_up), rel=1e-3)  # one slope: no jump at the sizing
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # then the cosine ...
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-5)  # ... to the floor
    err = capsys.readouterr().err
    assert "train (timing steps)" in err and "/10 " in err  # the probe's length before sizing: 2 + 8
    assert f"/{total} " in err


@pytest.mark.parametrize("max_time, stop_step, end", [(16.0, 6, 16.0), (14.0, 4, 9.0)])
def test_time_budget_leaves_room_for_checkpoint_saves(tmp_path, max_time, stop_step, end):
    """--max-time with a step taking 1 s and a checkpoint save 5 s (every 4 steps): the loop
    checked only the time spent, so it began step 8 at 12 s and, with its save, ended at 18 s.
    It now stops where one more step and the save after it (due, or the run's last) would not
    fit: at step 6 of a 16 s budget (saved at 16 s), or right after step 4's save (at 9 s) of a
    14 s one, whose checkpoint is then marked finished. A resumed trainer adds nothing."""
    stream = pattern_stream(4000)
    cfg = small_cfg(steps=30, max_time=max_time, save_every=4, eval_every=1000, keep=0)
    out = tmp_path / "t"
    trainer = Trainer(fresh_model(), stream[:3500], stream[3500:], cfg, out, tmp_path, progress=False)
    spent = [0.0]
    trainer.clock = lambda: trainer.step * 1.0 + spent[0]
    save = trainer.save

    def slow_save():
        spent[0] += 5.0
        return save()

    trainer.save = slow_save
    result = trainer.train()
    assert result.step == stop_step and trainer.clock() == end <= max_time
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({"checkpoint-0000004", f"checkpoint-{stop_step:07d}"})
    last = out / f"checkpoint-{stop_step:07d}"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == stop_step and state["time_budget_spent"] is True
    metrics = (out / "metrics.jsonl").read_text()

    resumed = Trainer(load_model(last), stream[:3500], stream[3500:], TrainingConfig(**state["training_config"]), out,
                      tmp_path, progress=False)
    resumed.resume_from(last)
    again = resumed.train()
    assert again.step == stop_step and again.evals == [] and again.checkpoint is None
    assert (out / "metrics.jsonl").read_text() == metrics


def test_time_budget_sizing_counts_checkpoint_saves(tmp_path, monkeypatch):
    """--max-time alone, a step taking 1 s and a checkpoint save 5 s (every 10 steps): the run
    was sized from the probe's steps only, 6 + 0.97 * 54 = 58 steps, and the budget stopped it
    at step 40 with its cosine far from the floor. The sizing now times one save (written to
    a temporary directory and removed) and counts a save per 10 steps and the last one: 6 +
    0.97 * (60 - 11 - 5) / 1.5 = 34 steps, which run to their end inside the budget."""
    import xlstm_metal.training.trainer as trainer_module

    stream = pattern_stream(4000)
    cfg = small_cfg(steps=None, max_time=60.0, warmup=5, probe_steps=4, save_every=10, eval_every=10_000, keep=0)
    out = tmp_path / "t"
    trainer = Trainer(fresh_model(), stream[:3500], stream[3500:], cfg, out, tmp_path, progress=False)
    spent = [0.0]
    trainer.clock = lambda: trainer.step * 1.0 + spent[0]
    saves = []
    real_save = trainer_module.save_checkpoint

    def slow_save(where, *args, **kwargs):
        spent[0] += 5.0
        saves.append(where)
        return real_save(where, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", slow_save)
    result = trainer.train()
    assert trainer.total_steps == 34 and result.step == 34
    assert trainer.clock() == 34 + 5 * 5 <= cfg.max_time  # the timing save, steps 10, 20 and 30, the last
    assert saves[0] != out and saves[0].parent == out and not saves[0].exists()  # the timing one, removed
    assert saves[1:] == [out] * 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "checkpoint"))) == [
        f"checkpoint-{s:07d}" for s in (10, 20, 30, 34)]
    lrs = [r["lr"] for r in lines(out / "metrics.jsonl") if r["kind"] == "train"]
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-5)  # the cosine reached its floor


# ------------------------------------------------------------------------------ output
def test_loss_plot_marks_single_points(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    monkeypatch.setattr(plt, "close", lambda fig: None)
    plot_metrics([{"kind": "train", "step": 3, "loss": 2.5}, {"kind": "eval", "step": 3, "val_loss": 2.7}],
                 tmp_path / "loss.png")
    (fig,) = figures
    plotted = fig.axes[0].get_lines()
    assert len(plotted) == 2
    for line in plotted:
        assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "", " ")
    plt.close(fig)


def test_eval_line_shows_the_latest_steps_loss(tmp_path, capsys):
    """--eval-every 5 --log-every 3: the line written at step 5's evaluation showed step 3's log
    record (its loss and throughput), and so did the progress bar; both show the loss of the
    steps since that record (4 and 5). Throughput leaves evaluation time out without dropping the
    steps before it (the window's clock was reset after an evaluation, so step 6's record counted
    steps 4-6 in step 6's time: 3x the rate)."""
    stream = pattern_stream(4000)
    trainer = Trainer(fresh_model(), stream[:3500], stream[3500:], small_cfg(steps=10, eval_every=5, log_every=3),
                      tmp_path / "r", tmp_path, progress=True)
    spent = [0.0]
    trainer.clock = lambda: trainer.step * 1.0 + spent[0]  # a step takes 1 s ...
    evaluate = trainer.evaluate

    def slow_evaluate():
        spent[0] += 100.0  # ... an evaluation 100 s
        return evaluate()

    trainer.evaluate = slow_evaluate
    result = trainer.train()
    out, err = capsys.readouterr()
    losses = dict(result.losses)
    latest = np.mean([losses[4], losses[5]])
    assert abs(latest - losses[3]) > 1e-3  # the stale value would differ
    line = next(line for line in out.splitlines() if line.startswith("step 5 "))
    assert f"train loss {latest:.4f}, 128 tok/s, validation loss" in line, line  # 4 x 32 tokens a second
    assert f"loss {latest:.3f} | 128 tok/s |" in err  # the progress bar at step 5
    records = [r for r in lines(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [3, 6, 9, 10]  # log points unchanged
    assert [r["tokens_per_s"] for r in records] == pytest.approx([128] * 4)


def test_no_progress_prints_no_blank_lines(run_dir, tmp_path, capfd):
    _, corpus, _ = run_dir
    assert main(["train", str(corpus), "--out", str(tmp_path / "o"), *RUN, "--steps", "1"]) == 0
    out = capfd.readouterr().out
    assert out.strip() and all(line.strip() for line in out.splitlines()), repr(out)


@pytest.mark.parametrize("spent", [{"elapsed": 2.5}, {"elapsed": 1.5, "time_budget_spent": True}])
def test_resuming_a_run_whose_time_budget_ran_out_is_refused(run_dir, tmp_path, capsys, spent):
    """Like a run at its last step: --resume of a --max-time run whose budget is spent says so
    (it ran 0 steps, exited 0 and appended a duplicate eval record); also one stopped before the
    budget ran out because one more step and checkpoint would not have fit (time_budget_spent)."""
    _, run = copy_run(run_dir, tmp_path)
    (checkpoint,) = sorted(run.glob("checkpoint-*"))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["training_config"].update(steps=None, max_time=2.0, warmup=None)
    state.update(total_steps=9, **spent)  # stopped by the budget at step 4 of a sized 9
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    metrics = (run / "metrics.jsonl").read_text()
    usage_error(capsys, ["train", "--out", str(run), "--resume"], "is finished", "--max-time budget of 2 s",
                "step 4", "--steps N with N > 4")
    assert (run / "metrics.jsonl").read_text() == metrics


# ------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    """SIGINT during `train` stopped the run without a checkpoint (every step since the last save
    was lost); now it saves the step it finished, names it, and exits 130."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "xlstm_metal", "train", str(corpus), "--out", str(out), *RUN,
                             "--steps", "400", "--warmup", "2", "--save-every", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().endswith("\n")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no step was logged"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    [checkpoint] = [p for p in out.iterdir() if p.name.startswith(("checkpoint-", ".checkpoint-"))]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step = state["step"]
    assert checkpoint.name == f"checkpoint-{step:07d}" and 1 <= step < 400
    assert f"interrupted at step {step}; checkpoint {checkpoint}" in err and "--resume" in err
    # The last step was logged as usual (and its eval run, every 4th step); the run resumes from
    # there, each step logged once.
    logged = [r for r in lines(metrics) if r["kind"] == "train"]
    assert [r["step"] for r in logged] == list(range(1, step + 1)) and state["log_window"] == []
    assert [r["step"] for r in lines(metrics) if r["kind"] == "eval"] == list(range(4, step + 1, 4))
    before = [r["loss"] for r in logged]
    assert all(np.isfinite(before)) and state["tokens"] == step * 4 * 32
    assert main(["train", "--out", str(out), "--resume", "--steps", str(step + 2), "--no-progress"]) == 0
    logged = [r for r in lines(metrics) if r["kind"] == "train"]
    assert [r["step"] for r in logged] == list(range(1, step + 3)) and [r["loss"] for r in logged[:step]] == before
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == [f"checkpoint-{step:07d}",
                                                                 f"checkpoint-{step + 2:07d}"]


def test_second_ctrl_c_aborts_at_once():
    import os
    import signal

    from xlstm_metal.training.trainer import StopOnCtrlC

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with StopOnCtrlC(note=False) as ctrl_c:
        os.kill(os.getpid(), signal.SIGINT)  # the first: a request, no exception
        assert ctrl_c.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode
                pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_after_the_last_step_says_the_run_is_finishing(tmp_path, monkeypatch, capfd):
    """A Ctrl-C during the final evaluation (the loop is over) lets the run finish its evaluation
    and checkpoint, and says so: it said 'stopping after this step', and nothing stopped."""
    import os
    import signal

    stream = pattern_stream(3000)
    cfg = small_cfg(steps=3, warmup=1, eval_every=100, save_every=100, keep=5)
    trainer = Trainer(fresh_model(), stream[:2500], stream[2500:], cfg, tmp_path / "r", tmp_path, progress=False)
    evaluate = trainer.evaluate

    def interrupted_evaluate():
        os.kill(os.getpid(), signal.SIGINT)  # arrives during the run's last evaluation
        return evaluate()

    monkeypatch.setattr(trainer, "evaluate", interrupted_evaluate)
    result = trainer.train()
    err = capfd.readouterr().err
    assert "the last step has run; finishing its evaluation and checkpoint" in err
    assert "stopping after this step" not in err
    assert result.step == 3 and (tmp_path / "r" / "checkpoint-0000003").is_dir() and result.evals[-1][0] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_time_budget_stop_between_log_points_logs_its_last_steps(tmp_path):
    """--max-time stopping between log points: the steps since the last one get their "train"
    record (metrics.jsonl and loss.png ended at the last log point; their losses were checked
    and kept only in the result)."""
    stream = pattern_stream(4000)
    cfg = small_cfg(steps=30, max_time=6.5, log_every=4, eval_every=1000, save_every=1000)
    out = tmp_path / "t"
    trainer = Trainer(fresh_model(), stream[:3500], stream[3500:], cfg, out, tmp_path, progress=False)
    trainer.clock = lambda: trainer.step * 1.0
    result = trainer.train()
    assert result.step % 4 != 0  # stopped between log points
    records = [r for r in lines(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [4, result.step]
    tail = [loss for step, loss in result.losses if step > 4]
    assert records[-1]["loss"] == pytest.approx(sum(tail) / len(tail), rel=1e-6)
    assert records[-1]["tokens"] == result.step * cfg.batch_size * cfg.seq_len
