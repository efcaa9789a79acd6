"""Tier fixtures: one real redis-server per run (see redis_server.py); each test flushes it."""
from __future__ import annotations

import pytest

from tests.tiers.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    redis_server.client().flushdb()
    return redis_server.url
