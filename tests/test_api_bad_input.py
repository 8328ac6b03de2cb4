import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model

import xlstm_metal  # noqa: F401  (BLAS preload)
from xlstm_metal import connectors, judge
from xlstm_metal.config_2024 import xLSTMLMConfig
from xlstm_metal.generation import DEFAULT_MODEL_DIR, Tokenizer
from xlstm_metal.generation.tokenizer import TokenizerError
from xlstm_metal.lab import WiredBlock, mad
from xlstm_metal.lab.cells import build_cell
from xlstm_metal.lab.evolve import evolve
from xlstm_metal.lab.model import LabConfig, LabModel, build_model
from xlstm_metal.models.xlstm_2024 import create_xlstm_model
from xlstm_metal.quantization import fidelity

LP = {"type": "linear_projection", "dim": 4}
M = {"mlstm_block": {}}
S = {"slstm_at": [0]}


def test_to_mlx():
    assert connectors.to_mlx(np.arange(3, dtype=np.int32)).tolist() == [0, 1, 2]  # raised TypeError
    with pytest.raises(ValueError, match="unknown dtype 'foo'"):
        connectors.to_mlx(np.zeros(2, np.float32), dtype="foo")
    with pytest.raises(TypeError, match="holds no numbers"):
        connectors.to_mlx(np.array(["a"]))


