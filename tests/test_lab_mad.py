"""MAD tasks: seeded generators with MAD-Lab's settings and semantics; the tiny preset solves
in-context recall with mLSTM and attention, and not without token mixing."""

from __future__ import annotations

import numpy as np
import pytest

import xlstm_metal  # noqa: F401
from xlstm_metal.lab import mad
from xlstm_metal.lab.mad import IGNORE, PAPER_TASKS, PRESETS, TASKS, generate, task_names


@pytest.mark.parametrize("name", TASKS)
def test_generators_are_deterministic_per_seed(name):
    task = PRESETS["tiny"].task(name)
    a = generate(task, 8, seed=3, training=False)
    b = generate(task, 8, seed=3, training=False)
    c = generate(task, 8, seed=4, training=False)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == a[1].shape and a[0].shape[0] == 8
    assert a[0].min() >= 0 and a[0].max() < task.settings["vocab_size"]
    scored = a[1][a[1] != IGNORE]
    assert scored.size > 0 and scored.max() < task.settings["vocab_size"]


def test_paper_settings_are_mad_labs():
    s = PAPER_TASKS
    assert s["in_context_recall"].settings == dict(vocab_size=16, seq_len=128, multi_query=True, noise_vocab_size=0)
    assert s["noisy_in_context_recall"].settings["frac_noise"] == 0.2
    assert s["fuzzy_in_context_recall"].settings["k_motif_size"] == 3
    assert s["selective_copying"].settings == dict(vocab_size=16, seq_len=256, num_tokens_to_copy=16)
    assert (s["memorization"].settings["vocab_size"], s["memorization"].num_train) == (256, 256)
    assert all(t.num_test == 1280 for t in s.values())
    assert PRESETS["paper"].batch_size == 128 and PRESETS["paper"].lr == 5e-4 and PRESETS["paper"].epochs == 200
    for name, task in s.items():
        x, y = generate(task, 2, seed=0, training=False)
        # MAD-Lab drops the last token of the recall sequences (the shift of next-token prediction)
        assert x.shape[1] in (task.settings["seq_len"] - 1, task.settings["seq_len"]), name


def test_in_context_recall_targets_are_the_values_of_repeated_keys():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = mad.in_context_recall(vocab_size=16, seq_len=64, multi_query=True, noise_vocab_size=0,
                                     is_training=False, rng=rng)
        pairs = {}
        for t in range(0, len(x) - 1, 2):
            k, v = x[t], x[t + 1]
            assert k < 8 <= v  # keys 0..7, values 8..15
            if y[t] != IGNORE:  # predicting the value after a key seen before
                assert k in pairs and y[t] == pairs[k] == v
            pairs[k] = v
    x, y = mad.in_context_recall(vocab_size=16, seq_len=64, multi_query=True, noise_vocab_size=0, rng=rng)
    assert np.array_equal(x[1:], y[:-1])  # training: next-token targets


def test_noisy_recall_noise_and_selective_copy_and_compression_and_memorization():
    rng = np.random.default_rng(1)
    x, y = mad.noisy_in_context_recall(vocab_size=32, noise_vocab_size=16, seq_len=128, frac_noise=0.2,
                                       multi_query=True, is_training=False, rng=rng)
    assert np.any(x >= 16) and np.all(y[x >= 16] == IGNORE)
    x, y = mad.selective_copying(vocab_size=16, seq_len=64, num_tokens_to_copy=8, rng=rng)
    copy_at = int(np.flatnonzero(x == 15)[0])
    tokens = x[:copy_at][x[:copy_at] != 14]
    assert np.array_equal(y[y != IGNORE], tokens) and len(tokens) == 8
    x, y = mad.compression(vocab_size=16, seq_len=32, rng=rng)
    assert np.array_equal(x, y) and x[-1] == 15
    kv = mad.generate_kv_map(63, seed=5)
    x, y = mad.memorization(vocab_size=64, seq_len=32, kv_map=kv, rng=rng)
    for t in range(1, 32, 2):
        assert x[t] == 63 and y[t] == kv[(x[t - 1],)][0] and y[t - 1] == IGNORE


