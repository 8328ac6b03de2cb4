"""The lm-eval adapter's batch_size: requests scored in right-padded batches, longest first, equal
the one-at-a-time scorer (judge.token_logprobs) in the requests' order."""

import math
import re
import warnings

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model
from test_tokenizer import train_tiny_tokenizer

import xlstm_metal.judge as judge
from xlstm_metal.judge import token_logprobs
from xlstm_metal.loading import save_model

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from xlstm_metal.lm_eval_adapter import AUTO_BATCH_SIZE, XLSTMMetalLM, parse_batch_size  # noqa: E402

PIECE = 8  # judge.SCORE_PIECE in these tests: the longest texts run in several pieces
CONTEXTS = ["the quick", "", "def f(x):\n    return x * 2\n" * 3, "naïve café", "xLSTM models keep",
            "the lazy dog. " * 4, "emoji 🙂"]
CONTINUATIONS = [" brown fox", " hello", " and more", "", " wörld, naïve café", "!", " 🚀"]
TEXTS = ["the quick brown fox", "", "a", "def f(x):\n    return x * 2\n" * 4, "héllo wörld", "xLSTM " * 9]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model (seeded) with a byte-level BPE tokenizer (BOS id 0)."""
    path = tmp_path_factory.mktemp("lm_eval_batching") / "tiny"
    hf = train_tiny_tokenizer()
    save_model(tiny_model(7, vocab_size=hf.get_vocab_size()), path)
    hf.save(str(path / "tokenizer.json"))
    return str(path)


def adapter(checkpoint, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny shape's transformers-compatibility note
        return XLSTMMetalLM(pretrained=checkpoint, **kwargs)


class Recording:
    """The model, recording the shape of every forward pass."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __call__(self, ids, state=None):
        self.shapes.append(tuple(ids.shape))
        return self.model(ids, state)


def request_ids(lm, context, continuation):
    """The context (with BOS, cut to max_length) and continuation ids the adapter scores."""
    spaces = len(context) - len(context.rstrip())  # lm-eval's split (HFLM._encode_pair)
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    plain = lm.tok.encode(context, add_special_tokens=False) if context else []
    cont = lm.tok.encode(context + continuation, add_special_tokens=False)[len(plain):]
    ctx = lm.tok.encode(context, add_special_tokens=True)
    if lm.max_length is not None:
        ctx = ctx[max(0, len(ctx) + len(cont) - lm.max_length - 1):]
    return ctx, cont


def one_at_a_time(lm, context, continuation):
    """One request through judge.token_logprobs, as the adapter scored each before batching."""
    ctx, cont = request_ids(lm, context, continuation)
    if not cont:
        return 0.0, True
    lp, greedy = token_logprobs(lm.model, ctx, cont, return_greedy=True)
    return float(np.sum(lp)), bool(np.all(greedy))


def greedy_request(lm, context):
    """(context, the model's argmax next token as text), where that text encodes back to the token."""
    ids = lm.tok.encode(context, add_special_tokens=True)
    logits, _ = lm.model(mx.array([ids], dtype=mx.int32))
    token = int(mx.argmax(logits[0, -1]))
    text = lm.tok.decode([token])
    assert lm.tok.encode(text, add_special_tokens=False) == [token]
    return context, text


def assert_same(got, expected):
    assert len(got) == len(expected)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, expected):
        assert math.isclose(lp, ref_lp, rel_tol=1e-5, abs_tol=1e-5), (got, expected)
        assert greedy is ref_greedy, (got, expected)


