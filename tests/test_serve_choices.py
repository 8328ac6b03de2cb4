"""`xlstm-metal serve`: several choices in one request (``n`` > 1, several prompts on
/v1/completions), as OpenAI's API answers them: usage, seeds, checks, and the work a request
that ends early leaves behind. A tiny random model in a temp dir, as in test_serve.py."""

import http.client
import json
import threading
import time

import pytest
from test_serve import PROMPTS, error_message, post, stream_events
from test_serve import ckpt, server  # noqa: F401  (the fixtures: a tiny checkpoint, a server of it)

pytest.importorskip("mlx_lm")

from xlstm_metal.serve import make_server, server_args  # noqa: E402


def narrow_server(ckpt, slots):
    """A server decoding ``slots`` requests at once (a request's choices run ``slots`` at a time)."""
    return make_server(server_args(ckpt, port=0, dtype="float32", decode_concurrency=slots, prompt_concurrency=1))


def choice_threads():
    return [t for t in threading.enumerate() if t.name.startswith("choice")]


def test_usage_counts_a_prompt_once_for_its_n_choices(server):
    """OpenAI's usage for n choices: the prompt's tokens once, the completion tokens of all of
    them (each prompt once where there are several). The prompt was counted n times: n=128
    reported 128 times the prompt's tokens."""
    text = {"max_tokens": 4, "temperature": 1.0, "seed": 3}
    alone = [post(server.url, "/v1/completions", {**text, "prompt": p})[1]["usage"] for p in PROMPTS[:2]]
    status, answer = post(server.url, "/v1/completions", {**text, "prompt": PROMPTS[0], "n": 3})
    assert status == 200, answer
    usage = answer["usage"]
    assert usage["prompt_tokens"] == alone[0]["prompt_tokens"] and usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]
    status, answer = post(server.url, "/v1/completions", {**text, "prompt": PROMPTS[:2], "n": 2})
    assert status == 200 and len(answer["choices"]) == 4, answer
    assert answer["usage"]["prompt_tokens"] == alone[0]["prompt_tokens"] + alone[1]["prompt_tokens"]
    assert answer["usage"]["completion_tokens"] == 16
    chat = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 3}
    one = post(server.url, "/v1/chat/completions", chat)[1]["usage"]
    events = stream_events(server.url, "/v1/chat/completions",
                           {**chat, "n": 4, "stream": True, "stream_options": {"include_usage": True}})
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["prompt_tokens"] == one["prompt_tokens"]
    assert usage["completion_tokens"] == 12 and usage["total_tokens"] == one["prompt_tokens"] + 12


def test_seeds_of_later_choices_wrap_below_2_to_the_64(server):
    """Choice j samples with seed + j: a seed of 2**64-1 (valid) with n=2 was refused for its
    choice 1 ("seed must be in 0..2**64-1, got 18446744073709551616"). It wraps to 0; a seed
    out of range is still refused."""
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 1.0}
    status, answer = post(server.url, "/v1/completions", {**body, "seed": 2**64 - 1, "n": 2})
    assert status == 200, answer
    texts = [c["text"] for c in answer["choices"]]
    for seed, text in zip((2**64 - 1, 0), texts):
        status, one = post(server.url, "/v1/completions", {**body, "seed": seed})
        assert status == 200 and one["choices"][0]["text"] == text
    status, answer = post(server.url, "/v1/completions", {**body, "seed": 2**64, "n": 2})
    assert status == 400 and "seed must be in" in error_message(status, answer, "seed")


@pytest.mark.parametrize("stream", ["false", "yes", 0, 1])
def test_stream_must_be_a_boolean_with_several_choices(server, stream):
    """One choice refuses a stream that is not true or false; several read it with bool(): the
    string "false" streamed, 0 did not, without a word."""
    for body in ({"prompt": PROMPTS[0], "n": 2}, {"prompt": PROMPTS[:2]},
                 {"messages": [{"role": "user", "content": "hi"}], "n": 2}):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, answer = post(server.url, path, {**body, "max_tokens": 2, "stream": stream})
        assert status == 400 and "stream must be of type bool" in error_message(status, answer, "stream"), answer


