"""Judging generated text: likelihood under a judge model and surface statistics.

For each record (``text`` and an optional ``prompt``):

- ``mean_logprob``: mean natural-log probability of the text's tokens under the judge model,
  each conditioned on the prompt and the text before it; ``perplexity`` = exp(-mean_logprob).
- ``distinct_1/2/3``: unique n-grams / all n-grams of the text's words (whitespace split).
- ``repeated_4gram_share``: the share of the text's word 4-grams that repeat an earlier one
  (0: none repeats; near 1: a loop).
- ``longest_repeated_span``: the longest run of words that occurs twice (overlaps allowed).
- ``chars``, ``words``, ``tokens``: lengths (``tokens``: the text's own, without the BOS a
  prompt-less text is scored after).

Texts of any length are scored in pieces carrying the recurrent state, so memory stays bounded.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import mlx.core as mx
import numpy as np

from .checks import bad_token_ids, check_targets, is_integer

#: Tokens per forward pass while scoring (the state carries across pieces).
SCORE_PIECE = 1024


def _ngrams(words: Sequence[str], n: int) -> list[tuple]:
    if isinstance(words, str):  # a str's characters, or n <= 0 empty grams, were counted
        raise TypeError("words must be a list (text.split()), got a str")
    if not is_integer(n) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(words: Sequence[str], n: int) -> float:
    """Unique n-grams / n-grams (0 for a text shorter than n words)."""
    grams = _ngrams(words, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(words: Sequence[str], n: int = 4) -> float:
    """Share of the n-grams that repeat an earlier one: (all - unique) / all."""
    grams = _ngrams(words, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def longest_repeated_span(words: Sequence[str]) -> int:
    """Length of the longest word sequence that occurs at least twice (binary search on the
    length with hashed windows: O(n log n))."""
    if isinstance(words, str):  # a str's characters were counted as words
        raise TypeError("words must be a list (text.split()), got a str")
    ids: dict[str, int] = {}
    seq = [ids.setdefault(w, len(ids)) for w in words]
    n = len(seq)

    def repeats(length: int) -> bool:
        seen = set()
        for i in range(n - length + 1):
            window = tuple(seq[i : i + length])
            if window in seen:
                return True
            seen.add(window)
        return False

    lo, hi = 0, n - 1
    while lo < hi:  # largest length with a repeat; repeats() is monotone in the length
        mid = (lo + hi + 1) // 2
        if repeats(mid):
            lo = mid
        else:
            hi = mid - 1
    return max(lo, 0)


def token_logprobs(model, prompt_ids: Sequence[int], text_ids: Sequence[int], *,
                   return_greedy: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Log-probabilities [len(text_ids)] of each text token given the prompt and the text before
    it. With no prompt the first text token is only a context (it has no prediction).
    ``return_greedy``: also whether each scored token was the model's argmax (bool array)."""
    logprobs, greedy = batched_token_logprobs(model, [(prompt_ids, text_ids)])[0]
    return (logprobs, greedy) if return_greedy else logprobs


