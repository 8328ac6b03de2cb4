"""`xlstm-metal serve`, session 52's hunt: defects found driving the server as a client does.
A tiny random model in a temp dir (test_serve's fixtures)."""

import pytest
from test_serve import PROMPTS, error_message, post
from test_serve import ckpt, server  # noqa: F401  (the fixtures: a tiny checkpoint, a server of it)

pytest.importorskip("mlx_lm")

from xlstm_metal.serve import ResponseGenerator  # noqa: E402


def test_echo_logprobs_scores_each_prompt_once_for_its_choices(server, monkeypatch):
    """echo + logprobs with n > 1: every choice carries its prompt's logprobs, those of n=1, and
    the prompt runs through the model once per prompt (it ran once per choice)."""
    calls = []
    scored = ResponseGenerator.score_prompt

    def counting(self, request, *args):
        calls.append(request.prompt)
        return scored(self, request, *args)

    monkeypatch.setattr(ResponseGenerator, "score_prompt", counting)
    body = {"max_tokens": 2, "echo": True, "logprobs": 2, "temperature": 1.0, "seed": 5}
    alone = {}
    for prompt in PROMPTS[:2]:
        status, answer = post(server.url, "/v1/completions", {**body, "prompt": prompt})
        assert status == 200, answer
        alone[prompt] = answer["choices"][0]["logprobs"]
    assert len(calls) == 2
    for extra, prompts in (({"max_tokens": 2}, PROMPTS[:1]), ({"max_tokens": 0}, PROMPTS[:1]),
                           ({"max_tokens": 2}, PROMPTS[:2])):
        calls.clear()
        status, answer = post(server.url, "/v1/completions", {**body, **extra, "prompt": prompts, "n": 3})
        assert status == 200, answer
        assert sorted(calls) == sorted(prompts), (extra, calls)  # one scoring per prompt
        assert len(answer["choices"]) == 3 * len(prompts)
        for choice in answer["choices"]:
            want, got = alone[prompts[choice["index"] // 3]], choice["logprobs"]
            count = len(want["tokens"]) - 2  # the prompt's tokens
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                assert got[key][:count] == want[key][:count], key


@pytest.mark.parametrize("best_of, n, wanted", [(1, 3, "best_of (1) must be at least n (3)"),
                                                (2, 3, "best_of (2) must be at least n (3)"),
                                                (True, 1, "best_of must be an integer")])
def test_best_of_below_n_is_refused(server, best_of, n, wanted):
    """OpenAI refuses best_of < n. best_of 1 with n=3 passed: each choice's request, n left out,
    saw best_of 1; true passed as 1."""
    body = {"prompt": PROMPTS[0], "max_tokens": 2, "n": n, "best_of": best_of}
    status, answer = post(server.url, "/v1/completions", body)
    assert status == 400 and wanted in error_message(status, answer, "best_of"), answer
    status, answer = post(server.url, "/v1/completions", {**body, "best_of": 1, "n": 1})
    assert status == 200 and len(answer["choices"]) == 1, answer


def test_a_model_that_fails_to_load_leaves_the_served_one_loaded(server, tmp_path):
    """A request naming a directory without tokenizer.json got its 404, but the served model
    had been unloaded first: the next echo with max_tokens 0 got a 503 "not loaded yet" (and
    any other request paid a reload)."""
    provider = server.generator.model_provider
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "model": str(tmp_path)}
    status, answer = post(server.url, "/v1/chat/completions", chat)
    assert status == 404 and "tokenizer.json" in error_message(status, answer, "model"), answer
    assert provider.model is not None and provider.model_key == provider.key_for("default_model")
    status, answer = post(server.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 0, "echo": True})
    assert status == 200 and answer["choices"][0]["text"] == PROMPTS[0], answer


def test_echo_alone_for_another_model_is_refused_for_what_it_asked(server, tmp_path):
    """echo with max_tokens 0 and no logprobs, naming another model: refused, as its prompt is
    counted with the served model's tokenizer, but the message said "echo with logprobs"."""
    body = {"prompt": PROMPTS[0], "max_tokens": 0, "echo": True, "model": str(tmp_path)}
    status, answer = post(server.url, "/v1/completions", body)
    message = error_message(status, answer, "echo")
    assert status == 400 and "logprobs" not in message and "max_tokens 0 counts" in message, answer
    status, answer = post(server.url, "/v1/completions", {**body, "logprobs": 0})
    assert status == 400 and "echo with logprobs scores" in error_message(status, answer, "echo"), answer


def test_a_tiny_temperature_takes_the_likeliest_tokens(server):
    """temperature 1e-39 (or 1e-320) is all but greedy; divided into float32 logits it overflowed
    and the reply was drawn at random, a different one per seed."""
    body = {"prompt": PROMPTS[0], "max_tokens": 12}
    greedy = post(server.url, "/v1/completions", {**body, "temperature": 0})[1]["choices"][0]["text"]
    for temperature, seed in ((1e-39, 1), (1e-320, 2), (1e-6, 3)):
        status, answer = post(server.url, "/v1/completions", {**body, "temperature": temperature, "seed": seed})
        assert status == 200 and answer["choices"][0]["text"] == greedy, (temperature, answer)


@pytest.mark.parametrize("field, value", [("user", 5), ("safety_identifier", ["x"]), ("prompt_cache_key", 3),
                                          ("metadata", "x"), ("metadata", {"a": 1})])
def test_fields_that_change_no_reply_take_openais_types(server, field, value):
    """user: 5 or metadata: "x" passed (OpenAI answers a 400); right types still pass."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, answer = post(server.url, "/v1/chat/completions", {**chat, field: value})
    assert status == 400 and "must be" in error_message(status, answer, field), answer
    good = {"a": "b"} if field == "metadata" else "abc"
    status, answer = post(server.url, "/v1/chat/completions", {**chat, field: good})
    assert status == 200, answer


@pytest.mark.slow
def test_a_second_ctrl_c_while_closing_ends_the_server_with_130(tmp_path):
    """Two SIGINTs back to back (a terminal's Ctrl-C under `timeout` sends two): the second one
    raised KeyboardInterrupt inside close() (or, on a loaded machine, in the interpreter's join of
    the threads after it), the interpreter exited with the generation thread
    inside MLX, and C++ aborted ("terminate called without an active exception", exit 134), or it hung."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import repo_env

    # the packaged model (a tiny one closes before the second signal comes)
    process = subprocess.Popen([sys.executable, "-m", "xlstm_metal", "serve", "--port", "0"], cwd=tmp_path,
                               stderr=subprocess.PIPE, text=True, env=repo_env(PYTHONUNBUFFERED="1"))
    try:
        assert any(line.startswith("serving on ") for line in process.stderr), "the server did not start"
        process.send_signal(signal.SIGINT)
        time.sleep(0.03)  # inside close() (back to back, the two could merge into one)
        process.send_signal(signal.SIGINT)
        rc = process.wait(timeout=60)
        rest = process.stderr.read()
        # 130 (our exit), or -SIGINT where the second one came after Python let go of its handlers
        assert rc in (130, -signal.SIGINT) and "terminate called" not in rest, (rc, rest)
    finally:
        if process.poll() is None:
            process.kill()
