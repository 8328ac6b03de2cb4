"""A burst of clients while the accepting thread is slow (socketserver's listen backlog of 5
reset them), HEAD on the GET routes (http.server answered 501), and a killed job whose process
is a zombie (not yet reaped: `top` listed it as running)."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from test_serve import serving_tiny

from xlstm_metal.monitor import read_jobs, send_command
from xlstm_metal.monitor.records import atomic_write_json, record_path

pytest.importorskip("mlx_lm")

BURST = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving_tiny(tmp_path_factory, "queue_head") as srv:
        yield srv


def test_the_listen_backlog_holds_a_burst(server):
    assert server.httpd.request_queue_size >= 128


def test_a_burst_of_connections_while_accepting_stalls_is_served(server):
    """60 clients connect while the accepting thread is held (as generation slowed it): each waits
    in the listen queue, then gets its 200. With a backlog of 5 the kernel dropped (Linux) or
    reset (macOS) the connections beyond the queue."""
    httpd, release = server.httpd, threading.Event()
    accept = httpd.get_request

    def held_accept():
        release.wait(30)
        return accept()

    httpd.get_request = held_accept  # the serving thread's next accept waits for the burst
    sockets = []
    try:
        for _ in range(BURST):
            sockets.append(socket.create_connection(httpd.server_address[:2], timeout=3))
    except OSError:  # a connection the queue had no room for: dropped (Linux) or reset (macOS)
        for sock in sockets:
            sock.close()
        raise
    finally:
        release.set()
        del httpd.get_request
    body = json.dumps({"prompt": "the cat", "max_tokens": 1}).encode()

    def ask(sock: socket.socket) -> bytes:
        with sock:
            sock.settimeout(30)
            sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    with ThreadPoolExecutor(BURST) as pool:
        answers = list(pool.map(ask, sockets))
    failed = [answer[:40] for answer in answers if not answer.startswith(b"HTTP/1.0 200")]
    assert not failed, failed


def raw_answer(server, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """(status, headers but Date, body) as the server sent them: the connection read to its end."""
    with socket.create_connection(server.httpd.server_address[:2], timeout=20) as sock:
        sock.sendall(f"{method} {path} HTTP/1.0\r\nOrigin: http://example.com\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers.pop("Date", None)
    return int(lines[0].split()[1]), headers, body


def test_head_answers_as_get_without_a_body(server):
    conn = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=20)
    conn.request("GET", "/v1/models")
    model_id = json.loads(conn.getresponse().read())["data"][0]["id"]
    conn.close()
    routes = {"/": 200, "/index.html": 200, "/chat?x=1": 200, "/v1/models": 200, f"/v1/models/{model_id}": 200,
              "/v1/models/nope": 404, "/health": 200, "/nope": 404}
    for path, expected in routes.items():
        status, headers, body = raw_answer(server, "GET", path)
        assert status == expected and int(headers["Content-Length"]) == len(body) > 0, (path, status, headers)
        head_status, head_headers, head_body = raw_answer(server, "HEAD", path)
        assert (head_status, head_headers, head_body) == (status, headers, b""), path
    assert raw_answer(server, "HEAD", "/v1/models")[1]["Access-Control-Allow-Origin"] == "*"


def test_a_killed_job_not_yet_reaped_is_not_running(tmp_path):
    """psutil's create_time answers for a zombie: the record of a job killed with SIGKILL stayed
    in `top` until its parent waited for it, and took commands no one would read."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = psutil.Process(proc.pid).create_time()
        atomic_write_json(record_path(proc.pid, tmp_path), {"pid": proc.pid, "command": "generate",
                                                            "process_started": started, "updated": time.time()})
        assert [job["pid"] for job in read_jobs(tmp_path, clean=False)] == [proc.pid]
        os.kill(proc.pid, signal.SIGKILL)  # not waited for: a zombie
        deadline = time.monotonic() + 10
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
        with pytest.raises(ProcessLookupError):
            send_command(proc.pid, "clear_cache", tmp_path)
        assert read_jobs(tmp_path) == []
        assert not record_path(proc.pid, tmp_path).exists()
    finally:
        proc.kill()
        proc.wait()
