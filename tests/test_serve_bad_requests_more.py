"""`xlstm-metal serve`: more bad requests (stream_options, logit_bias keys) and a long cached
prompt that must not stall later requests. Not repeated from the other test_serve files."""

import random

import pytest
from test_serve import error_message, post, serving_tiny

pytest.importorskip("mlx_lm")
from mlx_lm.models.cache import PromptTrie  # noqa: E402

from xlstm_metal.serve import _PromptCache  # noqa: E402

TEXT = {"prompt": "the cat", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving_tiny(tmp_path_factory, "bad_requests_more") as srv:
        yield srv


@pytest.mark.parametrize("body, words, param", [
    # Unknown keys of stream_options were ignored without a word.
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "continuous_usage_stats", "stream_options.continuous_usage_stats"),
    # int() read these as token ids: " 3" as 3, "3_0" as 30, "٣" (Arabic-Indic 3) as 3.
    ({"logit_bias": {" 3": 5}}, "token ids", "logit_bias"),
    ({"logit_bias": {"3_0": 5}}, "token ids", "logit_bias"),
    ({"logit_bias": {"\u0663": 5}}, "token ids", "logit_bias"),
    # "03" after "3": one token, the second bias silently replaced the first.
    ({"logit_bias": {"3": -100, "03": 100}}, "distinct", "logit_bias"),
])
def test_more_bad_requests_get_a_400(server, body, words, param):
    status, answer = post(server.url, "/v1/completions", {**TEXT, **body}, timeout=30)
    assert status == 400 and words in error_message(status, answer, param), answer
    status, answer = post(server.url, "/v1/completions", {**TEXT, "logit_bias": {"3": 5}}, timeout=30)
    assert status == 200, answer


def test_the_prompt_trie_finds_what_mlx_lms_finds():
    """Our trie search (mlx-lm's copied the path at each step: quadratic in a cached prompt's
    length, ~25 s per request beside one 200k-token prompt here) must find the same prompts:
    random tries and lookups, and one long cached prompt (timed in benchmarks/NOTES.md)."""
    rng = random.Random(0)
    ours, theirs = _PromptCache(10)._trie, PromptTrie()
    ours.add("m", [1] + [5] * 5_000, "long")
    theirs.add("m", [1] + [5] * 5_000, "long")
    for n in range(300):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 9))]
        ours.add("m", tokens, n)
        theirs.add("m", tokens, n)
    for _ in range(2_000):
        tokens = [1, *(rng.randrange(6) for _ in range(rng.randrange(0, 10)))] if rng.random() < 0.3 else \
            [rng.randrange(4) for _ in range(rng.randrange(1, 10))]
        assert ours.search("m", tokens) == theirs.search("m", tokens), tokens
