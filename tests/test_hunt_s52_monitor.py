"""Session 52's hunt of top, the watchdog and tune."""

import asyncio
import json
import os
import re
import subprocess
import sys

import psutil
import pytest
from conftest import ROOT, repo_env
from test_monitor import runtime  # noqa: F401  (autouse: records of each test only)
from test_tune import _profiles, _StopsAtTrial  # noqa: F401  (autouse: profiles of each test only)

from xlstm_metal.cli import main
from xlstm_metal.monitor import JobStatus, WatchdogConfig, job_status, read_jobs

CFG = str(ROOT / "xlstm_metal" / "assets" / "default_model" / "config.json")


def own_record(runtime):  # noqa: F811
    """A real record of this process (as a job writes it)."""
    job = JobStatus("convert", "r/[x]", watchdog=None, directory=runtime, argv=["-p", "[INST] a [/INST]"])
    job.publish()
    return job


@pytest.mark.parametrize("bad", [{"updated": "x"}, {"memory": [1]}, {"tokens_per_s": "fast"}, {"started": 1e400},
                                 {"argv": [1, 2]}, {"pid": -1}])
def test_top_skips_records_that_are_no_jobs_record(runtime, bad, capsys):  # noqa: F811
    """Each stopped `top` with a traceback."""
    runtime.mkdir()
    own_record(runtime)
    other = os.getppid()
    record = {"pid": other, "process_started": psutil.Process(other).create_time(), **bad}
    (runtime / f"{record['pid']}.json").write_text(json.dumps(record))
    assert [job["pid"] for job in read_jobs(runtime)] == [os.getpid()]
    assert main(["top", "--once"]) == 0 and f"{os.getpid()}  convert" in capsys.readouterr().out
    assert (runtime / f"{record['pid']}.json").exists()  # not ours to delete


def test_xltop_json_into_a_closed_pipe_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "xlstm_metal.cli.top", "--json", "--count", "20", "--interval",
                             "0.2"], env=repo_env(XLSTM_RUNTIME_DIR=str(tmp_path)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline())["jobs"] == []
    proc.stdout.close()  # as `xltop --json | head -1` does
    assert proc.wait(60) == 0
    assert "Traceback" not in proc.stderr.read()


def test_tui_clear_cache_that_cannot_be_sent_is_a_notice_not_a_crash(runtime):  # noqa: F811
    from xlstm_metal.monitor.tui import TopApp

    runtime.mkdir()
    own_record(runtime)
    (runtime / f"{os.getpid()}.cmd").mkdir()  # the request file cannot be written

    async def drive():
        app = TopApp(interval=5, directory=runtime)
        async with app.run_test(size=(200, 30)) as pilot:
            assert app.selected_pid() == os.getpid() and "r/[x]" in str(app.query_one("DataTable").render_line(1))
            await pilot.press("c")
            await pilot.pause(0.1)
            assert any("cannot ask" in str(n.message) for n in app._notifications)
            await pilot.press("q")

    asyncio.run(drive())


def test_a_second_sweep_on_the_same_out_is_refused_while_one_runs(tmp_path):
    from xlstm_metal.tuning import FunctionObjective, SweepError, SweepSettings, run_sweep

    out, refusals = tmp_path / "out", []

    class Nested(FunctionObjective):
        def evaluate(self, params, prompts=None, max_new_tokens=32):
            try:  # a --resume of the same --out in another terminal, while this trial runs
                run_sweep(FunctionObjective("sphere", 2), out, SweepSettings(trials=3, progress=False), resume=True)
            except SweepError as err:
                refusals.append(str(err))
            return super().evaluate(params, prompts, max_new_tokens)

    result = run_sweep(Nested("sphere", 2), out, SweepSettings(trials=2, progress=False))
    assert [r["status"] for r in result.trials] == ["complete", "complete"]  # its trial was marked interrupted
    assert len(refusals) == 2 and all("in use by another sweep" in r for r in refusals)
    run_sweep(FunctionObjective("sphere", 2), out, SweepSettings(trials=3, progress=False), resume=True)  # released


