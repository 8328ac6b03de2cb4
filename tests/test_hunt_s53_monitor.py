"""Session 53's hunt: top, the watchdog, distributed runs."""

import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import repo_env
from test_monitor import runtime  # noqa: F401  (autouse: records of each test only)

from xlstm_metal.cli import main
from xlstm_metal.distributed import stage_bounds
from xlstm_metal.monitor import JobStatus, WatchdogConfig, read_jobs, send_command
from xlstm_metal.monitor.records import take_command
from xlstm_metal.monitor.watchdog import job_rank


def _record(runtime, pid, extra="", **fields):  # noqa: F811
    record = json.dumps({"pid": pid, "process_started": psutil.Process(pid).create_time(), **fields})
    (runtime / f"{pid}.json").write_text(record[:-1] + extra + "}")


def _wait(done):
    deadline = time.monotonic() + 20
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    return done()


def _top(runtime, *args, **env):  # noqa: F811
    return subprocess.run([sys.executable, "-m", "xlstm_metal", "top", "--once", *args], capture_output=True,
                          text=True, timeout=60, env=repo_env(XLSTM_RUNTIME_DIR=str(runtime), **env))


@pytest.mark.parametrize("extra, shown", [(', "updated": null', 1), (', "step": 1' + "0" * 400, 0),
                                          (', "memory": {"samples": NaN}', 0)])
def test_top_takes_records_with_odd_values(runtime, capsys, extra, shown):  # noqa: F811
    """null, huge int: tracebacks; NaN: invalid JSON."""
    runtime.mkdir()
    _record(runtime, os.getpid(), extra)
    assert main(["top", "--json", "--once"]) == 0
    jobs = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)["jobs"]
    assert [(j["pid"], j["age_s"]) for j in jobs] == [(os.getpid(), 0.0)] * shown
    assert (runtime / f"{os.getpid()}.json").exists()


def test_top_sorts_numeric_commands_and_lists_no_record_without_start_time(runtime, capsys):  # noqa: F811
    runtime.mkdir()
    _record(runtime, os.getpid(), command=5)
    _record(runtime, os.getppid(), command="chat")
    (runtime / "1.json").write_text('{"pid": 1}')  # listed: top's kill key signalled it
    assert main(["top", "--json", "--once", "--sort", "command"]) == 0
    assert [j["pid"] for j in json.loads(capsys.readouterr().out)["jobs"]] == [os.getpid(), os.getppid()]
    with pytest.raises(ProcessLookupError):
        send_command(1, "clear_cache", runtime)


def test_an_unreadable_rss_keeps_the_watchdog_sampling(runtime, monkeypatch, capsys):  # noqa: F811
    def denied(self):
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "memory_info", denied)
    monkeypatch.setattr("xlstm_metal.monitor.watchdog._RSS_WARNED", False)
    config = WatchdogConfig.from_sources("10GB", "20GB", env={"XLSTM_MEM_POLL_MS": "10"}, total=10**12)
    with JobStatus("generate", watchdog=config, interval=0.02) as job:
        assert _wait(lambda: job.watchdog.samples >= 5)  # its thread died at the first
        assert job.watchdog.last.rss == 0 and read_jobs()[0]["memory"]["rss"] == 0
    assert capsys.readouterr().err.count("cannot read the process's RSS (AccessDenied)") == 1


def test_odd_watchdog_and_launch_settings(tmp_path):
    (tmp_path / "h").write_text("")  # mlx.launch -n 1's host file
    assert job_rank({"MLX_RANK": "0", "MLX_HOSTFILE": str(tmp_path / "h")}) is None
    pytest.raises(ValueError, stage_bounds, 1, 2).match("^cannot split 1 block across 2 .*: start at most 1$")
    assert not WatchdogConfig.from_sources(env={"XLSTM_MEM_WATCHDOG": " Off "}, total=10**9).enabled
    with pytest.raises(ValueError, match="XLSTM_MEM_WATCHDOG must be 1 or 0, got 'disabled'"):  # it was on
        WatchdogConfig.from_sources(env={"XLSTM_MEM_WATCHDOG": "disabled"}, total=10**9)


def test_top_once_on_an_ascii_stdout(runtime):  # noqa: F811
    runtime.mkdir()
    _record(runtime, os.getpid(), command="generate", model="模/" + "x" * 40)  # "…xxx"
    proc = _top(runtime, PYTHONIOENCODING="ascii")
    assert proc.returncode == 0 and f"{os.getpid()}  generate  ?xxx" in proc.stdout, proc.stderr


def test_a_fifo_in_place_of_a_record_or_command_hangs_nothing(runtime):  # noqa: F811
    runtime.mkdir()
    os.mkfifo(runtime / f"{os.getpid()}.json")
    os.mkfifo(runtime / "7.cmd")
    proc = _top(runtime, "--json")  # it waited forever
    assert proc.returncode == 0 and json.loads(proc.stdout)["jobs"] == [], proc.stderr
    taken = []
    thread = threading.Thread(target=lambda: taken.append(take_command(7, runtime)), daemon=True)
    thread.start()
    assert _wait(lambda: taken == [None])


def test_a_runtime_dir_lost_or_unusable_leaves_the_job_running(tmp_path, capsys):
    (tmp_path / "rt").write_text("")
    JobStatus("generate", watchdog=None, directory=tmp_path / "rt").start().close()  # NotADirectoryError
    assert "warning: no status record" in capsys.readouterr().err
    (tmp_path / "rt").unlink()
    (tmp_path / "rt").mkdir()
    with JobStatus("generate", watchdog=None, directory=tmp_path / "rt", interval=0.01) as job:
        (tmp_path / "rt").rename(tmp_path / "a")  # removed: top lost the job for good
        assert _wait(job.path.exists)
        (tmp_path / "rt").rename(tmp_path / "b")
        (tmp_path / "rt").write_text("")
        time.sleep(1)  # 10 lines
    assert capsys.readouterr().err.count("status record not written") == 2  # once a failure
