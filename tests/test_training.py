"""Training: data pipeline, loss falls, chunkwise-vs-parallel gradients, exact resume, checkpoints."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import xlstm_metal  # noqa: F401  (BLAS preload before mlx use)
from xlstm_metal.loading import load_model
from xlstm_metal.models.xlstm_large import xLSTMLarge
from xlstm_metal.training.checkpoint import checkpoint_dirs, read_trainer_state
from xlstm_metal.training.data import (
    DataError,
    PackedBatches,
    load_documents,
    split_stream,
    train_bpe_tokenizer,
    validation_windows,
)
from xlstm_metal.training.trainer import Trainer, TrainingConfig, init_xlstm_large, make_loss_fn

from conftest import tiny_config

V = 97


def pattern_stream(n: int, seed: int = 0) -> np.ndarray:
    """A learnable stream: runs counting up by a per-run step (next token mostly determined)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        start, step = rng.integers(3, V), rng.integers(1, 4)
        out.extend(3 + (start + step * np.arange(rng.integers(8, 24))) % (V - 3))
    return np.asarray(out[:n], dtype=np.int32)


def fresh_model(seed=0, **overrides) -> xLSTMLarge:
    model = xLSTMLarge(tiny_config(**overrides))
    init_xlstm_large(model, seed)
    return model


def small_cfg(**overrides) -> TrainingConfig:
    fields = dict(seq_len=32, batch_size=4, steps=40, lr=3e-3, warmup=5, eval_every=20, eval_batches=2,
                  save_every=1000, log_every=1, seed=0)
    fields.update(overrides)
    return TrainingConfig(**fields)


# ------------------------------------------------------------------------------ data
def test_packed_batches_are_shifted_windows_and_deterministic():
    stream = np.arange(1000, dtype=np.int32)
    a = PackedBatches(stream, seq_len=16, batch_size=3, seed=5)
    b = PackedBatches(stream, seq_len=16, batch_size=3, seed=5)
    seen = []
    for _ in range(a.batches_per_epoch() + 2):  # runs into the second epoch
        x, y = a.next()
        x2, y2 = b.next()
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one
        np.testing.assert_array_equal(np.diff(x, axis=1), 1)  # contiguous slices of the stream
        seen.append(x[:, 0])
    assert a.position.epoch == 1 and a.position.batch == 2
    first_epoch = np.concatenate(seen[: a.batches_per_epoch()])
    assert len(set(first_epoch.tolist())) == len(first_epoch)  # no window twice in an epoch
    # Resuming at a position gives the same batches as running there.
    c = PackedBatches(stream, seq_len=16, batch_size=3, seed=5)
    c.position.epoch, c.position.batch = 1, 1
    d = PackedBatches(stream, seq_len=16, batch_size=3, seed=5)
    for _ in range(d.batches_per_epoch(0) + 1):
        d.next()
    np.testing.assert_array_equal(c.next()[0], d.next()[0])


def test_split_holds_out_tail_and_windows():
    docs = [np.full(50, i, np.int32) for i in range(10)]
    train, val = split_stream(docs, 0.2, seed=0)
    assert len(train) == 400 and len(val) == 100
    assert sorted(np.unique(val).tolist()) != sorted(np.unique(train).tolist())
    w = validation_windows(val, 24)
    assert w.shape == (4, 25)
    with pytest.raises(DataError, match="validation split has 10 tokens"):
        validation_windows(val[:10], 24)


def test_bad_data_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no files"):
        load_documents([empty])
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="blob.bin looks binary"):
        load_documents([binary])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt is not UTF-8"):
        load_documents([latin])
    records = tmp_path / "d.jsonl"
    records.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: record has no 'text' field"):
        load_documents([records])
    with pytest.raises(DataError, match="not found"):
        load_documents([tmp_path / "missing.txt"])
    with pytest.raises(DataError, match="sequence length must be >= 2"):
        PackedBatches(np.arange(100, dtype=np.int32), seq_len=1, batch_size=2, seed=0)
    with pytest.raises(DataError, match="too few for one batch"):
        PackedBatches(np.arange(100, dtype=np.int32), seq_len=40, batch_size=4, seed=0)


