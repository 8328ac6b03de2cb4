"""A script that serves in-process (make_server(...).start()) exits cleanly, closing its server or
not: mlx-lm's generation thread (not a daemon) held an unclosed server's exit forever, and a
closed one's exit aborted ("terminate called without an active exception", exit code 134) most
runs: the generation thread's MLX random key (a C++ thread_local) took the GIL in its destructor
after join had returned, and CPython, finalising by then, ended the thread with pthread_exit
inside that noexcept destructor. A tiny random model in a temp dir; nothing downloads."""

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from test_serve import write_checkpoint

pytest.importorskip("mlx_lm")
import mlx.core as mx  # noqa: E402

from xlstm_metal.serve import make_server, server_args  # noqa: E402

#: A seeded, sampled chat request with a repetition penalty (mlx-lm served a seeded request
#: alone, seeding MLX's random key in the generation thread; ours joins the batch with a key of
#: its own).
SEEDED_CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16, "seed": 3,
               "temperature": 0.8, "repetition_penalty": 1.3}

SCRIPT = """
import atexit, json, sys, urllib.request
from xlstm_metal.serve import make_server, server_args

srv = make_server(server_args(sys.argv[1], port=0, dtype="float32")).start()
request = urllib.request.Request(srv.url + "/v1/chat/completions", data=sys.argv[3].encode(),
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as response:
    print("status", response.status, flush=True)


def report():  # atexit's functions run after threading's exit hooks, the server's among them
    alive = [t.name for t in getattr(srv, "threads", list)() if t.is_alive()]
    print(f"closed={getattr(srv, 'closed', None)} alive={alive}", flush=True)


atexit.register(report)
if sys.argv[2] == "close":
    srv.close()
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve_exit") / "ckpt")


def run_script(ckpt, tmp_path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "serve_once.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), str(ckpt), mode, json.dumps(SEEDED_CHAT)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode, runs", [("leave-open", 1), ("close", 2)])
def test_a_script_serving_in_process_exits_cleanly(ckpt, tmp_path, mode, runs):
    """Left open, the server is closed by its exit hook before the interpreter joins its
    threads (it hung there); closed, the exit never aborts (it did 26 runs in 30; two runs
    here). Either way every thread of the server has ended before finalisation."""
    for _ in range(runs):
        done = run_script(ckpt, tmp_path, mode)
        assert "terminate called" not in done.stderr, done.stderr[-2000:]
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert done.stdout.split("\n")[:2] == ["status 200", "closed=True alive=[]"], done.stdout


def test_close_ends_the_servers_threads_and_a_request_in_flight(ckpt, monkeypatch):
    """close() stops a reply in flight at its next token (mlx-lm waited for it to run to
    max_tokens), ends every thread of the server, the generation thread down to its OS thread,
    and the generation thread frees its MLX streams and random key before it ends."""
    released = []
    clear_streams = getattr(mx, "clear_streams", None)  # MLX >= 0.31.2

    def recording_clear_streams():
        released.append(threading.current_thread().name)
        clear_streams()

    if clear_streams is not None:
        monkeypatch.setattr(mx, "clear_streams", recording_clear_streams)
    srv = make_server(server_args(ckpt, port=0, dtype="float32")).start()
    request = urllib.request.Request(srv.url + "/v1/chat/completions", data=json.dumps(SEEDED_CHAT).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
    host, port = srv.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/v1/completions",
                 json.dumps({"prompt": "the cat sat on", "max_tokens": 100_000, "stream": True}),
                 {"Content-Type": "application/json"})
    stream = conn.getresponse()
    assert stream.status == 200
    while not stream.readline().startswith(b"data: "):  # prompt progress (": keepalive") first
        pass
    generation = srv.generator._generation_thread
    started = time.monotonic()
    srv.close()
    assert time.monotonic() - started < 5
    rest = stream.read()  # the stream ends, its last event an error saying why
    conn.close()
    assert rest.count(b"data: ") < 100_000
    assert json.loads(rest.strip().split(b"\n")[-1][len(b"data: "):])["error"]["message"] == (
        "the server closed before this reply was complete")
    assert srv.closed and [t.name for t in srv.threads() if t.is_alive()] == []
    assert {t.name for t in srv.threads()} >= {"xlstm-serve-http", "xlstm-serve-generation", "xlstm-serve-request"}
    if sys.platform.startswith("linux"):
        assert not os.path.exists(f"/proc/self/task/{generation.native_id}")  # its C++ thread_locals are gone
    assert released == (["xlstm-serve-generation"] if clear_streams is not None else [])
    srv.close()  # closing again does nothing


@pytest.mark.parametrize("stream", [False, True])
def test_close_fails_a_seeded_request_in_flight_as_it_does_others(ckpt, stream):
    """mlx-lm served a seeded request alone; close() stopping it made that path end the reply as if
    complete: a 200 with the reply so far and finish_reason "stop" (a client took the cut-off text
    for the whole reply). It is answered as every request is: a 503, or a last error event."""
    srv = make_server(server_args(ckpt, port=0, dtype="float32")).start()
    host, port = srv.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({**SEEDED_CHAT, "max_tokens": 100_000, "stream": stream}),
                 {"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while not any(q.ctx is not None for q in list(srv.generator._taken)):  # the generation thread has it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)  # a few tokens
    srv.close()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    expected = "the server closed before this reply was complete"
    if stream:
        assert response.status == 200
        events = [line[len(b"data: "):] for line in body.split(b"\n") if line.startswith(b"data: ")]
        assert b"[DONE]" not in events
        assert json.loads(events[-1])["error"]["message"] == expected
        assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-1])
    else:
        assert (response.status, json.loads(body)["error"]["message"]) == (503, expected)
