"""`xlstm-metal serve`, continued: clients that leave before their reply, failures inside the
generation thread, and request fields the server must honour or refuse (never ignore). A tiny
random model in a temp dir, as in test_serve.py; nothing downloads."""

import http.client
import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_serve import PROMPTS, error_message, expected_text, post, stream_events, write_checkpoint

mlx_lm = pytest.importorskip("mlx_lm")

from xlstm_metal.mlx_lm_model import ModelLarge  # noqa: E402
from xlstm_metal.serve import make_server, server_args  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve_more") / "ckpt")


@pytest.fixture(scope="module")
def reference(ckpt):
    return mlx_lm.load(str(ckpt), trust_remote_code=True)


def health(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def one_slot_server(ckpt):
    """A server that decodes one request at a time (mlx-lm's batch is at least prompt_concurrency wide)."""
    return make_server(server_args(ckpt, port=0, dtype="float32", decode_concurrency=1, prompt_concurrency=1))


def test_a_disconnecting_non_streaming_client_frees_its_slot(ckpt, monkeypatch):
    """A non-streaming client that leaves mid-reply must give its slot back, as a streaming one
    does, or the next request would wait for the first one's 100,000 tokens."""
    decoding = threading.Event()
    call = ModelLarge.__call__

    def watched(self, inputs, cache=None):
        if inputs.shape[1] == 1:  # one token per row: the first request is decoding
            decoding.set()
        return call(self, inputs, cache)

    monkeypatch.setattr(ModelLarge, "__call__", watched)
    with one_slot_server(ckpt).start() as srv:
        host, port = srv.httpd.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPTS[0], "max_tokens": 100_000}),
                     {"Content-Type": "application/json"})
        assert decoding.wait(30)
        conn.close()  # the client leaves before its reply
        started = time.monotonic()
        status, body = post(srv.url, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 5}, timeout=20)
        assert status == 200 and body["usage"]["completion_tokens"] == 5
        assert time.monotonic() - started < 10


class FailingModel:
    """ModelLarge.__call__ that raises once, at its ``n``-th call after :meth:`arm` (the
    generation thread's model call: an unexpected error in mlx-lm's or our generation code)."""

    def __init__(self, monkeypatch):
        self.countdown, self.call = None, ModelLarge.__call__
        model = self

        def call(self, inputs, cache=None):
            if model.countdown is not None:
                model.countdown -= 1
                if model.countdown == 0:
                    model.countdown = None
                    raise RuntimeError("injected failure")
            return model.call(self, inputs, cache)

        monkeypatch.setattr(ModelLarge, "__call__", call)

    def arm(self, n=1):
        self.countdown = n


def assert_server_error(status, body):
    assert status == 500, body
    error = body["error"]
    assert error["type"] == "server_error" and "RuntimeError: injected failure" in error["message"], error
    assert error["param"] is None and error["code"] is None


def test_a_failure_in_the_generation_thread_answers_500_and_the_server_keeps_serving(ckpt, reference, monkeypatch):
    """mlx-lm's batched generation thread died of any exception: the request got no response at
    all, /health said 503 from then on, and every later request got a 404 'generation thread died'."""
    model = FailingModel(monkeypatch)
    plain = {"prompt": PROMPTS[0], "max_tokens": 6}
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        model.arm(1)  # the prompt's prefill, in the batch
        assert_server_error(*post(srv.url, "/v1/completions", plain, timeout=20))
        assert health(srv.url) == (200, {"status": "ok"})
        status, body = post(srv.url, "/v1/completions", plain, timeout=20)
        assert status == 200 and body["choices"][0]["text"] == expected_text(reference, PROMPTS[0], 6)
        model.arm(4)  # mid-reply, streaming: the 200 is out, so an error event ends the stream (OpenAI's way)
        events = stream_events(srv.url, "/v1/completions", {**plain, "stream": True})
        streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
        assert streamed and expected_text(reference, PROMPTS[0], 6).startswith(streamed)
        assert_server_error(500, events[-1])
        model.arm(3)  # a seeded request (in the batch, with its own random key) fails mid-reply
        assert_server_error(*post(srv.url, "/v1/completions", {**plain, "seed": 3}, timeout=20))
        srv.generator._tokenize = lambda *args: 1 / 0  # before the reply starts (was a 404)
        status, body = post(srv.url, "/v1/completions", plain, timeout=20)
        assert status == 500 and "ZeroDivisionError" in body["error"]["message"]
        del srv.generator._tokenize
        status, body = post(srv.url, "/v1/completions", plain, timeout=20)
        assert status == 200 and body["choices"][0]["text"] == expected_text(reference, PROMPTS[0], 6)
        assert health(srv.url) == (200, {"status": "ok"})
        # A failure outside any request would come back at once: the thread stops, and says so.
        srv.generator._next_request = lambda timeout=None: 1 / 0
        deadline = time.monotonic() + 10
        while srv.generator.generation_available() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health(srv.url) == (503, {"status": "unavailable"})
        status, body = post(srv.url, "/v1/completions", plain, timeout=20)
        assert status == 503 and body["error"]["message"].startswith("the generation thread has stopped")