def test_bpe_tokenizer_round_trips_text():
    texts = ["The quick brown fox jumps over the lazy dog. " * 20, "def f(x):\n    return x * 2\n" * 20]
    tok = train_bpe_tokenizer(texts, vocab_size=300, show_progress=False)
    assert tok.get_vocab_size() <= 300
    assert [tok.token_to_id(t) for t in ("<|bos|>", "<|pad|>", "<|eos|>")] == [0, 1, 2]
    sample = "Ünïcode and the lazy dog\n\treturn x"
    assert tok.decode(tok.encode(sample).ids) == sample
    assert len(tok.encode(texts[0]).ids) < len(texts[0]) / 2  # merges were learnt


# ------------------------------------------------------------------------------ gradients
def test_chunkwise_gradients_equal_parallel_gradients():
    chunked = fresh_model(seed=3, chunkwise_kernel="chunkwise", chunk_size=16)
    parallel = fresh_model(seed=3, chunkwise_kernel="parallel", chunk_size=16)
    rng = np.random.default_rng(0)
    # Gates away from their init so decay and input gating vary along the sequence.
    for model in (chunked, parallel):
        for block in model.blocks:
            layer = block.mlstm_layer
            layer.fgate_preact.weight = mx.array(rng.normal(0, 0.3, layer.fgate_preact.weight.shape).astype(np.float32))
            layer.igate_preact.weight = mx.array(rng.normal(0, 0.3, layer.igate_preact.weight.shape).astype(np.float32))
            layer.igate_preact.bias = mx.array(rng.uniform(-3, 3, layer.igate_preact.bias.shape).astype(np.float32))
        rng = np.random.default_rng(0)
    ids = mx.array(rng.integers(0, V, (2, 45)).astype(np.int32))  # 45: not a multiple of the chunk
    grads = []
    for model in (chunked, parallel):
        loss_fn = make_loss_fn(model, mx.float32)
        params = model.trainable_parameters()
        loss, g = mx.value_and_grad(loss_fn)(params, ids[:, :-1], ids[:, 1:])
        model.update(params)
        grads.append((loss.item(), dict(tree_flatten(g))))
    (loss_c, gc), (loss_p, gp) = grads
    assert loss_c == pytest.approx(loss_p, rel=1e-5)
    assert gc.keys() == gp.keys()
    for name in gc:
        a, b = np.array(gc[name]), np.array(gp[name])
        scale = max(np.abs(b).max(), 1e-6)
        assert np.abs(a - b).max() <= 2e-4 * scale + 1e-7, name
    # The recurrence's own parameters do get gradient (not a vacuous comparison).
    assert np.abs(np.array(gc["backbone.blocks.0.mlstm_layer.fgate_preact.weight"])).max() > 1e-6
    assert np.abs(np.array(gc["backbone.blocks.1.mlstm_layer.q.weight"])).max() > 1e-6


# ------------------------------------------------------------------------------ training
def test_loss_falls_on_learnable_task(tmp_path):
    model = fresh_model()
    stream = pattern_stream(6000)
    trainer = Trainer(model, stream[:5000], stream[5000:], small_cfg(steps=60, eval_every=60), tmp_path / "run",
                      tmp_path, progress=False)
    result = trainer.train()
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 60
    assert np.mean(losses[:5]) > math.log(V) - 0.5  # starts near uniform
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert result.evals[-1][1] < 0.6 * math.log(V)
    assert result.best_val_loss == min(v for _, v in result.evals)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 61))
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bfloat16_compute_keeps_float32_masters(tmp_path):
    model = fresh_model()
    stream = pattern_stream(3000)
    trainer = Trainer(model, stream[:2500], stream[2500:], small_cfg(steps=6, warmup=2, dtype="bfloat16", eval_every=6),
                      tmp_path / "run", tmp_path, progress=False)
    result = trainer.train()
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.parameters()))
    assert all(math.isfinite(v) for _, v in result.losses)
    assert result.losses[-1][1] < result.losses[0][1]