@pytest.mark.parametrize("section, message", [
    ({"mlstm_block": {"mlstm": {"num_heads": 2.0}}}, "mlstm_block.mlstm.num_heads must be an integer"),
    ({"mlstm_block": {"mlstm": {"proj_factor": -2}}}, "proj_factor and round_proj_up_to_multiple_of must be > 0"),
    ({**M, "dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ({"slstm_block": {"slstm": {"conv1d_kernel_size": -1}}, **S}, "conv1d_kernel_size must be >= 0"),
    ({"slstm_block": {"feedforward": {"ff_type": "moe"}}, **S}, "only 'ffn_gated'"),
])
def test_2024_config(section, message):
    with pytest.raises(ValueError, match=message):
        xLSTMLMConfig.from_dict({"vocab_size": 10, "embedding_dim": 64, "num_blocks": 1, **section})


@pytest.mark.parametrize("signature", [(1.5, 1), 3])
def test_create_xlstm_model_signature(signature):
    with pytest.raises(ValueError, match="signature must be"):
        create_xlstm_model(97, 2, signature=signature, inp_dim=64, head_dim=16)


def test_tokenizer():
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    for ids, error in (("12", TypeError), ([3.5], ValueError)):
        with pytest.raises(error, match="token ids must be"):
            tok.decode(ids)
    with pytest.raises(ValueError, match="integers >= 0"):
        tok.detokenizer().add(-1)


def test_tokenizer_force_bos_flag_must_be_a_bool(tmp_path):
    # "false" read as true: every prompt got a BOS (add_bos_token had this check already)
    (tmp_path / "tokenizer.json").write_bytes((DEFAULT_MODEL_DIR / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text('{"force_bos_token_insert": "false"}')
    with pytest.raises(TokenizerError, match=r"force_bos_token_insert in .*config.json must be true or false"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("call, message", [
    (lambda m: judge.distinct_n(["a", "b"], 0), "n must be an integer >= 1"),
    (lambda m: judge.repeated_ngram_share("a b a", 1), "got a str"),
    (lambda m: judge.token_logprobs(m, [1], [500]), r"in \[0, 97\), got 500"),
    (lambda m: judge.judge(m, None, ["text"]), "a record needs a string 'text'"),
    (lambda m: fidelity(m, m, [1, 500]), r"ids must be token ids in \[0, 97\)"),
    (lambda m: fidelity(m, m, [1, 2, 3], piece=-1), "piece must be a positive integer"),
])
def test_judge_and_fidelity(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call(tiny_model())


@pytest.mark.parametrize("call, message", [
    (lambda: build_cell("soft_cap_gate", {"dim": 4, "cap": 0}), "'cap' must be a finite number > 0"),
    (lambda: build_cell("rmsnorm", {"dim": 4, "eps": -1}), "'eps' must be a finite number > 0"),
    (lambda: WiredBlock({"cells": {"a": LP, "b": {**LP, "share": {"cell": "a", "featurs": 2}}},
                         "connections": [{"from": "a", "to": "b"}]}), "share must be"),
    (lambda: WiredBlock({"params": {"sw": False}, "cells": {"a": LP}, "connections": [{"from": "a", "to": "out.y"}]},
                        {"sw": "yes_please"}), "'sw' is a switch: give true or false"),
    (lambda: WiredBlock({"cells": {"a": LP, "b": LP}, "connections": [{"from": "a", "to": "b", "density": True}]}),
     "density must be in"),
    (lambda: WiredBlock({"params": {"width": 4}, "cells": {"a": LP}, "connections": [{"from": "a", "to": "out.y"}]},
                        {"widht": 8}), r"wiring: unknown param\(s\) widht; it takes width$"),  # was ignored
    (lambda: build_model({"blocks": [{"spec": "mlstm", "params": {"num_head": 2}}]}, vocab_size=8, embedding_dim=16),
     r"block 0 \(mlstm\): unknown param\(s\) num_head; it takes chunk_size"),
    (lambda: mad.run_task("swiglu-only", "nope"), "unknown MAD task 'nope'"),
    (lambda: mad.run_task("swiglu-only", "compression", "huge"), "unknown preset 'huge'"),
    (lambda: mad.run_task("swiglu-only", "compression", epochs=0), "epochs must be a positive integer"),
    (lambda: mad.generate(mad.PRESETS["tiny"].task("compression"), 0, 0, True), "num must be a positive"),
    (lambda: mad.Preset("p", 16, 2, 0, 1, 1e-3), "batch_size must be a positive integer"),
    (lambda: mad.generate(mad.Preset("p", 16, 2, 4, 1, 1e-3, task_overrides={"selective_copying": {"vocab_size": 2}})
                          .task("selective_copying"), 2, 0, True), "selective_copying: no instance can be made"),
    (lambda: mad.generate(mad.Preset("p", 16, 2, 4, 1, 1e-3, task_overrides={"memorization": {"seq_len": 31}})
                          .task("memorization"), 2, 0, True), "seq_len must be even"),
    (lambda: mad.Preset("p", 16, 2, 4, 1, 0.0), "lr must be a finite number > 0"),
    (lambda: mad.Preset("p", 16, 2, 4, 1, 1e-3, task_overrides={"compression": {"seq_lenn": 8}}).task("compression"),
     r"unknown setting\(s\) \['seq_lenn'\]"),
    (lambda: evolve(dict, budget=10**9, start=["mlstmm"]), "start architecture 'mlstmm'"),
    (lambda: evolve(dict, budget=10**9, generations=0), "generations must be at least 1"),
])
def test_lab(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_lab_block_defaults_and_dim_go_only_where_a_spec_declares_them():
    """Undeclared parameters are refused (above), so what the model adds by itself goes only to the
    blocks that take it: evolve's num_heads skips a gated conv, and a spec of fixed sizes gets no dim."""
    config = LabConfig.from_arch({"blocks": ["gated_conv", "mlstm"]}, vocab_size=8, embedding_dim=16,
                                 block_defaults={"num_heads": 2, "kernel_size": 3})
    assert "num_heads" not in config.blocks[0]["params"] and config.blocks[0]["params"]["kernel_size"] == 3
    assert config.blocks[1]["params"] == {"num_heads": 2}
    assert LabModel(config).blocks[1].resolved.params["num_heads"] == 2
    fixed = {"name": "fixed", "cells": {"a": {"type": "linear_projection", "dim": 16}},
             "connections": [{"from": "in.x", "to": "a"}, {"from": "a", "to": "out.y"}]}
    model = LabModel(LabConfig(vocab_size=8, embedding_dim=16, blocks=[{"spec": fixed, "params": {}}]))
    logits, _ = model(mx.zeros((1, 3), dtype=mx.int32))
    assert logits.shape == (1, 3, 8)


def test_a_failed_hub_download_is_one_line(monkeypatch):
    # huggingface_hub's offline message spans lines; the CLI printed them as they came
    import huggingface_hub

    from xlstm_metal.errors import CheckpointError
    from xlstm_metal.loading import resolve_model_path

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Got: ConnectError\nAn error happened.\nPlease check.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError) as info:
        resolve_model_path("no-such-org/no-such-model")
    assert "\n" not in str(info.value)
    assert "LocalEntryNotFoundError: Got: ConnectError An error happened. Please check." in str(info.value)


_OUTSIDE_SCRIPT = r"""
import sys, json
sys.path.insert(0, sys.argv[1])
import xlstm_metal
import mlx.core as mx, mlx.nn as nn, numpy as np
from conftest import tiny_model
from xlstm_metal.cells.embedding import embed_tokens

report = {}
for name in ("float", "quantized"):
    model = tiny_model(seed=5)  # vocabulary 97
    if name == "quantized":
        nn.quantize(model, group_size=32, bits=8)
    clean, _ = model(mx.array([[1, 2, 3], [4, 5, 6]]), None)
    bad, _ = model(mx.array([[1, 2, 3], [4, 5, 10**6]]), None)  # MLX's gather: a segmentation fault
    edge, _ = model(mx.array([[-1], [97]]), None)  # MLX's gather: another row's values, silently
    report[name] = {
        "row0_equal": bool(np.array_equal(np.array(clean[0]), np.array(bad[0]))),
        "row1_last_nan": bool(np.isnan(np.array(bad[1, 2])).all()),
        "edge_nan": bool(np.isnan(np.array(edge)).all()),
    }
print(json.dumps(report))
"""


def test_ids_outside_the_vocabulary_give_nan_not_a_crash(tmp_path):
    # The forward cannot refuse them without a host sync: the rows they touch come out NaN (in a
    # process of its own: on the old code MLX's gather ended the process with a segfault).
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "outside.py"
    script.write_text(_OUTSIDE_SCRIPT)
    env = {**__import__("os").environ, "XLSTM_METAL_CPU_STEP": "0", "XLSTM_METAL_CPU_PREFILL": "0"}
    proc = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"row0_equal": True, "row1_last_nan": True, "edge_nan": True}
    assert report == {"float": expected, "quantized": expected}


@pytest.mark.parametrize("chunk_size", [-1, 2.5, True])
def test_lab_prefill_chunk_size_is_checked(chunk_size):
    # -1 ran no piece and failed with "'NoneType' object is not subscriptable"
    model = build_model("hybrid", vocab_size=16, embedding_dim=16)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer, or None \(or 0\) for the "
                                         f"default, got {chunk_size!r}"):
        model.prefill(mx.array([[1, 2, 3]]), chunk_size=chunk_size)
    logits, _ = model.prefill(mx.array([[1, 2, 3]]), chunk_size=2)
    whole, _ = model.prefill(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 16) and np.allclose(np.array(logits), np.array(whole), atol=1e-5)


@pytest.mark.parametrize("chunk_size", [-1, 2.5, True])
def test_prefill_chunk_size_is_checked(chunk_size):
    # -1 ran no piece: "cannot access local variable 'dtype'"; 2.5 a TypeError from range()
    model = tiny_model(seed=2)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer, or None \(or 0\) for the "
                                         f"default, got {chunk_size!r}"):
        model.prefill(mx.array([[1, 2, 3]]), chunk_size=chunk_size)


@pytest.mark.parametrize("arch", ["linear_recurrence", "xlstm_large_block", "hybrid"])
def test_lab_state_of_another_batch_size_is_refused(arch):
    # a batch-1 prompt against a batch-2 state broadcast silently (a batch-2 result)
    model = build_model(arch, vocab_size=16, embedding_dim=16)
    _, state = model(mx.array([[1, 2, 3], [4, 5, 6]]))
    with pytest.raises(ValueError, match=r"state\[0\] holds an array of shape \(2, .*not for input_ids' batch of 1"):
        model(mx.array([[7]]), state)
    logits, state = model(mx.array([[7], [8]]), state)  # its own batch size still runs
    assert logits.shape == (2, 1, 16)
