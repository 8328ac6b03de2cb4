"""Session 52's hunt in the architecture lab: specs a user writes from the README that were
misread or failed as tracebacks, and WiredBlock calls that failed deep inside the block."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest
import yaml

import xlstm_metal  # noqa: F401  (BLAS preload before mlx work)
from xlstm_metal.lab import WiredBlock, WiringError, load_arch


def _one(cell: dict) -> dict:
    return {"cells": {"a": cell}}


def test_a_key_given_twice_in_a_yaml_or_json_spec_is_refused(tmp_path):
    # The parsers kept the last one: the first cell a (a projection) was dropped without a word.
    from xlstm_metal.lab.spec import parse_text

    text = "cells:\n  a: {type: linear_projection, dim: 4}\n  a: {type: rmsnorm, dim: 4}\n"
    with pytest.raises(WiringError, match=r"s.yaml .*line 3, column 3: duplicate key 'a' \(first at line 2\)"):
        parse_text(text, "s.yaml")
    with pytest.raises(WiringError, match=r"duplicate key 'dim'"):
        parse_text("cells:\n  a: {type: rmsnorm, dim: 4, dim: 8}\n", "s.yml")
    with pytest.raises(WiringError, match=r"s.json: duplicate key 'a'"):
        parse_text('{"cells": {"a": {"type": "rmsnorm", "dim": 4}, "a": {"type": "sum", "dim": 4}}}', "s.json")
    merged = parse_text("b: &b {type: rmsnorm, dim: 4}\nc: {<<: *b, dim: 8}\n", "m.yaml")  # a merge overrides
    assert merged["c"] == {"type": "rmsnorm", "dim": 8}
    (tmp_path / "arch.yaml").write_text("name: x\nblocks: [mlstm]\nblocks: [swiglu, swiglu]\n")
    with pytest.raises(WiringError, match="duplicate key 'blocks'"):
        load_arch(str(tmp_path / "arch.yaml"))


@pytest.mark.parametrize("cell,named", [
    ({"type": "linear_projection", "dim": 4, "bias": "no"}, "'bias' is a switch"),  # "no" was true
    ({"type": "rmsnorm", "dim": 4, "force_float32": "no"}, "'force_float32' is a switch"),
    ({"type": "layernorm", "dim": 4, "bias": 1}, "'bias' is a switch"),
    ({"type": "linear_projection", "dim": 3_000_000_000}, "a size is at most 2,147,483,647"),  # OverflowError
    ({"type": "gated_projection", "dim": 4, "proj_factor": math.nan}, "'proj_factor' must be a finite"),  # ValueError
    ({"type": "gated_projection", "dim": 4, "proj_factor": math.inf}, "'proj_factor' must be a finite"),
    ({"type": "exponential_gate", "dim": 4, "max_log": math.nan}, "'max_log' must be a finite"),  # NaN outputs
    ({"type": "linear_projection", "dim": 4, "init_std": math.nan}, "'init_std' must be a finite"),
    ({"type": "linear_projection", "dim": 4, "bias": True, "bias_init": "x"}, "'bias_init' must be a finite"),
    ({"type": "linear_projection", "dim": 4, "bias": True, "bias_init": [1, 2, 3]}, r"a number or \[low, high\]"),
    ({"type": "softmax_attention", "num_heads": 1, "qk_dim": 4, "rope": "false"}, "'rope' is a switch"),
    ({"type": "softmax_attention", "num_heads": 1, "qk_dim": 4, "rope_base": -5}, "'rope_base' must be a finite"),
])
def test_a_cells_switches_sizes_and_numbers_are_checked(cell, named):
    from xlstm_metal.lab import build_cell

    params = {k: v for k, v in cell.items() if k != "type"}
    with pytest.raises(WiringError, match=f"cell 'a': .*{named}"):
        WiredBlock(_one(cell))
    with pytest.raises(ValueError, match=named):
        build_cell(cell["type"], params)


def test_the_checked_values_still_build():
    for cell in ({"type": "linear_projection", "dim": 4, "bias": True, "bias_init": [3, 6], "init_std": 0},
                 {"type": "gated_projection", "dim": 4, "proj_factor": 1.5}, {"type": "rmsnorm", "dim": 4}):
        y, _ = WiredBlock(_one(cell))(mx.ones((1, 2, 4)))
        assert y.shape == (1, 2, 4)


@pytest.mark.parametrize("name", ["in.q", "out.proj"])
def test_a_cell_named_under_in_or_out_is_refused(name):
    # Such a cell could not be connected: `to: in.q` read as the wiring's input q ("'in' can only
    # be a connection's from").
    spec = {"cells": {"a": {"type": "linear_projection", "dim": 4}, name: {"type": "sum", "dim": 4}},
            "connections": [{"from": "in", "to": "a"}, {"from": "a", "to": name}]}
    with pytest.raises(WiringError, match=f"cell name '{name}': '{name[:name.index('.')]}' is reserved"):
        WiredBlock(spec)


def test_a_cell_that_reaches_no_output_is_refused():
    # b was built, counted in the parameters and never trained, without a word.
    cells = {"a": {"type": "linear_projection", "dim": 4}, "b": {"type": "linear_projection", "dim": 4}}
    spec = {"cells": cells, "connections": [{"from": "in", "to": "a"}, {"from": "in", "to": "b"}]}
    with pytest.raises(WiringError, match="cell\\(s\\) 'a' reach no output"):
        WiredBlock(spec)
    cells["b"]["share"] = "a"  # a's weight is what b reads: a is used
    assert WiredBlock(spec).cell_names == ["a", "b"]


def test_an_arch_with_an_unknown_key_is_refused(tmp_path):
    # `tie_word_embedding: true` (a misspelt option) built an untied model without a word.
    from xlstm_metal.lab import training_model

    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"blocks": ["swiglu"], "tie_word_embedding": True}))
    with pytest.raises(WiringError, match="unknown architecture key\\(s\\) tie_word_embedding; .*tie_word_embeddings"):
        load_arch(str(tmp_path / "a.yaml"))
    with pytest.raises(WiringError, match="vocab_size must be a positive integer, got 0"):  # 0 took the default
        training_model({"blocks": ["swiglu"], "embedding_dim": 16, "vocab_size": 0}, 300)
    assert training_model({"blocks": ["swiglu"], "embedding_dim": 16}, 300).config.vocab_size == 320


def test_a_wired_blocks_inputs_and_state_are_checked():
    spec = {"inputs": {"x": 4, "z": 4}, "cells": {"g": {"type": "sigmoid_gate", "dim": 4}},
            "connections": [{"from": "in.x", "to": "g.x"}, {"from": "in.z", "to": "g.gate"}]}
    block = WiredBlock(spec)
    x = mx.ones((1, 3, 4))
    for bad, named in [(x, "several inputs \\(x, z\\): pass a dict"), ({"x": x}, "missing z"),  # KeyError
                       ({"x": x, "z": x, "q": x}, "no input port q"),  # ignored
                       ({"x": x, "z": x[:, :2]}, "one batch and sequence length"),
                       ({"x": mx.ones((1, 3, 5)), "z": mx.ones((1, 3, 5))}, "'x' must be an array \\[B, S, 4\\]")]:
        with pytest.raises(ValueError, match=named):
            block(bad)
    assert block({"x": x, "z": x})[0]["y"].shape == (1, 3, 4)
    conv = WiredBlock(_one({"type": "causal_convolution", "dim": 4}))
    with pytest.raises(ValueError, match="a tuple of 1 arrays \\(make_state\\), got 2 arrays"):
        conv(x, conv.make_state(1) * 2)


@pytest.mark.parametrize("block,named", [
    ({"spec": "mlstm", "params": {"conv_kernel_size": 0}}, r"block 0 \(mlstm\): conv_kernel_size 0 \(the genome's"),
    ({"spec": "slstm_2024_block", "params": {"feedforward": True}}, "feedforward True"),
    ({"spec": {"name": "mlstm", "params": {"dim": 8}, "cells": {"a": {"type": "rmsnorm", "dim": "$dim"}}}},
     "named 'mlstm' but is not the shipped 'mlstm'"),  # a KeyError traceback
])
def test_a_start_block_the_genome_cannot_hold_is_refused(block, named):
    # The first two were scored as the genome's block (conv 4, no feed-forward), without a word.
    from xlstm_metal.lab.genome import genome_of

    with pytest.raises(ValueError, match=named):
        genome_of(load_arch({"blocks": [block, "swiglu"]}))
    assert genome_of(load_arch("slstm"))[0] == (5, 2, 0, 0, 0)
