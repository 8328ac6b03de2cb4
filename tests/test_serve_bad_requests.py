"""`xlstm-metal serve` against bad (and unusual but valid) requests: each bad one gets a 4xx in
OpenAI's error shape naming the problem, never a 500, and the server keeps serving. What
tests/test_serve.py and tests/test_serve_more.py already cover is not repeated here."""

import http.client
import json
import time
import urllib.parse

import pytest
from test_serve import error_message, post, serving_tiny

pytest.importorskip("mlx_lm")
from xlstm_metal.serve import MAX_BODY_BYTES  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TEXT = {"prompt": "the cat", "max_tokens": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving_tiny(tmp_path_factory, "bad_requests") as srv:
        yield srv


def assert_still_serving(server):
    status, answer = post(server.url, "/v1/completions", {**TEXT, "temperature": 0}, timeout=30)
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length", answer


def request(server, method, path, body=b"", headers=None):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=20)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def test_null_fields_take_their_defaults(server):
    """OpenAI's fields are nullable (its SDK sends temperature=None as null); mlx-lm refused
    them: "temperature must be of type ('float', 'int')", "stream must be of type bool"."""
    nulls = {"temperature": None, "top_p": None, "stream": None, "max_tokens": None, "max_completion_tokens": None,
             "n": None, "stop": None, "seed": None, "logprobs": None, "model": None, "frequency_penalty": None}
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, **nulls, "max_tokens": 2}, timeout=30)
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant", answer
    status, answer = post(server.url, "/v1/completions", {**TEXT, "temperature": None, "stream": None}, timeout=30)
    assert status == 200, answer
    # An unknown field is refused whatever its value, a null prompt as a missing one.
    status, answer = post(server.url, "/v1/completions", {**TEXT, "max_token": None})
    assert status == 400 and "unrecognized request field: max_token" in error_message(status, answer, "max_token")
    status, answer = post(server.url, "/v1/completions", {**TEXT, "prompt": None})
    assert status == 400 and "prompt must be a string" in error_message(status, answer, "prompt")
    assert_still_serving(server)


@pytest.mark.parametrize("name, extra", [("repetition_context_size", {"repetition_penalty": 1.1}),
                                         ("presence_context_size", {"presence_penalty": 0.5}),
                                         ("frequency_context_size", {"frequency_penalty": 0.5})])
def test_a_huge_context_size_is_refused(server, name, extra):
    """MLX slices take 32-bit indices: the generation thread failed (std::bad_cast, "Slice indices
    must be 32-bit integers"), a 500 for this request and every one in flight with it."""
    for value in (2**63, 10**30):
        status, answer = post(server.url, "/v1/completions", {**TEXT, **extra, name: value}, timeout=30)
        assert status == 400 and "at most 2147483647" in error_message(status, answer, name), answer
    assert_still_serving(server)


def test_a_prompt_the_cache_holds_whole_still_runs(server):
    """A prompt equal to a cached entry (here "" = BOS alone, cached as the prefix of "x") left
    mlx-lm's batch generator nothing to run: "Sequence N has an empty prompt", a 500 and a
    restart of the generation loop."""
    first = post(server.url, "/v1/completions", {"prompt": "", "max_tokens": 3, "temperature": 0}, timeout=30)
    for _ in range(2):
        status, answer = post(server.url, "/v1/completions", {"prompt": "x", "max_tokens": 2}, timeout=30)
        assert status == 200, answer
    again = post(server.url, "/v1/completions", {"prompt": "", "max_tokens": 3, "temperature": 0}, timeout=30)
    assert first[0] == again[0] == 200, again
    assert again[1]["choices"][0]["text"] == first[1]["choices"][0]["text"]
    assert_still_serving(server)


BAD_TOOL_CALLS = [  # mlx-lm parsed these in the generation thread: a 500 with a traceback in the log
    ([{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{bad"}}], "not valid JSON",
     "messages[1].tool_calls[0].function.arguments"),
    ([{"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}], "JSON object",
     "messages[1].tool_calls[0].function.arguments"),
    ("zz", "must be a list", "messages[1].tool_calls"),
    (["zz"], "must be an object", "messages[1].tool_calls[0]"),
]


@pytest.mark.parametrize("tool_calls, words, param", BAD_TOOL_CALLS)
def test_malformed_tool_calls_in_the_history_get_a_400(server, tool_calls, words, param):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": tool_calls},
                {"role": "user", "content": "and?"}]
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, "messages": messages}, timeout=30)
    assert status == 400 and words in error_message(status, answer, param), answer
    assert_still_serving(server)


def test_well_formed_tool_calls_in_the_history_are_fine(server):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
                {"role": "tool", "tool_call_id": "1", "content": "2"}]
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, "messages": messages}, timeout=30)
    assert status == 200, answer


def test_a_huge_content_length_gets_a_413(server):
    """The handler read (allocated) Content-Length bytes at once: 10**12 was a MemoryError
    traceback and no response at all."""
    for length in (10**12, MAX_BODY_BYTES + 1):
        status, answer = request(server, "POST", "/v1/completions", b"{}", {"Content-Length": str(length)})
        assert status == 413 and "at most" in error_message(status, answer, None), answer
    assert_still_serving(server)