def write_adapters(ckpt, path, seed=0):
    """LoRA adapters for the checkpoint as mlx_lm.lora writes them, with random (non-zero) B
    matrices, so that they change the replies."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(str(ckpt), trust_remote_code=True)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    mx.random.seed(seed)
    weights = {name: mx.random.normal(w.shape) * 0.05 if name.endswith("lora_b") else w
               for name, w in tree_flatten(model.trainable_parameters())}
    path.mkdir()
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_a_requests_adapters_apply_to_its_reply(ckpt, reference, tmp_path):
    """mlx-lm's `adapters` field: LoRA adapters (a directory on the server) for this request. It
    was ignored (mlx-lm took the served model's own adapters in its place)."""
    adapters = write_adapters(ckpt, tmp_path / "adapters")
    tuned = mlx_lm.load(str(ckpt), adapter_path=str(adapters), trust_remote_code=True)
    base_text, tuned_text = (expected_text(m, PROMPTS[0], 8) for m in (reference, tuned))
    assert base_text != tuned_text
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        def ask(**extra):
            return post(srv.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 8, **extra}, timeout=30)

        def text(answer):
            assert answer[0] == 200, answer
            return answer[1]["choices"][0]["text"]

        assert text(ask(adapters=str(adapters))) == tuned_text
        assert text(ask()) == base_text  # the served model again
        answers = {}
        tuned_request = {"adapters": str(adapters)}
        threads = [threading.Thread(target=lambda k=k, extra=extra: answers.update({k: ask(**extra)}))
                   for k, extra in (("tuned", tuned_request), ("base", {}), ("tuned2", tuned_request))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [text(answers[k]) for k in ("tuned", "base", "tuned2")] == [tuned_text, base_text, tuned_text]
        for bad in (str(tmp_path / "missing"), str(ckpt), 5):
            status, body = ask(adapters=bad)
            assert status == 400 and "adapters" in error_message(status, body, "adapters"), (bad, body)
        assert text(ask()) == base_text


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
TEXT = {"prompt": PROMPTS[0], "max_tokens": 4}
IGNORED_FIELDS = [  # each gave a 200 that did not do what it asked
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format="),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice="),
    ("/v1/chat/completions", {**CHAT, "parallel_tool_calls": False}, "parallel_tool_calls="),
    ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions="),
    ("/v1/chat/completions", {**CHAT, "modalities": ["text", "audio"]}, "modalities="),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "high"}, "reasoning_effort="),
    ("/v1/chat/completions", {**CHAT, "verbosity": "low"}, "verbosity="),
    ("/v1/chat/completions", {**CHAT, "store": True}, "store="),
    ("/v1/chat/completions", {**CHAT, "role_mapping": {"user": "Q: "}}, "role_mapping="),
    ("/v1/chat/completions", {**CHAT, "draft_model": "x"}, "draft_model="),  # was a 404 from the generation thread
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {**CHAT, "max_token": 2}, "unrecognized request field: max_token"),
    ("/v1/chat/completions", {**CHAT, "echo": True}, "echo (a field of /v1/completions)"),
    ("/v1/completions", {**TEXT, "suffix": "end"}, "suffix="),
    ("/v1/completions", {**TEXT, "best_of": 3}, "best_of="),
    ("/v1/completions", {**TEXT, "echo": "yes"}, "echo"),
    ("/v1/completions", {**TEXT, "tools": []}, "tools (a field of /v1/chat/completions)"),
]


@pytest.fixture(scope="module")
def server(ckpt):
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        yield srv


