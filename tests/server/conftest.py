"""Server fixtures: ONE shared real `reprise serve` process per run (default model, float32, 128MiB of
KV, an API key), and clients for it; tests that need other flags start their own with
`helpers.launch`. Prompts come from `fresh_prompt`, whose first token no other prompt of the run
starts with, so the shared cache holds none of it until the test sends it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.server.helpers import launch

API_KEY = "test-key-7f3a"
KV_CACHE_BYTES = 128 * 2**20
BLOCK_SIZE = 16


@dataclass(frozen=True)
class Server:
    url: str                  # http://127.0.0.1:PORT
    num_blocks: int           # the KV pool, computed from the model config: what the server must report
    max_model_len: int


@pytest.fixture(scope="session")
def server(default_model) -> Server:
    flags = ["--dtype", "float32", "--kv-cache-bytes", str(KV_CACHE_BYTES), "--block-size", str(BLOCK_SIZE),
             "--api-key", API_KEY]
    with launch(flags) as running:
        config = default_model.config
        block_bytes = 2 * config.num_hidden_layers * BLOCK_SIZE * config.num_key_value_heads * config.head_dim * 4
        yield Server(running.url, KV_CACHE_BYTES // block_bytes, config.max_position_embeddings)


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def fresh_prompt(default_model):
    """fresh_prompt(num_tokens) -> text that encodes to exactly num_tokens ids, with a first token
    no other fresh prompt of this run starts with."""
    tokenizer = default_model.tokenizer
    words = [i for i in range(256, 12000) if _is_word(tokenizer, i)]
    rng = random.Random(2024)
    firsts = iter(rng.sample(words, len(words)))

    def make(num_tokens: int) -> str:
        ids = [next(firsts)] + [rng.choice(words) for _ in range(num_tokens - 1)]
        text = tokenizer.decode(ids)
        assert tokenizer.encode(text) == ids
        return text
    return make


def _is_word(tokenizer, token_id: int) -> bool:
    text = tokenizer.decode([token_id])
    return (len(text) > 3 and text[0] == " " and text[1:].isascii() and text[1:].isalpha()
            and text[1:].islower() and tokenizer.encode(text) == [token_id])
