"""`xlstm-metal serve`: more bad requests (stream_options, logit_bias keys, methods a path does
not take, sampling values outside OpenAI's ranges) and a long cached prompt that must not stall
later requests. Not repeated from the other test_serve files."""

import http.client
import json
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


def raw_request(server, method, path, body=None):
    """(status, headers, parsed JSON body or None) of one request over a fresh connection."""
    conn = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=20)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"} if body is not None else {})
        response = conn.getresponse()
        data = response.read()
        return response.status, response.headers, json.loads(data) if data else None
    finally:
        conn.close()


POST_ALLOW, GET_ALLOW = "POST, OPTIONS", "GET, HEAD, OPTIONS"


@pytest.mark.parametrize("method, path, allow", [
    # http.server answered 501 "Unsupported method" to these, whatever the path.
    *((method, path, POST_ALLOW) for method in ("PUT", "DELETE", "PATCH")
      for path in ("/v1/chat/completions", "/v1/completions", "/chat/completions?api-version=1")),
    *((method, path, GET_ALLOW) for method in ("PUT", "DELETE", "PATCH")
      for path in ("/v1/models", "/v1/models/some-model", "/health", "/", "/chat?x=1")),
    ("TRACE", "/v1/completions", POST_ALLOW),
    ("BREW", "/health", GET_ALLOW),
    # A GET path's POST and a POST path's GET were 404s, as if the path did not exist.
    ("POST", "/v1/models", GET_ALLOW),
    ("POST", "/health", GET_ALLOW),
    ("POST", "/", GET_ALLOW),
    ("GET", "/v1/chat/completions", POST_ALLOW),
    ("GET", "/v1/completions?x=1", POST_ALLOW),
])
def test_a_method_a_path_does_not_take_gets_a_405(server, method, path, allow):
    status, headers, answer = raw_request(server, method, path, b"{}" if method != "GET" else None)
    assert status == 405 and headers["Allow"] == allow, (status, dict(headers), answer)
    message = error_message(status, answer, None)
    assert method in message and path.split("?")[0] in message and allow in message, message
    assert headers["Content-Type"] == "application/json" and int(headers["Content-Length"]) == len(json.dumps(answer))
    assert headers["Access-Control-Allow-Origin"] == "*"  # a browser client can read it


def test_head_on_a_post_path_is_a_405_without_a_body(server):
    status, headers, answer = raw_request(server, "HEAD", "/v1/chat/completions")
    assert (status, headers["Allow"], answer) == (405, POST_ALLOW, None), dict(headers)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "BREW"])
@pytest.mark.parametrize("path", ["/nope", "/v1/nope", "/v1/chat"])
def test_an_unsupported_method_on_an_unknown_path_is_a_404(server, method, path):
    status, headers, answer = raw_request(server, method, path, b"{}")
    assert status == 404 and "Allow" not in headers, (status, dict(headers))
    assert f"not found: {path}" in error_message(status, answer, None)
    assert raw_request(server, "GET", path)[0] == raw_request(server, "POST", path, b"{}")[0] == 404


def test_options_lists_a_paths_methods_and_the_server_keeps_serving(server):
    for path, allow in (("/v1/chat/completions", POST_ALLOW), ("/v1/completions", POST_ALLOW),
                        ("/v1/models", GET_ALLOW), ("/health?x=1", GET_ALLOW), ("/", GET_ALLOW)):
        status, headers, answer = raw_request(server, "OPTIONS", path)
        assert (status, headers["Allow"], answer) == (204, allow, None), (path, dict(headers))
        assert headers["Access-Control-Allow-Methods"] == "*"  # mlx-lm's CORS preflight answer stands
    status, headers, _ = raw_request(server, "OPTIONS", "/nope")  # CORS preflight as before, nothing to list
    assert status == 204 and "Allow" not in headers
    status, answer = post(server.url, "/v1/completions", TEXT, timeout=30)
    assert status == 200, answer


@pytest.mark.parametrize("name, value, limits", [
    # Applied as given: a temperature of 50 or a penalty of -100 (OpenAI's API refuses them).
    ("temperature", 2.5, "[0, 2]"),
    ("temperature", 3, "[0, 2]"),
    ("temperature", 50.0, "[0, 2]"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("presence_penalty", -2.01, "[-2, 2]"),
    ("presence_penalty", -100, "[-2, 2]"),
    ("frequency_penalty", 2.1, "[-2, 2]"),
    ("frequency_penalty", -3, "[-2, 2]"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_out_of_range_sampling_values_get_a_400(server, path, name, value, limits):
    body = TEXT if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for stream in (False, True):
        status, answer = post(server.url, path, {**body, "stream": stream, name: value}, timeout=30)
        assert status == 400, answer
        assert error_message(status, answer, name) == f"{name} must be in {limits}, got {value}"


def test_sampling_values_at_the_range_edges_still_generate(server):
    """temperature 0 and 2, the penalties at -2 and 2 are OpenAI's own bounds: accepted (and the
    reply generated); a hair beyond them is refused."""
    for edges in ({"temperature": 2, "presence_penalty": -2, "frequency_penalty": 2, "seed": 1},
                  {"temperature": 2.0, "presence_penalty": 2.0, "frequency_penalty": -2.0, "top_p": 1, "seed": 2},
                  {"temperature": 0, "presence_penalty": 2, "frequency_penalty": -2, "top_p": 0}):
        for path, body in (("/v1/completions", {"prompt": "the cat", "max_tokens": 4}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})):
            status, answer = post(server.url, path, {**body, **edges}, timeout=30)
            assert status == 200 and answer["usage"]["completion_tokens"] == 4, (edges, answer)
            assert answer["choices"][0]["finish_reason"] == "length", answer
    for name, value in (("temperature", 2.0001), ("presence_penalty", -2.0001), ("frequency_penalty", 2.0001)):
        status, answer = post(server.url, "/v1/completions", {**TEXT, name: value}, timeout=30)
        assert status == 400 and f"got {value}" in error_message(status, answer, name), answer