def test_fields_the_server_cannot_honour_get_a_400_naming_them(server, reference):
    for path, body, words in IGNORED_FIELDS:
        status, answer = post(server.url, path, body, timeout=20)
        field = next(name for name in body if name not in (CHAT if path.endswith("chat/completions") else TEXT))
        assert status == 400 and words in error_message(status, answer, field), (body, status, answer)
    # Their neutral values ask for nothing: the reply is the plain one.
    neutral = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
               "modalities": ["text"], "store": False, "service_tier": "auto", "user": "u1", "metadata": {"k": "v"},
               "n": 1, "safety_identifier": "s1", "prompt_cache_key": "docs", "verbosity": "medium"}
    plain = post(server.url, "/v1/chat/completions", CHAT)[1]["choices"][0]["message"]
    status, answer = post(server.url, "/v1/chat/completions", {**CHAT, **neutral})
    assert status == 200 and answer["choices"][0]["message"] == plain
    # tool_choice "none": no tools for this reply, so a model without tool calling takes the request.
    status, answer = post(server.url, "/v1/chat/completions", {
        **CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"})
    assert status == 200 and answer["choices"][0]["message"] == plain
    status, answer = post(server.url, "/v1/completions", {**TEXT, "best_of": 1, "suffix": ""})
    assert status == 200 and answer["choices"][0]["text"] == expected_text(reference, PROMPTS[0], 4)


def test_echo_puts_the_prompt_before_the_completion(server, reference):
    """The legacy completions' echo (it was ignored)."""
    completion = expected_text(reference, PROMPTS[0], 4)
    status, answer = post(server.url, "/v1/completions", {**TEXT, "echo": True})
    assert status == 200 and answer["choices"][0]["text"] == PROMPTS[0] + completion
    assert answer["usage"]["completion_tokens"] == 4
    events = stream_events(server.url, "/v1/completions", {**TEXT, "echo": True, "stream": True})
    assert events[0]["choices"][0]["text"].startswith(PROMPTS[0])
    assert "".join(e["choices"][0]["text"] for e in events) == PROMPTS[0] + completion


def prompt_reference(reference, prompt, top):
    """The prompt's tokens (BOS left out) and each one's logprob and ``top`` likeliest (id,
    logprob) after the tokens before it, from one forward pass of the reference model."""
    import mlx.core as mx
    import numpy as np

    model, tokenizer = reference
    tokens = tokenizer.encode(prompt)
    logits = model(mx.array(tokens)[None]).astype(mx.float32)[0]
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    bos = len(tokens) == len(tokenizer.encode(prompt, add_special_tokens=False)) + 1
    rows = []
    for i in range(1 if bos else 0, len(tokens)):
        if i == 0:
            rows.append((tokens[0], None, None))
            continue
        best = np.argsort(-logp[i - 1], kind="stable")[:top]
        rows.append((tokens[i], float(logp[i - 1, tokens[i]]), [(int(j), float(logp[i - 1, j])) for j in best]))
    return rows


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_echo_with_logprobs_scores_the_prompt_first(server, reference, stream):
    """echo with logprobs (what lm-eval's local-completions sends to score a text): the prompt's
    tokens come first in logprobs, each with its logprob and top_logprobs given the tokens before
    it (a BOS is context, not listed; with none the first has null), text_offset counting the
    prompt from 0, then the reply's entries as without echo. It was refused."""
    model, tokenizer = reference
    body = {"prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2}
    if stream:
        events = stream_events(server.url, "/v1/completions", {**body, "stream": True})
        chunks = [e["choices"][0] for e in events if e["choices"]]
        logprobs = {key: sum((c["logprobs"][key] for c in chunks if c.get("logprobs")), [])
                    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        text = "".join(c["text"] for c in chunks)
    else:
        status, answer = post(server.url, "/v1/completions", body)
        assert status == 200, answer
        logprobs, text = answer["choices"][0]["logprobs"], answer["choices"][0]["text"]
    prompt = prompt_reference(reference, PROMPTS[1], 2)
    reply = reference_steps(reference, PROMPTS[1], 3, 2)
    n = len(prompt)
    assert n >= 3 and len(logprobs["tokens"]) == n + 3
    assert text == PROMPTS[1] + expected_text(reference, PROMPTS[1], 3)
    assert logprobs["tokens"][:n] == [tokenizer.decode([t]) for t, _, _ in prompt]
    assert "".join(logprobs["tokens"][:n]) == PROMPTS[1]
    for got, (token, lp, top) in zip(logprobs["token_logprobs"][:n], prompt):
        assert (got is None) == (lp is None) and (lp is None or got == pytest.approx(lp, abs=1e-4))
    for got, (token, lp, top) in zip(logprobs["top_logprobs"][:n], prompt):
        if lp is None:
            assert got is None
            continue
        want = {}
        for t, v in [*top, (token, lp)]:  # of tokens with one text (parts of characters: "\ufffd"), the likelier
            want.setdefault(tokenizer.decode([t]), v)
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-4) for k in want)
    # Offsets: where each prompt token's text starts in the prompt; the reply's continue after it.
    starts = [len("".join(logprobs["tokens"][:i])) for i in range(n)]
    assert logprobs["text_offset"][:n] == starts and logprobs["text_offset"][n] == len(PROMPTS[1])
    assert [tokenizer.decode([t]) for t, _, _ in reply] == logprobs["tokens"][n:]
    assert logprobs["token_logprobs"][n:] == pytest.approx([lp for _, lp, _ in reply], abs=1e-4)
    # logprobs 0: the chosen token alone in each prompt entry's top_logprobs.
    status, answer = post(server.url, "/v1/completions", {**body, "logprobs": 0})
    assert status == 200
    tops = answer["choices"][0]["logprobs"]["top_logprobs"][:n]
    assert all(top is None or len(top) == 1 for top in tops) and any(top for top in tops)


def test_prompt_logprobs_in_pieces_equal_one_forward(reference, monkeypatch):
    """prompt_logprobs: the first token has none (nothing before it), each other its logprob
    after the tokens before it and the likeliest tokens there, best first, as one forward pass
    gives them, also when the prompt runs in pieces of 2 positions (the state carried)."""
    import mlx.core as mx
    import numpy as np

    from xlstm_metal import serve

    model, tokenizer = reference
    tokens = tokenizer.encode(PROMPTS[1], add_special_tokens=False)[:7]
    logits = model(mx.array(tokens)[None]).astype(mx.float32)[0]
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    for piece in (512, 2):
        monkeypatch.setattr(serve, "SCORE_PIECE", piece)
        logprobs, tops = serve.prompt_logprobs(model, tokens, 3)
        assert logprobs[0] is None and tops[0] is None and len(logprobs) == len(tops) == len(tokens)
        for i in range(1, len(tokens)):
            assert logprobs[i] == pytest.approx(float(logp[i - 1, tokens[i]]), abs=1e-5)
            best = np.argsort(-logp[i - 1], kind="stable")[:3]
            assert [t for t, _ in tops[i]] == best.tolist()
            assert [v for _, v in tops[i]] == pytest.approx(logp[i - 1, best].tolist(), abs=1e-5)
    assert serve.prompt_logprobs(model, tokens[:1], 2) == ([None], [None])


def test_echo_with_logprobs_of_another_model_is_refused(server, ckpt, tmp_path):
    """The prompt is scored by the loaded model: a request naming adapters of another is a 400,
    and the server answers the next request."""
    adapters = write_adapters(ckpt, tmp_path / "adapters")
    status, answer = post(server.url, "/v1/completions", {**TEXT, "echo": True, "logprobs": 1,
                                                          "adapters": str(adapters)})
    assert status == 400 and "scores the prompt with the model being served" in error_message(status, answer)
    status, answer = post(server.url, "/v1/completions", TEXT)
    assert status == 200


def reference_steps(reference, prompt, max_tokens, top):
    """(token, its logprob, [(id, logprob) of the ``top`` most likely, best first]) per generated
    token, from mlx-lm's stream_generate on the reference model."""
    import numpy as np

    model, tokenizer = reference
    steps = []
    for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        logprobs = np.array(r.logprobs)
        best = np.argsort(-logprobs, kind="stable")[:top]
        steps.append((r.token, float(logprobs[r.token]), [(int(i), float(logprobs[i])) for i in best]))
    return steps


def token_bytes(reference, token):
    """A token's own bytes in the checkpoint's byte-level BPE (the GPT-2 byte alphabet)."""
    from mlx_lm.tokenizer_utils import _byte_decoder

    return list(bytes(_byte_decoder()[c] for c in reference[1].convert_ids_to_tokens(token)))


def test_chat_logprobs_in_openai_shape_streamed_or_not(server, reference):
    """Chat logprobs: each generated token's text, bytes, logprob and its top_logprobs, best
    first, streamed too. mlx-lm gave ids without text, in place of the chosen token the first of
    an unsorted top list, and nothing when streaming."""
    from test_serve import chat_prompt

    messages = [{"role": "user", "content": PROMPTS[1]}]
    steps = reference_steps(reference, chat_prompt(reference, messages), 8, 3)
    body = {"messages": messages, "max_tokens": 8, "logprobs": True, "top_logprobs": 3}
    status, answer = post(server.url, "/v1/chat/completions", body)
    assert status == 200, answer
    content = answer["choices"][0]["logprobs"]["content"]
    assert [e["id"] for e in content] == [token for token, _, _ in steps]
    for entry, (token, logprob, top) in zip(content, steps):
        assert entry["logprob"] == pytest.approx(logprob, abs=1e-3)
        assert entry["bytes"] == token_bytes(reference, token)
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", errors="replace")
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([lp for _, lp in top], abs=1e-3)
        assert [t["bytes"] for t in entry["top_logprobs"]] == [token_bytes(reference, i) for i, _ in top]
    events = stream_events(server.url, "/v1/chat/completions", {**body, "stream": True})
    streamed = [e for event in events if event["choices"] for e in event["choices"][0]["logprobs"]["content"]]
    assert [(e["id"], e["token"]) for e in streamed] == [(e["id"], e["token"]) for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-5)
    plain = post(server.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "logprobs": True})[1]
    assert [e["top_logprobs"] for e in plain["choices"][0]["logprobs"]["content"]] == [[]] * 8
    status, answer = post(server.url, "/v1/chat/completions", {"messages": messages, "top_logprobs": 2})
    assert status == 400 and "top_logprobs needs logprobs" in error_message(status, answer, "top_logprobs")


def character_ends(raw: bytes) -> list[int]:
    """Where each character of ``raw`` decoded as UTF-8 (errors replaced) ends, in bytes: a whole
    character after its last byte, a U+FFFD after the run of bytes it replaces (the spans of
    Python's decode errors, which "replace" gives one U+FFFD each)."""
    ends, pos = [], 0
    while pos < len(raw):
        try:
            raw[pos:].decode("utf-8")
            stop, bad = len(raw), None
        except UnicodeDecodeError as error:
            stop, bad = pos + error.start, pos + error.end
        for char in raw[pos:stop].decode("utf-8"):
            pos += len(char.encode())
            ends.append(pos)
        if bad is not None:
            ends.append(bad)
            pos = bad
    return ends


def text_offsets(reference, prompt, tokens):
    """OpenAI's text_offset of each reply token: the prompt's length plus the number of the
    reply's characters that end before the token's first byte (a character split across tokens
    counts at the token completing it; a run of bytes that forms none, one U+FFFD, counts
    before the token after it), less the leading space mlx-lm's detokenizer drops from a reply.
    test_serve_text_offset checks scripted replies value by value."""
    pieces = [bytes(token_bytes(reference, token)) for token in tokens]
    raw = b"".join(pieces)
    ends, leading_space = character_ends(raw), raw.decode("utf-8", "replace").startswith(" ")
    offsets, start = [], 0
    for piece in pieces:
        before = sum(end <= start for end in ends)
        offsets.append(len(prompt) + before - (leading_space and before > 0))
        start += len(piece)
    return offsets


def test_completion_logprobs_is_the_number_of_top_tokens(server, reference):
    """The legacy completions' logprobs: an integer N, giving tokens, token_logprobs, the N most
    likely tokens and the chosen one per position, and text offsets from the prompt's start; the
    same streamed. mlx-lm refused an integer (a boolean only, answered in chat's shape)."""
    steps = reference_steps(reference, PROMPTS[0], 6, 2)
    status, answer = post(server.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 6, "logprobs": 2})
    assert status == 200, answer
    logprobs = answer["choices"][0]["logprobs"]

    def text(token):
        return bytes(token_bytes(reference, token)).decode("utf-8", errors="replace")

    assert logprobs["tokens"] == [text(token) for token, _, _ in steps]
    assert logprobs["token_logprobs"] == pytest.approx([lp for _, lp, _ in steps], abs=1e-3)
    for got, (token, logprob, top) in zip(logprobs["top_logprobs"], steps):
        expected = {}
        for i, lp in [*top, (token, logprob)]:
            expected.setdefault(text(i), lp)
        assert got == pytest.approx(expected, abs=1e-3)
    assert logprobs["text_offset"] == text_offsets(reference, PROMPTS[0], [token for token, _, _ in steps])
    events = stream_events(server.url, "/v1/completions",
                           {"prompt": PROMPTS[0], "max_tokens": 6, "logprobs": 2, "stream": True})
    streamed = {key: [v for e in events for v in e["choices"][0]["logprobs"][key]] for key in logprobs}
    assert streamed["tokens"] == logprobs["tokens"] and streamed["text_offset"] == logprobs["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(logprobs["token_logprobs"], abs=1e-5)
    status, answer = post(server.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 6, "logprobs": 0})
    assert [list(top) for top in answer["choices"][0]["logprobs"]["top_logprobs"]] == [[t] for t in logprobs["tokens"]]
    for bad, words in ((6, "logprobs must be an integer in 0..5"), ("2", "logprobs must be an integer")):
        status, answer = post(server.url, "/v1/completions", {"prompt": "x", "logprobs": bad})
        assert status == 400 and words in error_message(status, answer, "logprobs"), answer
    status, answer = post(server.url, "/v1/completions", {"prompt": "x", "logprobs": 1, "top_logprobs": 1})
    assert status == 400 and "top_logprobs" in error_message(status, answer)


