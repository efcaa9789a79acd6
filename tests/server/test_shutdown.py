"""SIGTERM drains: the listening socket closes at once, an open stream still runs to [DONE], exit status 0."""
from __future__ import annotations

import json
import signal
import time

import httpx

from tests.server.helpers import STOP_TIMEOUT_S, launch

NUM_TOKENS = 64                 # seconds of decoding on a CPU: still streaming when the socket closes


def refused_within(url: str, timeout_s: float) -> bool:
    """True once a new connection is refused (the server stopped listening) within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
        except httpx.ConnectError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_lets_an_open_stream_finish_then_exits_0():
    with launch(["--dtype", "float32", "--kv-cache-bytes", "32MiB", "--shutdown-timeout", "60"]) as running:
        body = {"prompt": "Once upon a time", "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            running.process.send_signal(signal.SIGTERM)
            assert refused_within(running.url, 5)
            events = [first] + [line for line in lines if line.startswith("data: ")]
        assert running.process.wait(timeout=STOP_TIMEOUT_S) == 0
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(event[len("data: "):]) for event in events[:-1]]
        assert not any("error" in chunk for chunk in chunks)
        assert chunks[-1]["usage"]["completion_tokens"] == NUM_TOKENS
        assert "Traceback" not in running.log()
