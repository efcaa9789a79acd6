"""Connection limits and timeouts against a real server and raw sockets: a client that trickles its
body or its headers is cut off within --read-timeout while others are served, an idle keep-alive
connection is closed after --keep-alive-timeout, and past --max-connections new connections get 503
while the ones already open are served."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.server.helpers import launch, write_tiny_model

READ_TIMEOUT_S, KEEP_ALIVE_S, MAX_CONNECTIONS = 2.0, 1.0, 4
SLACK_S = 1.5                 # scheduling on a busy machine, on top of the timeout itself


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    model = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    with launch([str(model), "--dtype", "float32", "--kv-cache-bytes", "16MiB", "--read-timeout", str(READ_TIMEOUT_S),
                 "--keep-alive-timeout", str(KEEP_ALIVE_S), "--max-connections", str(MAX_CONNECTIONS)]) as running:
        yield running


def connect(running) -> socket.socket:
    host, port = running.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def request(method: str, path: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def served(running) -> bool:
    body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{running.url}/v1/completions", json=body, timeout=30)
    return response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


def test_a_trickled_body_gets_408_within_the_read_timeout_and_others_are_served(running):
    body = json.dumps({"prompt": "Hello", "max_tokens": 1}).encode()
    with connect(running) as sock:
        start = time.monotonic()
        sock.sendall(request("POST", "/v1/completions", body)[:-len(body)] + body[:3])
        sent, closed = 3, False
        while time.monotonic() - start < READ_TIMEOUT_S + SLACK_S + 2:
            if sent == 4:
                assert served(running)        # another client, mid-trickle
            try:
                sock.sendall(body[sent:sent + 1])
                sent += 1
            except OSError:
                closed = True
                break
            time.sleep(0.25)
            sock.settimeout(0.01)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except (BlockingIOError, socket.timeout):
                pass
            finally:
                sock.settimeout(10)
        answer = b"" if closed else read_all(sock)
        elapsed = time.monotonic() - start
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    assert json.loads(payload)["error"]["code"] == "request_timeout"
    assert READ_TIMEOUT_S <= elapsed < READ_TIMEOUT_S + SLACK_S
    assert sent < len(body)
    assert served(running)


def test_trickled_headers_are_cut_off_within_the_read_timeout(running):
    head = request("GET", "/health")
    with connect(running) as sock:
        start = time.monotonic()
        sent = 0
        try:
            while time.monotonic() - start < READ_TIMEOUT_S + SLACK_S + 2:
                sock.sendall(head[sent:sent + 1])
                sent += 1
                time.sleep(0.2)
                if sent == 3:
                    assert served(running)
        except OSError:
            pass
        sock.settimeout(READ_TIMEOUT_S + SLACK_S)
        try:
            assert read_all(sock) == b""
        except ConnectionResetError:
            pass
        elapsed = time.monotonic() - start
    assert sent < len(head) and elapsed < READ_TIMEOUT_S + SLACK_S + 0.5


def test_a_silent_connection_is_closed_within_the_read_timeout(running):
    with connect(running) as sock:
        start = time.monotonic()
        assert read_all(sock) == b""
        assert READ_TIMEOUT_S - 0.1 <= time.monotonic() - start < READ_TIMEOUT_S + SLACK_S


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(running):
    with connect(running) as sock:
        start = time.monotonic()             # the answer comes at once; the idle time starts after it
        sock.sendall(request("GET", "/health"))
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")
        assert KEEP_ALIVE_S - 0.1 <= time.monotonic() - start < KEEP_ALIVE_S + SLACK_S


def test_past_max_connections_new_ones_get_503_and_open_ones_are_served(running):
    held = [connect(running) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        with connect(running) as extra:
            extra.sendall(request("GET", "/health"))
            refused = extra.recv(65536)
        assert refused.startswith(b"HTTP/1.1 503 ")
        time.sleep(0.2)
        for sock in held:                     # each open connection is still served, one by one
            sock.sendall(request("GET", "/health"))
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert served(running)
