"""Token sampling on device: temperature, top-k, top-p, min-p, repetition penalty.

Everything here is pure MLX on [B, V] arrays with no host sync, so it can run inside the
compiled decode step. Randomness comes from explicit per-row keys ([B, 2] uint32, see
:func:`make_keys`): a seeded run is reproducible, and a row's draws do not depend on the other
rows of the batch.
"""

from __future__ import annotations

import numbers
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import mlx.core as mx

from ..checks import is_integer


#: Temperatures below this (float32's smallest normal number) sample greedily: float32 holds
#: them as subnormals or 0, which GPUs flush to 0, and at such a temperature only the top logit
#: keeps any probability anyway (transformers' limit of a tiny temperature).
GREEDY_BELOW = 1.1754943508222875e-38


def check_real(name: str, value: object) -> None:
    """Refuses a sampling number that is not a real number (int, float, NumPy scalar): float()
    read "0.5" as 0.5 and True as 1.0 without a word, and None failed without naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    temperature: 0 = greedy (argmax), as is anything below :data:`GREEDY_BELOW`; > 0 divides
        the logits (a tiny temperature tends to greedy without overflowing).
    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest set of tokens whose probability reaches top_p (1 = off).
    min_p: drop tokens whose probability is below min_p * the top probability (0 = off).
    repetition_penalty: CTRL-style penalty (> 1 discourages) on every token seen so far
        (prompt and generated); 1 = off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            check_real(name, getattr(self, name))
            object.__setattr__(self, name, float(getattr(self, name)))  # NumPy scalars become floats
        if is_integer(self.top_k):  # a NumPy integer becomes an int; anything else is refused below
            object.__setattr__(self, "top_k", int(self.top_k))
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty != 1.0


# ---------------------------------------------------------------------- keys
#: Seeds mx.random.key accepts: 0 .. 2**64 - 1 (others raise a TypeError inside MLX).
SEED_LIMIT = 2**64


def make_keys(seed: int | Sequence[int | None] | None, batch_size: int) -> mx.array:
    """Per-row PRNG keys [B, 2] uint32. An int seed gives row r the key of ``seed + r`` (so
    row 0 of a batch draws exactly what a single run with ``seed`` draws); a sequence gives
    one seed per row (None: a fresh one for that row); None draws a fresh seed."""
    if seed is None:
        seed = _fresh_seed()
    if is_integer(seed):
        seeds = [int(seed) + r for r in range(batch_size)]
    else:
        # A list of seeds: each an integer (int() truncated 1.7 to 1 and read "3" as 3 without a word).
        if isinstance(seed, (str, bytes)) or not isinstance(seed, Iterable):
            raise TypeError(f"seed must be an integer, a list of integers or None, got {type(seed).__name__}")
        seeds = seed.tolist() if hasattr(seed, "tolist") else list(seed)  # MLX / NumPy arrays of seeds
        seeds = [_fresh_seed() if s is None else s for s in seeds]
        wrong = [s for s in seeds if not is_integer(s)]
        if wrong:
            raise TypeError(f"seed must be an integer, a list of integers or None, got a list holding {wrong[0]!r}")
        seeds = [int(s) for s in seeds]
        if len(seeds) != batch_size:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {batch_size}")
    bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
    if bad:
        raise ValueError(f"seed must be in 0..{SEED_LIMIT - 1}, got {bad[0]}")
    return mx.stack([mx.random.key(s) for s in seeds])


def _fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _split_one(key: mx.array) -> mx.array:
    return mx.random.split(key, 2)


def split_keys(keys: mx.array) -> tuple[mx.array, mx.array]:
    """[B, 2] keys -> (keys to carry on [B, 2], keys to use now [B, 2])."""
    both = mx.vmap(_split_one)(keys)  # [B, 2, 2]
    return both[:, 0], both[:, 1]


# ---------------------------------------------------------------------- logit processing
def apply_repetition_penalty(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """logits [B, V] float, seen [B, V] bool -> logits with seen tokens penalised: positive
    logits divided by ``penalty``, negative ones multiplied (CTRL / Hugging Face rule)."""
    if penalty == 1.0:
        return logits
    penalised = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(seen, penalised, logits)


def mark_seen(seen: mx.array, tokens: mx.array) -> mx.array:
    """seen [B, V] bool, tokens [B] int -> seen with each row's token set."""
    ones = mx.ones((tokens.shape[0], 1), dtype=mx.bool_)
    return mx.put_along_axis(seen, tokens.astype(mx.int32)[:, None], ones, axis=-1)


def seen_from_ids(rows: Sequence[Sequence[int]], vocab_size: int) -> mx.array:
    """[B, V] bool mask of the ids each row has seen (built once from the prompts)."""
    import numpy as np

    mask = np.zeros((len(rows), vocab_size), dtype=bool)
    for r, ids in enumerate(rows):
        if len(ids):
            mask[r, np.asarray(ids, dtype=np.int64)] = True
    return mx.array(mask)


def filter_logits(logits: mx.array, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> mx.array:
    """logits [B, V] (already temperature-scaled) -> same with excluded tokens at -inf.

    The most likely token always survives. Ties at the top-k boundary are all kept.
    """
    neg_inf = mx.array(-float("inf"), dtype=logits.dtype)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        # k-th largest value per row: the boundary of the kept set.
        kth = mx.partition(logits, vocab - top_k, axis=-1)[:, vocab - top_k : vocab - top_k + 1]
        logits = mx.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        probs = mx.softmax(logits, axis=-1)
        order = mx.argsort(-probs, axis=-1)
        sorted_probs = mx.take_along_axis(probs, order, axis=-1)
        # Keep a token if the mass strictly before it is below top_p (keeps the top one).
        before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = before < top_p
        keep = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
        logits = mx.where(keep, logits, neg_inf)
    if min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
        threshold = mx.max(logits, axis=-1, keepdims=True) + mx.log(mx.array(min_p, dtype=logits.dtype))
        logits = mx.where(logits < threshold, neg_inf, logits)
    return logits


def _categorical_rows(logits: mx.array, keys: mx.array) -> mx.array:
    return mx.vmap(lambda row, key: mx.random.categorical(row, key=key))(logits, keys)


def sample(
    logits: mx.array,
    params: SamplingParams,
    keys: mx.array | None = None,
    seen: mx.array | None = None,
) -> mx.array:
    """Pick one token per row.

    Args:
        logits: [B, V] scores of the next token (any float dtype; computed in float32).
        params: the sampling settings.
        keys: [B, 2] uint32 per-row keys to use for this draw (ignored when greedy).
        seen: [B, V] bool, tokens subject to the repetition penalty.
    Returns:
        [B] int32 token ids.
    """
    logits = logits.astype(mx.float32)
    if params.uses_history:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs the `seen` mask")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    if keys is None:
        raise ValueError("sampling with temperature > 0 needs per-row keys")
    # Scale logits - max, not the logits: a tiny temperature then sends the tokens below the top
    # to -inf (probability 0) instead of overflowing the top ones to inf (inf - inf = NaN in the
    # softmax, and garbage draws). The softmax does not change under the shift.
    shifted = logits - mx.max(logits, axis=-1, keepdims=True)
    logits = filter_logits(shifted / params.temperature, params.top_k, params.top_p, params.min_p)
    return _categorical_rows(logits, keys).astype(mx.int32)