def test_resume_equals_uninterrupted(tmp_path):
    stream = pattern_stream(4000)
    cfg = small_cfg(steps=12, save_every=6, keep=5, eval_every=4)
    full = Trainer(fresh_model(), stream[:3500], stream[3500:], cfg, tmp_path / "full", tmp_path, progress=False)
    uninterrupted = full.train()
    middle = tmp_path / "full" / "checkpoint-0000006"
    assert [p.name for p in checkpoint_dirs(tmp_path / "full")] == ["checkpoint-0000006", "checkpoint-0000012"]
    assert read_trainer_state(middle)["data_position"] == {"epoch": 0, "batch": 6}

    # A new process would do this: model from the checkpoint, trainer restored from it.
    model = load_model(middle)
    resumed = Trainer(model, stream[:3500], stream[3500:], small_cfg(steps=12, save_every=6, keep=5, eval_every=4),
                      tmp_path / "full", tmp_path, progress=False)
    resumed.resume_from(middle)
    assert resumed.step == 6
    rest = resumed.train()
    assert [s for s, _ in rest.losses] == list(range(7, 13))
    assert rest.losses == uninterrupted.losses[6:]  # bit-for-bit equal losses
    assert rest.evals == [e for e in uninterrupted.evals if e[0] > 6]
    # metrics.jsonl: the records of steps 7-12 replaced, not duplicated.
    steps = [json.loads(l)["step"] for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_rotation_keeps_the_best_checkpoint(tmp_path):
    """--keep 1 removed every checkpoint but the newest, the best-validation one included. Here the
    model overfits a small training stream while the validation tokens are random, so the
    validation loss rises after the first evaluation: step 2 is the best."""
    val = np.random.default_rng(1).integers(3, V, 600).astype(np.int32)
    cfg = small_cfg(steps=12, eval_every=2, save_every=2, keep=1, lr=1e-2, warmup=1)
    trainer = Trainer(fresh_model(), pattern_stream(1000), val, cfg, tmp_path / "r", tmp_path, progress=False)
    result = trainer.train()
    losses = [loss for _, loss in result.evals]
    assert [s for s, _ in result.evals] == [2, 4, 6, 8, 10, 12] and losses == sorted(losses) and losses[0] < losses[-1]
    assert result.best_step == 2 and result.best_val_loss == losses[0]
    assert [p.name for p in checkpoint_dirs(tmp_path / "r")] == ["checkpoint-0000002", "checkpoint-0000012"]
    assert read_trainer_state(tmp_path / "r" / "checkpoint-0000002")["best_step"] == 2
    # A later best releases the old one, which then rotates out like any other.
    trainer.best_step, trainer.step = 12, 14
    trainer.save()
    assert [p.name for p in checkpoint_dirs(tmp_path / "r")] == ["checkpoint-0000012", "checkpoint-0000014"]


def test_resume_refuses_other_data(tmp_path):
    stream = pattern_stream(3000)
    trainer = Trainer(fresh_model(), stream[:2500], stream[2500:], small_cfg(steps=2, warmup=1, eval_every=2), tmp_path / "r",
                      tmp_path, progress=False)
    trainer.train()
    other = Trainer(fresh_model(), stream[100:2500], stream[2500:], small_cfg(steps=2, warmup=1, eval_every=2),
                    tmp_path / "r", tmp_path, progress=False)
    with pytest.raises(ValueError, match="different data"):
        other.resume_from(checkpoint_dirs(tmp_path / "r")[-1])


def test_checkpoint_round_trip(tmp_path):
    model = fresh_model()
    stream = pattern_stream(3000)
    trainer = Trainer(model, stream[:2500], stream[2500:], small_cfg(steps=3, warmup=1, eval_every=3), tmp_path / "run",
                      tmp_path, progress=False)
    result = trainer.train()
    ckpt = result.checkpoint
    assert ckpt.name == "checkpoint-0000003"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json", "xlstm_mlx_lm.py"]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp leftovers
    loaded = load_model(ckpt)
    ids = mx.array(stream[None, :40])
    np.testing.assert_array_equal(np.array(loaded(ids)[0]), np.array(model(ids)[0]))
    state = read_trainer_state(ckpt)
    assert state["step"] == 3 and state["tokens"] == 3 * 4 * 32 and state["total_steps"] == 3
    # Optimizer moments come back identical.
    other = Trainer(load_model(ckpt), stream[:2500], stream[2500:], small_cfg(steps=3, warmup=1), tmp_path / "run", tmp_path,
                    progress=False)
    other.resume_from(ckpt)
    saved = dict(tree_flatten(trainer.optimizer.state))
    restored = dict(tree_flatten(other.optimizer.state))
    assert saved.keys() == restored.keys()
    for key in saved:
        np.testing.assert_array_equal(np.array(saved[key]), np.array(restored[key]), err_msg=key)


def test_time_budget_sizes_the_run(tmp_path):
    stream = pattern_stream(4000)
    cfg = small_cfg(steps=None, max_time=1.0, warmup=12, probe_steps=8, eval_every=10_000, log_every=1)
    trainer = Trainer(fresh_model(), stream[:3500], stream[3500:], cfg, tmp_path / "t", tmp_path, progress=False)
    ticks = iter(range(10**6))
    trainer.clock = lambda: next(ticks) * 0.01  # deterministic: every clock read is 10 ms later
    result = trainer.train()
    # Sized from the probe: ~0.02 s per step (two clock reads) -> about 0.97 * 1.0 / 0.02 steps.
    assert 40 <= trainer.total_steps <= 50
    assert result.step == trainer.total_steps  # the schedule ran to its end inside the budget
    assert result.elapsed <= cfg.max_time
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
           if json.loads(l)["kind"] == "train"]
    assert len(lrs) == result.step
    assert lrs[0] == pytest.approx(cfg.lr / cfg.warmup, rel=1e-5)  # warmup from lr / warmup ...
    assert lrs[cfg.warmup] == pytest.approx(cfg.lr, rel=1e-5)  # ... to the peak, where the cosine starts
    assert all(a < b for a, b in zip(lrs[: cfg.warmup], lrs[1 : cfg.warmup + 1]))
    assert all(a >= b for a, b in zip(lrs[cfg.warmup :], lrs[cfg.warmup + 1 :]))
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-5)  # cosine floor at the last step


