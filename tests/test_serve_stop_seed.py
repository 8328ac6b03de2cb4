"""`xlstm-metal serve`: the logprobs of a reply a stop word ends, and seeded requests served in
the batch with the others.

Stop words: the reply's text is cut before the stop word, and its logprobs list exactly the
tokens of the returned text (OpenAI's): the stop word's tokens are no part of them, streamed or
not, on both endpoints. A token whose text starts before the cut and runs past it (part of its
text is returned) is kept. The random model is steered to a scripted reply (as in
test_serve_text_offset), so the tokens are known exactly.

Seeds: a seeded request samples with its own random key, split at each of its draws, so it
joins the batch: the same seeded request gives the same tokens alone or beside others, and
does not hold them up. Nothing downloads."""

import http.client
import json
import time

import mlx.core as mx
import pytest
import test_serve_text_offset
from test_serve import chat_prompt, post, stream_events, write_checkpoint
from test_serve_text_offset import REPLACEMENT, byte_token, byte_tokens

mlx_lm = pytest.importorskip("mlx_lm")

from xlstm_metal.serve import make_server, server_args  # noqa: E402

LOGPROB_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve_stop_seed") / "ckpt")


@pytest.fixture(scope="module")
def reference(ckpt):
    return mlx_lm.load(str(ckpt), trust_remote_code=True)


@pytest.fixture(scope="module")
def tokenizer(reference):
    return reference[1]


@pytest.fixture(scope="module")
def server(ckpt):
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        yield srv


scripted = test_serve_text_offset.scripted  # the fixture, on this module's tokenizer


def completion(server, prompt, n, stop, stream=False, echo=False, chunkwise=False):
    """(text, finish_reason, logprobs) of a greedy /v1/completions request with logprobs 1; the
    stream's chunks' logprobs are joined. ``chunkwise``: each chunk's tokens spell its text (a
    reply of one-character tokens), none goes out before its text does."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 1, "stop": stop, "echo": echo}
    if not stream:
        status, answer = post(server.url, "/v1/completions", body)
        assert status == 200, answer
        choice = answer["choices"][0]
        return choice["text"], choice["finish_reason"], choice["logprobs"]
    events = stream_events(server.url, "/v1/completions", {**body, "stream": True})
    choices = [e["choices"][0] for e in events if e["choices"]]
    if chunkwise:
        assert all("".join(c["logprobs"]["tokens"]) == c["text"] for c in choices), choices
    logprobs = {key: [v for c in choices for v in c["logprobs"][key]] for key in LOGPROB_KEYS}
    return "".join(c["text"] for c in choices), choices[-1]["finish_reason"], logprobs


def chat(server, n, stop, stream=False):
    """(content, finish_reason, logprobs content entries) of a greedy chat request."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": n, "temperature": 0, "logprobs": True,
            "top_logprobs": 1, "stop": stop}
    if not stream:
        status, answer = post(server.url, "/v1/chat/completions", body)
        assert status == 200, answer
        choice = answer["choices"][0]
        return choice["message"]["content"], choice["finish_reason"], choice["logprobs"]["content"]
    events = stream_events(server.url, "/v1/chat/completions", {**body, "stream": True})
    choices = [e["choices"][0] for e in events if e["choices"]]
    content = "".join(c["delta"].get("content") or "" for c in choices)
    return content, choices[-1]["finish_reason"], [entry for c in choices for entry in c["logprobs"]["content"]]


def texts(tokenizer, text):
    return [byte_token(tokenizer, ord(c)) for c in text]


STREAM = pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])


@STREAM
def test_a_stop_word_s_tokens_are_not_in_the_logprobs(server, tokenizer, scripted, stream):
    """"xyzQRwv", stop "QR": the text is "xyz" and so are the logprobs' tokens (Q and R, cut with
    the stop word, were listed as well)."""
    scripted("a", texts(tokenizer, "xyzQRwv"))
    text, finish, logprobs = completion(server, "a", 7, "QR", stream, chunkwise=True)
    assert (text, finish) == ("xyz", "stop")
    assert logprobs["tokens"] == ["x", "y", "z"]
    assert logprobs["text_offset"] == [1, 2, 3]
    assert len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 3


