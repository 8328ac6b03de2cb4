"""`xlstm-metal serve` on 127.0.0.1: plain, concurrent and streaming requests against mlx-lm's
stream_generate, bad requests, a client that disconnects mid-stream, the CLI; and
`xlstm-metal mlx-lm`. A tiny random model in a temp dir; nothing downloads."""

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import tiny_model
from test_tokenizer import train_tiny_tokenizer

from xlstm_metal import save_model

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm import stream_generate  # noqa: E402

from xlstm_metal.mlx_lm_model import ModelLarge  # noqa: E402
from xlstm_metal.serve import make_server, server_args  # noqa: E402

PROMPTS = ["the cat sat on", "hello there my good friend, how", "a", "def f(x):\n    return"]


def write_checkpoint(path):
    """A tiny xLSTM-Large with a BPE tokenizer and no EOS: replies run to max_tokens."""
    tok = train_tiny_tokenizer()
    return save_model(tiny_model(5, vocab_size=tok.get_vocab_size(), eos_token_id=None), path, tokenizer=tok)


@contextlib.contextmanager
def serving_tiny(tmp_path_factory, name: str):
    """A server of a fresh write_checkpoint() on a free port (a test module's own)."""
    np.random.seed(0)
    ckpt = write_checkpoint(tmp_path_factory.mktemp(name) / "ckpt")
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        yield srv


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt")


@pytest.fixture(scope="module")
def server(ckpt):
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(ckpt):
    return mlx_lm.load(str(ckpt), trust_remote_code=True)


