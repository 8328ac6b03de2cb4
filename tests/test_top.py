"""`xlstm-metal top` (issue 14): a running generate job with a tiny model is listed with tokens/s
(--json --once, --json stream, text), the terminal UI (textual's Pilot) shows it, asks its MLX
cache to be cleared, sorts, and kills it after a confirmation; in a real pseudo-terminal
(pexpect) it says that no job runs and quits on q."""

import asyncio
import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import tiny_model
from test_monitor import wait_for
from test_tokenizer import train_tiny_tokenizer

from xlstm_metal.cli import main
from xlstm_metal.cli.top import main as xltop_main
from xlstm_metal.loading import save_model
from xlstm_metal.monitor import read_jobs
from xlstm_metal.monitor.top import sparkline


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A `generate` job (tiny random model, greedy: no EOS for 5,000+ tokens) publishing into a
    runtime directory of its own; yields (process, runtime dir, env)."""
    tmp = tmp_path_factory.mktemp("top")
    ckpt, runtime = tmp / "ckpt", tmp / "runtime"
    hf = train_tiny_tokenizer()
    save_model(tiny_model(2, vocab_size=hf.get_vocab_size()), ckpt)
    hf.save(str(ckpt / "tokenizer.json"))
    env = {**os.environ, "XLSTM_RUNTIME_DIR": str(runtime), "XLSTM_STATUS_INTERVAL": "0.25"}
    proc = subprocess.Popen([sys.executable, "-m", "xlstm_metal", "generate", "-m", str(ckpt), "-p", "the quick",
                             "-n", "1000000", "--temp", "0"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: proc.poll() is not None or any(j.get("phase") == "decode" for j in read_jobs(runtime)),
                 timeout=120)
        assert proc.poll() is None, proc.stderr.read()
        yield proc, runtime, env
    finally:
        proc.kill()
        proc.wait()


def top_json(env, *args):
    out = subprocess.run([sys.executable, "-m", "xlstm_metal", "top", "--json", *args], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_json_once_lists_the_job_with_tokens_per_s(job):
    proc, runtime, env = job
    [snap] = top_json(env, "--once")
    assert set(snap) == {"time", "interval", "machine", "jobs"}
    [rec] = snap["jobs"]
    assert rec["pid"] == proc.pid and rec["command"] == "generate" and rec["phase"] == "decode"
    assert rec["tokens_per_s"] > 0 and rec["decode_tps"] > 0 and rec["done"] > 0 and rec["total"] == 1000000
    assert rec["memory"]["rss"] > 0 and rec["memory"]["hard_limit"] > rec["memory"]["soft_limit"] > 0
    m = snap["machine"]
    assert m["cpu_count"] >= 1 and 0 < m["ram_used"] < m["ram_total"] and m["mlx"]["device"] in ("cpu", "metal", "cuda")
    # A stream of N objects: the job's progress moves on between them.
    snaps = top_json(env, "--interval", "0.5", "--count", "2")
    assert len(snaps) == 2 and snaps[1]["jobs"][0]["done"] > snaps[0]["jobs"][0]["done"]


def test_text_snapshot_and_xltop(job, capsys, monkeypatch):
    proc, runtime, _ = job
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(runtime))
    assert main(["top", "--once"]) == 0
    out = capsys.readouterr().out
    assert "PID" in out and "TOK/S" in out and f"{proc.pid}  generate" in out and "decode" in out
    assert xltop_main(["--once", "--sort", "memory"]) == 0
    assert str(proc.pid) in capsys.readouterr().out
    assert xltop_main(["--interval", "0"]) == 2
    assert "--interval must be between" in capsys.readouterr().err
    assert main(["top", "--count", "3"]) == 2  # --count needs --json
    assert main(["top", "--json", "--once", "--count", "3"]) == 2
    assert "--count goes with --json" in capsys.readouterr().err
    assert main(["top", "--clear-cache", str(proc.pid)]) == 0
    assert f"asked {proc.pid} to clear its MLX cache" in capsys.readouterr().err
    assert wait_for(lambda: [j for j in read_jobs(runtime) if j.get("last_command")])
    assert main(["top", "--clear-cache", "999999999"]) == 2
    assert "no running xlstm-metal job with pid 999999999" in capsys.readouterr().err


def test_sparkline():
    assert sparkline([0, 1, 2, 4]) == "▁▃▅█"
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([50, 0, 10, 20], width=3) == "▁▅█"  # the last 3 values, scaled to their max
    assert sparkline([]) == ""


def test_json_stream_takes_commands_on_stdin(tmp_path):
    """`top --json` with a piped stdin: clear_cache PID, interval S, kill PID, quit."""
    runtime = tmp_path / "runtime"
    env = {**os.environ, "XLSTM_RUNTIME_DIR": str(runtime), "XLSTM_STATUS_INTERVAL": "0.2"}
    script = tmp_path / "job.py"
    script.write_text("import time\nfrom xlstm_metal.monitor import job_status\n"
                      "with job_status('convert', model='x'):\n    time.sleep(120)\n")
    job = subprocess.Popen([sys.executable, str(script)], env=env)
    top = subprocess.Popen([sys.executable, "-m", "xlstm_metal", "top", "--json", "--interval", "0.3"], env=env,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def until(predicate):
            for line in top.stdout:
                snap = json.loads(line)
                if predicate(snap):
                    return snap
            raise AssertionError("top ended: " + top.stderr.read())

        until(lambda s: any(j["pid"] == job.pid for j in s["jobs"]))
        top.stdin.write(f"clear_cache {job.pid}\ninterval 0.5\nbogus\n")
        top.stdin.flush()
        snap = until(lambda s: any(j.get("last_command") for j in s["jobs"]))
        assert snap["jobs"][0]["last_command"]["command"] == "clear_cache"
        until(lambda s: s["interval"] == 0.5)
        top.stdin.write(f"kill {job.pid}\n")
        top.stdin.flush()
        assert job.wait(30) == 128 + 15
        until(lambda s: s["jobs"] == [])
        top.stdin.write("quit\n")
        top.stdin.flush()
        assert top.wait(30) == 0
        err = top.stderr.read()
        assert f"asked {job.pid} to clear" in err and f"sent SIGTERM to {job.pid}" in err
        assert "unknown command 'bogus'" in err and "interval 0.5 s" in err
    finally:
        job.kill()
        top.kill()


def test_terminal_ui_shows_the_job_clears_its_cache_and_kills_it(job, monkeypatch):
    from textual.widgets import DataTable, Static

    from xlstm_metal.monitor.tui import ConfirmKill, TopApp

    proc, runtime, _ = job
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(runtime))

    async def drive():
        app = TopApp(interval=0.3, directory=runtime)
        async with app.run_test(size=(220, 40)) as pilot:
            table = app.query_one("#jobs", DataTable)
            for _ in range(100):
                if table.row_count:
                    break
                await pilot.pause(0.1)
            assert table.row_count == 1
            row = table.get_row_at(0)
            assert row[0] == str(proc.pid) and row[1] == "generate" and row[2] == "-"
            assert float(row[6].replace(",", "")) > 0
            assert "no jobs running" not in str(app.query_one("#machine", Static).render())
            assert app.selected_pid() == proc.pid

            before = (next(iter(read_jobs(runtime)), {}).get("last_command") or {}).get("at", 0)
            await pilot.press("c")  # the job clears its MLX cache and says so in its record
            for _ in range(100):
                rec = next(iter(read_jobs(runtime)), {})
                if (rec.get("last_command") or {}).get("at", 0) > before:
                    break
                await pilot.pause(0.1)
            assert rec["last_command"]["at"] > before
            assert rec["last_command"]["command"] == "clear_cache" and rec["last_command"]["ok"]

            await pilot.press("s")
            assert app.sort_key == "command"
            await pilot.press("minus")
            assert app.interval == 0.6

            await pilot.press("k")  # asks first; n keeps the job
            assert isinstance(app.screen, ConfirmKill)
            await pilot.press("n")
            await pilot.pause(0.3)
            assert proc.poll() is None and not isinstance(app.screen, ConfirmKill)

            await pilot.press("k")
            await pilot.press("y")
            assert proc.wait(30) == 128 + 15  # SIGTERM: the job unwinds and exits
            for _ in range(50):
                if not table.row_count:
                    break
                await pilot.pause(0.2)
            assert table.row_count == 0 and app.query_one("#empty", Static).display
            assert "no jobs running" in str(app.query_one("#empty", Static).render())
            await pilot.press("q")
        assert list(runtime.glob("*.json")) == []  # the killed job removed its record

    asyncio.run(drive())


def test_pseudo_terminal_no_jobs_and_quit(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "XLSTM_RUNTIME_DIR": str(tmp_path / "empty"), "TERM": "xterm-256color"}
    child = pexpect.spawn(sys.executable, ["-m", "xlstm_metal", "top", "--interval", "0.5"], env=env,
                          dimensions=(30, 140), timeout=60, encoding="utf-8")
    try:
        child.expect("no jobs running")
        child.expect("Quit")  # the footer lists the keys
        child.send("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_readme_monitoring_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The commands of the README's monitoring section, run in a fresh directory."""
    import re
    import shlex

    readme = (__import__("pathlib").Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Monitoring"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["xlstm-metal", "top"], ["xlstm-metal", "top"],
                                         ["xlstm-metal", "generate"]]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(tmp_path / "runtime"))
    for argv in commands:
        assert main(argv[1:]) == 0, argv
    out = capsys.readouterr().out
    assert "no jobs running" in out
    snapshot = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert snapshot["jobs"] == [] and snapshot["machine"]["ram_total"] > 0
    rows = (tmp_path / "mem.csv").read_text().splitlines()
    assert rows[0].startswith("time,elapsed_s,usage_bytes") and len(rows) >= 2