@STREAM
def test_a_held_prefix_that_is_no_stop_word_keeps_its_logprobs(server, tokenizer, scripted, stream):
    """"xyzQRwv", stop "QX" then "Rw": Q is held back (it could start "QX"), then given back with
    R, whose own text is held until w completes "Rw"; the logprobs end at Q, the returned text."""
    scripted("a", texts(tokenizer, "xyzQRwv"))
    text, finish, logprobs = completion(server, "a", 7, ["QX", "Rw"], stream, chunkwise=True)
    assert (text, finish) == ("xyzQ", "stop")
    assert logprobs["tokens"] == ["x", "y", "z", "Q"]
    assert logprobs["text_offset"] == [1, 2, 3, 4]
    text, finish, logprobs = completion(server, "a", 7, "QX", stream, chunkwise=True)  # no stop word in it
    assert (text, finish) == ("xyzQRwv", "length")
    assert logprobs["tokens"] == list("xyzQRwv")


@STREAM
def test_a_token_straddling_the_cut_is_kept(server, tokenizer, scripted, stream):
    """"x" " t" "y", stop "t": the cut falls inside the token " t", whose text starts before it
    (its space is returned): it is kept, as the token that gives the text its last character.
    Stop " t" cuts before the token: it is dropped."""
    space_t = tokenizer.convert_tokens_to_ids("Ġt")
    assert tokenizer.convert_ids_to_tokens(space_t) == "Ġt"
    scripted("b", [byte_token(tokenizer, ord("x")), space_t, byte_token(tokenizer, ord("y"))])
    text, finish, logprobs = completion(server, "b", 3, "t", stream)
    assert (text, finish) == ("x ", "stop")
    assert logprobs["tokens"] == ["x", " t"]
    assert logprobs["text_offset"] == [1, 2]
    text, finish, logprobs = completion(server, "b", 3, " t", stream)
    assert (text, finish) == ("x", "stop")
    assert logprobs["tokens"] == ["x"]


@STREAM
def test_a_character_split_across_tokens_at_the_cut(server, tokenizer, scripted, stream):
    """"x€y" (€ is three byte tokens): stop "€" drops all three (they start at the cut, adding no
    character before it); stop "y" keeps them."""
    scripted("c", [byte_token(tokenizer, ord("x")), *byte_tokens(tokenizer, "€"), byte_token(tokenizer, ord("y"))])
    text, finish, logprobs = completion(server, "c", 5, "€", stream)
    assert (text, finish, logprobs["tokens"]) == ("x", "stop", ["x"])
    text, finish, logprobs = completion(server, "c", 5, "y", stream)
    assert (text, finish, logprobs["tokens"]) == ("x€", "stop", ["x", *[REPLACEMENT] * 3])
    assert logprobs["text_offset"] == [1, 2, 2, 2]


@STREAM
def test_a_lone_space_before_the_stop_word_is_kept(server, tokenizer, scripted, stream):
    """"x" " " "Q" "R": mlx-lm's byte-level detokenizer holds a lone space until the next token
    (its text comes out with Q's), but the space is the returned text's, Q and R the stop word's."""
    scripted("d", texts(tokenizer, "x QRz"))
    text, finish, logprobs = completion(server, "d", 5, "QR", stream)
    assert (text, finish) == ("x ", "stop")
    assert logprobs["tokens"] == ["x", " "]
    assert logprobs["text_offset"] == [1, 2]


@STREAM
def test_echo_puts_the_prompt_s_logprobs_before_the_cut_reply_s(server, tokenizer, scripted, stream):
    scripted("a", texts(tokenizer, "xyzQRwv"))
    text, finish, logprobs = completion(server, "a", 7, "QR", stream, echo=True)
    assert (text, finish) == ("axyz", "stop")
    prompt = [tokenizer.decode([t]) for t in tokenizer.encode("a", add_special_tokens=False)]
    assert logprobs["tokens"] == [*prompt, "x", "y", "z"]
    assert logprobs["text_offset"][-3:] == [1, 2, 3]


@STREAM
def test_chat_logprobs_end_with_the_returned_content(server, reference, tokenizer, scripted, stream):
    """Chat's ``logprobs.content``: one entry per token of the returned content."""
    last = chat_prompt(reference, [{"role": "user", "content": "hi"}])[-1]
    script = texts(tokenizer, "xyzQRwv")
    assert last not in script
    scripted(last, script)
    content, finish, entries = chat(server, 7, ["QR"], stream)
    assert (content, finish) == ("xyz", "stop")
    assert [e["token"] for e in entries] == ["x", "y", "z"]
    assert all(len(e["top_logprobs"]) == 1 for e in entries)


