"""`xlstm-metal serve`, continued: clients that leave before their reply, failures inside the
generation thread, and request fields the server must honour or refuse (never ignore). A tiny
random model in a temp dir, as in test_serve.py; nothing downloads."""

import http.client
import json
import threading
import time

import pytest
from test_serve import PROMPTS, post, write_checkpoint

pytest.importorskip("mlx_lm")

from xlstm_metal.mlx_lm_model import ModelLarge  # noqa: E402
from xlstm_metal.serve import make_server, server_args  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve_more") / "ckpt")


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