def test_nvml_gpus_and_metal_info_are_shown(monkeypatch, tmp_path):
    """GPU rows through a stand-in for nvidia-ml-py (no NVIDIA GPU here): utilisation, memory,
    and each job's GPU memory by pid; MLX's Metal device info in the machine text."""
    import types

    from xlstm_metal.monitor.machine import Machine
    from xlstm_metal.monitor.top import Monitor, machine_text

    class Mem:
        used, total = 40 * 10**9, 141 * 10**9

    class Util:
        gpu = 87

    class Proc:
        def __init__(self, pid, used):
            self.pid, self.usedGpuMemory = pid, used

    nv = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: b"NVIDIA H200" if h == 0 else "NVIDIA H200",
        nvmlDeviceGetUtilizationRates=lambda h: Util, nvmlDeviceGetMemoryInfo=lambda h: Mem,
        nvmlDeviceGetTemperature=lambda h, kind: 51, nvmlDeviceGetPowerUsage=lambda h: 312_000,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [Proc(os.getpid(), 3 * 10**9)] if h == 1 else [],
    )
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(tmp_path))
    machine = Machine()
    gpus = machine.gpus()
    assert [(g["index"], g["name"], g["utilization"], g["memory_used"], g["power_w"]) for g in gpus] == [
        (0, "NVIDIA H200", 87.0, 40 * 10**9, 312.0), (1, "NVIDIA H200", 87.0, 40 * 10**9, 312.0)]
    from xlstm_metal.monitor import job_status

    with job_status("serve", watchdog=None, interval=0.05):
        snap = Monitor(tmp_path, machine).poll(1.0)
    [job] = snap["jobs"]
    assert job["gpu_memory"] == 3 * 10**9 and "processes" not in snap["machine"]["gpus"][0]
    text = machine_text(snap["machine"])
    assert "GPU 1 NVIDIA H200: util 87%  memory 40.0G/141.0G  51°C  312 W" in text
    metal = {**snap["machine"], "gpus": [], "mlx": {"version": "0.32", "device": "metal", "device_name": "Apple M3 Max",
                                                      "memory_size": 128 * 10**9,
                                                      "max_recommended_working_set_size": 96 * 10**9}}
    assert "MLX 0.32 metal: Apple M3 Max, memory 128.0G, recommended working set 96.0G" in machine_text(metal)


