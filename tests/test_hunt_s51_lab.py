"""Session 51's hunt in the architecture lab: wirings that did not compute what their spec says,
MAD data and scores, evolution and its outputs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import yaml

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


def test_an_arch_files_relative_block_spec_path_is_read_beside_it(tmp_path, monkeypatch):
    # It was read from the working directory: not found there, or another file of that name.
    from xlstm_metal.lab import load_arch

    block = {"name": "mine", "params": {"dim": 8}, "cells": {"a": {"type": "linear_projection", "dim": "$dim"}}}
    decoy = {"name": "decoy", "params": {"dim": 8}, "cells": {"b": {"type": "rmsnorm", "dim": "$dim"}}}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "block.yaml").write_text(yaml.safe_dump(block))
    (tmp_path / "runs" / "arch.yaml").write_text(yaml.safe_dump({"name": "a", "blocks": ["block.yaml", "mlstm"]}))
    monkeypatch.chdir(tmp_path)
    arch = load_arch("runs/arch.yaml")
    assert arch["blocks"][0]["spec"]["name"] == "mine" and arch["blocks"][1]["spec"]["name"] == "mlstm"
    (tmp_path / "block.yaml").write_text(yaml.safe_dump(decoy))  # one of that name in the working directory
    assert load_arch("runs/arch.yaml")["blocks"][0]["spec"]["name"] == "mine"
    assert load_arch(str(tmp_path / "runs" / "arch.yaml"))["blocks"][0]["spec"]["name"] == "mine"