def with_generation_config(ckpt, path, config):
    """A copy of ``ckpt`` whose generation_config.json is ``config``."""
    shutil.copytree(ckpt, path)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def reference_tokens(reference, prompt, max_tokens, temp=0.0, top_p=1.0, top_k=0, repetition_penalty=0.0, seed=None):
    """(text, tokens) of mlx-lm's stream_generate with these sampling settings, made as mlx-lm's
    server makes them (a seeded request is served on its own, after mx.random.seed)."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    model, tokenizer = reference
    if seed is not None:
        mx.random.seed(seed)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                     sampler=make_sampler(temp, top_p=top_p, top_k=top_k),
                                     logits_processors=make_logits_processors(None, repetition_penalty, 20)))
    return "".join(r.text for r in responses), [r.token for r in responses]


def completion(url, prompt, **fields):
    """(text, completion tokens) of a /v1/completions request."""
    status, answer = post(url, "/v1/completions", {"prompt": prompt, **fields})
    assert status == 200, answer
    return answer["choices"][0]["text"], answer["usage"]["completion_tokens"]


def test_generation_config_supplies_request_defaults(ckpt, reference, tmp_path):
    """A request's left-out fields come from the served model's generation_config.json, read as
    `generate` reads it (do_sample false: greedy, its repetition_penalty still applies), as vLLM's
    --generation-config auto; the request wins, and so do the server's own settings. A request
    naming another checkpoint gets that one's. The file was ignored: 512 greedy tokens."""
    prompt = PROMPTS[2]  # its greedy reply repeats a token
    greedy = with_generation_config(ckpt, tmp_path / "greedy", {
        "do_sample": False, "temperature": 0.9, "top_k": 3, "repetition_penalty": 1.3, "max_new_tokens": 7})
    sampling = with_generation_config(ckpt, tmp_path / "sampling", {
        "do_sample": True, "temperature": 0.8, "top_k": 5, "top_p": 0.9, "max_new_tokens": 9})
    penalised = reference_tokens(reference, prompt, 7, repetition_penalty=1.3)[0]
    assert penalised != expected_text(reference, prompt, 7)  # the penalty shows
    with make_server(server_args(greedy, port=0, dtype="float32")).start() as srv:
        assert completion(srv.url, prompt) == (penalised, 7)
        sampled = reference_tokens(reference, prompt, 7, temp=0.7, repetition_penalty=1.3, seed=5)[0]
        assert sampled != penalised and completion(srv.url, prompt, temperature=0.7, seed=5) == (sampled, 7)
        plain = expected_text(reference, prompt, 3)
        assert completion(srv.url, prompt, max_tokens=3, repetition_penalty=0) == (plain, 3)
        # Another checkpoint named by the request: its own file (do_sample with its settings).
        sampled = reference_tokens(reference, prompt, 9, temp=0.8, top_k=5, top_p=0.9, seed=3)[0]
        assert completion(srv.url, prompt, model=str(sampling), seed=3) == (sampled, 9)
        greedy_9 = expected_text(reference, prompt, 9)
        assert completion(srv.url, prompt, model=str(sampling), temperature=0) == (greedy_9, 9)
        assert completion(srv.url, prompt) == (penalised, 7)  # the served model again
    # The server's settings win over the file; --generation-config none ignores it.
    with make_server(server_args(sampling, port=0, dtype="float32", temp=0.0, max_tokens=4)).start() as srv:
        assert completion(srv.url, prompt) == (expected_text(reference, prompt, 4), 4)
    with make_server(server_args(greedy, port=0, dtype="float32", generation_config="none")).start() as srv:
        assert completion(srv.url, prompt, max_tokens=6) == (expected_text(reference, prompt, 6), 6)
    # A directory's generation_config.json, for every model.
    with make_server(server_args(ckpt, port=0, dtype="float32", generation_config=str(greedy))).start() as srv:
        assert completion(srv.url, prompt) == (penalised, 7)