@pytest.mark.parametrize("max_length", [None, 20])
def test_loglikelihood_batches_equal_one_at_a_time_in_order(checkpoint, monkeypatch, max_length):
    monkeypatch.setattr(judge, "SCORE_PIECE", PIECE)
    lm = adapter(checkpoint, max_length=max_length)
    pairs = list(zip(CONTEXTS, CONTINUATIONS)) + [greedy_request(lm, "the quick brown fox jumps over the"),
                                                  greedy_request(lm, "def f(x):\n")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    expected = [one_at_a_time(lm, *pair) for pair in pairs]
    lengths = [sum(map(len, request_ids(lm, *pair))) for pair in pairs]
    assert max(lengths) > 2 * PIECE and lengths != sorted(lengths, reverse=True)  # pieces; not in Collator order
    if max_length:  # contexts cut from the left
        assert max(lengths) == max_length + 1 < len(lm.tok.encode(CONTEXTS[2], add_special_tokens=True))
    scores = [lp for lp, _ in expected]
    assert len(set(scores)) == len(scores)  # a request's score in another's place shows
    assert {greedy for _, greedy in expected} == {True, False} and expected[CONTINUATIONS.index("")] == (0.0, True)
    for batch_size in (1, 3, "4", len(pairs) + 5):
        lm = adapter(checkpoint, max_length=max_length, batch_size=batch_size)
        lm.model = recording = Recording(lm.model)
        assert_same(lm.loglikelihood(requests), expected)
        # One forward pass per piece of each batch, longest requests first; empty continuations not run
        run, size, shapes = sorted((n for n, (_, x) in zip(lengths, pairs) if x), reverse=True), int(batch_size), []
        for first in range(0, len(run), size):
            shapes += [(len(run[first : first + size]), min(PIECE, run[first] - b)) for b in range(0, run[first], PIECE)]
        assert recording.shapes == shapes


@pytest.mark.parametrize("max_length", [None, 5])
def test_loglikelihood_rolling_batches_equal_one_at_a_time_in_order(checkpoint, monkeypatch, max_length):
    from lm_eval import utils as lm_utils

    monkeypatch.setattr(judge, "SCORE_PIECE", PIECE)
    lm = adapter(checkpoint, max_length=max_length)
    expected, rows = [], 0  # rows: the (context, tokens) pieces of text scored, each from a fresh state
    for text in TEXTS:  # as the adapter scored them one at a time, each window from a fresh state
        ids = lm.tok.encode(text, add_special_tokens=True)
        if len(ids) < 2:
            expected.append(0.0)
        elif max_length is None:
            expected.append(float(np.sum(token_logprobs(lm.model, ids[:1], ids[1:]))))
            rows += 1
        else:
            windows = list(lm_utils.get_rolling_token_windows(ids[1:], ids[0], max_length, 1))
            rows += len(windows)
            expected.append(sum(float(np.sum(token_logprobs(lm.model, *lm_utils.make_disjoint_window(w))))
                                for w in windows))
    assert len(set(expected)) == len(expected) and 0.0 in expected  # "" is BOS alone: nothing scored
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(TEXTS)]
    for batch_size in (1, 3, 50):
        lm = adapter(checkpoint, max_length=max_length, batch_size=batch_size)
        lm.model = recording = Recording(lm.model)
        got = lm.loglikelihood_rolling(requests)
        assert len(got) == len(expected)
        for value, ref in zip(got, expected):
            assert math.isclose(value, ref, rel_tol=1e-5, abs_tol=1e-5), (got, expected)
        assert max(b for b, _ in recording.shapes) == min(batch_size, rows)  # windows of several texts at once
        assert max(s for _, s in recording.shapes) <= PIECE


def test_batch_size_values(checkpoint):
    assert parse_batch_size(3) == parse_batch_size("3") == parse_batch_size(" 3 ") == 3
    assert parse_batch_size(None) == 1
    assert parse_batch_size("auto") == parse_batch_size("auto:4") == AUTO_BATCH_SIZE
    assert parse_batch_size("auto", max_batch_size=2) == parse_batch_size("auto:1", "2") == min(2, AUTO_BATCH_SIZE)
    assert parse_batch_size(5, max_batch_size=2) == 5  # as lm-eval's models: a bound on "auto" only
    for bad in (0, -1, "0", "-2", "abc", "", 2.5, True, "auto:x", "autox"):
        with pytest.raises(ValueError, match="batch_size must be a positive integer.*got " + re.escape(repr(bad))):
            parse_batch_size(bad)
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer, got 0"):
        parse_batch_size("auto", max_batch_size=0)
    with pytest.raises(ValueError, match="got 'abc'"):
        XLSTMMetalLM(pretrained=checkpoint, batch_size="abc")
    assert adapter(checkpoint, batch_size="2").batch_size == 2
    with warnings.catch_warnings():  # as lm_eval.simple_evaluate builds the model
        warnings.simplefilter("ignore")
        lm = XLSTMMetalLM.create_from_arg_string(f"pretrained={checkpoint}",
                                                 {"batch_size": "auto:2", "max_batch_size": 3, "device": None})
        assert lm.batch_size == min(3, AUTO_BATCH_SIZE)
        assert XLSTMMetalLM.create_from_arg_string(f"pretrained={checkpoint}", {"batch_size": "5"}).batch_size == 5