def post(url, path, body, timeout=60):
    """(status, parsed JSON or text) of a POST; ``body`` bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def error_message(status, answer, param=...):
    """The message of an error answer, after checking its OpenAI shape: type by status, and
    ``param`` when given."""
    assert isinstance(answer, dict) and set(answer) == {"error"}, (status, answer)
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), error
    assert error["type"] == ("invalid_request_error" if 400 <= status < 500 else "server_error"), (status, error)
    assert param is ... or error["param"] == param, (param, error)
    return error["message"]


def expected_text(reference, prompt, max_tokens):
    model, tokenizer = reference
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))


def chat_prompt(reference, messages):
    """Token ids of a chat as the server renders it: the checkpoint has no chat template, so the
    server uses ours (BOS first, as the model's config asks)."""
    from xlstm_metal.checkpoint_files import chat_template

    return reference[1].apply_chat_template(messages, chat_template=chat_template(True), add_generation_prompt=True)


def stream_events(url, path, body):
    """The parsed ``data:`` events of an SSE response (until [DONE])."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        for raw in response:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                break
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def test_plain_requests_equal_stream_generate(server, reference):
    status, body = post(server.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0})
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected_text(reference, PROMPTS[0], 20)
    assert body["usage"]["completion_tokens"] == 20
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a cat."}]
    status, body = post(server.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 12})
    assert status == 200
    assert body["choices"][0]["message"]["content"] == expected_text(reference, chat_prompt(reference, messages), 12)
    status, models = post(server.url, "/v1/models", b"{}")  # GET below; POST to it is not an endpoint
    assert status == 405
    with urllib.request.urlopen(server.url + "/v1/models") as response:
        assert json.loads(response.read())["data"][0]["id"].endswith("ckpt")
    with urllib.request.urlopen(server.url + "/health") as response:
        assert json.loads(response.read()) == {"status": "ok"}


def test_streaming_equals_stream_generate(server, reference):
    events = stream_events(server.url, "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 16, "stream": True})
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    prompt = chat_prompt(reference, [{"role": "user", "content": PROMPTS[1]}])
    assert text == expected_text(reference, prompt, 16)
    assert len(events) > 2 and events[-1]["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_are_batched(server, reference, monkeypatch):
    batch_sizes = []
    call = ModelLarge.__call__

    def counting(self, inputs, cache=None):
        batch_sizes.append(inputs.shape[0])
        return call(self, inputs, cache)

    monkeypatch.setattr(ModelLarge, "__call__", counting)
    results = {}

    def ask(prompt):
        results[prompt] = post(server.url, "/v1/completions", {"prompt": prompt, "max_tokens": 48, "temperature": 0})

    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    for prompt in PROMPTS:
        status, body = results[prompt]
        assert status == 200 and body["choices"][0]["text"] == expected_text(reference, prompt, 48), prompt
    assert max(batch_sizes) >= 2  # requests ran together in one batch


BAD_REQUESTS = [  # and the field OpenAI's param names
    ("/v1/completions", b"{not json", "Invalid JSON", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature", "temperature"),
    ("/v1/completions", {"prompt": ["x", 5]}, "prompt must be a string or a list of token ids", "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop", "stop"),
    ("/v1/completions", {"prompt": "x", "model": 5}, "requested_model", "model"),  # mlx-lm's attribute
    ("/v1/chat/completions", {"messages": "hi"}, "messages", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "content", "messages[0].content"),
    ("/v1/chat/completions", {"prompt": "no messages"}, "messages", "messages"),
    ("/v1/chat/completions", [1, 2], "dictionary", None),
    ("/v1/nowhere", {"prompt": "x"}, "not found", None),
]


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, reference):
    """Each in OpenAI's error shape (mlx-lm's checks answered {"error": "..."})."""
    for path, body, words, param in BAD_REQUESTS:
        status, answer = post(server.url, path, body)
        assert 400 <= status < 500, (path, body, status)
        assert words.lower() in error_message(status, answer, param).lower(), (body, answer)
    status, body = post(server.url, "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == expected_text(reference, PROMPTS[2], 8)


HOSTILE_REQUESTS = [  # each reached the generation thread, or got no response, before the handler checked it
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"99999999": 5}}, "vocabulary"),  # segfault
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"-1": 5}}, "vocabulary"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"3": [1]}}, "logit_bias"),  # no response
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {"3": 1e9}}, "-100..100"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "seed": -1}, "seed"),  # no response
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "seed": 2**64}, "seed"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "temperature": NaN}', "finite"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "presence_penalty": Infinity}', "finite"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "boolean"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 0}, "n must be an integer in 1..128"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 2.0}, "n must be an integer"),
    ("/v1/completions", {"prompt": ["x", "y"], "max_tokens": 2, "n": 65}, "130 choices; at most 128"),
    ("/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}', "UTF-8"),  # no response
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}', "Unicode"),  # was a 404
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["\udfff"]}, "Unicode"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": "x"}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": 5},
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "stream_options": {"include_usage": "yes"}}, "stream_options"),
]


def test_hostile_requests_get_4xx_json_and_the_server_keeps_serving(server, reference):
    for path, body, words in HOSTILE_REQUESTS:
        status, answer = post(server.url, path, body, timeout=20)
        assert status == 400, (path, body, status, answer)
        assert words.lower() in error_message(status, answer).lower(), (body, answer)
    host, port = server.httpd.server_address[:2]
    for length, status in (("-1", 400), ("x", 400), (None, 411)):  # mlx-lm read a negative length until EOF: a hang
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.putrequest("POST", "/v1/completions")
        if length is not None:
            conn.putheader("Content-Length", length)
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == status and "Content-Length" in error_message(status, json.loads(response.read()))
        conn.close()
    conn = http.client.HTTPConnection(host, port, timeout=10)  # http.server's 501 (an HTML page): a 405 now
    conn.request("PUT", "/v1/completions", b"{}")
    response = conn.getresponse()
    assert response.status == 405 and "PUT" in error_message(405, json.loads(response.read()), None)
    assert response.getheader("Allow") == "POST, OPTIONS"
    conn.close()
    with urllib.request.urlopen(server.url + "/health") as response:
        assert json.loads(response.read()) == {"status": "ok"}
    status, body = post(server.url, "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == expected_text(reference, PROMPTS[2], 8)


def test_top_k_beyond_the_vocabulary_keeps_every_token(server, reference):
    """MLX's top-k refuses k >= the vocabulary; the batched generation thread died of it and
    every later request got 'generation thread died'."""
    greedy = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    status, body = post(server.url, "/v1/completions", {**greedy, "top_k": 10**6})
    assert status == 200 and body["choices"][0]["text"] == expected_text(reference, PROMPTS[0], 6)
    sampled = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 1.0, "seed": 7}
    texts = [post(server.url, "/v1/completions", {**sampled, "top_k": k})[1]["choices"][0]["text"] for k in (10**6, 0)]
    assert texts[0] == texts[1]
    status, body = post(server.url, "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == expected_text(reference, PROMPTS[2], 8)


def test_stream_options_without_include_usage_and_a_query_string(server):
    """`stream_options: {}` ended the stream without [DONE] (mlx-lm read include_usage with []);
    a query string (Azure-style clients add ?api-version=...) got a 404."""
    request = urllib.request.Request(
        server.url + "/v1/chat/completions?api-version=2024-06-01", headers={"Content-Type": "application/json"},
        data=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
                         "stream_options": {}}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        lines = [raw.decode().strip() for raw in response]
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", lines[-3:]


def test_stop_sequences_end_the_reply_at_the_text(server, reference):
    """OpenAI's stop: the reply ends before the first occurrence of a stop string, whatever tokens
    spell it. mlx-lm matched the string's own tokens, so a string spread over other tokens never
    stopped the reply, and its text filter cut every occurrence out of a max_tokens reply."""
    model, tokenizer = reference
    pieces = [r.text for r in stream_generate(model, tokenizer, PROMPTS[0], max_tokens=40)]
    full = "".join(pieces)
    middle = len(full) // 2
    stop = full[middle - 2:middle + 2]  # four characters around the middle, likely across tokens
    end = full.find(stop)
    tokens = next(i + 1 for i in range(len(pieces)) if len("".join(pieces[:i + 1])) >= end + len(stop))
    for stops in (stop, ["never in this text \u2603", stop]):
        status, body = post(server.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 40, "stop": stops})
        assert status == 200, body
        choice = body["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (full[:end], "stop"), (stop, full)
        assert body["usage"]["completion_tokens"] == tokens
    events = stream_events(server.url, "/v1/completions",
                           {"prompt": PROMPTS[0], "max_tokens": 40, "stop": stop, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == full[:end]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    status, body = post(server.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 40, "stop": "\u2603"})
    assert body["choices"][0] == {"index": 0, "finish_reason": "length", "text": full}


def test_a_disconnecting_stream_frees_its_slot(ckpt):
    """One decode slot: a client that leaves mid-stream must give it back, or the next
    request would wait for the first one's 100,000 tokens."""
    with make_server(server_args(ckpt, port=0, dtype="float32", decode_concurrency=1,
                                 prompt_concurrency=1)).start() as srv:  # mlx-lm decodes max(both) at once
        host, port = srv.httpd.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": PROMPTS[0], "max_tokens": 100_000, "stream": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        received = b""
        while received.count(b"data: ") < 3:
            received += response.read1(4096)
        response.close()  # the client leaves: the socket closes mid-stream
        conn.close()
        started = time.monotonic()
        status, body = post(srv.url, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 5}, timeout=60)
        assert status == 200 and body["usage"]["completion_tokens"] == 5
        assert time.monotonic() - started < 30


