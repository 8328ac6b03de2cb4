"""MAD training inside a job: every training step publishes its step and loss (`xlstm-metal top`)
and is a memory-watchdog safe point, so a hard limit stops `mad` / `evolve` within a step
instead of at the end of a task (hours later with --preset paper)."""

from __future__ import annotations

import math

import pytest

import xlstm_metal.lab.mad as lab_mad
from xlstm_metal.cli import main
from xlstm_metal.monitor import MemoryLimitExceeded, current_job
from xlstm_metal.monitor import watchdog as watchdog_module
from xlstm_metal.monitor.watchdog import MemorySample


class FakeJob:
    """Records updates; its safe point stops the job once step ``stop_at`` was published."""

    def __init__(self, stop_at: int):
        self.stop_at, self.updates, self.checks = stop_at, [], 0

    def update(self, **fields):
        self.updates.append(fields)

    def check(self, note=""):
        self.checks += 1
        if self.updates and self.updates[-1].get("step", 0) >= self.stop_at:
            raise MemoryLimitExceeded(f"hard limit; {note}")


def test_run_task_publishes_every_step_and_stops_at_a_safe_point(monkeypatch):
    job = FakeJob(stop_at=3)
    monkeypatch.setattr(lab_mad, "current_job", lambda: job)
    with pytest.raises(MemoryLimitExceeded):
        lab_mad.run_task("mlstm", "memorization", "tiny", seed=1, epochs=2)  # 8 steps planned
    steps = [u["step"] for u in job.updates if "step" in u]
    assert steps == [1, 2, 3] and job.checks == 3  # stopped after the 3rd of 8 steps, not after the task
    losses = [u["loss"] for u in job.updates]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert all(0 < u["lr"] <= lab_mad.PRESETS["tiny"].lr * (1 + 1e-6) for u in job.updates)  # (float32)

    # Seeded: the same run publishes the same losses; an explicit safe point replaces the job's check.
    again, calls = FakeJob(stop_at=10**9), []
    monkeypatch.setattr(lab_mad, "current_job", lambda: again)
    result = lab_mad.run_task("mlstm", "memorization", "tiny", seed=1, epochs=2, safe_point=lambda: calls.append(1))
    assert len(calls) == 8 == result.steps and again.checks == 0
    assert [u["loss"] for u in again.updates][:3] == losses
    assert again.updates[-1]["loss"] == pytest.approx(result.loss)


def test_mad_cli_stops_at_the_hard_limit_within_a_task(tmp_path, monkeypatch, capsys):
    # The job's memory sampler reports 6 GB once the task has published step 3: the watchdog
    # (hard limit 5GB) asks the job to stop, and the next training step's safe point does. The
    # old code checked only between tasks: this 200-step task ran to its end and exited 0.
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XLSTM_MEM_POLL_MS", "10")
    seen = []

    def fake_sampler(unified):
        def sample():
            step = current_job().fields.get("step") or 0 if current_job().command else 0
            seen.append(step)
            usage = 6_000_000_000 if step >= 3 else 100_000_000
            return MemorySample(0.0, usage, usage, 0, 0, 0)
        return sample

    monkeypatch.setattr(watchdog_module, "default_sampler", fake_sampler)
    out = tmp_path / "r"
    rc = main(["mad", "--arch", "mlstm", "--tasks", "memorization", "--epochs", "50", "--out", str(out),
               "--mem-hard", "5GB"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "reached the hard limit 5.00 GB (--mem-hard 5GB)" in err and "0 of 1 tasks were scored" in err
    assert 3 <= max(seen) < 200  # stopped during the task's 200 steps
    assert not out.exists()  # nothing written


def test_evolve_stopped_before_its_first_candidate_says_there_is_nothing_to_resume(tmp_path, monkeypatch, capsys):
    # As above, within the first candidate's training: nothing was scored, so nothing was written,
    # and the note must not send the user to --resume (it said "0 candidates ... (--resume continues)").
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XLSTM_MEM_POLL_MS", "10")

    def fake_sampler(unified):
        def sample():
            step = current_job().fields.get("step") or 0 if current_job().command else 0
            usage = 6_000_000_000 if step >= 3 else 100_000_000
            return MemorySample(0.0, usage, usage, 0, 0, 0)
        return sample

    monkeypatch.setattr(watchdog_module, "default_sampler", fake_sampler)
    out = tmp_path / "e"
    rc = main(["evolve", "--budget", "200000", "--population", "2", "--generations", "1", "--tasks", "memorization",
               "--epochs", "50", "--out", str(out), "--mem-hard", "5GB", "--seed", "0"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "no candidate was scored yet" in err and "--resume continues" not in err
    assert not out.exists()


def test_a_mad_job_names_its_architecture_as_its_model():
    # `xlstm-metal top` shows a job's model: mad's is its --arch (it showed "-").
    from xlstm_metal.cli import build_parser
    from xlstm_metal.monitor.job import job_from_args

    args = build_parser().parse_args(["mad", "--arch", "hybrid", "--tasks", "memorization", "--out", "x"])
    assert job_from_args(args).fields["model"] == "hybrid"
