"""README audit (session 53): claims checked against the code."""

import pytest

from cli_helpers import assert_rejected


@pytest.mark.parametrize("flag,value,message", [
    ("--grad-clip", "-1", "--grad-clip must be >= 0, got -1.0"),
    ("--weight-decay", "-0.5", "--weight-decay must be >= 0, got -0.5"),
    ("--lr", "0", "--lr must be > 0, got 0.0"),
    ("--min-lr-ratio", "2", "--min-lr-ratio must be in [0, 1], got 2.0"),
    ("--eval-every", "0", "--eval-every must be >= 1, got 0"),
])
def test_train_out_of_range_names_the_flag(flag, value, message, text_data, tmp_path, capsys):
    # README: bad input prints a message naming the problem; one joint message ("weight decay
    # and gradient clipping must be >= 0") left the user to guess which flag was wrong.
    out = tmp_path / "run"
    err = assert_rejected(["train", text_data, "--out", out, "--steps", "2", flag, value], capsys, message)
    assert err.count("must be") == 1, err  # only the bad one
    assert not out.exists()


def test_a_blas_setting_that_cannot_apply_is_warned_of(tmp_path):
    # README: XLSTM_METAL_BLAS picks another library, XLSTM_METAL_BLAS_THREADS sets its threads;
    # a path that does not load, or threads that are no positive integer, were ignored silently.
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("the preload runs on Linux only")
    env = dict(os.environ, XLSTM_METAL_BLAS=str(tmp_path / "missing.so"), XLSTM_METAL_BLAS_THREADS="two")
    env.pop("XLSTM_METAL_NO_OPENBLAS", None)
    err = subprocess.run([sys.executable, "-c", "import xlstm_metal"], env=env, capture_output=True, text=True,
                         timeout=120).stderr
    assert f"XLSTM_METAL_BLAS={tmp_path / 'missing.so'} could not be loaded" in err, err
    assert "XLSTM_METAL_BLAS_THREADS='two' is not a positive integer" in err, err


@pytest.mark.parametrize("value", ["3", "nan"])
def test_serve_refuses_a_default_temperature_no_request_may_send(value):
    # README: a request's temperature must be in [0, 2]; --temp 3 became every request's default.
    # (The check alone: the old code went on to serve.)
    from xlstm_metal.cli import UsageError, build_parser
    from xlstm_metal.cli.serve import _check

    with pytest.raises(UsageError, match=r"--temp must be in \[0, 2\]"):
        _check(build_parser().parse_args(["serve", "--temp", value]))
    _check(build_parser().parse_args(["serve", "--temp", "2"]))