def test_text_snapshot_in_a_narrow_terminal_keeps_whole_figures():
    """An 80-column `top --once` left out the least needed columns instead of cutting every one:
    the pid, tokens/s and memory read in full (they were "7…", "2…", "162…")."""
    import re
    import time as _time

    from xlstm_metal.monitor.top import render_text

    machine = {"host": "h", "cpu_percent": 50.0, "cpu_count": 2, "load_avg": [1.0, 1.0, 1.0], "ram_used": 10**9,
               "ram_total": 8 * 10**9, "ram_percent": 12.5, "swap_used": 0, "swap_total": 0, "gpus": [], "mlx": None}
    job = {"pid": 74401, "command": "generate", "model": "packaged model", "phase": "decode", "done": 1241,
           "total": 4000, "unit": "tokens", "tokens_per_s": 261.25, "started": _time.time() - 7, "age_s": 0.1,
           "interval": 1, "device_name": "Intel(R) Xeon(R) Processor",
           "memory": {"usage": 162.1e6, "rss": 162.1e6, "mlx_active": 61.8e6, "mlx_peak": 62.1e6, "mlx_cache": 31.6e6,
                      "state": "ok"}}
    snap = {"time": _time.time(), "interval": 1.0, "machine": machine, "jobs": [job]}
    for width in (80, 100):
        text = render_text(snap, width=width)
        assert max(len(line) for line in text.splitlines()) <= width
        row = next(line for line in text.splitlines() if line.startswith("74401"))
        assert "…" not in row
        assert re.search(r"^74401\s+generate\s+(packaged model\s+)?decode\s+1,241/4,000 tokens \(31%\)\s+261\.2\s+162\.1M", row), row
    wide = render_text(snap, width=200)
    assert "Intel(R) Xeon(R) Processor" in wide and "61.8M/62.1M/31.6M" in wide