def test_batched_logprobs_refuses_ids_past_the_vocabulary(checkpoint):
    lm = adapter(checkpoint)
    vocab = lm.model.config.vocab_size
    with pytest.raises(ValueError, match=rf"token ids must be integers in \[0, {vocab}\), got {vocab}"):
        judge.batched_token_logprobs(lm.model, [([0, 5], [6]), ([0], [vocab])], 2)
    assert judge.batched_token_logprobs(lm.model, [], 4) == []
    # Rows that predict nothing (no token, or one: only context) score nothing, beside one that does
    got = judge.batched_token_logprobs(lm.model, [([], []), ([0], []), ([], [5]), ([0, 5], [6, 7])], 4)
    assert [lp.shape for lp, _ in got] == [(0,), (0,), (0,), (2,)]
    assert np.allclose(got[3][0], token_logprobs(lm.model, [0, 5], [6, 7]), atol=1e-6)


# ---------------------------------------------------------------------- generate_until
GEN_CONTEXTS = ["the quick", "def f(x):\n    return x * 2\n" * 3, "naïve café", "xLSTM models keep",
                "the lazy dog. " * 4, "emoji 🙂", "a"]
SAMPLED = {"do_sample": True, "temperature": 1.0, "top_k": 40}


def generate_one_at_a_time(lm, context, gen_kwargs):
    """A generate_until request as the adapter ran each before batching: alone through runner.generate."""
    kw = dict(gen_kwargs)
    until = kw.pop("until", None)
    until = [until] if isinstance(until, str) else until
    max_tokens = int(kw.pop("max_gen_toks", 256))
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    if not kw.pop("do_sample", temperature > 0):
        temperature = 0.0
    prompt = lm.tok.encode(context, add_special_tokens=True)
    if lm.max_length is not None:
        prompt = prompt[-max(1, lm.max_length - max_tokens):]
    ids = lm.runner.generate(prompt, max_tokens=max_tokens, temperature=temperature,
                             stop=list(until) if until else None, **{"seed": 0, **kw})
    text = lm.tok.decode(ids)
    for stop in until or []:
        if stop in text:
            text = text[: text.index(stop)]
    return text