def test_models_retrieve_and_paths_with_query_strings(server):
    """/v1/models/<id> answered the whole list for any id (and /v1/modelsXYZ too); /health with a
    query string was a 404."""
    status, listing = request(server, "GET", "/v1/models?limit=5")
    assert status == 200 and listing["object"] == "list" and len(listing["data"]) == 1
    model = listing["data"][0]
    status, answer = request(server, "GET", "/v1/models/" + model["id"].lstrip("/"))  # as the id reads
    status_slash, answer_slash = request(server, "GET", "/v1/models/" + model["id"])
    assert 200 in (status, status_slash) and model in (answer, answer_slash), (answer, answer_slash)
    status, answer = request(server, "GET", "/v1/models/gpt-4")
    assert status == 404 and "gpt-4" in error_message(status, answer, "model") and answer["error"]["code"] == \
        "model_not_found"
    status, answer = request(server, "GET", "/v1/modelsXYZ")
    assert status == 404 and "not found" in error_message(status, answer, None)
    assert request(server, "GET", "/health?probe=1") == (200, {"status": "ok"})
    assert_still_serving(server)


def test_a_models_created_time_stays_put(server):
    """/v1/models' ``created`` (OpenAI: when the model was created) was the time of each request:
    every listing a second apart named another time, and a model retrieved apart from the list
    differed from its entry. It is the time the server took the model up."""
    _, first = request(server, "GET", "/v1/models")
    time.sleep(1.1)
    _, second = request(server, "GET", "/v1/models")
    model = first["data"][0]
    assert second["data"] == [model] and model["created"] <= int(time.time()) - 1
    _, retrieved = request(server, "GET", "/v1/models/" + urllib.parse.quote(model["id"]))
    assert retrieved == model


def test_parameters_named_as_sent_and_ignored_ones_refused(server):
    """An error about max_completion_tokens named max_tokens, a field the client did not send;
    num_draft_tokens was silently ignored (no draft model can be used); an integer
    xtc_probability (0) was refused as not a float."""
    for value, words in (("5", "max_completion_tokens must be of type int"),
                         (0, "max_completion_tokens must be at least 1"),
                         (True, "max_completion_tokens must be a number, not a boolean")):
        body = {"messages": CHAT["messages"], "max_completion_tokens": value}
        status, answer = post(server.url, "/v1/chat/completions", body)
        assert status == 400 and words in error_message(status, answer, "max_completion_tokens"), answer
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, "num_draft_tokens": 5})
    assert status == 400 and "num_draft_tokens=5 is not supported" in error_message(status, answer,
                                                                                      "num_draft_tokens")
    status, answer = post(server.url, "/v1/completions", {**TEXT, "xtc_probability": 0, "xtc_threshold": 0})
    assert status == 200, answer
    assert_still_serving(server)


def test_deeply_nested_json_gets_a_400(server):
    """5,000 nested arrays made Python's JSON decoder raise RecursionError in the handler: the
    client's connection dropped with no response; ~900 levels in chat_template_kwargs failed in
    the template's rendering (a 500)."""
    deep = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b', "max_tokens": 2}'
    status, answer = request(server, "POST", "/v1/completions", deep)
    assert status == 400 and "nests more than 64 levels" in answer["error"]["message"], answer
    nested = {}
    for _ in range(900):
        nested = {"a": nested}
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, "chat_template_kwargs": nested})
    assert status == 400 and "nests more than 64 levels" in error_message(status, answer), answer
    # A body of 64 levels is served (an unused template variable nested 62 deep).
    nested = []
    for _ in range(61):
        nested = [nested]
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"x": nested}},
                          timeout=30)
    assert status == 200, answer
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"x": [nested]}})
    assert status == 400 and "nests more than 64 levels" in error_message(status, answer), answer
    assert_still_serving(server)


@pytest.mark.parametrize("key", ["tokenize", "tools", "conversation", "messages", "add_generation_prompt"])
def test_chat_template_kwargs_may_not_set_the_templates_own_arguments(server, key):
    """These keys clashed with the template call's own ("got multiple values for keyword
    argument"): a 500, plain and streamed."""
    for stream in (False, True):
        status, answer = post(server.url, "/v1/chat/completions",
                              {**CHAT, "stream": stream, "chat_template_kwargs": {key: False, "enable_thinking": False}})
        message = error_message(status, answer)
        assert status == 400 and f"must not set {key}" in message, answer
    # A template variable of the template's own is still fine.
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"enable_thinking": False}},
                          timeout=30)
    assert status == 200, answer


def test_logprobs_stop_and_token_limits_are_checked_at_both_ends(server):
    """mlx-lm let these through: top_logprobs -1 (its own "none"), an empty stop string (stopped
    nowhere: silently ignored), a max_tokens beyond 2**31 - 1 (generated until the client gave
    up), and max_tokens beside a different max_completion_tokens (the second won silently)."""
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": -1})
    assert status == 400 and "top_logprobs must be an integer >= 0" in error_message(status, answer, "top_logprobs")
    for stop in ("", ["x", ""]):
        status, answer = post(server.url, "/v1/completions", {**TEXT, "stop": stop})
        assert status == 400 and "stop strings must not be empty" in error_message(status, answer, "stop"), answer
    for name in ("max_tokens", "max_completion_tokens"):
        body = {**CHAT, name: 10**30} if name == "max_tokens" else {"messages": CHAT["messages"], name: 2**31}
        status, answer = post(server.url, "/v1/chat/completions", body)
        assert status == 400 and f"{name} must be at most 2147483647" in error_message(status, answer, name), answer
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, "max_completion_tokens": 5})
    assert status == 400 and "max_tokens (2) and max_completion_tokens (5) differ" in \
        error_message(status, answer, "max_tokens"), answer
    # The same value under both names is one request of that many tokens.
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, "max_completion_tokens": 2, "temperature": 0},
                          timeout=30)
    assert status == 200 and answer["usage"]["completion_tokens"] <= 2, answer
    status, answer = post(server.url, "/v1/chat/completions",
                          {**CHAT, "logprobs": True, "top_logprobs": 0, "temperature": 0}, timeout=30)
    assert status == 200 and answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == [], answer
    assert_still_serving(server)
