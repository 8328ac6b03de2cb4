"""Session 51's hunt in the architecture lab: wirings that did not compute what their spec says,
MAD data and scores, evolution and its outputs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import xlstm_metal  # noqa: F401  (BLAS preload before mlx work)
from xlstm_metal.lab import WiredBlock


# ------------------------------------------------------------------------------ wiring
def test_a_spec_connecting_out_itself_gets_no_second_implicit_output_connection():
    # Without declared outputs the last cell's output went to out.y a second time (y = 2 * b).
    spec = {"cells": {"a": {"type": "linear_projection", "dim": 4}, "b": {"type": "sum", "dim": 4}},
            "connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "out"}]}
    mx.random.seed(0)
    block = WiredBlock(spec)
    x = mx.random.normal((1, 3, 4))
    y, _ = block(x)
    want = block.cell("a")({"x": x})[0]["y"]
    assert len(block.synapses) == 3  # in.x -> a, a -> b, b -> out.y
    assert np.allclose(np.array(y), np.array(want), atol=1e-6)