def test_a_refused_choice_past_the_decode_slots_answers_at_once(ckpt):
    """Every choice is checked before any runs: a bad prompt that the pool would start only
    once the choices before it had ended (past decode_concurrency) was refused after they had
    run to max_tokens (here: never, within the client's patience)."""
    with narrow_server(ckpt, 1).start() as srv:
        taken = srv.generator._taken_count
        for stream in (False, True):
            body = {"prompt": [PROMPTS[0], PROMPTS[1], [1, 10**6]], "max_tokens": 100_000, "stream": stream}
            status, answer = post(srv.url, "/v1/completions", body, timeout=10)
            assert status == 400, answer
            assert "prompt 2: prompt token id 1000000" in error_message(status, answer, "prompt")
            body = {"messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 100_000,
                    "top_logprobs": 2, "stream": stream}  # without logprobs: true (every choice's error)
            status, answer = post(srv.url, "/v1/chat/completions", body, timeout=10)
            assert status == 400 and "top_logprobs needs logprobs" in error_message(status, answer)
        assert srv.generator._taken_count == taken  # nothing generated


@pytest.mark.parametrize("stream", [True, False])
def test_choices_not_started_when_the_client_leaves_never_run(ckpt, stream):
    """A client leaving a request of 24 choices, 2 decoding at a time: the 22 waiting for a
    slot are dropped. Each was run before, its prompt and first tokens, only to be stopped at
    its first look at the client (n=128 held the server ~1.5 s after the client had gone)."""
    with narrow_server(ckpt, 2).start() as srv:
        host, port = srv.httpd.server_address[:2]
        taken = srv.generator._taken_count
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPTS[0], "n": 24, "max_tokens": 100_000,
                                                             "temperature": 1.0, "stream": stream}),
                     {"Content-Type": "application/json"})
        if stream:
            response = conn.getresponse()
            assert response.status == 200 and response.fp.readline()  # a keepalive or a chunk
            response.close()
        else:
            deadline = time.monotonic() + 20
            while srv.generator._taken_count < taken + 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        conn.close()
        deadline = time.monotonic() + 20
        while choice_threads() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not choice_threads()
        assert srv.generator._taken_count - taken <= 4  # the two decoding (and any started meanwhile)
        status, answer = post(srv.url, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 3}, timeout=20)
        assert status == 200 and answer["usage"]["completion_tokens"] == 3


def test_an_error_names_a_prompt_only_where_it_is_that_prompts(ckpt, server, tmp_path):
    """Several prompts: an error of a field they all share, or of the model, names no prompt
    (it read "prompt 0: temperature must be in [0, 2], got 5", and a model not found named
    whichever prompt's copy answered first); a prompt's own error names it."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    for fields, status_param in (({"temperature": 5}, (400, "temperature")), ({"max_tokens": 0}, (400, "max_tokens")),
                                 ({"model": str(tmp_path / "nope")}, (404, "model"))):
        for stream in (False, True):
            status, answer = post(server.url, "/v1/completions",
                                  {"prompt": prompts, "max_tokens": 2, **fields, "stream": stream})
            assert status == status_param[0], answer
            assert not error_message(status, answer, status_param[1]).startswith("prompt "), answer
    from test_serve_more import with_generation_config

    path = with_generation_config(ckpt, tmp_path / "short", {"max_length": 8})
    with make_server(server_args(path, port=0, dtype="float32")).start() as srv:
        status, answer = post(srv.url, "/v1/completions", {"prompt": [PROMPTS[2], PROMPTS[1]]})
        assert status == 400, answer
        assert error_message(status, answer, "max_tokens").startswith("prompt 1: max_tokens is needed")


def test_a_stream_of_several_choices_keeps_alive_while_its_prompt_runs(ckpt, monkeypatch):
    """One choice's stream starts once its request is taken and sends ": keepalive" comments
    while the prompt runs; several choices sent nothing, not even the status line, until the
    first token (a client with a read timeout gave up on a long prompt)."""
    from xlstm_metal.mlx_lm_model import ModelLarge

    call = ModelLarge.__call__

    def slow_prompt(self, inputs, cache=None):
        if inputs.shape[1] > 1:  # a piece of a prompt
            time.sleep(0.05)
        return call(self, inputs, cache)

    monkeypatch.setattr(ModelLarge, "__call__", slow_prompt)
    args = server_args(ckpt, port=0, dtype="float32", prefill_step_size=8)
    with make_server(args).start() as srv:
        host, port = srv.httpd.server_address[:2]
        for body in ({"prompt": " ".join(PROMPTS * 2), "n": 2}, {"prompt": [" ".join(PROMPTS * 2), PROMPTS[2]]}):
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("POST", "/v1/completions", json.dumps({**body, "max_tokens": 2, "stream": True}),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200
            lines = [line for line in response.read().split(b"\n\n") if line]
            conn.close()
            assert lines[0].startswith(b": keepalive "), lines[:2]
            data = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
            assert len({d["id"] for d in data}) == 1 and {d["choices"][0]["index"] for d in data} == {0, 1}
            assert lines[-1] == b"data: [DONE]"