SEEDED = {"prompt": "the cat sat on", "max_tokens": 32, "temperature": 1.0, "seed": 1234, "logprobs": 0}
#: Sampled requests without a seed: they draw from MLX's global key, in the same batch.
UNSEEDED = [{"prompt": p, "max_tokens": 100_000, "temperature": 1.0, "stream": True}
            for p in ("hello there my good friend, how", "a", "def f(x):\n    return")]


def open_stream(server, body):
    """A streaming request under way: (connection, response) once its first event has come."""
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    received = b""
    while b"data: {" not in received:
        received += response.read1(4096)
    return conn, response


def still_streaming(response) -> bool:
    """Whether the stream goes on: more events come and none ends it."""
    received = b""
    while received.count(b"data: ") < 3:
        chunk = response.read1(4096)
        if not chunk:
            return False
        received += chunk
    return b"[DONE]" not in received and b'"finish_reason": "' not in received


def sampled(server, body):
    status, answer = post(server.url, "/v1/completions", body, timeout=30)
    assert status == 200, answer
    choice = answer["choices"][0]
    return choice["text"], choice["logprobs"]["tokens"], answer["usage"]["completion_tokens"]


def mlx_lm_seeded(reference, prompt, max_tokens, seed, **sampling):
    """The text of mlx-lm's stream_generate after mx.random.seed(seed): what mlx-lm's server
    gave a seeded request (alone, on its one-request path)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = reference
    mx.random.seed(seed)
    special = tokenizer.encode("\n") + list(tokenizer.eos_token_ids)
    sampler = make_sampler(sampling.pop("temperature"), xtc_special_tokens=special, **sampling)
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler))


def test_a_seeded_request_gives_the_same_reply_alone_and_beside_others(server, reference):
    """Alone, then while three sampled requests without a seed stream in the batch (drawing from
    MLX's global key between its draws): the same tokens, mlx-lm's for that seed, and it ends
    while they go on (mlx-lm served it alone: it waited for them to end)."""
    alone = sampled(server, SEEDED)
    assert alone[2] == 32
    assert alone[0] == mlx_lm_seeded(reference, SEEDED["prompt"], 32, 1234, temperature=1.0)
    assert sampled(server, {**SEEDED, "seed": 1235})[0] != alone[0]  # the seed matters
    streams = [open_stream(server, body) for body in UNSEEDED]
    try:
        beside = sampled(server, SEEDED)
        assert all(still_streaming(response) for _, response in streams)
    finally:
        for conn, _ in streams:
            conn.close()
    assert beside == alone


def test_a_seeded_request_with_every_sampling_filter_gives_mlx_lm_s_reply(server, reference):
    """Top-p, min-p, XTC and top-k before the draw, beside a sampled request: each filter as
    mlx-lm's make_sampler applies it, XTC's own draw from the request's key as well."""
    filters = {"top_p": 0.95, "min_p": 0.02, "top_k": 40, "xtc_probability": 0.5, "xtc_threshold": 0.01}
    body = {**SEEDED, "temperature": 1.3, "seed": 77, **filters}
    expected = mlx_lm_seeded(reference, SEEDED["prompt"], 32, 77, temperature=1.3, **filters)
    conn, response = open_stream(server, UNSEEDED[0])
    try:
        assert sampled(server, body)[0] == expected
        assert still_streaming(response)
    finally:
        conn.close()
    assert sampled(server, body)[0] == expected  # alone


def test_an_unseeded_request_is_not_held_up_by_a_seeded_one(server):
    """A seeded stream of 100,000 tokens under way: a request without a seed sent meanwhile gets
    its whole reply while the seeded one goes on (mlx-lm served the seeded one alone: the other
    waited for its end)."""
    conn, response = open_stream(server, {**SEEDED, "max_tokens": 100_000, "stream": True})
    try:
        started = time.monotonic()
        text, tokens, count = sampled(server, {"prompt": "a", "max_tokens": 5, "temperature": 1.0, "logprobs": 0})
        assert count == 5 and len(tokens) == 5
        assert time.monotonic() - started < 20
        assert still_streaming(response)
    finally:
        conn.close()
