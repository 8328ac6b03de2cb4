"""`xlstm-metal train` end to end: run, export, resume, fine-tune, 2024 xLSTM, bad input; the shipped model."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import xlstm_metal
from xlstm_metal.cli import main
from xlstm_metal.loading import load_model, read_weights

SENTENCES = [
    "The interpreter reads a line of input and executes it.",
    "A list is a mutable sequence of items, written between square brackets.",
    "Functions are defined with the def keyword, followed by the name and the parameters.",
    "A dictionary maps keys to values; keys must be hashable.",
    "Exceptions are raised with the raise statement and handled by try and except.",
    "Modules are files containing Python definitions and statements.",
]


def make_corpus(root, seed=0):
    """A directory with text files and a JSON Lines file of English-like sentences."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    (root / "sub").mkdir()
    for i in range(3):
        text = "\n".join(" ".join(rng.choice(SENTENCES, 4)) for _ in range(40))
        (root / f"doc{i}.txt").write_text(text)
    with open(root / "sub" / "records.jsonl", "w") as fh:
        for _ in range(30):
            fh.write(json.dumps({"text": " ".join(rng.choice(SENTENCES, 5)), "id": 1}) + "\n")
    return root


BASE = ["--config", "tiny", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--warmup", "2",
        "--log-every", "1", "--lr", "3e-3", "--no-progress", "--val-fraction", "0.1"]