def test_generation_config_max_length_and_eos_list(ckpt, reference, tmp_path):
    """max_length is prompt + generated tokens (transformers' meaning; a prompt that fills it is a
    400 naming max_tokens), and every id of an eos_token_id list ends the reply."""
    prompt = PROMPTS[0]
    _, tokens = reference_tokens(reference, prompt, 12)
    prompt_tokens = len(reference[1].encode(prompt))
    stop_at = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    unused = next(t for t in range(reference[1].vocab_size) if t not in tokens)
    path = with_generation_config(ckpt, tmp_path / "eos", {"eos_token_id": [unused, tokens[stop_at]]})
    with make_server(server_args(path, port=0, dtype="float32")).start() as srv:
        status, answer = post(srv.url, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "logprobs": 0})
        assert status == 200 and answer["choices"][0]["finish_reason"] == "stop"
        # The reply is the tokens before the second EOS id (the logprobs list each, not the EOS).
        assert len(answer["choices"][0]["logprobs"]["tokens"]) == stop_at
    (path / "generation_config.json").write_text(json.dumps({"max_length": prompt_tokens + 5}))
    with make_server(server_args(path, port=0, dtype="float32")).start() as srv:
        assert completion(srv.url, prompt) == (expected_text(reference, prompt, 5), 5)
        status, answer = post(srv.url, "/v1/completions", {"prompt": PROMPTS[1]})
        assert status == 400 and "max_length" in error_message(status, answer, "max_tokens")
        assert completion(srv.url, PROMPTS[1], max_tokens=2)[1] == 2
        assert completion(srv.url, prompt, max_tokens=8)[1] == 8  # the request wins over max_length


