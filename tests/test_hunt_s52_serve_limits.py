"""`xlstm-metal serve` as a hostile client drives it: connections that send nothing or less
than their Content-Length, and a request's ``model`` / ``adapters`` naming paths the operator
did not allow. A tiny random model in a temp dir (test_serve's fixtures)."""

import socket
import time

import pytest
from test_serve import PROMPTS, error_message, post
from test_serve import ckpt, server  # noqa: F401  (the fixtures: a tiny checkpoint, a server of it)

pytest.importorskip("mlx_lm")

from xlstm_metal import serve  # noqa: E402
from xlstm_metal.cli import main  # noqa: E402


def _answer(srv, data: bytes, wait: float = 15.0) -> tuple[bytes, float]:
    """What the server sends back on a raw connection after ``data`` (until it closes), and when."""
    host, port = srv.httpd.server_address[:2]
    start, got = time.monotonic(), b""
    with socket.create_connection((host, port)) as conn:
        conn.settimeout(wait)
        conn.sendall(data)
        try:
            while chunk := conn.recv(4096):
                got += chunk
        except TimeoutError:
            got += b"<still open>"
    return got, time.monotonic() - start


def test_a_silent_or_short_client_is_let_go_after_the_request_timeout(server, monkeypatch):
    """A connection that sends nothing, or a Content-Length of 1000 with a 2-byte body, held a
    request thread (and the connection) for ever: the handler had no socket timeout."""
    monkeypatch.setattr(server.generator.cli_args, "request_timeout", 1.0, raising=False)
    got, took = _answer(server, b"")
    assert got == b"" and took < 10, (got, took)
    got, took = _answer(server, b"POST /v1/completions HTTP/1.0\r\nContent-Length: 1000\r\n\r\n{}")
    assert got.startswith(b"HTTP/1.0 408") and b'"invalid_request_error"' in got and took < 10, (got, took)
    status, answer = post(server.url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2})
    assert status == 200, answer


def test_a_request_loads_only_the_models_and_adapters_the_operator_allows(server, ckpt, tmp_path, monkeypatch):
    """mlx-lm's server loads whatever ``model`` names (any directory, ~, ../, a Hugging Face id,
    downloaded) in place of the served model, and ``adapters`` from any directory. With
    allowed_models / allowed_adapters (the CLI's default: none) those are refused before the
    name reaches the file system; the served model's own names still serve."""
    cli_args, provider = server.generator.cli_args, server.generator.model_provider
    loads = []
    original = serve.ModelProvider._load

    def load(self, *key):
        loads.append(key)
        return original(self, *key)

    monkeypatch.setattr(serve.ModelProvider, "_load", load)
    monkeypatch.setattr(cli_args, "allowed_models", [], raising=False)
    monkeypatch.setattr(cli_args, "allowed_adapters", [], raising=False)
    body = {"prompt": PROMPTS[0], "max_tokens": 2}
    for model in ("/etc", "~", "../", str(tmp_path), "some-org/some-model"):
        status, answer = post(server.url, "/v1/completions", {**body, "model": model})
        message = error_message(status, answer, "model")
        assert status == 404 and "not served here" in message and answer["error"]["code"] == "model_not_found", answer
    status, answer = post(server.url, "/v1/completions", {**body, "adapters": "/etc"})
    assert status == 400 and "not allowed" in error_message(status, answer, "adapters"), answer
    assert loads == [] and provider.model_key == provider.key_for("default_model")
    for model in ("default_model", str(ckpt), ckpt.name):
        status, answer = post(server.url, "/v1/completions", {**body, "model": model})
        assert status == 200, (model, answer)
    # Listed: loaded (this one fails: no tokenizer.json), spelled another way too.
    monkeypatch.setattr(cli_args, "allowed_models", [str(tmp_path)])
    status, answer = post(server.url, "/v1/completions", {**body, "model": str(tmp_path) + "/."})
    assert status == 404 and "tokenizer.json" in error_message(status, answer, "model"), answer
    assert len(loads) >= 1


def test_serve_cli_allows_no_other_model_unless_told(ckpt, monkeypatch):
    """The CLI's defaults: no other checkpoint or adapters; * allows any; a timeout of 60 s."""
    seen = []

    def fake_make_server(cli_args):
        seen.append(cli_args)
        raise serve.ServeError("stop here")

    monkeypatch.setattr(serve, "make_server", fake_make_server)
    assert main(["serve", "--model", str(ckpt), "--port", "0"]) == 2
    assert main(["serve", "--model", str(ckpt), "--port", "0", "--allowed-models", "*",
                 "--allowed-adapters", " a , b", "--request-timeout", "5"]) == 2
    assert (seen[0].allowed_models, seen[0].allowed_adapters, seen[0].request_timeout) == ([], [], 60.0)
    assert (seen[1].allowed_models, seen[1].allowed_adapters, seen[1].request_timeout) == (None, ["a", "b"], 5.0)
    assert main(["serve", "--model", str(ckpt), "--port", "0", "--request-timeout", "0"]) == 2
