"""Session 52's hunt over the Python API: model(ids, state), the runner and the lm-eval adapter."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model
from test_lm_eval_batching import adapter, checkpoint  # noqa: F401  (checkpoint: a fixture)

from xlstm_metal.generation import xLSTMRunner
from xlstm_metal.models.xlstm_2024 import create_xlstm_model

IDS = mx.array([[1, 2, 3, 4]])


def test_a_state_of_another_model_is_refused_by_name():
    model = tiny_model()
    for other in (tiny_model(num_heads=4), tiny_model(embedding_dim=128)):  # other heads / head sizes
        for call in (model, model.prefill):
            for ids in (IDS, IDS[:, :1]):
                with pytest.raises(ValueError, match=r"state\[0\] holds arrays of shapes .* another model"):
                    call(ids, other.make_state(1))  # was an MLX broadcast error deep in the block
    with pytest.raises(ValueError, match="another model"):  # was "not enough values to unpack"
        model(IDS, [layer[:2] for layer in model.make_state(1)])
    small = create_xlstm_model(50, 2, (1, 1), 32, 8, 4, seed=1)
    for other in (create_xlstm_model(50, 2, (1, 1), 32, 16, 2), create_xlstm_model(50, 2, (1, 1), 64, 16, 4)):
        for ids in (IDS, IDS[:, :1]):
            with pytest.raises(ValueError, match="another model"):
                small(ids, other.make_state(1))
        with pytest.raises(ValueError, match=r"state\[1\]"):  # a None entry is a block's zero state
            small(IDS, [None, other.make_state(1)[1]])
    # its own states pass, and they carry: one token at a time equals the whole prompt at once
    for m in (model, small):
        logits, _ = m(IDS)
        state, steps = m.make_state(1), []
        for t in range(IDS.shape[1]):
            out, state = m(IDS[:, t:t + 1], state)
            steps.append(out)
        assert mx.allclose(mx.concatenate(steps, axis=1), logits, atol=1e-5)
    model.fuse_projections()
    deferred = model.defer_state(model.make_state(2), 4)  # six arrays per block: its first three checked
    assert len(deferred[0]) == 6
    out, deferred = model(mx.array([[1], [2]]), deferred)
    assert out.shape == (2, 1, 97)


def test_an_empty_batch_is_refused_by_name():
    empty = mx.zeros((0, 3), dtype=mx.int32)
    model = tiny_model()
    for call in (model, model.prefill, create_xlstm_model(50, 2, (1, 1), 32, 8, 4)):
        with pytest.raises(ValueError, match=r"B >= 1"):  # a reshape's "Cannot infer the shape", or / 0
            call(empty)


def test_stream_takes_a_numpy_max_tokens_as_generate_does():
    runner = xLSTMRunner(tiny_model(1), prefill_chunk_size=np.int64(2))
    expected = runner.generate([5, 6, 7], max_tokens=3)
    assert len(expected) == 3 and runner.prefill_chunk_size == 2
    assert [chunk.token for chunk in runner.stream([5, 6, 7], max_tokens=np.int64(3))] == expected


def generate(lm, settings, context="the quick"):
    from lm_eval.api.instance import Instance

    return lm.generate_until([Instance("generate_until", {}, (context, settings), 0)])


@pytest.mark.parametrize("settings, error, match", [
    ({"max_gen_toks": 2.7}, ValueError, "max_gen_toks must be an integer >= 0, got 2.7"),  # ran 2
    ({"max_gen_toks": None}, ValueError, "max_gen_toks must be an integer"),
    ({"max_gen_toks": -1}, ValueError, "max_gen_toks must be"),
    ({"until": [5]}, TypeError, "until must be a string or a list of strings"),  # failed after generating
    ({"until": 5}, TypeError, "until must be"),
    ({"temperature": "0.5", "do_sample": True}, TypeError, "temperature must be a real number"),  # ran at 0.5
    ({"do_sample": True}, ValueError, "do_sample is true but temperature is 0"),  # ran greedy
    ({"do_sample": True, "temperature": 0}, ValueError, "do_sample is true"),
    ({"do_sample": "yes", "temperature": 1.0}, TypeError, "do_sample must be true or false"),
    (None, TypeError, "settings must be a dict"),
])
def test_generate_until_refuses_settings_it_would_misread(checkpoint, settings, error, match):  # noqa: F811
    lm = adapter(checkpoint)
    with pytest.raises(error, match=match):
        generate(lm, settings)


def test_generate_until_still_takes_what_lm_eval_gives(checkpoint):  # noqa: F811
    lm = adapter(checkpoint)
    greedy = generate(lm, {"max_gen_toks": 3})
    assert generate(lm, {"max_gen_toks": "3", "until": ("zzz",), "temperature": None}) == greedy
    assert generate(lm, {"max_gen_toks": 3, "do_sample": False, "temperature": 0.7}) == greedy
    sampled = {"max_gen_toks": 6, "do_sample": True, "temperature": 1.0, "seed": 3}
    assert generate(lm, sampled) == generate(lm, dict(sampled)) != generate(lm, {"max_gen_toks": 6})


@pytest.mark.parametrize("max_length", ["4.5", 4.5, True, "x", 1])
def test_max_length_must_be_a_whole_number(checkpoint, max_length):  # noqa: F811
    with warnings.catch_warnings(), pytest.raises(ValueError, match="max_length must be an integer of at least 2"):
        warnings.simplefilter("ignore")
        adapter(checkpoint, max_length=max_length)
    assert adapter(checkpoint, max_length="12").max_length == 12


def test_without_bos_every_token_is_scored_after_lm_evals_prefix(checkpoint, tmp_path):  # noqa: F811
    import json
    import shutil

    from lm_eval.api.instance import Instance

    from xlstm_metal.judge import token_logprobs

    path = tmp_path / "no_bos"
    shutil.copytree(checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "force_bos_token_insert": False}))
    lm = adapter(str(path))
    text = "the quick brown fox"
    ids = lm.tok.encode(text)
    assert ids[0] != 0 and len(ids) > 2  # no BOS inserted: the prefix is the BOS id, 0
    expected = float(np.sum(token_logprobs(lm.model, [0], ids)))  # every token, the first included
    (score, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("", text), 0)])
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert score == pytest.approx(expected, abs=1e-4) and rolling == pytest.approx(expected, abs=1e-4)
    assert lm.loglikelihood([Instance("loglikelihood", {}, ("the", " quick"), 0)])[0][0] == pytest.approx(
        float(np.sum(token_logprobs(lm.model, lm.tok.encode("the"), lm.tok.encode(" quick")))), abs=1e-5)


def test_a_pair_is_split_as_lm_evals_own_models_split_it(checkpoint):  # noqa: F811
    """A context ending in a space: lm-eval's models (HFLM._encode_pair) move the space to the
    continuation and take its ids from the pair encoded whole. Encoded apart, the space was a
    context token of its own and the continuation a word without its space: other tokens, other
    scores than every lm-eval model reports."""
    from lm_eval.api.instance import Instance

    lm = adapter(checkpoint)
    joined = lm.tok.encode(" brown fox", add_special_tokens=False)
    assert joined != lm.tok.encode("brown fox", add_special_tokens=False)  # the space is in the word's token
    assert lm._rows("the quick ", "brown fox") == (lm.tok.encode("the quick", add_special_tokens=True), joined)
    scores = lm.loglikelihood([Instance("loglikelihood", {}, pair, 0) for pair in
                               [("the quick ", "brown fox"), ("the quick", " brown fox")]])
    assert scores[0] == scores[1]
