"""Status records and the memory watchdog (issue 14): limits, soft/hard actions, CSV, records,
commands, dead pids; generate and train stopped at a hard limit (exit 3, train resumes exactly)."""

import csv
import json
import os
import subprocess
import sys
import time

import mlx.core as mx
import pytest
from conftest import tiny_model
from test_train_cli import BASE, make_corpus

from xlstm_metal.cli import main
from xlstm_metal.loading import load_model, read_weights, save_model
from xlstm_metal.monitor import (
    JobStatus,
    MemoryLimitExceeded,
    MemoryWatchdog,
    WatchdogConfig,
    current_job,
    job_status,
    parse_limit,
    read_jobs,
    send_command,
)
from xlstm_metal.monitor.records import record_path
from xlstm_metal.monitor.watchdog import CSV_FIELDS, MemorySample

GB = 10**9


@pytest.fixture(autouse=True)
def runtime(tmp_path, monkeypatch):
    """Records of this test only (other jobs on the machine stay out)."""
    path = tmp_path / "runtime"
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(path))
    return path


def test_parse_limit():
    assert parse_limit("12", 100 * GB) == 12 * GB
    assert parse_limit("12GB", 100 * GB) == 12 * GB
    assert parse_limit("512mb", 100 * GB) == 512 * 10**6
    assert parse_limit("1.5GiB", 100 * GB) == int(1.5 * 2**30)
    assert parse_limit("80%", 50 * GB) == 40 * GB
    for bad in ("", "x", "12XB", "0", "-3GB", "120%", "0%"):
        with pytest.raises(ValueError):
            parse_limit(bad, GB, "--mem-hard")


def test_config_precedence_and_errors(tmp_path):
    total = 100 * GB
    cfg = WatchdogConfig.from_sources(env={}, total=total)
    assert (cfg.soft, cfg.hard, cfg.enabled, cfg.action, cfg.poll_s) == (80 * GB, 90 * GB, True, "stop", 0.25)
    env = {"XLSTM_MEM_SOFT_PCT": "50", "XLSTM_MEM_HARD_PCT": "60", "XLSTM_MEM_POLL_MS": "100"}
    cfg = WatchdogConfig.from_sources(env=env, total=total)
    assert (cfg.soft, cfg.hard, cfg.poll_s) == (50 * GB, 60 * GB, 0.1)
    env["XLSTM_MEM_HARD_MB"] = "70000"  # MB wins over percent
    assert WatchdogConfig.from_sources(env=env, total=total).hard == 70 * GB
    cfg = WatchdogConfig.from_sources("10GB", "20%", env=env, total=total)  # flags win over both
    assert (cfg.soft, cfg.hard, cfg.soft_source, cfg.hard_source) == (10 * GB, 20 * GB, "--mem-soft 10GB",
                                                                      "--mem-hard 20%")
    # A low hard limit alone pulls the default soft limit under it.
    cfg = WatchdogConfig.from_sources(None, "9GB", env={}, total=total)
    assert cfg.hard == 9 * GB and cfg.soft == 8 * GB
    assert not WatchdogConfig.from_sources(env={"XLSTM_MEM_WATCHDOG": "0"}, total=total).enabled
    assert WatchdogConfig.from_sources(env={"XLSTM_MEM_ACTION": "warn"}, total=total).action == "warn"
    (tmp_path / "plain").write_text("")
    for kwargs, env, word in (
        (dict(soft="30GB", hard="20GB"), {}, "below the hard limit"),
        ({}, {"XLSTM_MEM_ACTION": "explode"}, "XLSTM_MEM_ACTION"),
        ({}, {"XLSTM_MEM_POLL_MS": "fast"}, "XLSTM_MEM_POLL_MS"),
        ({}, {"XLSTM_MEM_SOFT_PCT": "200"}, "XLSTM_MEM_SOFT_PCT"),
        (dict(log=str(tmp_path)), {}, "is a directory"),
        (dict(log=str(tmp_path / "no" / "x.csv")), {}, "does not exist"),
        (dict(log=str(tmp_path / "plain" / "x.csv")), {}, "plain is a file, not a directory"),
    ):
        with pytest.raises(ValueError, match=word):
            WatchdogConfig.from_sources(env=env, total=total, **kwargs)
    foreign = tmp_path / "notes.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a memory log of ours"):
        WatchdogConfig.from_sources(log=str(foreign), env={}, total=total)


