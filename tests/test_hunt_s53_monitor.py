"""Session 53's hunt of top, the watchdog and distributed runs."""

import json
import os
import time

import psutil
import pytest
from test_monitor import runtime  # noqa: F401  (autouse: records of each test only)

from xlstm_metal.cli import main
from xlstm_metal.monitor import JobStatus, WatchdogConfig, read_jobs, send_command


def _record(runtime, pid, text=None, **fields):  # noqa: F811
    record = {"pid": pid, "process_started": psutil.Process(pid).create_time(), "command": "generate", **fields}
    (runtime / f"{pid}.json").write_text(text or json.dumps(record))


@pytest.mark.parametrize("extra, shown", [('"updated": null', True), ('"step": 1' + "0" * 400, False),
                                          ('"message": NaN', False), ('"memory": {"samples": Infinity}', False)])
def test_top_takes_records_with_odd_values(runtime, capsys, extra, shown):  # noqa: F811
    """null "updated", an int beyond floats: tracebacks; NaN / Infinity: `top --json` printed no JSON."""
    runtime.mkdir()
    pid = os.getpid()
    started = psutil.Process(pid).create_time()
    _record(runtime, pid, f'{{"pid": {pid}, "process_started": {started!r}, {extra}}}')
    assert main(["top", "--json", "--once"]) == 0
    jobs = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))["jobs"]
    assert [(j["pid"], j["age_s"]) for j in jobs] == ([(pid, 0.0)] if shown else [])
    assert (runtime / f"{pid}.json").exists()  # skipped, not deleted


def test_top_sorts_a_numeric_command_and_ignores_records_without_start_time(runtime, capsys):  # noqa: F811
    runtime.mkdir()
    _record(runtime, os.getpid(), command=5)
    _record(runtime, os.getppid(), command="chat")
    (runtime / "1.json").write_text(json.dumps({"pid": 1, "command": "train"}))  # pid 1: no start time
    assert main(["top", "--json", "--once", "--sort", "command"]) == 0
    assert [j["pid"] for j in json.loads(capsys.readouterr().out)["jobs"]] == [os.getpid(), os.getppid()]
    with pytest.raises(ProcessLookupError):  # top's kill / clear_cache never reach pid 1
        send_command(1, "clear_cache", runtime)


def test_a_runtime_dir_that_takes_no_files_leaves_the_job_running(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    job = JobStatus("generate", watchdog=None, directory=blocker, interval=0.05)
    with job:  # it raised NotADirectoryError (the CLI: exit 2, nothing generated)
        job.update(done=1)
    assert "warning: no status record" in capsys.readouterr().err and blocker.read_text() == "x"


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
        assert job._thread.is_alive() and job.watchdog.samples >= 5  # the thread died at the first sample
        assert job.watchdog.last.rss == 0 and read_jobs()[0]["memory"]["rss"] == 0
    err = capsys.readouterr().err
    assert err.count("cannot read the process's RSS (AccessDenied") == 1 and "Traceback" not in err


def test_an_unknown_watchdog_switch_is_refused(capsys, monkeypatch):
    """XLSTM_MEM_WATCHDOG=disabled left the watchdog on: the job was stopped at 90% of memory."""
    with pytest.raises(ValueError, match="XLSTM_MEM_WATCHDOG must be 1 or 0 \\(on or off\\), got 'disabled'"):
        WatchdogConfig.from_sources(env={"XLSTM_MEM_WATCHDOG": "disabled"}, total=10**9)
    assert not WatchdogConfig.from_sources(env={"XLSTM_MEM_WATCHDOG": " Off "}, total=10**9).enabled
    monkeypatch.setenv("XLSTM_MEM_WATCHDOG", "disabled")
    assert main(["convert", "nowhere", "out", "-q"]) == 2
    assert "got 'disabled'" in capsys.readouterr().err


def test_top_once_on_an_ascii_stdout(runtime, tmp_path):  # noqa: F811
    """A model name (or top's own "…") that stdout cannot encode: a UnicodeEncodeError traceback."""
    import subprocess
    import sys

    from conftest import repo_env

    runtime.mkdir()
    _record(runtime, os.getpid(), model="模型/" + "x" * 40)
    proc = subprocess.run([sys.executable, "-m", "xlstm_metal", "top", "--once"], capture_output=True, timeout=60,
                          env=repo_env(XLSTM_RUNTIME_DIR=str(runtime), PYTHONIOENCODING="ascii"))
    assert proc.returncode == 0 and f"{os.getpid()}  generate  ?" in proc.stdout.decode(), proc.stderr.decode()


def test_a_pipeline_of_more_ranks_than_blocks_names_the_most_it_takes():
    from xlstm_metal.distributed import stage_bounds

    assert stage_bounds(3, 2) == [(0, 2), (2, 3)]
    with pytest.raises(ValueError, match="^cannot split 1 block across 2 processes: each needs at least one: "
                                         "start at most 1$"):
        stage_bounds(1, 2)


def test_a_fifo_in_place_of_a_record_or_command_hangs_nothing(runtime):  # noqa: F811
    """`top` (and a job's thread, at its command file) waited forever to read a FIFO."""
    import subprocess
    import sys
    import threading

    from conftest import repo_env

    from xlstm_metal.monitor.records import take_command

    runtime.mkdir()
    os.mkfifo(runtime / f"{os.getpid()}.json")
    os.mkfifo(runtime / "7.cmd")
    proc = subprocess.run([sys.executable, "-m", "xlstm_metal", "top", "--json", "--once"], capture_output=True,
                          text=True, timeout=60, env=repo_env(XLSTM_RUNTIME_DIR=str(runtime)))
    assert proc.returncode == 0 and json.loads(proc.stdout)["jobs"] == [], proc.stderr
    taken = []
    thread = threading.Thread(target=lambda: taken.append(take_command(7, runtime)), daemon=True)
    thread.start()
    thread.join(20)
    assert taken == [None] and not (runtime / "7.cmd").exists()