def test_json_stdin_kill_signals_only_xlstm_metal_jobs(tmp_path, monkeypatch, capsys):
    """`kill PID` on top --json's stdin sent SIGTERM to any pid, a mistyped one included; it
    now refuses a process that publishes no job record (and still stops a job)."""
    from xlstm_metal.cli.top import _run_command

    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _run_command(f"kill {other.pid}", 1.0) == 1.0
        time.sleep(0.3)
        assert other.poll() is None, "an unrelated process was killed"
        assert f"no running xlstm-metal job with pid {other.pid}" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    script = ("from xlstm_metal.monitor import JobStatus; import time\n"
              "JobStatus('bench', watchdog=None, interval=0.1).start(); print('ready', flush=True); time.sleep(60)")
    job = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "XLSTM_RUNTIME_DIR": str(tmp_path)})
    try:
        assert job.stdout.readline().strip() == "ready"
        _run_command(f"kill {job.pid}", 1.0)
        assert job.wait(timeout=20) == 128 + 15
        assert f"sent SIGTERM to {job.pid}" in capsys.readouterr().err
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


RANK_JOB = """
import sys, time
from xlstm_metal.distributed import world
from xlstm_metal.monitor import JobStatus
if sys.argv[1] == "join":
    world()  # the group's own rank and size (the other rank joins too)
JobStatus("generate", "m", watchdog=None, interval=0.1).start()
print("ready", flush=True)
time.sleep(60)
"""


def test_the_ranks_of_one_distributed_job_are_told_apart(tmp_path, monkeypatch, capsys):
    """The processes of one mlx.launch run were identical rows in top; each record now has its
    rank and the world size (from the joined group, or mlx.launch's environment before it is
    joined), shown as RANK r/N; a process on its own has rank null, and the text view drops the
    column when no job has a rank."""
    from distributed_helpers import free_port, ring_env

    from xlstm_metal.distributed import launch_rank

    runtime = tmp_path / "runtime"
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(runtime))
    port = free_port(2)
    procs = []
    try:
        for rank in range(2):  # joined: the ring's own rank and size
            env = {**ring_env(rank, 2, port, tmp_path), "XLSTM_RUNTIME_DIR": str(runtime)}
            procs.append(subprocess.Popen([sys.executable, "-c", RANK_JOB, "join"], env=env, stdout=subprocess.PIPE,
                                          text=True))
        env = {**os.environ, "XLSTM_RUNTIME_DIR": str(runtime), "MLX_RANK": "3", "MLX_WORLD_SIZE": "4"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_JOB, "env"], env=env, stdout=subprocess.PIPE,
                                      text=True))  # not joined: mlx.launch's environment (nccl's variables)
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_JOB, "alone"], stdout=subprocess.PIPE, text=True,
                                      env={k: v for k, v in env.items() if not k.startswith("MLX_")}))
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        wait_for(lambda: len(read_jobs(runtime)) == 4)
        assert main(["top", "--json", "--once"]) == 0
        snapshot = json.loads(capsys.readouterr().out)
        by_pid = {job["pid"]: (job["rank"], job["world_size"]) for job in snapshot["jobs"]}
        assert by_pid == {procs[0].pid: (0, 2), procs[1].pid: (1, 2), procs[2].pid: (3, 4), procs[3].pid: (None, 1)}
        assert main(["top", "--once"]) == 0
        rows = capsys.readouterr().out.splitlines()
        assert "RANK" in next(line for line in rows if line.startswith("PID"))
        for proc, rank in zip(procs, ("0/2", "1/2", "3/4", "-")):
            assert re.search(rf"^{proc.pid}\s+generate\s+{re.escape(rank)}\s+m\s", next(
                line for line in rows if line.startswith(str(proc.pid)))), rows
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    # Only the process on its own left: no RANK column.
    procs[3] = subprocess.Popen([sys.executable, "-c", RANK_JOB, "alone"], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "XLSTM_RUNTIME_DIR": str(runtime)})
    try:
        assert procs[3].stdout.readline().strip() == "ready"
        wait_for(lambda: read_jobs(runtime))
        assert main(["top", "--once"]) == 0
        assert "RANK" not in capsys.readouterr().out
    finally:
        procs[3].kill()
        procs[3].wait()
    # The environment mlx.launch gives each backend's processes.
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]]))
    assert launch_rank({"MLX_RANK": "2", "MLX_HOSTFILE": str(hostfile)}) == (2, 3)  # ring
    assert launch_rank({"MLX_RANK": "1", "MLX_WORLD_SIZE": "8"}) == (1, 8)  # nccl
    assert launch_rank({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6"}) == (5, 6)  # mpirun
    assert launch_rank({"MLX_RANK": "0", "MLX_HOSTFILE": str(tmp_path / "gone.json")}) == (0, None)
    assert launch_rank({}) is None and launch_rank({"MLX_RANK": "x"}) is None
