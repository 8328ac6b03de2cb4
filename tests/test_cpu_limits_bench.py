"""benchmarks/cpu_limits.py's paired measurement: decode steps each timed beside a read of the
step's bytes, in alternating order, and the share of the read limit each pair gives."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import run_benchmark, tiny_model

_spec = importlib.util.spec_from_file_location("cpu_limits", Path(__file__).parent.parent / "benchmarks" / "cpu_limits.py")
cpu_limits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_limits)


def _recording_step(monkeypatch, delay_s: float) -> list:
    """make_decode_step replaced by a step that records its calls and takes ``delay_s``."""
    from xlstm_metal import benchmark as bm

    calls = []
    real = bm.make_decode_step

    def make(model, compiled=True):
        step = real(model, compiled)

        def slow(tok, state):
            calls.append(time.perf_counter())
            time.sleep(delay_s)
            return step(tok, state)
        return slow

    monkeypatch.setattr(bm, "make_decode_step", make)
    return calls


def test_pairs_alternate_their_order_and_scale_the_read_to_the_steps_bytes(monkeypatch):
    mx.random.seed(0)
    model = tiny_model(seed=1)
    calls = _recording_step(monkeypatch, 0.02)
    matmuls = []
    real_eval = mx.eval

    nbytes = 4 * 4096 * 64  # 1 MiB: a read of it takes well under the step's 20 ms sleep

    def eval_(*args):  # a read: the eval of the one-row product over the [64, 4096] weight
        if len(args) == 1 and isinstance(args[0], mx.array) and args[0].shape == (1, 64):
            matmuls.append(time.perf_counter())
        return real_eval(*args)

    monkeypatch.setattr(mx, "eval", eval_)
    result = cpu_limits.paired_reads(model, nbytes, pairs=4, buffer=cpu_limits.read_buffer(nbytes))
    assert result["pairs"] == 4 and len(result["ratios"]) == 4
    # warm-up steps first (start_decode), then step / read, read / step, step / read, read / step
    timed_steps, reads = calls[-4:], matmuls[-4:]
    assert timed_steps[0] < reads[0] and reads[1] < timed_steps[1]
    assert timed_steps[2] < reads[2] and reads[3] < timed_steps[3]
    # a read of 1 MiB against a step of >= 20 ms: every pair far below 1, all positive
    assert all(0 < r < 0.25 for r in result["ratios"])
    assert result["step_ms_median"] >= 20.0 and result["stream_gbs_median"] > 0
    q1, q2, q3 = result["ratio_quartiles"]
    assert q1 <= result["ratio_median"] <= q3 and q2 == pytest.approx(result["ratio_median"])


def test_a_slower_step_gives_a_smaller_share(monkeypatch):
    model = tiny_model(seed=2)
    buffer = cpu_limits.read_buffer(4 * 4096 * 64)
    _recording_step(monkeypatch, 0.005)
    fast = cpu_limits.paired_reads(model, 4 * 4096 * 64, pairs=3, buffer=buffer)
    _recording_step(monkeypatch, 0.06)
    slow = cpu_limits.paired_reads(model, 4 * 4096 * 64, pairs=3, buffer=buffer)
    assert slow["ratio_median"] < fast["ratio_median"]


@pytest.mark.parametrize("args,message", [
    (["--pairs", "-1"], "--pairs and --prefill >= 0"),
    (["--rounds", "0"], "--rounds and --tokens must be >= 1"),
    (["--out", "/nonexistent/x.json"], "--out: folder /nonexistent does not exist"),
])
def test_cpu_limits_bad_input_exits_2(tmp_path, args, message):
    done = run_benchmark("cpu_limits.py", *args, tmp_path=tmp_path, check=False)
    assert done.returncode == 2 and message in done.stderr


def test_amx_peaks_where_the_tiles_run():
    """The prefill's AMX ceilings: a sixth of the tiles' rate, and a product through them that
    cannot beat that ceiling by much; nothing where the library has no tiles."""
    from xlstm_metal.kernels.cpu import decode_step

    lib = decode_step.library()
    peaks = cpu_limits.amx_gflops(2, n=256, repeats=2)
    if lib is None or not lib.xl_amx_available():
        assert peaks == {}
        return
    assert set(peaks) == {"amx_tiles_peak_div6_x2", "amx_sgemm_256"}
    assert peaks["amx_tiles_peak_div6_x2"] > 0 and 0 < peaks["amx_sgemm_256"] < 1.5 * peaks["amx_tiles_peak_div6_x2"]
