"""A real `redis-server` for tests: on a free 127.0.0.1 port, no persistence, killed at the end.

Tests never mock Redis. `make test` installs Debian's redis-server when missing; without it the
tests that need one are skipped with that reason.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import pytest
import redis

START_TIMEOUT_S = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process; `kill()` and `start()` again reuse the same port (an outage)."""

    def __init__(self, port: int | None = None, maxmemory: str = "256mb"):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (make test installs it)")
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.process: subprocess.Popen | None = None
        self._directory = tempfile.TemporaryDirectory()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru",
                   "--dir", self._directory.name]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        self.kill()
        self._directory.cleanup()
