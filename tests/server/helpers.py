"""Starting `reprise serve` processes and reading /metrics in server tests."""
from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20


@dataclass(frozen=True)
class Running:
    url: str                    # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path              # the server's stdout and stderr

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def launch(flags: list[str], subcommand: str = "serve", ready=lambda health: True) -> Iterator[Running]:
    """`reprise SUBCOMMAND FLAGS` (serve, route) on a free 127.0.0.1 port, on entry healthy with a
    /health body that `ready` accepts, stopped on exit. A server runs with --no-compile unless FLAGS
    say --compile."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if subcommand == "serve" and "--compile" not in flags:
        # servers here decode eagerly: the compiled graph costs ~20 s a start, and
        # tests/engine/test_compiled.py covers it
        flags = [*flags, "--no-compile"]
    command = [sys.executable, "-m", "reprise.cli", subcommand, "--port", str(port), *flags]
    with tempfile.TemporaryDirectory() as directory:
        log_path = Path(directory) / f"{subcommand}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        running = Running(url, process, log_path)
        try:
            _wait_healthy(running, subcommand, ready)
            yield running
        finally:
            stop(process)


def stop(process: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit status."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(running: Running, subcommand: str, ready) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            pytest.fail(f"reprise {subcommand} exited with {running.process.returncode}:\n{running.log()[-4000:]}")
        with contextlib.suppress(httpx.TransportError):
            health = httpx.get(f"{running.url}/health", timeout=1)
            if health.status_code == 200 and ready(health.json()):
                return
        time.sleep(0.3)
    pytest.fail(f"reprise {subcommand} was not ready after {START_TIMEOUT_S} s:\n{running.log()[-4000:]}")


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """One sample of /metrics by its exact name and labels (the Prometheus text format)."""
    text = http.get("/metrics").text
    label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    wanted = f"{name}{{{label_text}}}" if labels else name
    for line in text.splitlines():
        if line.split(" ")[0] == wanted:
            return float(line.split(" ")[1])
    raise AssertionError(f"{wanted} is not in /metrics")


def kv_blocks(http: httpx.Client) -> dict[str, float]:
    text = http.get("/metrics").text
    return {state: float(value) for state, value in re.findall(r'^reprise:kv_blocks\{state="(\w+)"\} (\S+)$',
                                                                   text, re.MULTILINE)}


def wait_idle(http: httpx.Client, timeout: float = 15.0) -> dict[str, float]:
    """Polls /metrics until no KV block is used; returns the last kv_blocks reading."""
    deadline = time.monotonic() + timeout
    blocks = kv_blocks(http)
    while blocks["used"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        blocks = kv_blocks(http)
    return blocks


def write_tiny_model(directory: Path) -> Path:
    """A tiny random-weight Llama with the default model's tokenizer (ChatML: <|im_end|> ends a turn),
    for server tests of chat templates the default model does not have (pass --chat-template)."""
    import torch
    import transformers

    from reprise.loader import load_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    (directory / "tokenizer.json").write_text(load_model(None).tokenizer.backend_json())
    (directory / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}')
    return directory
