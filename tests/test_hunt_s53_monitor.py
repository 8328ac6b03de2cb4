"""Session 53's hunt of top, the watchdog and distributed runs."""

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


def _record(runtime, pid, extra="", **fields):  # noqa: F811
    record = json.dumps({"pid": pid, "process_started": psutil.Process(pid).create_time(), **fields})
    (runtime / f"{pid}.json").write_text(record[:-1] + extra + "}")


def _top(runtime, *args, **env):  # noqa: F811
    return subprocess.run([sys.executable, "-m", "xlstm_metal", "top", "--once", *args], capture_output=True,
                          text=True, timeout=60, env=repo_env(XLSTM_RUNTIME_DIR=str(runtime), **env))


@pytest.mark.parametrize("extra, shown", [(', "updated": null', 1), (', "step": 1' + "0" * 400, 0),
                                          (', "memory": {"samples": NaN}', 0)])
def test_top_takes_records_with_odd_values(runtime, capsys, extra, shown):  # noqa: F811
    """null, a huge int: tracebacks; NaN: invalid JSON out."""
    runtime.mkdir()
    _record(runtime, os.getpid(), extra)
    assert main(["top", "--json", "--once"]) == 0
    jobs = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)["jobs"]
    assert [(j["pid"], j["age_s"]) for j in jobs] == [(os.getpid(), 0.0)] * shown
    assert (runtime / f"{os.getpid()}.json").exists()  # skipped, not deleted


def test_top_sorts_numeric_commands_and_lists_no_record_without_start_time(runtime, capsys):  # noqa: F811
    runtime.mkdir()
    _record(runtime, os.getpid(), command=5)
    _record(runtime, os.getppid(), command="chat")
    (runtime / "1.json").write_text('{"pid": 1}')  # listed, and killed by top's kill key
    assert main(["top", "--json", "--once", "--sort", "command"]) == 0
    assert [j["pid"] for j in json.loads(capsys.readouterr().out)["jobs"]] == [os.getpid(), os.getppid()]
    with pytest.raises(ProcessLookupError):
        send_command(1, "clear_cache", runtime)


def test_a_runtime_dir_that_takes_no_files_leaves_the_job_running(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with JobStatus("generate", watchdog=None, directory=tmp_path / "f"):  # NotADirectoryError
        pass
    assert "warning: no status record" in capsys.readouterr().err


def test_an_unreadable_rss_keeps_the_watchdog_sampling(runtime, monkeypatch, capsys):  # noqa: F811
    def denied(self):
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "memory_info", denied)
    monkeypatch.setattr("xlstm_metal.monitor.watchdog._RSS_WARNED", False)
    config = WatchdogConfig.from_sources("10GB", "20GB", env={"XLSTM_MEM_POLL_MS": "10"}, total=10**12)
    with JobStatus("generate", watchdog=config, interval=0.02) as job:
        deadline = time.monotonic() + 20
        while job.watchdog.samples < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job._thread.is_alive() and job.watchdog.samples >= 5  # it died at the first
        assert job.watchdog.last.rss == 0 and read_jobs()[0]["memory"]["rss"] == 0
    assert capsys.readouterr().err.count("cannot read the process's RSS (AccessDenied)") == 1


def test_an_unknown_watchdog_switch_is_refused(capsys, monkeypatch):
    """"disabled" left the watchdog on."""
    assert not WatchdogConfig.from_sources(env={"XLSTM_MEM_WATCHDOG": " Off "}, total=10**9).enabled
    monkeypatch.setenv("XLSTM_MEM_WATCHDOG", "disabled")
    assert main(["convert", "nowhere", "out", "-q"]) == 2
    assert "XLSTM_MEM_WATCHDOG must be 1 or 0 (on or off), got 'disabled'" in capsys.readouterr().err


def test_top_once_on_an_ascii_stdout(runtime):  # noqa: F811
    runtime.mkdir()
    _record(runtime, os.getpid(), command="generate", model="模型/" + "x" * 40)  # shown as "…xxx"
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
    thread.join(20)
    assert taken == [None]


def test_a_pipeline_of_more_ranks_than_blocks():
    with pytest.raises(ValueError, match="^cannot split 1 block across 2 processes: each needs at least one: "
                                         "start at most 1$"):
        stage_bounds(1, 2)