def test_corpus_script_extracts_sphinx_page_bodies():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pydoc_corpus", Path(__file__).parent.parent / "scripts" / "pydoc_corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    page = """<html><head><title>T</title><script>var x;</script></head><body>
    <div role="navigation">Previous topic</div>
    <div class="body" role="main"><section><h1>3. Numbers<a class="headerlink" href="#n">\u00b6</a></h1>
    <p>The interpreter acts as a
    simple calculator:</p>
    <div class="highlight"><pre><span>&gt;&gt;&gt; </span>2 + 2
4</pre></div><ul><li>one</li><li>two</li></ul></section></div>
    <div class="footer">Copyright</div></body></html>"""
    assert corpus.page_text(page) == (
        "3. Numbers\n\nThe interpreter acts as a simple calculator:\n\n>>> 2 + 2\n4\n\n- one\n\n- two")
    django = ('<div id="bd"><div id="yui-main"><div class="yui-b"><p>Let\u2019s learn by example.</p>'
              '<label>&#xf17c;</label><section class="c-content-win"><pre>py -m django</pre></section>'
              '<section class="c-content-unix"><pre>$ python -m django</pre></section></div></div>'
              '<div class="yui-b" id="sidebar">Contents</div></div>')
    assert corpus.page_text(django) == "Let\u2019s learn by example.\n\n$ python -m django"


def test_a_killed_saves_temporary_directory_is_removed_by_the_next_save(tmp_path):
    """SIGKILL during a checkpoint save leaves its hidden temporary directory (a whole model and
    optimizer state: 139 MB for pydoc-15m); the next save of the run removes it, nothing else."""
    run = tmp_path / "run"
    partial = run / ".checkpoint-0000002.k1ll3d"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 1000)
    (run / ".notes").write_text("mine")
    (run / ".checkpoint-notes").mkdir()  # not a save's temporary directory: kept
    stream = pattern_stream(3000)
    trainer = Trainer(fresh_model(), stream[:2500], stream[2500:], small_cfg(steps=3, warmup=1, eval_every=3), run,
                      tmp_path, progress=False)
    trainer.train()
    assert sorted(p.name for p in run.iterdir()) == [".checkpoint-notes", ".notes", "checkpoint-0000003", "loss.png",
                                                    "metrics.jsonl"]