def test_serve_cli_checks_the_generation_config_setting(ckpt, tmp_path, capsys):
    """--generation-config must name a file; a bad value in the model's file is named at startup."""
    from xlstm_metal.cli import main

    assert main(["serve", "--model", str(ckpt), "--port", "0", "--generation-config", str(tmp_path)]) == 2
    assert "--generation-config must be auto, none or a directory" in capsys.readouterr().err
    bad = with_generation_config(ckpt, tmp_path / "bad", {"do_sample": True, "top_p": 3})
    assert main(["serve", "--model", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--top-p must be in (0, 1], got 3" in err and "generation_config.json" in err
    assert main(["serve", "--model", str(ckpt), "--port", "0", "--top-k", "-1"]) == 2
    assert "--top-k must be >= 0" in capsys.readouterr().err


def test_the_client_is_looked_at_once_per_poll_interval_not_per_token():
    """A request's handler looks at its client (select + recv: two system calls) while no token
    arrives, and at most every POLL_S while tokens do: not once per token of every request."""
    from queue import Queue

    from xlstm_metal.serve import POLL_S, ResponseGenerator

    class Idle:
        _stop = _is_distributed = False  # not closing

        def generation_available(self):
            return True

    rqueue, looks = Queue(), []
    for i in range(500):
        rqueue.put(i)
    rqueue.put(None)
    start = time.monotonic()
    tokens = list(ResponseGenerator._responses(Idle(), rqueue, None, lambda: looks.append(1) or False))
    assert tokens == list(range(500))
    assert len(looks) <= 2 + (time.monotonic() - start) / POLL_S


def test_a_request_naming_a_bad_model_leaves_the_served_one_loaded(ckpt, tmp_path):
    """A request whose model path does not exist, or whose checkpoint's generation_config.json is
    bad, is refused before the served model is unloaded: the next request needs no reload."""
    bad_config = tmp_path / "bad_config"
    shutil.copytree(ckpt, bad_config)
    (bad_config / "generation_config.json").write_text(json.dumps({"max_new_tokens": 0}))
    with make_server(server_args(ckpt, port=0, dtype="float32")).start() as srv:
        provider = srv.generator.model_provider
        served = provider.model
        for model in (str(tmp_path / "missing"), str(bad_config)):
            status, answer = post(srv.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2, "model": model},
                                  timeout=30)
            assert status >= 400 and "error" in answer, answer
            assert provider.model is served  # not unloaded, not reloaded
        status, answer = post(srv.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2})
        assert status == 200 and provider.model is served


