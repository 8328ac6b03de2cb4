"""Session 51's hunt in the job monitor, the memory watchdog, convert and the distributed side:
each test failed before its fix."""

from __future__ import annotations

import pytest
from cli_helpers import assert_rejected

from xlstm_metal.monitor import JobStatus


@pytest.fixture(autouse=True)
def runtime(tmp_path, monkeypatch):
    """Records of this test only (other jobs on the machine stay out)."""
    path = tmp_path / "runtime"
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(path))
    return path


# ---------------------------------------------------------------------- XLSTM_STATUS_INTERVAL
@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "1e9"])
def test_a_bad_status_interval_is_refused_by_name(value, monkeypatch, capsys):
    # 0 and below made the publisher thread spin (the record rewritten ~1,000 times a second),
    # nan / inf failed with a JSON traceback, 'abc' said only "could not convert string to float".
    monkeypatch.setenv("XLSTM_STATUS_INTERVAL", value)
    assert_rejected(["generate", "--prompt", "x", "-n", "1"], capsys, "XLSTM_STATUS_INTERVAL", repr(value))
    with pytest.raises(ValueError, match="XLSTM_STATUS_INTERVAL"):
        JobStatus("bench", watchdog=None)


def test_status_intervals_in_range_are_taken(monkeypatch):
    monkeypatch.setenv("XLSTM_STATUS_INTERVAL", " 0.5 ")
    assert JobStatus("bench", watchdog=None).interval == 0.5
    assert JobStatus("bench", watchdog=None, interval=0.05).interval == 0.05  # the argument wins
    monkeypatch.setenv("XLSTM_STATUS_INTERVAL", "")
    assert JobStatus("bench", watchdog=None).interval == 1.0
    with pytest.raises(ValueError, match="interval must be"):
        JobStatus("bench", watchdog=None, interval=0)


# ---------------------------------------------------------------------- top --clear-cache
def test_top_clear_cache_without_a_usable_runtime_directory_is_one_line(tmp_path, monkeypatch, capsys):
    # A file where the runtime directory should be: FileExistsError traceback from mkdir.
    blocker = tmp_path / "afile"
    blocker.write_text("")
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(blocker))
    assert_rejected(["top", "--clear-cache", "1"], capsys, "no running xlstm-metal job with pid 1")
    # A runtime directory that does not exist holds no job: refused, and not made by asking.
    missing = tmp_path / "missing"
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(missing))
    assert_rejected(["top", "--clear-cache", "1"], capsys, "no running xlstm-metal job with pid 1")
    assert not missing.exists()


def test_top_json_stdin_commands_survive_an_unusable_runtime_directory(tmp_path, monkeypatch, capsys):
    from xlstm_metal.cli.top import _run_command

    blocker = tmp_path / "afile"
    blocker.write_text("")
    monkeypatch.setenv("XLSTM_RUNTIME_DIR", str(blocker))
    assert _run_command("clear_cache 1", 2.0) == 2.0  # the stream goes on (was a traceback ending it)
    assert "no running xlstm-metal job with pid 1" in capsys.readouterr().err


# ---------------------------------------------------------------------- tensor parallel, quantized
class _Pair:
    """Rank 0 of a group of two, for the checks shard_model makes before any collective."""

    def size(self):
        return 2

    def rank(self):
        return 0


def test_tensor_split_of_a_quantized_model_names_the_group_size_that_cannot_split(monkeypatch):
    # The input of proj_down (192) and out_proj (64) split in two is 96 and 32 columns: groups of
    # 64 cannot be cut there. MLX failed with "[quantize] The last dimension of the matrix needs
    # to be divisible by the quantization group size 64 ..." (what `mlx.launch -n 2 -- xlstm-metal
    # generate -m <4-bit tiny model>` printed), naming no layer and no way out.
    from conftest import tiny_model

    from xlstm_metal.distributed import shard_model
    from xlstm_metal.quantization import quantize_model

    # The ranks' comparison of their models (a collective: test_hunt_s52_distributed) needs a real group.
    monkeypatch.setattr("xlstm_metal.distributed.tensor.check_same_model", lambda *args: None)
    model = tiny_model(0)
    quantize_model(model, bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"cannot split the model across processes: backbone\.blocks\.0\.ffn\."
                                         r"proj_down's input width 192 in 2 parts of 96 is not a multiple of its "
                                         r"quantization group size 64 \(--parallel pipeline"):
        shard_model(model, _Pair())
    model = tiny_model(0)
    quantize_model(model, bits=4, group_size=32)  # 96 and 32 hold whole groups of 32: it splits
    shard_model(model, _Pair())
    assert model.parallel == {"mode": "tensor", "size": 2, "rank": 0}
    assert model.backbone.blocks[0].ffn.proj_down.weight.shape[-1] * 32 // 4 == 96


# ---------------------------------------------------------------------- top's kill
def test_the_kill_key_signals_only_a_job_that_still_runs(runtime):
    # The live view asks before it kills; meanwhile the job may end and its pid go to another
    # process (here: one that never was a job, and one holding the pid of a job that died with
    # SIGKILL and left its record): kill_job signalled whatever had the pid.
    import subprocess
    import sys

    import psutil

    from xlstm_metal.monitor.records import atomic_write_json, record_path
    from xlstm_metal.monitor.top import kill_job

    runtime.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(ProcessLookupError, match=f"no running xlstm-metal job with pid {proc.pid}"):
            kill_job(proc.pid, runtime)
        started = psutil.Process(proc.pid).create_time()
        atomic_write_json(record_path(proc.pid, runtime), {"pid": proc.pid, "process_started": started - 100,
                                                            "updated": started})
        with pytest.raises(ProcessLookupError):
            kill_job(proc.pid, runtime)
        assert proc.poll() is None  # not signalled
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------- convert --overwrite
def test_convert_overwrite_keeps_a_checkpoint_holding_other_files(tmp_path, capsys):
    # README: --overwrite replaces OUT "never [when it is] a directory holding ... other files";
    # a checkpoint beside the user's notes, or the --q-recipe / --check file of this very run,
    # was replaced whole: they were deleted.
    import json

    from conftest import tiny_model

    from xlstm_metal.cli import main
    from xlstm_metal.loading import save_model

    src, prev = tmp_path / "src", tmp_path / "prev"
    save_model(tiny_model(0), src)
    assert main(["convert", str(src), str(prev)]) == 0
    (prev / "notes.txt").write_text("mine")
    (prev / "recipe.json").write_text(json.dumps({"bits": 8}))
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in prev.iterdir()}
    assert_rejected(["convert", src, prev, "-q", "--q-recipe", prev / "recipe.json", "--overwrite"], capsys,
                    "is not a checkpoint directory (it holds notes.txt, recipe.json)")
    assert {p.name: p.read_bytes() for p in prev.iterdir()} == before
    # The files a checkpoint holds (a training run's too) are replaced as before.
    (prev / "notes.txt").unlink()
    (prev / "recipe.json").unlink()
    for name in ("optimizer.safetensors", "trainer_state.json", "generation_config.json", "README.md"):
        (prev / name).write_text("{}")
    assert main(["convert", str(src), str(prev), "-q", "--overwrite"]) == 0
    assert json.loads((prev / "config.json").read_text())["quantization"]["bits"] == 4
    assert not (prev / "optimizer.safetensors").exists()