def test_task_names_and_errors():
    assert task_names(None) == list(TASKS)
    assert task_names("in-context-recall,memorization") == ["in_context_recall", "memorization"]
    with pytest.raises(ValueError, match="unknown MAD task"):
        task_names("recall")
    with pytest.raises(ValueError, match="names in_context_recall more than once"):  # "-" and "_" spell one task
        task_names("in-context-recall,memorization,in_context_recall")


def _recall(arch):
    return mad.run_task(arch, "in_context_recall", "tiny", seed=0)


@pytest.mark.slow
def test_tiny_in_context_recall_mlstm_solves_it():
    result = _recall("mlstm")
    assert result.accuracy > 0.9, result


@pytest.mark.slow
def test_tiny_in_context_recall_attention_solves_it():
    result = _recall("attention")
    assert result.accuracy > 0.9, result


@pytest.mark.slow
def test_tiny_in_context_recall_swiglu_only_stays_near_chance():
    result = _recall("swiglu-only")
    assert result.accuracy < 2.5 * result.chance, result


def test_autoencoder_trains_every_parameter_of_the_encoder():
    from mlx.utils import tree_flatten

    from xlstm_metal.lab.model import build_model

    model = build_model("slstm", vocab_size=16, embedding_dim=16, block_defaults={"num_heads": 2})
    net = mad.AutoEncoder(model, 8)
    names = dict(tree_flatten(net.trainable_parameters()))
    assert "encoder.backbone.blocks.0.xlstm.slstm_cell._recurrent_kernel_" in names
    assert len([k for k in names if k.startswith("encoder.")]) == len(tree_flatten(model.trainable_parameters()))
    import mlx.core as mx

    assert net(mx.array([[1, 2, 3, 4, 5, 6, 7, 15]])).shape == (1, 8, 16)


@pytest.mark.parametrize("which", ["mad", "evolve"])
def test_plots_are_written_whole_or_not_at_all(tmp_path, monkeypatch, which):
    # accuracy.png / evolution.png were written in place: a savefig that failed midway (disk
    # full, interrupted) left a truncated file where the previous run's plot was.
    import matplotlib.figure

    from xlstm_metal.lab.evolve import plot_history
    from xlstm_metal.lab.mad import TaskResult, plot_results

    path = tmp_path / ("accuracy.png" if which == "mad" else "evolution.png")
    path.write_bytes(b"previous plot")

    def failing_savefig(self, target, *args, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="No space"):
        if which == "mad":
            plot_results([TaskResult("compression", 0.5, 1.0, 1 / 15, 10, 1.0, 100, {})], path, "t")
        else:
            plot_history([{"generation": 0, "fitness": 0.5, "parameters": 100}], path)
    assert path.read_bytes() == b"previous plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left
    monkeypatch.undo()
    if which == "mad":
        plot_results([TaskResult("compression", 0.5, 1.0, 1 / 15, 10, 1.0, 100, {})], path, "t")
    else:
        plot_history([{"generation": 0, "fitness": 0.5, "parameters": 100}], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_selective_copying_places_the_blanks_as_mad_lab_does():
    """MAD-Lab's generate_copying_instance (selective=True) inserts all blanks at once with
    np.insert, each before a token drawn uniformly from [0, n): each blank picks its gap
    independently (a multinomial spread; the last token to copy stays last). Transcribed with
    the task's generator in place of MAD-Lab's global np.random; inserting the blanks one at a
    time into the growing list (uniform over splits) would be another task."""
    n, seq_len, vocab = 8, 64, 16
    blank, copy = vocab - 2, vocab - 1
    for seed in range(3):
        x, y = mad.selective_copying(vocab_size=vocab, seq_len=seq_len, num_tokens_to_copy=n,
                                     rng=np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        to_copy = rng.choice(np.arange(vocab - 2), size=(n,), replace=True)
        num_blank = seq_len - 2 * n - 1
        indices = rng.integers(0, len(to_copy), num_blank)
        expected = np.insert(np.array(to_copy), indices, [blank] * num_blank).tolist() + [copy] + [blank] * n
        assert x.tolist() == expected
        assert y.tolist() == [IGNORE] * (n + num_blank + 1) + to_copy.tolist()
        assert x[seq_len - n - 2] == to_copy[-1]  # the last token to copy comes right before the copy token