def test_penalties_see_the_whole_prompt_after_a_prompt_cache_hit(server, reference, monkeypatch):
    """mlx-lm's single-request path (where it served seeded requests) gave the logits processors
    only the prompt tokens after a prompt-cache hit (1 of 17 here): the cached ones escaped the
    repetition penalty. Every request, seeded or not, now sees the whole prompt."""
    from xlstm_metal import serve

    histories = []
    plain = serve._mlx_make_logits_processors

    def spy(args):  # a processor that records its history, before mlx-lm's own
        def record(tokens, logits):
            histories.append(tokens.tolist())
            return logits
        return [record] + plain(args)

    monkeypatch.setattr(serve, "_mlx_make_logits_processors", spy)
    body = {"max_tokens": 3, "temperature": 0, "repetition_penalty": 1.5}
    for seed in (None, 11):  # unseeded, then seeded (its own sampler)
        prompts, firsts = ["the dog ran to"], []
        for turn in range(2):
            histories.clear()
            status, answer = post(server.url, "/v1/completions", {**body, "prompt": prompts[-1], "seed": seed})
            assert status == 200, answer
            usage = answer["usage"]
            # The first call sees the whole prompt (BOS first), each later one a reply token more.
            assert len(histories[0]) == usage["prompt_tokens"], (seed, turn, usage, histories)
            assert histories[0][1:] == reference[1].encode(prompts[-1], add_special_tokens=False)
            assert all(len(h) == len(histories[0]) + i for i, h in enumerate(histories))
            firsts.append(histories[0])
            prompts.append(prompts[-1] + answer["choices"][0]["text"] + " and")
        assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # the second turn found the first's cache
        assert firsts[1][:len(firsts[0])] == firsts[0]