def test_a_prompt_of_token_ids_or_a_list_of_one(server, reference):
    """OpenAI's legacy prompt: token ids (used as they are: no BOS put before them) or a list of
    one string or one list of ids, as lm-eval's local-completions sends them; ids outside the
    vocabulary are a 400 naming the prompt (several prompts: the tests below)."""
    model, tokenizer = reference
    ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    assert tokenizer.encode(PROMPTS[0]) != ids  # the server's BOS goes before a text prompt only
    want = "".join(r.text for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=4))
    assert want != expected_text(reference, PROMPTS[0], 4)
    for prompt in (ids, [ids]):
        status, answer = post(server.url, "/v1/completions", {**TEXT, "prompt": prompt, "echo": True})
        assert status == 200, answer
        assert answer["choices"][0]["text"] == tokenizer.decode(ids) + want
        assert answer["usage"]["prompt_tokens"] == len(ids)
    status, answer = post(server.url, "/v1/completions", {**TEXT, "prompt": [PROMPTS[0]]})
    assert status == 200 and answer["choices"][0]["text"] == expected_text(reference, PROMPTS[0], 4)
    for bad, words in (([1, 10**6], "token id 1000000 is not in the vocabulary"), ([], "list of token ids"),
                       ([1.5], "list of token ids"), ([True], "list of token ids")):
        status, answer = post(server.url, "/v1/completions", {**TEXT, "prompt": bad})
        assert status == 400 and words in error_message(status, answer, "prompt"), (bad, answer)


def test_lm_eval_local_completions_scores_through_the_server(server, reference, ckpt):
    """lm-eval's local-completions model (its tokenizer from the checkpoint, token ids sent with
    echo and logprobs, one request each) gets from the server the log-likelihoods and greedy
    flags of one forward pass of the same tokens."""
    import mlx.core as mx
    import numpy as np

    pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as response:
        served = json.loads(response.read())["data"][0]["id"]  # lm-eval's model=, as a user finds it
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=served, tokenizer=str(ckpt),
                             tokenizer_backend="huggingface", max_length=256)
    pairs = [("the quick brown", " fox jumps"), (PROMPTS[1], " over the lazy dog")]
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                               disable_tqdm=True)
    model, tokenizer = reference
    for (context, continuation), (loglikelihood, greedy) in zip(pairs, results):
        head = tokenizer.encode(context, add_special_tokens=False)
        whole = tokenizer.encode(context + continuation, add_special_tokens=False)
        assert whole[:len(head)] == head
        logits = model(mx.array(whole)[None]).astype(mx.float32)[0]
        logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        span = range(len(head), len(whole))
        assert loglikelihood == pytest.approx(sum(logp[i - 1, whole[i]] for i in span), abs=1e-3)
        assert greedy == all(int(np.argmax(logp[i - 1])) == whole[i] for i in span)
        assert loglikelihood < 0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_echo_with_max_tokens_0_scores_the_prompt_alone(server, reference, stream):
    """OpenAI's legacy way to score a text (HELM's): echo with max_tokens 0 returns the prompt as
    the text, with its logprobs where asked (those of the same request with one reply token,
    less that token's), finish_reason "length" and no completion token. mlx-lm refused
    max_tokens 0; without echo it still is refused."""
    body = {"prompt": PROMPTS[1], "temperature": 0, "echo": True, "logprobs": 2}
    status, one = post(server.url, "/v1/completions", {**body, "max_tokens": 1})
    assert status == 200, one
    want = {key: value[:-1] for key, value in one["choices"][0]["logprobs"].items()}
    if stream:
        events = stream_events(server.url, "/v1/completions", {**body, "max_tokens": 0, "stream": True,
                                                               "stream_options": {"include_usage": True}})
        choices = [e["choices"][0] for e in events if e["choices"]]
        assert len(choices) == 1
        choice, usage = choices[0], events[-1]["usage"]
    else:
        status, answer = post(server.url, "/v1/completions", {**body, "max_tokens": 0})
        assert status == 200, answer
        choice, usage = answer["choices"][0], answer["usage"]
    assert choice["text"] == PROMPTS[1] and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == want["tokens"] and choice["logprobs"]["text_offset"] == want["text_offset"]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-5)
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] == one["usage"]["prompt_tokens"]
    # No logprobs asked: the prompt alone, no scoring; token ids as a prompt too.
    model, tokenizer = reference
    ids = tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    status, answer = post(server.url, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True})
    assert status == 200 and answer["choices"][0]["text"] == tokenizer.decode(ids)
    assert answer["choices"][0].get("logprobs") is None and answer["usage"]["prompt_tokens"] == len(ids)
    status, answer = post(server.url, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 0})
    assert status == 400 and "max_tokens" in error_message(status, answer, "max_tokens")


def test_several_prompts_get_one_choice_each_as_each_alone(server, reference):
    """A list of several prompts (OpenAI's legacy batch): choice i is what prompt i gets alone
    (greedy and seeded), usage is the sum; texts and token ids may mix. Before, a 400."""
    model, tokenizer = reference
    ids = tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    prompts = [PROMPTS[0], ids, PROMPTS[1], PROMPTS[2]]
    for fields in ({"temperature": 0}, {"temperature": 0.9, "seed": 7}):
        alone = []
        for prompt in prompts:
            status, answer = post(server.url, "/v1/completions", {"prompt": prompt, "max_tokens": 6, **fields})
            assert status == 200, answer
            alone.append(answer)
        status, answer = post(server.url, "/v1/completions", {"prompt": prompts, "max_tokens": 6, **fields})
        assert status == 200, answer
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in answer["choices"]] == [a["choices"][0]["text"] for a in alone]
        assert [c["finish_reason"] for c in answer["choices"]] == ["length"] * 4
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert answer["usage"][name] == sum(a["usage"][name] for a in alone)
        assert answer["usage"]["completion_tokens"] == 24
    assert len({a["choices"][0]["text"] for a in alone}) > 1  # the choices differ: their order is checked