def test_resuming_a_run_whose_time_budget_ran_out_adds_nothing(tmp_path):
    """A --max-time run that stopped on its budget before its sized step count is finished: a
    resumed trainer trains no step and logs nothing (it appended a second eval record of the
    last step on every resume)."""
    stream = pattern_stream(4000)
    cfg = small_cfg(steps=None, max_time=1.0, warmup=12, probe_steps=8, eval_every=10_000, log_every=1)
    trainer = Trainer(fresh_model(), stream[:3500], stream[3500:], cfg, tmp_path / "t", tmp_path, progress=False)
    reads = iter(range(10**6))
    # 10 ms per clock read while the probe sizes the run, then 100 ms: the budget ends it early.
    trainer.clock = lambda: (lambda n: n * 0.01 if n < 60 else 0.6 + (n - 60) * 0.1)(next(reads))
    result = trainer.train()
    assert result.step < trainer.total_steps and result.elapsed >= cfg.max_time
    metrics = (tmp_path / "t" / "metrics.jsonl").read_text()
    last = checkpoint_dirs(tmp_path / "t")[-1]
    assert last.name == f"checkpoint-{result.step:07d}"

    resumed = Trainer(load_model(last), stream[:3500], stream[3500:], TrainingConfig(**read_trainer_state(last)[
        "training_config"]), tmp_path / "t", tmp_path, progress=False)
    resumed.resume_from(last)
    again = resumed.train()
    assert again.step == result.step and again.evals == [] and again.checkpoint is None
    assert (tmp_path / "t" / "metrics.jsonl").read_text() == metrics


def test_resume_between_log_points_logs_the_same_records(tmp_path):
    """--log-every 7 with checkpoints every 10: the record at step 14 averages steps 8-14. A run
    resumed from step 10 averaged only steps 11-14 there (a loss 3.57 against 3.80 in a CLI run)."""
    stream = pattern_stream(4000)
    cfg = dict(steps=16, save_every=10, keep=5, eval_every=8, log_every=7)
    full = Trainer(fresh_model(), stream[:3500], stream[3500:], small_cfg(**cfg), tmp_path / "full", tmp_path,
                   progress=False)
    uninterrupted = full.train()
    records = (tmp_path / "full" / "metrics.jsonl").read_text()
    middle = tmp_path / "full" / "checkpoint-0000010"

    resumed = Trainer(load_model(middle), stream[:3500], stream[3500:], small_cfg(**cfg), tmp_path / "full", tmp_path,
                      progress=False)
    resumed.resume_from(middle)
    rest = resumed.train()
    assert rest.losses == uninterrupted.losses[10:]  # this session's steps, 11-16

    def train_records(text):
        return [(r["step"], r["loss"], r["tokens"]) for r in map(json.loads, text.splitlines()) if r["kind"] == "train"]

    before, after = train_records(records), train_records((tmp_path / "full" / "metrics.jsonl").read_text())
    assert [s for s, _, _ in after] == [7, 14, 16]
    assert after == before  # step 14's loss is the mean of steps 8-14 again
    assert after[1][1] == pytest.approx(np.mean([v for s, v in uninterrupted.losses if 8 <= s <= 14]), rel=1e-6)
    assert len(read_trainer_state(middle)["log_window"]) == 3  # steps 8, 9, 10


def test_files_with_a_byte_order_mark_read_as_their_text(tmp_path):
    """UTF-8 files written with a BOM (Notepad, PowerShell): a JSON Lines file was refused ("not
    valid JSON (Unexpected UTF-8 BOM)") and a text file trained on a U+FEFF character."""
    (tmp_path / "a.jsonl").write_text('{"text": "first record"}\n{"text": "second"}\n', encoding="utf-8-sig")
    (tmp_path / "b.txt").write_text("plain text", encoding="utf-8-sig")
    docs = load_documents([tmp_path / "a.jsonl", tmp_path / "b.txt"])
    assert [d.text for d in docs] == ["first record", "second", "plain text"]