class Script:
    """A sampler returning scripted usage values (``next()`` moves on; a re-sample within one
    step sees the same value); clear_cache subtracts ``freed``."""

    def __init__(self, values, freed=0):
        self.values, self.freed, self.cleared, self.i = list(values), freed, 0, 0

    def sample(self):
        v = self.values[min(self.i, len(self.values) - 1)] - self.freed * self.cleared
        return MemorySample(time.time(), v, v, v // 2, v // 4, v)

    def clear(self):
        self.cleared += 1

    def step(self, wd):
        wd.sample()
        self.i += 1


def watchdog(tmp_path, values, freed=0, soft=500, hard=1000, **kw):
    script = Script(values, freed)
    cfg = WatchdogConfig(soft, hard, 10_000, log_path=tmp_path / "mem.csv")
    return MemoryWatchdog(cfg, sampler=script.sample, clear_cache=script.clear, warn=kw.pop("warn", None), **kw), script


def read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == CSV_FIELDS
    return [dict(zip(CSV_FIELDS, r)) for r in rows[1:]]


def test_soft_action_fires_before_hard_and_csv_has_one_row_per_sample(tmp_path, capsys):
    wd, script = watchdog(tmp_path, [100, 600, 700, 1200, 1300])
    shrunk = []
    wd.on_soft(lambda: shrunk.append(True))
    for i in range(5):
        script.step(wd)
        if i == 1:  # soft crossed: cache cleared at once, callbacks wait for the safe point
            assert script.cleared == 1 and wd.over_soft_limit() and not wd.stop_requested and not shrunk
            wd.run_soft_callbacks()
            assert shrunk == [True]
    assert wd.stop_requested and wd.samples == 5
    err = wd.error("checkpoint x")
    assert isinstance(err, MemoryLimitExceeded) and err.exit_code == 3
    assert "hard limit" in str(err) and "checkpoint x" in str(err) and "stopped cleanly" in str(err)
    wd.close()
    rows = read_csv(tmp_path / "mem.csv")
    assert len(rows) == wd.samples == 5
    assert [r["usage_bytes"] for r in rows] == ["100", "600", "700", "1200", "1300"]
    assert [r["event"] for r in rows] == ["", "soft", "", "hard", ""]
    assert [r["state"] for r in rows] == ["ok", "soft", "soft", "hard", "hard"]
    warnings = capsys.readouterr().err
    assert warnings.count("soft limit") == 1  # warned once
    # A second run appends to our own CSV (nothing lost), header once.
    wd, _ = watchdog(tmp_path, [100])
    wd.sample()
    wd.close()
    assert len(read_csv(tmp_path / "mem.csv")) == 6


def test_over_both_limits_at_once_soft_first_and_cache_clearing_can_avoid_the_stop(tmp_path):
    wd, script = watchdog(tmp_path, [1200, 1200])
    wd.sample()
    assert script.cleared == 1 and wd.stop_requested
    assert read_csv(tmp_path / "mem.csv")[0]["event"] == "soft+hard"
    wd.close()
    (tmp_path / "mem.csv").unlink()
    # Clearing the cache frees 300: usage 900 < hard, so the job goes on.
    wd, script = watchdog(tmp_path, [1200, 1200], freed=300)
    wd.sample()
    assert script.cleared == 1 and wd.over_soft_limit() and not wd.stop_requested
    wd.close()


def test_refuse_mode_until_back_under_soft_and_hysteresis(tmp_path):
    wd, script = watchdog(tmp_path, [1100, 800, 480, 440, 600], hard_action="refuse")
    states = []
    for _ in range(5):
        script.step(wd)
        states.append((wd.refusing(), wd.over_soft_limit(), wd.stop_requested))
    # 1100: hard -> refuse; 800: still over soft; 480: under soft (accept) but above 90% of it
    # (soft state stays); 440: below 450 -> soft over; 600: soft again.
    assert states == [(True, True, False), (True, True, False), (False, True, False), (False, False, False),
                      (False, True, False)]
    wd.close()
    # What `serve` reads through its job (a no-op job never refuses).
    job = JobStatus("serve", watchdog=None, hard_action="refuse", directory=tmp_path)
    assert not job.refusing() and not current_job().refusing()
    job.watchdog, script.i = wd, 0
    script.step(wd)
    assert job.refusing() and not job.stopping()


def wait_for(predicate, timeout=20.0, step=0.05):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out")


def test_record_lifecycle_and_clear_cache_command(runtime):
    cfg = WatchdogConfig(GB * 1000, GB * 2000, GB * 3000, poll_s=0.02)
    with job_status("generate", model="tiny", watchdog=cfg, interval=0.05) as job:
        assert current_job() is job
        job.update(phase="decode", done=5, total=20, tokens=5, decode_tps=12.5, prefill_tps=float("inf"))
        with pytest.raises(TypeError, match="bogus"):
            job.update(bogus=1)
        path = record_path(os.getpid(), runtime)
        rec = wait_for(lambda: [r for r in read_jobs(runtime) if r.get("done") == 5])[0]
        assert rec["pid"] == os.getpid() and rec["command"] == "generate" and rec["model"] == "tiny"
        assert rec["phase"] == "decode" and rec["progress"] == 0.25 and rec["decode_tps"] == 12.5
        assert rec["prefill_tps"] is None  # inf is not JSON
        assert rec["memory"]["hard_limit"] == GB * 2000 and rec["memory"]["rss"] > 0
        assert rec["memory"]["samples"] >= 1
        # The rate comes from the tokens counter.
        job.update(tokens=105)
        rec = wait_for(lambda: [r for r in read_jobs(runtime) if r.get("tokens") == 105])[0]
        assert rec["tokens_per_s"] > 0
        # Nested job_status yields the running job (one record per process).
        with job_status("other") as inner:
            assert inner is job
        # top asks for a cache clear; the publisher thread does it and reports it.
        _ = mx.ones((256, 1024)) + 1
        mx.eval(_)
        del _
        send_command(os.getpid(), "clear_cache", runtime)
        rec = wait_for(lambda: [r for r in read_jobs(runtime) if r.get("last_command")])[0]
        assert rec["last_command"]["command"] == "clear_cache" and rec["last_command"]["ok"]
        assert rec["last_command"]["cache_after"] == 0 == mx.get_cache_memory()
        assert path.exists()
    assert not path.exists()  # removed on exit
    assert current_job().watchdog is None
    with pytest.raises(ProcessLookupError):
        send_command(os.getpid(), "clear_cache", runtime)
    with pytest.raises(ValueError, match="unknown job command"):
        send_command(os.getpid(), "format_disk", runtime)


def test_dead_and_reused_pids_are_skipped_and_cleaned(runtime):
    runtime.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (runtime / f"{dead.pid}.json").write_text(json.dumps({"pid": dead.pid, "command": "train"}))
    (runtime / f"{dead.pid}.cmd").write_text("{}")
    # Our own pid, but the record is from an older process that had it.
    (runtime / f"{os.getpid()}.json").write_text(json.dumps({"pid": os.getpid(), "process_started": 1.0}))
    (runtime / "junk.json").write_text("not json")
    assert read_jobs(runtime) == []
    assert sorted(p.name for p in runtime.iterdir()) == ["junk.json"]


def test_an_unusable_runtime_directory_does_not_stop_the_job(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(blocker / "sub"))  # under a file: cannot be made
    assert main(["generate", "--prompt", "def f", "-n", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "warning: no status record" in err


def test_sigterm_removes_the_record(runtime, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import time\nfrom xlstm_metal.monitor import job_status\n"
        "with job_status('bench', model='x', interval=0.05):\n    print('ready', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert wait_for(lambda: read_jobs(runtime))[0]["command"] == "bench"
        proc.terminate()
        assert proc.wait(20) == 128 + 15
    finally:
        proc.kill()
    assert list(runtime.glob("*.json")) == []


# ---------------------------------------------------------------------- commands at the hard limit
def test_generate_over_a_hard_limit_exits_3_after_the_soft_warning(tmp_path, capsys):
    log = tmp_path / "gen.csv"
    # kB limits: crossed on every device (the CPU's RSS; on CUDA MLX's device memory, a few MB here)
    code = main(["generate", "--prompt", "def f", "-n", "50", "--mem-soft", "1KB", "--mem-hard", "2KB",
                 "--mem-log", str(log)])
    out, err = capsys.readouterr()
    assert code == 3
    assert "soft limit 1.0 kB (--mem-soft 1KB)" in err and "hard limit 2.0 kB (--mem-hard 2KB)" in err
    assert err.index("soft limit") < err.index("hard limit") and "stopped cleanly" in err
    assert "RSS" in err and "MLX active" in err  # the usage is named
    assert 0 < len(out.strip())  # what was generated before the stop is printed
    rows = read_csv(log)
    events = [r["event"].split("+") for r in rows]
    soft = next(i for i, e in enumerate(events) if "soft" in e)
    hard = next(i for i, e in enumerate(events) if "hard" in e)
    # Soft first, or both in one sample (the CPU's RSS crosses both at once; CUDA's device memory
    # can fall back under the hard limit once the soft action clears the cache, and cross it later).
    assert soft <= hard and sum("hard" in e for e in events) == 1
    assert int(rows[hard]["usage_bytes"]) >= int(rows[hard]["hard_bytes"]) == 2000
    assert main(["generate", "--prompt", "x", "--mem-hard", "lots"]) == 2
    assert "--mem-hard must be a size" in capsys.readouterr().err


def test_train_over_a_hard_limit_saves_a_checkpoint_that_resumes_exactly(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    args = [str(corpus), *BASE, "--steps", "4", "--eval-every", "4", "--save-every", "100"]
    assert main(["train", "--out", str(tmp_path / "full"), *args]) == 0
    # 1 kB: crossed on every device (the CPU's RSS; on CUDA MLX's device memory, under 2 MB here)
    code = main(["train", "--out", str(tmp_path / "cut"), *args, "--mem-hard", "1KB"])
    err = capsys.readouterr().err
    assert code == 3
    ckpt = tmp_path / "cut" / "checkpoint-0000001"
    assert "hard limit 1.0 kB" in err and str(ckpt) in err and "--resume" in err
    load_model(ckpt)  # loadable
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    full = read_weights(tmp_path / "full" / "checkpoint-0000004")
    resumed = read_weights(tmp_path / "cut" / "checkpoint-0000004")
    assert full.keys() == resumed.keys()
    for key in full:
        assert mx.array_equal(full[key], resumed[key]).item(), key


def test_sizes_read_in_the_unit_that_shows_them():
    from xlstm_metal.monitor.watchdog import gb

    assert [gb(n) for n in (1000, 2e6, 99_999, 1.5e8, 24e9)] == ["1.0 kB", "2.0 MB", "100.0 kB", "0.15 GB",
                                                                "24.00 GB"]


def test_convert_over_a_hard_limit_exits_3_and_writes_nothing(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    save_model(tiny_model(3, tie_word_embeddings=False), src)
    # 4 kB held active from the start: on CUDA the usage is the device's (active + cache), which a
    # tiny convert may not reach before it is done (it finished whole on an H200, session 47);
    # on CPUs the RSS is over the limit from the first sample anyway.
    held = mx.ones((1024,))
    mx.eval(held)
    code = main(["convert", str(src), str(out), "-q", "--mem-hard", "2KB"])
    del held
    err = capsys.readouterr().err
    assert code == 3 and "hard limit 2.0 kB" in err and f"nothing was written to {out}" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["runtime", "src"]


def test_tune_stops_between_trials_at_the_hard_limit_and_resumes(tmp_path):
    pytest.importorskip("optuna")
    from xlstm_metal.tuning import FunctionObjective, SweepSettings, run_sweep

    def settings():
        return SweepSettings(trials=4, seed=3, progress=False)

    full = run_sweep(FunctionObjective("sphere", 2), tmp_path / "full", settings())
    over = WatchdogConfig(soft=1, hard=2, total=GB, poll_s=0.05)  # any process is over 2 bytes
    with job_status("tune", watchdog=over) as job:
        with pytest.raises(MemoryLimitExceeded, match="continue with --resume"):
            run_sweep(FunctionObjective("sphere", 2), tmp_path / "cut", settings())
        assert job.fields["phase"] == "tune" and job.fields["done"] == 1 and job.fields["unit"] == "trials"
    lines = (tmp_path / "cut" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 1  # stopped after the first trial
    resumed = run_sweep(FunctionObjective("sphere", 2), tmp_path / "cut", settings(), resume=True)
    strip = [(r["number"], r["status"], r["value"], r["params"]) for r in resumed.trials]
    assert strip == [(r["number"], r["status"], r["value"], r["params"]) for r in full.trials]


def test_serve_answers_503_over_the_hard_limit_until_back_under_soft(tmp_path):
    pytest.importorskip("mlx_lm")
    from test_serve import post, write_checkpoint

    from xlstm_metal.serve import make_server, server_args

    ckpt = write_checkpoint(tmp_path / "ckpt")
    wd, script = watchdog(tmp_path, [100, 1200, 800, 400], hard_action="refuse")
    with job_status("serve", watchdog=None, hard_action="refuse") as job:
        job.watchdog = wd  # scripted usage: under, over hard, over soft, under soft
        with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
            answers = []
            for _ in range(4):
                script.step(wd)
                answers.append(post(srv.url, "/v1/completions", {"prompt": "the cat", "max_tokens": 3}))
            # Two requests answered, 3 tokens each (this checkpoint has no EOS), none streaming now.
            assert (job.fields["done"], job.fields["tokens"], job.fields["phase"]) == (2, 6, "idle")
    assert [status for status, _ in answers] == [200, 503, 503, 200]
    refused = answers[1][1]["error"]  # OpenAI's error shape
    assert "memory limit" in refused["message"] and refused["type"] == "server_error", refused
    assert answers[3][1]["choices"][0]["text"]


def test_mad_and_evolve_stop_at_the_hard_limit(tmp_path, capsys):
    out = tmp_path / "mad"
    assert main(["mad", "--arch", "mlstm", "--tasks", "memorization", "--epochs", "1", "--out", str(out),
                 "--mem-hard", "2KB"]) == 3
    assert "0 of 1 tasks were scored" in capsys.readouterr().err and not (out / "results.json").exists()
    out = tmp_path / "ev"
    assert main(["evolve", "--budget", "2000000", "--population", "2", "--generations", "2", "--tasks",
                 "memorization", "--epochs", "1", "--start", str(two_blocks(tmp_path)), "--min-blocks", "2", "--max-blocks", "2",
                 "--out", str(out), "--mem-hard", "2KB"]) == 3
    err = capsys.readouterr().err
    # Every MAD training step is a safe point: the search stops within its first candidate, before
    # anything is written, and says so (not "--resume continues").
    assert "hard limit 2.0 kB" in err and "no candidate was scored yet" in err and not out.exists()


def _sigterm_when_ready(code: str, *argv: str, before=None) -> tuple[subprocess.Popen, str, str]:
    """Run ``code`` (it prints "ready"), call ``before(proc)``, send SIGTERM; (process, the rest of
    its stdout, its stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        if before is not None:
            before(proc)
        proc.send_signal(15)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc, out, err


STUCK_JOB = """
import ctypes, signal
from xlstm_metal.monitor import JobStatus
JobStatus("generate", "m", watchdog=None, interval=0.2).start()
# The SIGTERM reaches another thread while the main thread sits in native code, as when an MLX
# collective waits for a process that died (mlx.launch then sends SIGTERM and waits).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
sleep = ctypes.CDLL(None).sleep
print("ready", flush=True)
sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libc sleep through ctypes (Linux)")
def test_sigterm_ends_a_job_stuck_in_native_code(runtime):
    """SIGTERM must still end a job whose main thread never returns to Python (the handler that
    removes the record would otherwise be deferred forever: mlx.launch hung on such a rank)."""
    def recorded(proc):
        assert record_path(proc.pid, runtime).is_file()
        # Into the native sleep first: a SIGTERM while the main thread still runs Python code
        # (waiting for the GIL after its print, on a busy machine) is handled there at once.
        time.sleep(0.5)
        sent.append(time.monotonic())

    sent: list[float] = []
    proc, out, err = _sigterm_when_ready(STUCK_JOB, before=recorded)
    assert time.monotonic() - sent[0] < 15
    assert proc.returncode == 128 + 15, err
    assert "did not return from native code" in err
    assert not record_path(proc.pid, runtime).exists()


STUCK_WRITER = """
import ctypes, signal, sys
from pathlib import Path
from xlstm_metal.monitor import JobStatus, note_on_sigterm, partial_output
JobStatus("train", "m", watchdog=None, interval=0.2).start()
note_on_sigterm("rank 0 stopped by signal 15 (the note)")
part = Path(sys.argv[1])
part.mkdir()
(part / "model.safetensors").write_bytes(b"half")
with partial_output(part):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    print("ready", flush=True)
    ctypes.CDLL(None).sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libc sleep through ctypes (Linux)")
def test_sigterm_ends_a_stuck_rank_with_its_note_and_removes_what_it_was_writing(runtime, tmp_path):
    """train under mlx.launch: a rank stuck in a collective with a killed peer (SIGTERM deferred
    forever) hung the launcher, since train's own SIGTERM handler turned the job's watch off.
    Now the rank's note is printed, the checkpoint it was writing is removed, and it exits."""
    part = tmp_path / ".checkpoint-0000004.abc"

    def written(_proc):
        assert (part / "model.safetensors").is_file()
        time.sleep(0.5)  # into the native sleep first

    proc, out, err = _sigterm_when_ready(STUCK_WRITER, str(part), before=written)
    assert proc.returncode == 128 + 15, err
    assert "rank 0 stopped by signal 15 (the note)" in err and "did not return from native code" in err
    assert not part.exists()
    assert not record_path(proc.pid, runtime).exists()


NOTED_JOB = """
import time
from xlstm_metal.monitor import JobStatus, note_on_sigterm
JobStatus("train", "m", watchdog=None, interval=0.2).start()
note_on_sigterm("rank 0 stopped by signal 15 (the note)")
try:
    print("ready", flush=True)
    time.sleep(60)
except SystemExit:
    print("unwound", flush=True)
    raise
"""


def test_a_job_that_takes_sigterm_unwinds_and_prints_its_note_once(runtime):
    """The main thread takes the SIGTERM (not stuck): the job's handler prints the note and
    raises SystemExit (so cleanup runs), and the job's thread does not also force an exit."""
    proc, out, err = _sigterm_when_ready(NOTED_JOB)
    assert proc.returncode == 128 + 15, err
    assert err.count("rank 0 stopped by signal 15 (the note)") == 1 and "native code" not in err
    assert "Traceback" not in err and out == "unwound\n"


def test_temporary_record_files_of_dead_jobs_are_cleaned(runtime):
    """A job killed between writing its record's temporary file and renaming it left
    `.<pid>.json.*.tmp` in the runtime directory for good; top's read removes it once the job is
    gone (and leaves a running job's, and a fresh one, alone)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    runtime.mkdir(parents=True, exist_ok=True)
    old = time.time() - 120
    stale = [runtime / f".{dead.pid}.json.abc123.tmp", runtime / f".{dead.pid}.cmd.def456.tmp"]
    fresh = runtime / f".{dead.pid}.json.new999.tmp"
    alive = runtime / f".{os.getpid()}.json.xyz789.tmp"
    other = runtime / ".notes.tmp"
    for path in (*stale, fresh, alive, other):
        path.write_text("{")
    for path in (*stale, alive, other):
        os.utime(path, (old, old))
    assert read_jobs(runtime) == []
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and alive.exists() and other.exists()
    assert read_jobs(runtime, clean=False) == [] and fresh.exists()


def test_a_low_hard_limit_from_the_environment_alone_moves_the_default_soft_limit():
    """XLSTM_MEM_HARD_MB / _PCT alone, below the default soft limit, made every job command exit 2
    ("the soft memory limit (... default 80% ...) must be below the hard limit"); like
    --mem-hard alone it brings the soft limit to 8/9 of it. Both set explicitly still must agree."""
    total = 100 * GB
    cfg = WatchdogConfig.from_sources(env={"XLSTM_MEM_HARD_MB": "9000"}, total=total)
    assert (cfg.hard, cfg.soft) == (9 * GB, 8 * GB) and "hard limit" in cfg.soft_source
    cfg = WatchdogConfig.from_sources(env={"XLSTM_MEM_HARD_PCT": "45"}, total=total)
    assert (cfg.hard, cfg.soft) == (45 * GB, 40 * GB)
    with pytest.raises(ValueError, match="below the hard limit"):
        WatchdogConfig.from_sources(env={"XLSTM_MEM_HARD_MB": "9000", "XLSTM_MEM_SOFT_MB": "9500"}, total=total)
    with pytest.raises(ValueError, match="below the hard limit"):
        WatchdogConfig.from_sources("95GB", None, env={}, total=total)


def test_bench_status_names_the_run_in_progress(tmp_path, monkeypatch, capsys):
    """`bench` told top about a run only once it had ended: while the next one ran, the record
    showed the previous run's kind and speed as current. Each run is now announced as it
    starts (kind, which run, no speed yet); finished runs' speeds stay in prefill_tps /
    decode_tps."""
    from xlstm_metal import benchmark as bm

    keys = ("phase", "done", "total", "unit", "message", "tokens_per_s", "prefill_tps", "decode_tps")
    seen = []

    def spy(measure):
        def wrapped(*args, **kwargs):  # the record top reads while this run is measured
            record = current_job().record()
            seen.append({k: record.get(k) for k in keys})
            return measure(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(bm, "measure_prefill", spy(bm.measure_prefill))
    monkeypatch.setattr(bm, "measure_decode", spy(bm.measure_decode))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=97, chunk_size=16)))
    assert main(["bench", "--config", str(config), "--prefill-lengths", "16,32", "--decode-batches", "2",
                 "--decode-tokens", "4", "--seed", "0", "--json"]) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kind"], r["length"]) for r in runs] == [("prefill", 16), ("prefill", 32), ("decode", 4)]
    common = {"total": 3, "unit": "runs", "tokens_per_s": None}
    assert seen == [
        {**common, "phase": "prefill", "done": 0, "message": "run 1 of 3: prefill of 16 tokens x 1",
         "prefill_tps": None, "decode_tps": None},
        {**common, "phase": "prefill", "done": 1, "message": "run 2 of 3: prefill of 32 tokens x 1",
         "prefill_tps": runs[0]["tok_s"], "decode_tps": None},
        {**common, "phase": "decode", "done": 2, "message": "run 3 of 3: decode at batch 2, 4 steps",
         "prefill_tps": runs[1]["tok_s"], "decode_tps": None},
    ]


def two_blocks(tmp_path):
    """mlstm's first mixer and SwiGLU: a 2-block start for a quick search (evolve refuses a start
    outside --min-blocks..--max-blocks rather than cutting it)."""
    path = tmp_path / "mlstm-2.yaml"
    path.write_text("name: mlstm-2\nblocks: [mlstm, swiglu]\n")
    return path
