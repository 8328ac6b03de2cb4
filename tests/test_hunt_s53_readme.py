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