def stop_inside(text):
    """Two characters from the middle of ``text`` (no replacement character) that first occur past its start."""
    for i in range(len(text) // 2, len(text) - 1):
        piece = text[i : i + 2]
        if "\ufffd" not in piece and text.index(piece) >= 2:
            return piece
    raise AssertionError(f"no stop string inside {text!r}")


def generation_requests(lm):
    """Requests of every kind, settings interleaved: greedy ones (some asking for a temperature, a top_k, or
    do_sample false) with different lengths, stops and max_gen_toks; two with one context and different stops;
    one of 0 tokens; a repetition penalty; seeded sampling (two on the default seed 0) in two settings."""
    full = {c: generate_one_at_a_time(lm, c, {"until": [], "max_gen_toks": 12}) for c in GEN_CONTEXTS[:2] + GEN_CONTEXTS[4:5]}
    lazy, code = GEN_CONTEXTS[4], GEN_CONTEXTS[1]
    asks = [
        (GEN_CONTEXTS[0], {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": False}),
        (lazy, {"until": [stop_inside(full[lazy]), "never"], "max_gen_toks": 12}),
        (GEN_CONTEXTS[5], {**SAMPLED, "until": ["\n"], "max_gen_toks": 9}),
        (code, {"until": "zz", "max_gen_toks": 5, "temperature": 0.0}),
        (GEN_CONTEXTS[3], {"max_gen_toks": 7, "repetition_penalty": 1.3}),
        (lazy, {"until": ["zzz"], "max_gen_toks": 12, "do_sample": False, "temperature": 0.8}),
        (GEN_CONTEXTS[6], {**SAMPLED, "max_gen_toks": 8}),
        (GEN_CONTEXTS[2], {"until": [], "max_gen_toks": 0}),
        (GEN_CONTEXTS[0], {**SAMPLED, "max_gen_toks": 8, "seed": 5}),
        (GEN_CONTEXTS[2], {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "min_p": 0.05, "max_gen_toks": 6}),
        (code, {"until": [stop_inside(full[code])], "max_gen_toks": 12, "top_k": 3}),
        (GEN_CONTEXTS[5], {"max_gen_toks": 4, "repetition_penalty": 1.3, "until": ["\n"]}),
        (GEN_CONTEXTS[6], {"max_gen_toks": 3}),
    ]
    return asks, full


def test_generate_until_batches_equal_one_at_a_time_in_order(checkpoint):
    from xlstm_metal.kernels.cpu import decode_step as cpu_decode_step

    for max_length, c_step in ((None, True), (12, True), (None, False)):  # False: MLX's graph decodes
        with cpu_decode_step.switched(c_step):
            lm = adapter(checkpoint, max_length=max_length)
            asks, full = generation_requests(lm)
            expected = [generate_one_at_a_time(lm, *ask) for ask in asks]
            assert len(set(expected)) == len(expected) and expected[7] == ""  # an answer in another's place shows
            lazy = full[GEN_CONTEXTS[4]]
            if max_length is None:  # one context, a stop in one request and not the other: each row has its own
                assert expected[5] == lazy and expected[1] == lazy[: lazy.index(asks[1][1]["until"][0])] != lazy
                # each row's own max_gen_toks: 3 tokens where the rows beside it take 12
                assert len(expected[12]) < len(generate_one_at_a_time(lm, GEN_CONTEXTS[6], {"max_gen_toks": 12}))
            assert expected[8] != generate_one_at_a_time(lm, GEN_CONTEXTS[0], {"max_gen_toks": 8})  # sampled
            requests = [Instance("generate_until", {}, ask, i) for i, ask in enumerate(asks)]
            prompts = sorted(len(generation_prompt(lm, *ask)) for ask in asks if ask[1]["max_gen_toks"])
            for batch_size in (1, 3, 8, "auto"):
                lm = adapter(checkpoint, max_length=max_length, batch_size=batch_size)
                prefilled, decoded = record_generation(lm.runner)
                assert lm.generate_until(requests) == expected, batch_size
                # each prompt prefilled once, alone and unpadded; rows of one setting decode together
                assert sorted(prefilled) == prompts
                assert sum(decoded) == len(prompts) and max(decoded) <= lm.batch_size
                greedy_rows = 6  # the greedy requests without repetition penalty that ask for tokens
                assert max(decoded) == min(lm.batch_size, greedy_rows)


def generation_prompt(lm, context, gen_kwargs):
    ids = lm.tok.encode(context, add_special_tokens=True)
    if lm.max_length is not None:
        ids = ids[-max(1, lm.max_length - gen_kwargs["max_gen_toks"]):]
    return ids


def record_generation(runner):
    """Lists that fill with the length of every prompt the runner prefills and the rows of every decode."""
    prefilled, decoded = [], []
    prefill, decode = runner.prefill, runner._decode

    def recording_prefill(ids, state=None):
        prefilled.append(len(ids))
        return prefill(ids, state)

    def recording_decode(logits, *args):
        decoded.append(logits.shape[0])
        return decode(logits, *args)

    runner.prefill, runner._decode = recording_prefill, recording_decode
    return prefilled, decoded


def test_generate_until_refuses_bad_settings_before_generating(checkpoint):
    lm = adapter(checkpoint, batch_size=4)
    prefilled, _ = record_generation(lm.runner)
    good = Instance("generate_until", {}, ("the quick", {"max_gen_toks": 3}), 0)
    with pytest.raises(ValueError, match=r"generation settings \['num_beams'\] are not supported"):
        lm.generate_until([good, Instance("generate_until", {}, ("x", {"num_beams": 4}), 1)])
    with pytest.raises(ValueError, match="top_p must be in"):
        lm.generate_until([good, Instance("generate_until", {}, ("x", {**SAMPLED, "top_p": 1.5}), 1)])
    assert prefilled == []  # every request is checked before any runs
    assert lm.generate_until([]) == []
