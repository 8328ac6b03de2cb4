"""`xlstm-metal serve`'s /v1/completions prompts of token ids and echo with logprobs, at their
edges: ids the model takes but its tokenizer lacks (a vocabulary padded past the tokenizer's, as
xLSTM-7b's 50304 beside GPT-NeoX's 50277 tokens), and token ids under mlx.launch. A tiny random
model in a temp dir, as in test_serve.py; nothing downloads."""

import pytest
from conftest import tiny_model
from test_serve import PROMPTS, error_message, expected_text, post, write_checkpoint
from test_tokenizer import train_tiny_tokenizer

from xlstm_metal import save_model

mlx_lm = pytest.importorskip("mlx_lm")

from xlstm_metal.serve import make_server, server_args  # noqa: E402

#: The ids past the tokenizer's vocabulary that the model's embedding and logits still have.
PADDING = 8


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """A checkpoint whose model is PADDING ids wider than its tokenizer; (path, tokenizer size)."""
    tok = train_tiny_tokenizer()
    path = tmp_path_factory.mktemp("serve_token_prompts") / "ckpt"
    save_model(tiny_model(5, vocab_size=tok.get_vocab_size() + PADDING, eos_token_id=None), path, tokenizer=tok)
    return path, tok.get_vocab_size()


@pytest.fixture(scope="module")
def padded_server(padded):
    with make_server(server_args(padded[0], port=0, dtype="float32")).start() as srv:
        yield srv


def test_ids_the_tokenizer_lacks_have_no_text_in_logprobs(padded_server, padded):
    """A token id the model has but the tokenizer lacks (a prompt may name one; the model may pick
    one) is "" in logprobs, as the tokenizer decodes it. Its name is None, which failed the
    byte-level BPE's byte lookup: a 500 for echo with logprobs of such a prompt, and for any
    reply with logprobs whose tokens or likeliest tokens held one."""
    import mlx.core as mx
    import numpy as np

    path, size = padded
    model, tokenizer = mlx_lm.load(str(path), trust_remote_code=True)
    ids = [*tokenizer.encode("the cat", add_special_tokens=False), size + 3, 40]
    status, answer = post(padded_server.url, "/v1/completions", {
        "prompt": ids, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 2})
    assert status == 200, answer
    logprobs = answer["choices"][0]["logprobs"]
    assert logprobs["tokens"][:len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert logprobs["tokens"][len(ids) - 2] == ""
    logits = model(mx.array(ids)[None]).astype(mx.float32)[0]
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    assert logprobs["token_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:len(ids)] == pytest.approx(
        [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4)
    assert answer["choices"][0]["text"].startswith(tokenizer.decode(ids))
    # A reply of such tokens (logit_bias picks one), with its likeliest tokens, on both endpoints.
    bias = {"logit_bias": {str(size + 5): 100}, "max_tokens": 2, "temperature": 0}
    status, answer = post(padded_server.url, "/v1/completions", {"prompt": "the cat", "logprobs": 5, **bias})
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["logprobs"]["tokens"] == ["", ""]
    assert choice["text"] == ""  # as the tokenizer decodes them (mlx-lm's detokenizer wrote "!" for each)
    assert all("" in top for top in choice["logprobs"]["top_logprobs"])
    status, answer = post(padded_server.url, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 3, **bias})
    assert status == 200, answer
    content = answer["choices"][0]["logprobs"]["content"]
    assert [(c["token"], c["bytes"], c["id"]) for c in content] == [("", [], size + 5)] * 2


def test_a_follower_under_mlx_launch_takes_a_prompt_of_ids_as_rank_0(padded):
    """Under mlx.launch every rank tokenizes each request (rank 0 shares it, not its tokens): the
    followers' generator took a prompt of ids to the tokenizer, which refused it (rank 0 ran the
    request, the followers dropped it, and their collectives no longer matched)."""
    import types

    from mlx_lm import server as mlx_server

    from xlstm_metal import serve

    tokenizer = mlx_lm.load(str(padded[0]), trust_remote_code=True)[1]
    for prompt, want in (([5, 6, 7], [5, 6, 7]), ("the cat", tokenizer.encode("the cat"))):
        request = mlx_server.CompletionRequest("text", prompt, [], None, None)
        for generator in (serve.ResponseGenerator, serve._Follower):
            args = types.SimpleNamespace(model_defaults=frozenset())
            tokens = generator._tokenize(object.__new__(generator), tokenizer, request, args)[0]
            assert list(tokens) == want and args.prompt_tokens == want, (generator, prompt)


def test_echo_with_logprobs_after_a_request_for_another_checkpoint(tmp_path):
    """A request naming another checkpoint leaves it loaded; the prompt of the next one for the
    served model, with echo and logprobs, was scored before its reply loaded the served model
    back, and refused as another model's (a 400, for every such request until a plain one came).
    A request naming the other checkpoint is still refused."""
    import shutil

    import mlx.core as mx
    import numpy as np

    ckpt = write_checkpoint(tmp_path / "ckpt")
    other = shutil.copytree(ckpt, tmp_path / "other")
    model, tokenizer = mlx_lm.load(str(ckpt), trust_remote_code=True)
    body = {"prompt": PROMPTS[1], "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1}
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        status, answer = post(srv.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2, "model": str(other)})
        assert status == 200, answer
        for _ in range(2):
            status, answer = post(srv.url, "/v1/completions", body)
            assert status == 200, answer
            tokens = tokenizer.encode(PROMPTS[1])  # the BOS first: context, not listed
            logits = model(mx.array(tokens)[None]).astype(mx.float32)[0]
            logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            logprobs = answer["choices"][0]["logprobs"]
            assert logprobs["token_logprobs"][:len(tokens) - 1] == pytest.approx(
                [float(logp[i - 1, tokens[i]]) for i in range(1, len(tokens))], abs=1e-4)
            assert answer["choices"][0]["text"] == PROMPTS[1] + expected_text((model, tokenizer), PROMPTS[1], 2)
        status, answer = post(srv.url, "/v1/completions", {**body, "model": str(other)})
        assert status == 400 and "scores the prompt with the model being served" in error_message(status, answer)
        status, answer = post(srv.url, "/v1/completions", body)
        assert status == 200, answer
