"""`xlstm-metal serve` against good requests, as OpenAI's API documents their answers (what a
standard OpenAI client expects): the chunks of a stream, the usage chunk, ``model``, an empty
reply, ``top_p`` 0, and OpenAI's caching hints. What tests/test_serve.py, test_serve_more.py and
test_serve_bad_requests.py already cover is not repeated here. A tiny random model; nothing
downloads."""

import json
import urllib.request

import numpy as np
import pytest
from test_serve import expected_text, post, stream_events, write_checkpoint

mlx_lm = pytest.importorskip("mlx_lm")
from xlstm_metal.serve import make_server, server_args  # noqa: E402

CHAT = [{"role": "user", "content": "hi"}]
PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    np.random.seed(0)
    return write_checkpoint(tmp_path_factory.mktemp("openai_compat") / "ckpt")


@pytest.fixture(scope="module")
def server(ckpt):
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(ckpt):
    return mlx_lm.load(str(ckpt), trust_remote_code=True)


def served_id(server):
    with urllib.request.urlopen(server.url + "/v1/models", timeout=20) as response:
        return json.loads(response.read())["data"][0]["id"]


def accumulate(acc, delta):
    """The openai SDK's way of adding up a stream's deltas (openai.lib.streaming._deltas): strings
    are concatenated, whatever the key."""
    for key, value in delta.items():
        if acc.get(key) is None:
            acc[key] = value
        elif isinstance(value, str):
            acc[key] += value
    return acc


def test_a_chat_stream_carries_the_role_in_its_first_delta_only(server):
    """OpenAI's chunks: the role in the first delta, then content, then an empty delta with the
    finish_reason. mlx-lm put ``role`` in every delta, and the openai SDK's stream helper
    (``client.chat.completions.stream``), which adds the deltas up, said the message's role
    was "assistantassistantassistant..."."""
    events = stream_events(server.url, "/v1/chat/completions",
                           {"messages": CHAT, "max_tokens": 6, "temperature": 0, "stream": True})
    greedy = post(server.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 6, "temperature": 0})[1]
    reply = greedy["choices"][0]["message"]["content"]
    assert len(events) >= 3 and all(e["object"] == "chat.completion.chunk" for e in events)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant"
    assert [d for d in deltas[1:] if "role" in d] == []
    assert deltas[-1] == {} and events[-1]["choices"][0]["finish_reason"] == "length"
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    message = {}
    for delta in deltas:
        accumulate(message, delta)
    assert message == {"role": "assistant", "content": reply}
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-")


@pytest.mark.parametrize("path, body, obj", [
    ("/v1/chat/completions", {"messages": CHAT}, "chat.completion.chunk"),
    ("/v1/completions", {"prompt": PROMPT}, "text_completion"),
])
def test_the_usage_chunk_is_a_chunk_of_its_stream(server, path, body, obj):
    """``stream_options: {"include_usage": true}``: a last chunk with no choices and the usage,
    of the stream's own object. mlx-lm's said "chat.completion" on both endpoints (the legacy
    completions' chunks are "text_completion")."""
    plain = post(server.url, path, {**body, "max_tokens": 5, "temperature": 0})[1]
    events = stream_events(server.url, path, {**body, "max_tokens": 5, "temperature": 0, "stream": True,
                                              "stream_options": {"include_usage": True}})
    usage = events[-1]
    assert [e["object"] for e in events] == [obj] * len(events)
    assert usage["choices"] == [] and usage["id"] == events[0]["id"]
    counts = {k: usage["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert counts == {k: plain["usage"][k] for k in counts} and counts["completion_tokens"] == 5
    assert counts["total_tokens"] == counts["prompt_tokens"] + 5
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_top_p_zero_keeps_only_the_most_likely_token(server, reference):
    """OpenAI's top_p narrows sampling to the tokens holding that much probability: 0 leaves the
    most likely one. mlx-lm read 0 as "top-p off", and such a request sampled from the whole
    vocabulary."""
    greedy = expected_text(reference, PROMPT, 8)
    for seed in (1, 2, 3):
        status, body = post(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0,
                                                            "top_p": 0, "seed": seed})
        assert status == 200 and body["choices"][0]["text"] == greedy, (seed, body)
    status, body = post(server.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8, "temperature": 1.5,
                                                             "top_p": 0.0, "top_k": 50, "seed": 4})
    plain = post(server.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8, "temperature": 0})[1]
    assert status == 200 and body["choices"][0]["message"] == plain["choices"][0]["message"]


def test_a_response_names_the_served_model_when_the_request_names_none(server):
    """A request without ``model`` was answered with mlx-lm's placeholder "default_model", a
    model /v1/models does not list; a request naming one gets its name back."""
    model_id = served_id(server)
    assert model_id.endswith("ckpt")
    for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": PROMPT})):
        status, answer = post(server.url, path, {**body, "max_tokens": 2})
        assert status == 200 and answer["model"] == model_id, answer
        events = stream_events(server.url, path, {**body, "max_tokens": 2, "stream": True,
                                                  "stream_options": {"include_usage": True}})
        assert [e["model"] for e in events] == [model_id] * len(events)
        status, answer = post(server.url, path, {**body, "max_tokens": 2, "model": "ckpt"})
        assert status == 200 and answer["model"] == "ckpt"


def test_an_empty_chat_reply_is_an_empty_string(server):
    """A reply with no text (here a stop sequence at its very start) has content "", as OpenAI's
    (null only beside tool calls); mlx-lm sent null, and a client's ``content.strip()`` failed."""
    first = post(server.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "temperature": 0})[1]
    stop = first["choices"][0]["message"]["content"][0]
    status, body = post(server.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "temperature": 0,
                                                             "stop": [stop]})
    assert status == 200
    assert body["choices"][0] == {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": ""}}
    events = stream_events(server.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "temperature": 0,
                                                                "stop": stop, "stream": True})
    assert [(e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events] == [
        ({"role": "assistant"}, "stop")]


def test_openai_prompt_caching_hints_are_accepted(server):
    """``prompt_cache_retention`` and ``prompt_cache_options`` (openai SDK fields: how long OpenAI
    keeps a cached prompt, where its cache breakpoints are) change no reply, like
    ``prompt_cache_key``; they were refused as unrecognized fields."""
    plain = {"messages": CHAT, "max_tokens": 5, "temperature": 0}
    expected = post(server.url, "/v1/chat/completions", plain)[1]["choices"][0]["message"]["content"]
    for hints in ({"prompt_cache_retention": "24h"}, {"prompt_cache_options": {"ttl": "30m"}},
                  {"prompt_cache_key": "k", "prompt_cache_retention": "in_memory"}):
        status, body = post(server.url, "/v1/chat/completions", {**plain, **hints})
        assert status == 200 and body["choices"][0]["message"]["content"] == expected, (hints, body)
