"""Session fixtures: the default model is loaded once per run, with the prefix cache on and off; one
redis-server per run for the tiers and router tests."""
from __future__ import annotations

import random

import pytest

from reprise import LLM, SamplingParams
from reprise.chat.grammar import Grammars
from reprise.loader import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=16)
WORDS = ("alpha river stone light number garden window paper music signal harbor engine forest winter "
         "yellow silver morning castle bridge ocean mountain letter story market doctor planet").split()


@pytest.fixture(scope="session")
def default_model():
    """Config and tokenizer of the default model (weights stay unread)."""
    return load_model(None)


@pytest.fixture(scope="session")
def grammars(default_model) -> Grammars:
    """The default tokenizer's grammar engine (its vocabulary is built once per run)."""
    return Grammars(default_model.tokenizer)


@pytest.fixture(scope="session")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_bytes="192MiB")


@pytest.fixture(scope="session")
def llm_cold() -> LLM:
    return LLM(dtype="float32", kv_cache_bytes="192MiB", prefix_cache=False)


def words(seed: int | str, count: int) -> str:
    """Plain text nobody else in the test run uses (so the shared cache holds none of it)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


def prompt_ids(llm: LLM, seed: int | str, num_tokens: int) -> list[int]:
    ids = llm.tokenizer.encode(words(seed, num_tokens))
    assert len(ids) >= num_tokens
    return ids[:num_tokens]


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server per run on a free 127.0.0.1 port (tests/tiers/redis_server.py)."""
    from tests.tiers.redis_server import RedisServer
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, flushed for this test."""
    redis_server.client().flushdb()
    return redis_server.url