def test_several_prompts_streamed_and_their_failures(server, reference):
    """Streamed: each choice's chunks as they come, with its index, all of the stream's one id
    (usage null until the last chunk, which sums it); a failing prompt answers the request with a
    400 naming its index."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    events = stream_events(server.url, "/v1/completions", {"prompt": prompts, "max_tokens": 5, "temperature": 0,
                                                            "stream": True, "stream_options": {"include_usage": True}})
    chunks, last = events[:-1], events[-1]
    assert len({e["id"] for e in events}) == 1 and all(e["object"] == "text_completion" for e in events)
    assert all(e["usage"] is None for e in chunks) and len(chunks) > 3
    texts = ["".join(e["choices"][0]["text"] for e in chunks if e["choices"][0]["index"] == i) for i in range(3)]
    assert texts == [expected_text(reference, p, 5) for p in prompts]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 15
    for bad, words in (([PROMPTS[0], [1, 10**6]], "prompt 1: prompt token id 1000000 is not in the vocabulary"),
                       ([PROMPTS[0], 3], "prompt must be a string or a list of token ids"),
                       ([[], PROMPTS[0]], "prompt 0: prompt must be a string")):
        status, answer = post(server.url, "/v1/completions", {"prompt": bad, "max_tokens": 3})
        assert status == 400 and words in error_message(status, answer, "prompt"), (bad, answer)
    status, answer = post(server.url, "/v1/completions", {"prompt": [PROMPTS[0], [10**6]], "max_tokens": 3,
                                                          "stream": True})  # refused before any chunk: a 400
    assert status == 400 and "prompt 1: prompt token id" in error_message(status, answer, "prompt")
    status, answer = post(server.url, "/v1/completions", {"prompt": prompts, "max_tokens": 3,
                                                          "stream_options": {"include_usage": True}})
    assert status == 400 and "only allowed when stream is true" in error_message(status, answer, "stream_options")


def test_lm_eval_local_completions_in_batches_scores_as_one_at_a_time(server, ckpt):
    """lm-eval's local-completions at batch_size 3 sends the prompts of a batch in one request:
    the same log-likelihoods and greedy flags as one request each."""
    pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as response:
        served = json.loads(response.read())["data"][0]["id"]
    pairs = [("the quick brown", " fox jumps"), (PROMPTS[1], " over the lazy dog"), ("a", " b c"), (PROMPTS[3], " x")]
    results = []
    for batch_size in (1, 3):
        lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=served, tokenizer=str(ckpt),
                                 tokenizer_backend="huggingface", max_length=256, batch_size=batch_size)
        results.append(lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                                        disable_tqdm=True))
    one, batched = results
    assert [g for _, g in batched] == [g for _, g in one]
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in one], abs=1e-4)
    assert all(ll < 0 for ll, _ in one)


def test_n_choices_each_sampled_on_its_own(server):
    """``n`` > 1 (was a 400): n choices, each what a request alone gets, choice j with seed + j
    (so seeded choices differ and repeat); greedy ones agree; on /v1/completions with several
    prompts, prompt-major. A chat stream carries each choice whole as a delta."""
    chat = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 6, "temperature": 1.0}
    alone = []
    for seed in (11, 12, 13):
        status, answer = post(server.url, "/v1/chat/completions", {**chat, "seed": seed})
        assert status == 200, answer
        alone.append(answer["choices"][0]["message"]["content"])
    assert len(set(alone)) > 1
    status, answer = post(server.url, "/v1/chat/completions", {**chat, "seed": 11, "n": 3})
    assert status == 200, answer
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in answer["choices"]] == alone
    assert answer["usage"]["completion_tokens"] == 18 and answer["object"] == "chat.completion"
    events = stream_events(server.url, "/v1/chat/completions", {**chat, "seed": 11, "n": 3, "stream": True})
    assert all(e["object"] == "chat.completion.chunk" for e in events) and len({e["id"] for e in events}) == 1
    streamed = {i: [e["choices"][0] for e in events if e["choices"][0]["index"] == i] for i in range(3)}
    for i, text in enumerate(alone):  # token by token: the role first, the finish_reason last
        chunks = streamed[i]
        assert len(chunks) > 2 and chunks[0]["delta"].get("role") == "assistant"
        assert "".join(c["delta"].get("content") or "" for c in chunks) == text
        assert chunks[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in chunks[:-1])
    greedy = {"prompt": [PROMPTS[0], PROMPTS[3]], "max_tokens": 5, "temperature": 0, "n": 2}
    status, answer = post(server.url, "/v1/completions", greedy)
    assert status == 200, answer
    texts = [c["text"] for c in answer["choices"]]
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert texts[0] == texts[1] != texts[2] == texts[3]
    for i, prompt in enumerate(greedy["prompt"]):
        status, one = post(server.url, "/v1/completions", {**greedy, "prompt": prompt, "n": 1})
        assert status == 200 and one["choices"][0]["text"] == texts[2 * i]
