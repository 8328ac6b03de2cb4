"""`xlstm-metal serve`, session 53's hunt (test_serve's tiny model and server)."""

import socket
import struct
import time

import pytest
from test_hunt_s52_serve_limits import _answer
from test_serve import PROMPTS, error_message, post
from test_serve import ckpt, server  # noqa: F401

pytest.importorskip("mlx_lm")

from xlstm_metal import serve  # noqa: E402
from xlstm_metal.cli import main  # noqa: E402

BODY = {"prompt": PROMPTS[0], "max_tokens": 2}


def _400(srv, body, param=..., path="/v1/completions") -> str:
    status, answer = post(srv.url, path, body)
    assert status == 400, answer
    return error_message(status, answer, param)


def _wait_live(srv, n: int) -> None:
    for _ in range(250):
        if sum(t.is_alive() for t in srv.httpd.request_threads) == n:
            return
        time.sleep(0.02)


def test_a_connection_over_max_connections_gets_a_prompt_503(server, monkeypatch):
    monkeypatch.setattr(server.httpd, "max_connections", 2, raising=False)
    idle = [socket.create_connection(server.httpd.server_address[:2]) for _ in range(2)]
    _wait_live(server, 2)
    start = time.monotonic()
    status, answer = post(server.url, "/v1/completions", BODY, timeout=10)
    assert status == 503 and "most connections (2)" in error_message(status, answer), answer
    got, _ = _answer(server, b"GET /health HTTP/1.0\r\n\r\n")
    assert got.startswith(b"HTTP/1.0 503") and b"Retry-After: 1\r\n" in got and time.monotonic() - start < 5
    for conn in idle:
        conn.close()
    _wait_live(server, 0)
    assert post(server.url, "/v1/completions", BODY)[0] == 200


def test_max_tokens_limit_refuses_a_larger_request_and_caps_the_default(server, monkeypatch):
    monkeypatch.setattr(server.generator.cli_args, "max_tokens_limit", 5, raising=False)
    for field in ("max_tokens", "max_completion_tokens"):
        assert "at most 5" in _400(server, {"prompt": "a", field: 6}, field)
    for body in ({"prompt": "a", "max_tokens": 5}, {"prompt": "a"}):  # left out: 512, capped
        status, answer = post(server.url, "/v1/completions", body)
        assert status == 200 and answer["usage"]["completion_tokens"] == 5, answer


def test_serve_cli_checks_the_limits(ckpt, monkeypatch, capsys):
    seen = []

    def fake_make_server(cli_args):
        seen.append((cli_args.max_connections, cli_args.max_tokens_limit))
        raise serve.ServeError("stop here")

    monkeypatch.setattr(serve, "make_server", fake_make_server)
    base = ["serve", "--model", str(ckpt), "--port", "0"]
    assert main(base) == main(base + ["--max-connections", "3", "--max-tokens-limit", "9"]) == 2
    assert seen == [(64, None), (3, 9)]
    for bad, wanted in ((["--max-connections", "0"], "--max-connections must be >= 1"),
                        (["--max-tokens-limit", "-1"], "--max-tokens-limit must be >= 1"),
                        (["--max-tokens", "10", "--max-tokens-limit", "9"], "above --max-tokens-limit 9")):
        capsys.readouterr()
        assert main(base + bad) == 2 and wanted in capsys.readouterr().err and len(seen) == 2


def test_a_content_length_that_is_not_one_number_is_refused(server):
    """int() read "+2" and "1_0" (10: it waited for bytes never sent); of two differing, the first won."""
    for head in (b"Content-Length: +2\r\n", b"Content-Length: 1_0\r\n", b"Content-Length: 2\r\nContent-Length: 3\r\n"):
        got, _ = _answer(server, b"POST /v1/completions HTTP/1.0\r\n" + head + b"\r\n{}", wait=5)
        assert got.startswith(b"HTTP/1.0 400") and b"Invalid Content-Length" in got, got


def test_a_client_resetting_its_connection_leaves_no_traceback(server, capfd):
    """socketserver printed "Exception occurred during processing" and a traceback."""
    capfd.readouterr()
    for data in (b"POST /v1/completions HTTP/1.0\r\nContent-Length: 1000\r\n\r\n{}", b"GET /health HTTP/1.0\r\n"):
        conn = socket.create_connection(server.httpd.server_address[:2])
        conn.sendall(data)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: a reset
        time.sleep(0.2)  # read by the server first
        conn.close()
        _wait_live(server, 0)
    assert "Traceback" not in capfd.readouterr().err


def test_chat_takes_top_logprobs_up_to_openais_20(server):
    """mlx-lm refused above 11."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True}
    status, answer = post(server.url, "/v1/chat/completions", {**chat, "top_logprobs": 20})
    for entry in answer["choices"][0]["logprobs"]["content"]:
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(top) == 20 and top == sorted(top, reverse=True) and entry["logprob"] >= top[-1], entry
    assert "at most 20" in _400(server, {**chat, "top_logprobs": 21}, "top_logprobs", "/v1/chat/completions")


def test_a_number_of_5000_digits_is_a_400_naming_its_place(server):
    """Past Python's 4300-digit int limit json.loads raised a ValueError: no answer, a traceback."""
    assert "Invalid JSON" in _400(server, b'{"max_tokens": ' + b"9" * 5000 + b"}")
    assert "token ids" in _400(server, {**BODY, "logit_bias": {"1" * 5000: 1}}, "logit_bias")
    call = {"function": {"name": "f", "arguments": '{"a": ' + "9" * 5000 + "}"}}
    chat = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    param = "messages[0].tool_calls[0].function.arguments"
    assert "not valid JSON" in _400(server, chat, param, "/v1/chat/completions")