def test_top_progress_of_a_resumed_sweep_counts_the_budget(tmp_path):
    from xlstm_metal.tuning import FunctionObjective, SweepSettings, run_sweep

    settings = SweepSettings(trials=3, seed=1, progress=False)
    stopping = _StopsAtTrial("sphere", 2)
    stopping.stop_at = 1
    with pytest.raises(KeyboardInterrupt):
        run_sweep(stopping, tmp_path / "out", settings)
    with job_status("tune", watchdog=None) as job:
        result = run_sweep(FunctionObjective("sphere", 2), tmp_path / "out", settings, resume=True)
        assert len(result.trials) == 4  # one interrupted: done was 4 of 3 trials
        assert job.fields["done"] == job.fields["total"] == 3


def test_overwrite_keeps_a_base_profile_in_out(tmp_path, capsys):
    from xlstm_metal.profiles import load_profile

    out = tmp_path / "out"
    out.mkdir()
    (out / "profile.json").write_text(json.dumps(load_profile("exact-fp32").replace(name="won").to_dict()))
    code = main(["tune", "--objective", "speed", "--shape", CFG, "--out", str(out), "--trials", "1", "--profile",
                 str(out / "profile.json"), "--overwrite", "--no-progress"])
    assert code == 2 and "--profile" in capsys.readouterr().err
    assert load_profile(str(out / "profile.json")).name == "won"


@pytest.mark.parametrize("env, message", [
    ({"XLSTM_MEM_SOFT_MB": "500M"}, "XLSTM_MEM_SOFT_MB must be a number of megabytes, such as 8000 (no unit), "
                                    "got '500M'"),
    ({"XLSTM_MEM_HARD_PCT": "90%"}, "XLSTM_MEM_HARD_PCT must be a number of percent"),
    ({"XLSTM_MEM_HARD_MB": "0"}, "XLSTM_MEM_HARD_MB must be > 0, got '0'"),
    ({"XLSTM_MEM_HARD_MB": "0.0000001"}, "XLSTM_MEM_HARD_MB must be at least 1 byte"),  # was a hard limit of 0 bytes
])
def test_watchdog_limits_from_the_environment_name_what_was_given(env, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        WatchdogConfig.from_sources(env=env, total=16 * 10**9)
    with pytest.raises(ValueError, match="at least 1 byte"):
        WatchdogConfig.from_sources(hard="0.5b", total=16 * 10**9)


def test_resume_with_a_budget_below_the_trials_run_is_refused(tmp_path):
    from xlstm_metal.tuning import FunctionObjective, SweepError, SweepSettings, run_sweep

    run_sweep(FunctionObjective("sphere", 2), tmp_path, SweepSettings(trials=3, progress=False))
    meta = (tmp_path / "run_meta.json").read_text()
    with pytest.raises(SweepError, match="budget 2 is below the 3 trials"):
        run_sweep(FunctionObjective("sphere", 2), tmp_path, SweepSettings(trials=2, progress=False), resume=True)
    assert (tmp_path / "run_meta.json").read_text() == meta


def test_a_profile_saved_by_another_run_during_the_sweep_is_kept(tmp_path, monkeypatch, capsys):
    """Two sweeps of one --profile-name at once: the later replaced the other's winner."""
    import xlstm_metal.tuning as tuning
    from xlstm_metal.profiles import load_profile, user_profile_dir

    real = tuning.run_sweep

    def sweep_while_another_saves(*args, **kwargs):
        result = real(*args, **kwargs)
        user_profile_dir().mkdir(parents=True, exist_ok=True)
        (user_profile_dir() / "mine.json").write_text(json.dumps(load_profile("exact-fp32").replace(
            name="mine", description="the other sweep's").to_dict()))
        return result

    monkeypatch.setattr(tuning, "run_sweep", sweep_while_another_saves)
    argv = ["tune", "--objective", "speed", "--shape", CFG, "--trials", "1", "--prefill-length", "16",
            "--decode-tokens", "2", "--repeats", "1", "--profile-name", "mine", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "written by another run during this sweep" in capsys.readouterr().err
    assert load_profile("mine").description == "the other sweep's"
    monkeypatch.setattr(tuning, "run_sweep", real)
    assert main(["tune", "--out", str(tmp_path / "a"), "--resume", "--profile-name", "ours"]) == 0
    assert load_profile("ours").chunk_size is not None
