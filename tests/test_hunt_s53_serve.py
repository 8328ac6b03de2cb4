"""`xlstm-metal serve`, session 53's hunt: a bound on connections and on max_tokens, and defects
found driving the server as a careless client does. A tiny random model (test_serve's fixtures)."""

import socket
import struct
import time

import pytest
from test_serve import PROMPTS, error_message, post
from test_serve import ckpt, server  # noqa: F401  (the fixtures: a tiny checkpoint, a server of it)
from test_hunt_s52_serve_limits import _answer

pytest.importorskip("mlx_lm")

from xlstm_metal import serve  # noqa: E402
from xlstm_metal.cli import main  # noqa: E402


def _live(srv) -> int:
    return sum(t.is_alive() for t in srv.httpd.request_threads)


def test_a_connection_over_max_connections_gets_a_prompt_503(server, monkeypatch):
    """Every connection held a thread, without bound; past max_connections one is refused."""
    monkeypatch.setattr(server.httpd, "max_connections", 2, raising=False)
    address = server.httpd.server_address[:2]
    idle = [socket.create_connection(address) for _ in range(2)]  # connected, sending nothing
    try:
        for _ in range(100):
            if _live(server) == 2:
                break
            time.sleep(0.02)
        start = time.monotonic()
        status, answer = post(server.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2}, timeout=10)
        assert status == 503 and "most connections (2)" in error_message(status, answer), answer
        assert time.monotonic() - start < 5
        with socket.create_connection(address, timeout=10) as conn:
            conn.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            head = conn.recv(4096)
        assert head.startswith(b"HTTP/1.0 503") and b"Retry-After: 1\r\n" in head, head
    finally:
        for conn in idle:
            conn.close()
    for _ in range(250):
        if _live(server) == 0:
            break
        time.sleep(0.02)
    status, answer = post(server.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2})
    assert status == 200, answer


def test_max_tokens_limit_refuses_a_larger_request_and_caps_the_default(server, monkeypatch):
    monkeypatch.setattr(server.generator.cli_args, "max_tokens_limit", 5, raising=False)
    body = {"prompt": PROMPTS[0]}
    for field in ("max_tokens", "max_completion_tokens"):
        status, answer = post(server.url, "/v1/completions", {**body, field: 6})
        message = error_message(status, answer, field)
        assert status == 400 and "at most 5" in message and "got 6" in message, answer
    for extra in ({"max_tokens": 5}, {}):  # left out: the default (512) capped at the limit
        status, answer = post(server.url, "/v1/completions", {**body, **extra})
        assert status == 200 and answer["usage"]["completion_tokens"] == 5, answer


def test_serve_cli_checks_the_limits(ckpt, monkeypatch, capsys):
    seen = []

    def fake_make_server(cli_args):
        seen.append(cli_args)
        raise serve.ServeError("stop here")

    monkeypatch.setattr(serve, "make_server", fake_make_server)
    base = ["serve", "--model", str(ckpt), "--port", "0"]
    assert main(base) == 2 and (seen[0].max_connections, seen[0].max_tokens_limit) == (64, None)
    assert main(base + ["--max-connections", "3", "--max-tokens-limit", "9"]) == 2
    assert (seen[1].max_connections, seen[1].max_tokens_limit) == (3, 9)
    capsys.readouterr()
    for bad, wanted in ((["--max-connections", "0"], "--max-connections must be >= 1"),
                        (["--max-tokens-limit", "-1"], "--max-tokens-limit must be >= 1"),
                        (["--max-tokens", "10", "--max-tokens-limit", "9"], "above --max-tokens-limit 9")):
        assert main(base + bad) == 2 and len(seen) == 2
        assert wanted in capsys.readouterr().err


@pytest.mark.parametrize("lengths", [("+2",), (" 1_0",), ("2", "3")])
def test_a_content_length_that_is_not_one_number_is_refused(server, lengths):
    """int() read "+2" and "1_0" (10: the server then waited for 8 bytes never sent), and of
    two differing headers the first won (a proxy reading the other splits requests elsewhere)."""
    head = "".join(f"Content-Length: {value}\r\n" for value in lengths)
    got, _ = _answer(server, f"POST /v1/completions HTTP/1.0\r\n{head}\r\n{{}}".encode(), wait=5)
    assert got.startswith(b"HTTP/1.0 400") and b"Invalid Content-Length" in got, got


def test_a_client_resetting_its_connection_leaves_no_traceback(server, capfd):
    """A client that reset its connection mid-request (or before an error answer) made the
    server print socketserver's "Exception occurred during processing" and a traceback."""
    capfd.readouterr()
    for data in (b"POST /v1/completions HTTP/1.0\r\nContent-Length: 1000\r\n\r\n{}", b"GET /health HTTP/1.0\r\n"):
        conn = socket.create_connection(server.httpd.server_address[:2])
        conn.sendall(data)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        time.sleep(0.2)  # the server reads what came first
        conn.close()
        for _ in range(250):
            if _live(server) == 0:
                break
            time.sleep(0.02)
    assert "Traceback" not in capfd.readouterr().err


def test_chat_takes_top_logprobs_up_to_openais_20(server):
    """OpenAI's top_logprobs is 0..20; mlx-lm refused above 11 ("must be at most 11")."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True}
    status, answer = post(server.url, "/v1/chat/completions", {**chat, "top_logprobs": 20})
    assert status == 200, answer
    for entry in answer["choices"][0]["logprobs"]["content"]:
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(top) == 20 and top == sorted(top, reverse=True) and entry["logprob"] >= top[-1], entry
    status, answer = post(server.url, "/v1/chat/completions", {**chat, "top_logprobs": 21})
    assert status == 400 and "at most 20" in error_message(status, answer, "top_logprobs"), answer
