"""Functional checks of the architecture lab with good input: MAD task definitions against
MAD-Lab's generators (seeded)."""

from __future__ import annotations

import numpy as np

import xlstm_metal  # noqa: F401
from xlstm_metal.lab import mad
from xlstm_metal.lab.mad import IGNORE


def _mad_lab_selective_copying(vocab_size, seq_len, num_tokens_to_copy, rng):
    """MAD-Lab's generate_selective_copying_instance, its np.random.randint replaced by ``rng``."""
    copy_token, blank_token = vocab_size - 1, vocab_size - 2
    num_blank = seq_len - num_tokens_to_copy * 2 - 1
    to_copy = rng.choice(np.arange(vocab_size - 2), size=(num_tokens_to_copy,), replace=True).reshape(-1)
    inputs = list(to_copy)
    for _ in range(num_blank):
        inputs.insert(rng.integers(len(inputs)), blank_token)
    inputs.append(copy_token)
    inputs.extend([blank_token] * num_tokens_to_copy)
    targets = [IGNORE] * (num_tokens_to_copy + num_blank + 1) + list(to_copy)
    return np.array(inputs), np.array(targets)


def test_selective_copying_inserts_blanks_one_at_a_time_as_mad_lab():
    # Two tokens, four blanks: MAD-Lab's sequential insertion makes every split of the blanks between
    # the gap before the first token and the gap before the second equally likely (1/5 each); the
    # generator put the blanks at independent uniform positions (a binomial split: 1/16 for 0 or 4).
    rng = np.random.default_rng(0)
    counts = np.zeros(5, int)
    for _ in range(4000):
        x, y = mad.selective_copying(vocab_size=16, seq_len=9, num_tokens_to_copy=2, rng=rng)
        assert x[-3] == 15 and x[-4] != 14 and list(y[-2:]) == [t for t in x[:-3] if t != 14]
        counts[int(np.argmax(x != 14))] += 1
    assert np.all(np.abs(counts / 4000 - 0.2) < 0.025), counts
    # The same instances as MAD-Lab's generator drawing from the same seeded generator.
    for seed in range(3):
        a = mad.selective_copying(vocab_size=16, seq_len=48, num_tokens_to_copy=8, rng=np.random.default_rng(seed))
        b = _mad_lab_selective_copying(16, 48, 8, np.random.default_rng(seed))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