def batched_token_logprobs(model, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
                           batch_size: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`token_logprobs` (with ``return_greedy``) of every ``(prompt_ids, text_ids)`` row,
    ``batch_size`` rows per forward pass [batch, piece]: longest first, each right-padded to the
    longest of its batch (the model is causal: padding never reaches a real position's logits),
    in pieces of :data:`SCORE_PIECE` tokens carrying the batched state. Results in the rows' order;
    the same values as one row at a time, to float32 round-off (the lm-eval adapter's batches)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    seqs = [list(prompt) + list(text) for prompt, text in rows]
    bad = bad_token_ids((i for seq in seqs for i in seq), vocab)
    if bad:  # past the vocabulary: garbage scored
        raise ValueError(f"token ids must be integers in [0, {vocab}), got {bad[0]!r}")
    order = sorted(range(len(rows)), key=lambda row: -len(seqs[row]))  # stable: ties keep their order
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.float32), np.zeros(0, bool))] * len(rows)
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        width = len(seqs[batch[0]])
        if width < 2:  # nothing is predicted: a lone token is only context
            continue
        ids = np.zeros((len(batch), width + 1), np.int32)  # token 0 pads the right (and the last target)
        for row, index in enumerate(batch):
            ids[row, : len(seqs[index])] = seqs[index]
        # Position p predicts token p + 1: its log-probability and whether it was the argmax.
        logp, greedy, state = [], [], None
        for begin in range(0, width, SCORE_PIECE):
            end = min(begin + SCORE_PIECE, width)
            logits, state = model(mx.array(ids[:, begin:end]), state)
            # a target past the logits' columns was read from outside them (a segmentation fault
            # for a model without config.vocab_size, or narrower logits than its vocabulary)
            check_targets(ids[:, begin + 1 : end + 1].ravel().tolist(), logits.shape[-1])
            piece = logits.astype(mx.float32)
            piece = piece - mx.logsumexp(piece, axis=-1, keepdims=True)
            target = mx.array(ids[:, begin + 1 : end + 1])
            picked = mx.take_along_axis(piece, target[..., None], axis=-1)[..., 0]
            hit = mx.argmax(piece, axis=-1) == target
            mx.eval(picked, hit, state)
            logp.append(np.array(picked))
            greedy.append(np.array(hit))
        logp_all, greedy_all = np.concatenate(logp, axis=1), np.concatenate(greedy, axis=1)
        for row, index in enumerate(batch):  # with no prompt the first text token is only context
            prompt_len = len(rows[index][0])
            first_scored = max(prompt_len, 1) - 1
            scored = slice(first_scored, max(first_scored, len(seqs[index]) - 1))
            out[index] = (logp_all[row, scored], greedy_all[row, scored])
    return out


def perplexity(mean_logprob: float) -> float:
    """exp(-mean_logprob); inf past the float range (math.exp raised OverflowError)."""
    return math.exp(-mean_logprob) if -mean_logprob < 709.78 else math.inf


def judge_record(model, tokenizer, record: dict[str, Any]) -> dict[str, Any]:
    """The ratings of one record (see the module docstring)."""
    if not isinstance(record, dict) or not isinstance(record.get("text"), str) \
            or not isinstance(record.get("prompt") or "", str):  # was an AttributeError or KeyError
        raise ValueError(f"a record needs a string 'text' (and 'prompt', if any), got {record!r:.80}")
    text = record["text"]
    prompt = record.get("prompt") or ""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
    plain_ids = tokenizer.encode(text, add_special_tokens=False)  # the text's own tokens
    # Without a prompt the text follows the tokenizer's special tokens (BOS): context, not text.
    text_ids = plain_ids if prompt else tokenizer.encode(text, add_special_tokens=True)
    lp = token_logprobs(model, prompt_ids, text_ids) if text_ids else np.zeros(0)
    words = text.split()
    mean = float(lp.mean()) if lp.size else float("nan")
    return {
        "mean_logprob": mean,
        "perplexity": perplexity(mean) if lp.size else float("nan"),
        "scored_tokens": int(lp.size),
        "distinct_1": distinct_n(words, 1),
        "distinct_2": distinct_n(words, 2),
        "distinct_3": distinct_n(words, 3),
        "repeated_4gram_share": repeated_ngram_share(words, 4),
        "longest_repeated_span": longest_repeated_span(words),
        "chars": len(text),
        "words": len(words),
        "tokens": len(plain_ids),
    }


def judge(model, tokenizer, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratings for every record, each with the record's own fields (other than text) first.
    ValueError for a record with a field named as a rating (it would be replaced)."""
    out = []
    for record in records:
        rating = judge_record(model, tokenizer, record)
        keep = {k: v for k, v in record.items() if k != "text"}
        clash = [k for k in rating if k in keep]
        if clash:
            raise ValueError(f"record fields {clash} would be replaced by the ratings of those names")
        out.append({**keep, **rating})
    return out


__all__ = ["distinct_n", "judge", "judge_record", "longest_repeated_span", "perplexity", "repeated_ngram_share",
           "token_logprobs"]