def test_make_logits_processors_puts_the_cached_head_before_the_history(monkeypatch):
    import mlx.core as mx
    from types import SimpleNamespace

    from xlstm_metal import serve

    seen = []
    plain = serve._mlx_make_logits_processors
    logits = mx.zeros((1, 8))

    def histories_seen(args, histories):
        """What a processor made for ``args`` sees, called with each of ``histories``."""
        monkeypatch.setattr(serve, "_mlx_make_logits_processors",
                            lambda a: [lambda t, lg: seen.append(t.tolist()) or lg])
        processors = serve._make_logits_processors(args)
        monkeypatch.setattr(serve, "_mlx_make_logits_processors", plain)
        seen.clear()
        for h in histories:
            for processor in processors:
                assert processor(mx.array(h, dtype=mx.int32), logits) is logits
        return list(seen)

    for prompt, histories, expected in (
            ([5, 6, 7, 1, 2], [[1, 2], [1, 2, 3]], [[5, 6, 7, 1, 2], [5, 6, 7, 1, 2, 3]]),  # after a hit
            ([5, 6, 7], [[5, 6, 7], [5, 6, 7, 1]], [[5, 6, 7], [5, 6, 7, 1]]),  # whole already
            ([5, 6, 7], [[9, 7]], [[9, 7]])):  # not the prompt's tail: left as it is
        assert histories_seen(SimpleNamespace(prompt_tokens=prompt), histories) == expected
    # With the penalties' context sizes known, the head is no longer than the largest of them:
    # a head of 3 (of the 4 cached), so the last 3 tokens are the whole prompt's.
    args = SimpleNamespace(prompt_tokens=[5, 6, 7, 8, 1, 2], logits=SimpleNamespace(
        repetition_context_size=3, presence_context_size=1, frequency_context_size=None))
    assert histories_seen(args, [[1, 2]]) == [[6, 7, 8, 1, 2]]
    # No prompt recorded (another caller of mlx-lm's function): its processors as they are.
    args = SimpleNamespace(logits=SimpleNamespace(logit_bias=None, repetition_penalty=1.3, repetition_context_size=20,
                                                  presence_penalty=0.0, presence_context_size=20, frequency_penalty=0.0,
                                                  frequency_context_size=20))
    assert len(serve._make_logits_processors(args)) == len(plain(args)) == 1


def test_chat_page_is_served(server):
    with urllib.request.urlopen(server.url + "/") as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
    for element in ('id="prompt"', 'id="send"', 'id="stop"', 'id="new-chat"', 'id="temperature"', 'id="top-p"',
                    'id="max-tokens"', "/v1/chat/completions"):
        assert element in page
    assert "http://" not in page and "https://" not in page  # no CDN: the page is self-contained


