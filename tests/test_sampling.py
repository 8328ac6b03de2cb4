"""Sampling: greedy, temperature, top-k / top-p / min-p, repetition penalty, keys."""

import math

import mlx.core as mx
import numpy as np
import pytest

import xlstm_metal  # noqa: F401
from xlstm_metal.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    make_keys,
    mark_seen,
    sample,
    seen_from_ids,
    split_keys,
)

NEG_INF = -math.inf


def log_probs(*probs):
    return mx.array(np.log(np.asarray([probs], dtype=np.float32)))


def test_temperature_zero_is_argmax():
    logits = mx.random.normal((5, 50), key=mx.random.key(0))
    out = sample(logits, SamplingParams(temperature=0.0))  # no keys needed
    assert out.dtype == mx.int32
    assert out.tolist() == mx.argmax(logits, axis=-1).tolist()


def test_top_k_one_is_argmax_at_any_temperature():
    logits = mx.random.normal((6, 40), key=mx.random.key(1))
    for seed in range(3):
        out = sample(logits, SamplingParams(temperature=5.0, top_k=1), keys=make_keys(seed, 6))
        assert out.tolist() == mx.argmax(logits, axis=-1).tolist()


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-37, 1e-30, 1e-6, 5e-324])
def test_tiny_temperature_is_greedy_never_nan(temperature):
    """logits / 1e-45 overflowed to inf and the softmax to NaN: the draws were garbage."""
    logits = mx.random.normal((8, 64), key=mx.random.key(7)) * 30  # 30 / 1e-37 overflows float32
    greedy = mx.argmax(logits, axis=-1).tolist()
    for seed in range(3):
        for extra in ({}, {"top_p": 0.9}, {"min_p": 0.1, "top_k": 5}):
            out = sample(logits, SamplingParams(temperature=temperature, **extra), keys=make_keys(seed, 8))
            assert out.tolist() == greedy, (temperature, extra)
    # Ties at the top stay a fair draw between the tied tokens (the limit of a small temperature).
    tied = mx.array([[1.0, 5.0, 5.0, -2.0]])
    picks = {sample(tied, SamplingParams(temperature=1e-30), keys=make_keys(s, 1)).item() for s in range(40)}
    assert picks == {1, 2}


def test_filters_keep_the_right_sets():
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    kept = lambda x: [i for i, v in enumerate(x[0].tolist()) if v != NEG_INF]  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.8)) == [0, 1]  # mass before token 2 is 0.8
    assert kept(filter_logits(logits, top_p=0.81)) == [0, 1, 2]
    assert kept(filter_logits(logits, top_p=1e-6)) == [0]
    assert kept(filter_logits(logits, min_p=0.2)) == [0, 1, 2]  # threshold 0.1
    assert kept(filter_logits(logits, min_p=0.7)) == [0]
    assert kept(filter_logits(logits, top_k=3, min_p=0.5)) == [0, 1]
    # Shuffled order: the filters work on values, not positions.
    shuffled = mx.array([[math.log(0.05), math.log(0.5), math.log(0.15), math.log(0.3)]])
    assert kept(filter_logits(shuffled, top_p=0.8)) == [1, 3]
    assert kept(filter_logits(shuffled, top_k=3)) == [1, 2, 3]


def test_repetition_penalty_rule():
    logits = mx.array([[2.0, -2.0, 3.0, -1.0]])
    seen = seen_from_ids([[0, 1]], 4)
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 3.0, -1.0]]
    # Penalty flips the greedy choice when the favourite was seen.
    logits = mx.array([[3.0, 2.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, params, seen=seen_from_ids([[0]], 3)).tolist() == [1]
    assert sample(logits, params, seen=seen_from_ids([[1]], 3)).tolist() == [0]
    marked = mark_seen(seen_from_ids([[0], []], 3), mx.array([2, 1]))
    assert marked.tolist() == [[True, False, True], [False, True, False]]


def test_samples_follow_the_distribution():
    # 4000 independent rows of the same distribution, one key each.
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    rows = 4000
    logits = mx.broadcast_to(log_probs(*probs), (rows, 4))
    draws = np.array(sample(logits, SamplingParams(temperature=1.0), keys=make_keys(0, rows)))
    freq = np.bincount(draws, minlength=4) / rows
    assert np.abs(freq - probs).max() < 0.03
    # Temperature 0.5 squares the probabilities (renormalised).
    draws = np.array(sample(logits, SamplingParams(temperature=0.5), keys=make_keys(1, rows)))
    sharp = probs**2 / (probs**2).sum()
    assert np.abs(np.bincount(draws, minlength=4) / rows - sharp).max() < 0.03
    # Nucleus: only tokens 0 and 1 remain, renormalised to 0.625 / 0.375.
    draws = np.array(sample(logits, SamplingParams(temperature=1.0, top_p=0.8), keys=make_keys(2, rows)))
    freq = np.bincount(draws, minlength=4) / rows
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.03


def test_keys_reproducible_and_rows_independent():
    logits = mx.random.normal((3, 1000), key=mx.random.key(5))
    params = SamplingParams(temperature=1.0)
    keys = make_keys(11, 3)
    a = sample(logits, params, keys=keys)
    b = sample(logits, params, keys=keys)
    assert a.tolist() == b.tolist()
    # Row r of a batch seeded s draws what a single row seeded s + r draws.
    for r in range(3):
        solo = sample(logits[r:r + 1], params, keys=make_keys(11 + r, 1))
        assert solo.tolist() == [a.tolist()[r]]
    # Splitting gives fresh keys: a sequence of draws is not constant.
    seq, k = [], make_keys(3, 1)
    for _ in range(20):
        k, use = split_keys(k)
        seq.append(sample(logits[:1], params, keys=use).item())
    assert len(set(seq)) > 5
    assert make_keys([4, 9], 2).tolist() == make_keys(4, 1).tolist() + make_keys(9, 1).tolist()
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        make_keys([1, 2], 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_params_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_without_keys_or_seen_is_an_error():
    logits = mx.zeros((1, 4))
    with pytest.raises(ValueError, match="keys"):
        sample(logits, SamplingParams(temperature=1.0))
    with pytest.raises(ValueError, match="seen"):
        sample(logits, SamplingParams(repetition_penalty=1.2))