def override(args, *pairs):
    """``args`` with each ``FLAG VALUE`` of ``pairs`` in place of that flag's value there (or
    added): a command line gives an option once (a repeat is refused)."""
    args = list(args)
    for flag, value in zip(pairs[::2], pairs[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 12-step run with checkpoints at 6 and 12 and an export."""
    tmp = tmp_path_factory.mktemp("cli")
    corpus = make_corpus(tmp / "corpus")
    out, export = tmp / "run", tmp / "export"
    rc = main(["train", str(corpus), "--out", str(out), *BASE, "--steps", "12", "--eval-every", "6",
               "--save-every", "6", "--keep", "3", "--export", str(export)])
    assert rc == 0
    return tmp, corpus, out, export


def test_train_run_writes_checkpoints_metrics_and_export(trained):
    tmp, corpus, out, export = trained
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint-0000006", "checkpoint-0000012", "loss.png", "metrics.jsonl", "summary.json"]
    assert sorted(p.name for p in (out / "checkpoint-0000012").iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "tokenizer.json", "tokenizer_config.json",
        "trainer_state.json", "xlstm_mlx_lm.py"]
    losses = [loss for _, loss in train_losses(out)]
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.0
    summary = json.loads((out / "summary.json").read_text())
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [6, 12]
    assert summary["best_val_loss"] == min(e["val_loss"] for e in evals)
    assert evals[0]["val_ppl"] == pytest.approx(math.exp(evals[0]["val_loss"]))

    # The export is the best-validation checkpoint's weights, loadable with its tokenizer.
    model, tokenizer = xlstm_metal.load(export)
    best = read_weights(out / f"checkpoint-{summary['best_step']:07d}")
    exported = read_weights(export)
    assert exported.keys() == best.keys()
    for k in best:
        np.testing.assert_array_equal(np.array(exported[k]), np.array(best[k]), err_msg=k)
    ids = tokenizer.encode("A list is a mutable sequence")
    assert tokenizer.decode(ids[1:] if ids[0] == tokenizer.bos_token_id else ids) == "A list is a mutable sequence"
    gen = json.loads((export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 0
    # The export opens in transformers: strict config, and AutoTokenizer adds BOS as we do.
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(export).model_type == "xlstm"
    assert AutoTokenizer.from_pretrained(export)("A list").input_ids == tokenizer.encode("A list")
    assert tokenizer.encode("A list")[0] == tokenizer.bos_token_id


def test_cli_resume_continues_exactly(trained):
    tmp, corpus, out, _ = trained
    import shutil

    resumed = tmp / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-0000012")  # as if the run died after step 6's checkpoint
    assert main(["train", "--out", str(resumed), "--resume", "--no-progress"]) == 0  # data from the checkpoint
    assert train_losses(resumed) == train_losses(out)


def test_memory_limit_is_set_for_the_run(tmp_path, monkeypatch):
    """--memory-limit GB: MLX's memory limit while the run trains (a run-time setting; the job's
    memory watchdog puts back the limit it found when the command ends)."""
    corpus = make_corpus(tmp_path / "corpus")
    calls = []
    original = mx.set_memory_limit

    def recording(limit):
        calls.append(limit)
        return original(limit)

    monkeypatch.setattr(mx, "set_memory_limit", recording)
    assert main(["train", str(corpus), "--out", str(tmp_path / "run"), *override(BASE, "--warmup", "1"), "--steps", "2",
                 "--eval-every", "2", "--memory-limit", "3.5"]) == 0
    assert 3_500_000_000 in calls
    assert (tmp_path / "run" / "checkpoint-0000002").is_dir()


def test_fine_tune_from_export(trained, tmp_path):
    tmp, corpus, out, export = trained
    run = tmp_path / "ft"
    assert main(["train", str(corpus), "--out", str(run), "--init-from", str(export), "--seq-len", "32",
                 "--batch-size", "4", "--steps", "3", "--warmup", "1", "--log-every", "1", "--no-progress",
                 "--val-fraction", "0.1", "--eval-every", "3"]) == 0
    fresh_first = train_losses(out)[0][1]
    assert train_losses(run)[0][1] < fresh_first - 1.0  # starts from the trained weights
    assert (run / "checkpoint-0000003" / "tokenizer.json").read_text() == (export / "tokenizer.json").read_text()


def test_train_2024_xlstm_from_config(tmp_path):
    config = {"embedding_dim": 32, "num_blocks": 2, "slstm_at": [1], "context_length": 32,
              "mlstm_block": {"mlstm": {"num_heads": 2}},
              "slstm_block": {"slstm": {"num_heads": 2}, "feedforward": {"proj_factor": 1.3}}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    args = [a for a in BASE if a not in ("--config", "tiny")]
    # Short sequences: the sLSTM recurrence is a loop over time, compiled for CPU per length.
    args = override(args, "--seq-len", "8", "--batch-size", "8", "--lr", "1e-2")
    assert main(["train", str(corpus), "--out", str(run), *args, "--config", str(tmp_path / "cfg.json"),
                 "--steps", "8", "--eval-every", "8"]) == 0
    losses = [loss for _, loss in train_losses(run)]
    assert np.mean(losses[-2:]) < losses[0] - 0.5
    model = load_model(run / "checkpoint-0000008")
    assert type(model).__name__ == "xLSTMLMModel" and model.config.slstm_at == [1]


def test_val_fraction_zero_trains_on_everything_without_validation(trained, tmp_path, capsys):
    """--val-fraction 0 was refused ("validation split has 0 tokens"); it means no validation split."""
    tmp, corpus, reference, _ = trained
    out, export = tmp_path / "run", tmp_path / "export"
    args = [a if a != "0.1" else "0" for a in BASE]
    assert main(["train", str(corpus), "--out", str(out), *args, "--steps", "6", "--eval-every", "2",
                 "--save-every", "2", "--keep", "2", "--export", str(export)]) == 0
    err = capsys.readouterr().err
    assert "--val-fraction 0: no validation split" in err and "no validation split; checkpoint" in err
    assert f"exported the final step-6 model to {export}" in err
    summary = json.loads((out / "summary.json").read_text())
    split = json.loads((reference / "summary.json").read_text())
    assert summary["val_tokens"] == 0 and summary["train_tokens"] == split["train_tokens"] + split["val_tokens"]
    assert summary["best_val_loss"] is None and summary["best_val_ppl"] is None and summary["best_step"] is None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 7))
    assert all(r["kind"] == "train" and math.isfinite(r["loss"]) for r in records)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000004", "checkpoint-0000006"]
    last, exported = read_weights(out / "checkpoint-0000006"), read_weights(export)
    assert all(np.array_equal(np.array(last[k]), np.array(exported[k])) for k in last)
    # The run resumes as any other (its saved fraction, 0, splits the same way).
    assert main(["train", "--out", str(out), "--resume", "--steps", "8", "--no-progress"]) == 0
    assert (out / "checkpoint-0000008").is_dir()


@pytest.mark.parametrize("case", ["empty_dir", "binary", "seq_len", "vocab", "jsonl_field", "not_empty_out",
                                  "memory_limit"])
def test_bad_input_exits_2_without_checkpoint(case, tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = ["train", str(corpus), "--out", str(out), *override(BASE, "--warmup", "1"), "--steps", "2"]
    if case == "empty_dir":
        (tmp_path / "empty").mkdir()
        args[1], expected = str(tmp_path / "empty"), "holds no files"
    elif case == "binary":
        (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
        expected = "image.png looks binary"
    elif case == "seq_len":
        args = override(args, "--seq-len", "1")
        expected = "sequence length must be >= 2"
    elif case == "vocab":
        (tmp_path / "small.json").write_text(json.dumps({"embedding_dim": 64, "num_heads": 2, "num_blocks": 1,
                                                         "vocab_size": 128}))
        args = override(args, "--config", str(tmp_path / "small.json"))
        expected = "vocab_size (128) is smaller than the tokenizer's vocabulary"
    elif case == "jsonl_field":
        args += ["--text-field", "body"]
        expected = "record has no 'body' field"
    elif case == "memory_limit":
        args += ["--memory-limit", "0"]
        expected = "--memory-limit must be a positive number of GB, got 0"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = "is not empty"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "xlstm-metal: error:" in err and expected in err, err
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    assert leftovers in ([], ["notes.txt"])  # nothing written, the user's file untouched


# ------------------------------------------------------------------------------ shipped model
def test_default_model_is_small_and_has_learnt_english():
    from xlstm_metal.assets import default_model_path

    path = default_model_path()
    files = sorted(p.name for p in path.iterdir() if not p.name.startswith("_"))
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "xlstm_mlx_lm.py"]
    assert sum(p.stat().st_size for p in path.iterdir()) <= 10 * 1024**2
    model, tokenizer = xlstm_metal.load(path, dtype="float32")
    assert type(model).__name__ == "xLSTMLarge" and model.config.vocab_size == 4096
    text = ("The for statement in Python differs a bit from what you may be used to in C. Rather than "
            "always iterating over an arithmetic progression of numbers, it iterates over the items of "
            "any sequence, such as a list or a string, in the order that they appear in the sequence.")
    ids = mx.array([tokenizer.encode(text)])
    logits, _ = model(ids[:, :-1])
    loss = nn.losses.cross_entropy(logits.astype(mx.float32), ids[:, 1:], reduction="mean").item()
    assert loss < 4.0, loss  # uniform guessing: ln(4096) = 8.3; the shipped model: ~2-3 on such text


def test_fine_tune_from_quantized_checkpoint_trains_float_weights(trained, tmp_path):
    """A quantized --init-from (the packaged model ships quantized) is fine-tuned dequantized:
    packed weights cannot be trained, so every layer must come back as float and change."""
    from mlx.utils import tree_flatten

    from xlstm_metal.loading import save_model
    from xlstm_metal.quantization import dequantize_model, quantize_model

    tmp, corpus, out, export = trained
    model = load_model(export, dtype="float32")
    quantize_model(model, bits=8, group_size=32)
    qdir = tmp_path / "quantized"
    save_model(model, qdir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (qdir / name).write_text((export / name).read_text())
    saved = json.loads((qdir / "config.json").read_text())
    assert "quantization" in saved or "quantization_config" in saved
    run = tmp_path / "ft"
    assert main(["train", str(corpus), "--out", str(run), "--init-from", str(qdir), "--seq-len", "32",
                 "--batch-size", "4", "--steps", "2", "--warmup", "1", "--log-every", "1", "--no-progress",
                 "--val-fraction", "0.1", "--eval-every", "2"]) == 0
    start = dequantize_model(load_model(qdir, dtype="float32"))
    weights = read_weights(run / "checkpoint-0000002")
    assert not any(k.endswith((".scales", ".biases")) for k in weights)
    q_key = "backbone.blocks.0.mlstm_layer.q.weight"
    before = np.array(dict(tree_flatten(start.parameters()))[q_key])
    after = np.array(weights[q_key])
    assert after.shape == before.shape and after.dtype == np.float32
    assert not np.allclose(after, before)  # the q projection was trained, not frozen


@pytest.mark.parametrize("c_code", [True, False], ids=["c-paths", "no-c-paths"])
def test_default_model_ships_quantized_and_runs_quantized_where_c_reads_it(monkeypatch, c_code):
    """On a CPU the packaged model stays quantized where the C step and prefill read its packed
    weights, and is dequantized to float32 where MLX's (slower) quantized matmul would run."""
    from mlx.utils import tree_flatten

    from xlstm_metal import _blas
    from xlstm_metal.assets import default_model_path, for_this_device
    from xlstm_metal.kernels.cpu import decode_step, prefill
    from xlstm_metal.quantization import quantization_config

    path = default_model_path()
    config = json.loads((path / "config.json").read_text())
    q = config.get("quantization") or config["quantization_config"]
    assert q["bits"] == 4 and q["group_size"] == 64 and q["backbone.embeddings"]["bits"] == 6
    model, tokenizer = xlstm_metal.load(path, dtype="float32")
    assert quantization_config(model) is not None
    ids = mx.array([tokenizer.encode("A dictionary maps keys to values.")])
    quantized_logits, _ = model(ids)
    monkeypatch.setattr(decode_step, "ENABLED", c_code)
    kept = mx.default_device() != mx.cpu or (
        decode_step.unsupported_reason(model) is None and prefill.unsupported_reason(model) is None)
    if mx.default_device() == mx.cpu and decode_step.library() is not None and _blas.gemv_rows() \
            and _blas.openblas_sgemm() is not None:  # CI installs a compiler and OpenBLAS
        assert kept == c_code
    for_this_device(model)
    if kept:
        assert quantization_config(model) is not None
        assert isinstance(model.backbone.embeddings, nn.QuantizedEmbedding)
    else:
        assert quantization_config(model) is None
        assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
        assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.parameters()))
    logits, _ = model(ids)
    a, b = np.array(logits), np.array(quantized_logits)
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