def test_serve_cli_refuses_a_missing_model(tmp_path, capsys):
    from xlstm_metal.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_cli_serves_then_stops_on_ctrl_c(ckpt):
    process = subprocess.Popen([sys.executable, "-m", "xlstm_metal", "serve", "--model", str(ckpt), "--port", "0"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        for line in process.stderr:
            if line.startswith("serving on "):
                url = line.split()[2]
                break
        assert url is not None, "the server did not start"
        status, body = post(url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 4})
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()


def test_mlx_lm_command_trusts_only_our_model_file(ckpt, reference, tmp_path, capsys):
    from xlstm_metal.checkpoint_files import MLX_LM_SHIM
    from xlstm_metal.cli import main

    def run(model, *extra):
        return main(["mlx-lm", "generate", "--model", str(model), "--prompt", PROMPTS[0], "--max-tokens", "12",
                     "--temp", "0", *extra])

    assert run(ckpt) == 0  # no --trust-remote-code needed: the model file is ours
    assert expected_text(reference, PROMPTS[0], 12) in capsys.readouterr().out
    other = tmp_path / "other"  # a model file that is not ours still needs the flag
    other.mkdir()
    for f in ckpt.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / MLX_LM_SHIM).write_text((ckpt / MLX_LM_SHIM).read_text() + "\n# changed\n")
    assert run(other) == 2
    assert "trust_remote_code" in capsys.readouterr().err
    assert run(other, "--trust-remote-code") == 0
    capsys.readouterr()
    assert main(["mlx-lm", "convert", "-q"]) == 2
    assert "--hf-path" in capsys.readouterr().err


@pytest.mark.slow
def test_mlx_lm_command_binds_openblas_first(ckpt, reference):
    """As the console script runs it (a fresh interpreter, xlstm_metal.cli first): mlx-lm
    generates, and MLX got OpenBLAS, not the reference BLAS mlx-lm's own entry point leaves."""
    script = ("import sys; from xlstm_metal.cli import main; "
              f"rc = main(['mlx-lm', 'generate', '--model', {str(ckpt)!r}, '--prompt', {PROMPTS[1]!r}, "
              "'--max-tokens', '10', '--temp', '0']); "
              "from xlstm_metal import _blas; print('BLAS', _blas.LOADED, _blas.REASON); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected_text(reference, PROMPTS[1], 10) in done.stdout
    blas = done.stdout.strip().splitlines()[-1]
    if sys.platform.startswith("linux") and not os.environ.get("XLSTM_METAL_NO_OPENBLAS"):
        assert "openblas" in blas.lower() and "imported before" not in blas, blas


def test_mlx_lm_model_type_xlstm_loads_transformers_checkpoints(tmp_path):
    """With the model type registered (as `xlstm-metal mlx-lm` does), a checkpoint written by
    transformers (no model file) loads in mlx-lm and gives transformers' logits."""
    import mlx.core as mx
    import torch
    from mlx_lm.utils import load_model
    from transformers import xLSTMConfig, xLSTMForCausalLM

    from xlstm_metal.cli.mlxlm import register_model_type

    torch.manual_seed(0)
    hf = xLSTMForCausalLM(xLSTMConfig(vocab_size=101, hidden_size=128, num_hidden_layers=2, num_heads=2,
                                      chunk_size=16, autocast_kernel_dtype="float32")).eval()
    hf.save_pretrained(tmp_path / "hf")
    register_model_type()
    model, _ = load_model(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, 101, size=(1, 21))
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    got = np.array(model(mx.array(ids.astype(np.int32))))
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) <= 1e-4


def test_serving_adds_bos_and_a_chat_template_where_the_checkpoint_lacks_them(tmp_path):
    """A checkpoint written elsewhere (a plain tokenizer.json, force_bos_token_insert in the
    config): the server still starts prompts with BOS, as our tokenizer does, and can chat."""
    from xlstm_metal.generation.tokenizer import load_tokenizer
    from xlstm_metal.serve import load_for_serving

    path = write_checkpoint(tmp_path / "ckpt")
    train_tiny_tokenizer().save(str(path / "tokenizer.json"))  # no BOS in its post-processor
    (path / "tokenizer_config.json").unlink()
    assert train_tiny_tokenizer().encode("a cat").ids[0] != 0
    _, tokenizer = load_for_serving(path, dtype="float32")
    assert tokenizer.encode("a cat") == load_tokenizer(path).encode("a cat") and tokenizer.encode("a cat")[0] == 0
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat[0] == 0 and tokenizer.decode(chat[1:]) == "User: hi\nAssistant:"
